"""Where our CPU train step's time goes, per line of the model's source.

Usage: python bench/profile_step.py [--preset tiny|small|shape] [--devices 1|8] [--optim adamw|muon]
                                    [--batch 8] [--seq 128] [--steps 3] [--by line|function|op]
                                    [--top 30] [override ...]

Compiles the step bench/train_speed.py times (same config: float32, MTP off; `--preset shape` is
its dim-256 shape at batch 2 x 256; overrides such as model.scan_unroll=3 are applied last),
runs it, then records `--steps` steps with jax.profiler. Every XLA op the trace shows is matched
to its instruction in the compiled HLO, and the instruction to the innermost frame of its Python
stack that lies in this repository (the HLO's FileNames / FileLocations / StackFrames tables;
frames in site-packages, such as optax's, are used only when no frame of ours is on the stack).
It prints, per source line (or function, or HLO op), the op time per step, its share, the
forward / backward split and the op kinds (dot, reduce_sum, ...).

Op time is the sum of the ops' own durations: ops of one device overlap on the intra-op threads,
and with --devices 8 the eight devices' programs share the machine's cores, so the total exceeds
the step's wall time; a collective's time there includes its wait for the slowest device. Read
it for where work goes, and time changes side by side (train_speed).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":  # the block cache and huge pages (train/host.py), before JAX, as train_speed
    from train.host import tune_malloc

    tune_malloc()

import argparse
import collections
import glob
import gzip
import json
import linecache
import re
import tempfile
import time

from plan.flops import parse_hlo

_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def stack_tables(hlo_text: str):
    """The HLO text's stack tables: ({location id: (file, function, line)}, {frame id: (location
    id, parent frame id)}). A frame whose parent is itself has none."""
    section, files, functions, locations, frames = None, {}, {}, {}, {}
    for line in hlo_text.splitlines():
        if line in _TABLES:
            section = line
            continue
        if section is None or not line.strip():
            section = None
            continue
        key, _, rest = line.partition(" ")
        fields = dict(re.findall(r"(\w+)=(\d+)", rest))
        if section == "FileNames":
            files[int(key)] = rest.strip().strip('"')
        elif section == "FunctionNames":
            functions[int(key)] = rest.strip().strip('"')
        elif section == "FileLocations":
            locations[int(key)] = (files[int(fields["file_name_id"])],
                                   functions[int(fields["function_name_id"])], int(fields["line"]))
        else:
            frames[int(key)] = (int(fields["file_location_id"]), int(fields.get("parent_frame_id", 0)))
    return locations, frames


def instruction_sources(hlo_text: str, root: str = ROOT) -> dict:
    """{instruction name: (file relative to root, function, line, op_name, kind)}: the innermost
    frame of the instruction's stack inside `root` and outside site-packages, else its innermost
    frame (a library's line); ("?", "?", 0, ...) where the instruction has no stack. kind: "dot"
    for a dot or a fusion holding one (a weight gradient's dot is often named after the transpose
    it absorbed), the opcode of a collective (XLA combines the gradients' all-reduces into one,
    named after one of them), else the op name's last primitive. Control flow (while,
    conditional, call) is left out: the trace times the ops of its bodies themselves."""
    locations, frames = stack_tables(hlo_text)
    computations, _ = parse_hlo(hlo_text)
    with_dots = {c for c, instructions in computations.items() if any(i[2] == "dot" for i in instructions)}
    out = {}
    for name, _, opcode, rest in (i for instructions in computations.values() for i in instructions):
        if opcode in ("while", "conditional", "call"):
            continue
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        op_name = op_name.group(1) if op_name else ""
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        chain, fid = [], int(frame.group(1)) if frame else 0
        while fid in frames and len(chain) < 200:
            loc, parent = frames[fid]
            chain.append(locations[loc])
            fid = 0 if parent == fid else parent
        ours = [c for c in chain if c[0].startswith(root + os.sep) and "site-packages" not in c[0]]
        file, function, lineno = (ours or chain or [("?", "?", 0)])[0]
        if opcode == "dot" or (opcode == "fusion" and calls and calls.group(1) in with_dots):
            kind = "dot"
        elif opcode in COLLECTIVES:
            kind = opcode
        else:
            kind = kind_of(op_name)
        out[name] = (os.path.relpath(file, root) if file.startswith(root + os.sep) else file, function,
                     lineno, op_name, kind)
    return out


def op_times(trace_dir: str, names) -> tuple[collections.Counter, collections.Counter]:
    """(total microseconds, executions) per HLO instruction in `names`, from the trace that
    jax.profiler wrote under trace_dir (its newest *.trace.json.gz)."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        events = json.load(f)["traceEvents"]
    us, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            us[e["name"]] += e.get("dur", 0)
            count[e["name"]] += 1
    return us, count


def kind_of(op_name: str) -> str:
    """The op name's last primitive (reduce_sum, add, ...)."""
    return op_name.rsplit("/", 1)[-1][:24] or "?"


def by_source(us: collections.Counter, sources: dict, by: str, steps: int):
    """[(key, ms per step, backward ms per step, {kind: ms per step})], largest first. by: line
    (file:line), function (file:function) or op (the HLO instruction)."""
    total, backward, kinds = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    for name, t in us.items():
        file, function, line, op_name, kind = sources[name]
        key = {"line": f"{file}:{line}", "function": f"{file}:{function}", "op": name}[by]
        ms = t / 1000 / steps
        total[key] += ms
        backward[key] += ms if "transpose(" in op_name else 0.0
        kinds[key][kind] += ms
    return [(k, ms, backward[k], dict(kinds[k])) for k, ms in total.most_common()]


def print_table(rows, top: int, wall_ms: float, root: str = ROOT):
    total = sum(r[1] for r in rows)
    print(f"op time {total:.1f} ms per step (wall {wall_ms:.1f} ms), {len(rows)} sources; top {top}:")
    print(f"{'ms/step':>8} {'share':>6} {'bwd':>6}  {'source':<40} kinds (ms) | code")
    for key, ms, bwd, kinds in rows[:top]:
        file, _, line = key.rpartition(":")
        code = linecache.getline(os.path.join(root, file), int(line)).strip() if line.isdigit() else ""
        top_kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
        print(f"{ms:8.2f} {100 * ms / total:5.1f}% {bwd:6.1f}  {key[-40:]:<40} {top_kinds} | {code[:60]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="a model preset, or `shape` (train_speed's dim-256 shape)")
    ap.add_argument("--devices", type=int, default=1, choices=(1, 8), help="1 device, or fsdp=8 over 8 emulated ones")
    ap.add_argument("--optim", default="adamw", choices=("adamw", "muon"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps recorded (after 3 untimed and 5 timed ones)")
    ap.add_argument("--by", default="line", choices=("line", "function", "op"))
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.scan_unroll=3")
    args = ap.parse_args()

    import train_speed  # reads --devices from sys.argv: sets the emulated device count before JAX starts
    import jax
    import numpy as np

    name, preset, model_overrides, b, s = (train_speed.SHAPE if args.preset == "shape"
                                           else (args.preset, args.preset, [], args.batch, args.seq))
    run_cfg = train_speed.bench_config(preset, [*model_overrides, *args.overrides], b, s, args.optim, 30)
    tokens = np.random.default_rng(0).integers(0, run_cfg.model.vocab_size, (b, s + 1), dtype=np.int32)
    print(f"compiling {name} ({args.optim}, {args.devices} device{'s' if args.devices > 1 else ''}) ...", flush=True)
    compiled, state, batch = train_speed.compile_ours(run_cfg, jax.devices()[:args.devices], tokens)
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(5):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    wall_ms = (time.perf_counter() - t0) / 5 * 1000
    sources = instruction_sources(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        us, _ = op_times(trace_dir, sources)
    print_table(by_source(us, sources, args.by, args.steps), args.top, wall_ms)


if __name__ == "__main__":
    main()
