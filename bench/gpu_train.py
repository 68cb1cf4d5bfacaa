"""Train a ~1B-active DeepSeek-V4 on one accelerator for a few steps: tokens/s and MFU.

Usage: python bench/gpu_train.py [--steps 10] [--warmup 2] [--batch 8] [--seq 4096] [--tiny]
                                 [--set model.moe_impl=batched ...] [--profile 2]

The model: v4-flash's architecture narrowed to dim 2048, 12 layers (2 window, then CSA / HCA
alternating), 16 heads of 512, 32 experts (top-6) of 1408 hidden units: 1.25B active of 4.6B
parameters. bfloat16 compute, float32 parameters, Muon, remat full, the real train step of
`python -m train` (model.moe_impl auto: tokamax or batched on GPU, megablox on TPU). MFU counts
model.flops_per_token x the remat factor against the chip's dense bf16 peak (plan/chips.yaml's
catalogue, by device kind; --peak overrides). --tiny runs a small shape anywhere (how the test
suite checks this script on CPU). The planner's estimate of the run (python -m plan) is printed
next to the compiler's total. --profile N traces N more steps with jax.profiler and prints the
device's busiest kernels (ms per step, calls, the jax op an XLA fusion came from).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = ["model.preset=v4-flash", "model.dim=2048", "model.n_layers=12", "model.n_heads=16",
         "model.q_lora_rank=768", "model.o_groups=4", "model.o_lora_rank=512",
         "model.compress_ratios=[0,0,4,128,4,128,4,128,4,128,4,128]", "model.n_routed_experts=32",
         "model.moe_inter_dim=1408", "model.index_n_heads=16", "model.index_topk=256", "model.n_hash_layers=2",
         # the loss head's float32 logits 1/8 of the vocabulary at a time, as the pod configs
         # (with all of it at once, logits and their gradient took 31.6 GiB on an H200)
         "model.head_chunks=8",
         # plain bf16 (the preset's quantisation-aware training would add its rounding ops)
         "model.quant_matmul=none", "model.quant_experts=none", "model.quant_kv=none", "model.quant_indexer=none"]
# the CPU check of this script: tiny's widths, one CSA layer, no MTP block (a 7 s compile)
TINY = ["model.preset=tiny", "model.n_layers=1", "model.compress_ratios=[4]", "model.n_hash_layers=0",
        "model.n_mtp_layers=0"]
PEAKS = {"h100": "h100", "h200": "h200", "v5p": "v5p", "v6": "v6e", "v5 lite": "v5e", "v4": "v4", "7x": "tpu7x"}
CPU_PEAK = 7.0e10  # this project's 2-core CPU: measured bf16 matmul rate (DESIGN.md)


def peak_flops(device) -> float:
    from plan import CHIPS

    kind = device.device_kind.lower()
    for key, chip in PEAKS.items():
        if key in kind:
            return CHIPS[chip].peak
    return CPU_PEAK if device.platform == "cpu" else float("nan")


def busiest_ops(trace_dir: str) -> tuple[dict, str]:
    """{kernel or op name: [total ns, calls]} over the device planes of the jax.profiler trace
    in trace_dir (their "XLA Ops" lines where there are such, else every line: on an H200 the
    planes hold only their streams' kernels), and the lines it read."""
    from jax.profiler import ProfileData

    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    ops, read = {}, []
    for plane in ProfileData.from_file(path).planes:
        lines = list(plane.lines) if plane.name.startswith("/device:") else []
        for line in [line for line in lines if line.name == "XLA Ops"] or lines:
            read.append(f"{plane.name} {line.name}")
            for ev in line.events:
                op = ops.setdefault(ev.name, [0, 0])
                op[0] += ev.duration_ns
                op[1] += 1
    return ops, "; ".join(read[:4]) + ("; ..." if len(read) > 4 else "")


def hlo_sources(hlo_text: str) -> dict:
    """{kernel name: the jax source op of that HLO instruction} from a compiled module's text
    (XLA:GPU names a fusion's kernel after the instruction, '.' written '_')."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        out[m.group(1).replace(".", "_")] = m.group(2)
    return out


def print_top_ops(trace_dir: str, steps: int, sources: dict, top: int = 30):
    ops, read = busiest_ops(trace_dir)
    if not ops:
        print("the trace holds no device plane (on CPU, read the trace itself: " + trace_dir + ")")
        return
    total = sum(op[0] for op in ops.values())
    print(f"\nbusiest device ops over {steps} traced step(s) ({read}); device busy {total / steps / 1e6:.1f} ms a step; "
          f"the trace: {trace_dir}")
    print("| ms / step | share | calls / step | kernel / op | jax source (library GEMMs have none) |")
    print("|---|---|---|---|---|")
    for name, (ns, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {ns / steps / 1e6:.2f} | {ns / total:.1%} | {calls / steps:g} | {name[:60]} | "
              f"{sources.get(name, '')[-110:]} |")


def planner_estimate(run_cfg, rules, platform: str) -> float:
    """The planner's per-device bytes for this one-device run (plan/memory.py), printed next to
    the compiler's: every GPU run checks the estimate. The grouped matmul traced is the one this
    host runs (auto resolved here: batched on a GPU without tokamax), not the planner's guess
    for a remote target."""
    import dataclasses

    from model.gmm import choose_impl
    from plan import StateLayout, activations, estimate

    model = run_cfg.model.replace(moe_impl=choose_impl(run_cfg.model.moe_impl, platform))
    run_cfg = dataclasses.replace(run_cfg, model=model)
    layout = StateLayout(run_cfg, rules)
    act = activations(run_cfg, layout, platform)
    return estimate(run_cfg, layout, act, {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}).total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (a CPU check of this script)")
    ap.add_argument("--peak", type=float, help="bf16 FLOP/s of the device (default: by device kind)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="trace N more steps and print the device's busiest ops")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override after this script's own (repeatable), e.g. model.moe_impl=batched")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from model import flops_per_token, param_counts
    from parallel import MeshConfig, Rules, make_mesh, sharded
    from plan import REMAT_FLOPS
    from train.config import load_run_config
    from train.setup import setup

    run_cfg = load_run_config(os.path.join(ROOT, "configs/tiny.yaml"), [
        *(TINY if args.tiny else MODEL), "model.dtype=bfloat16", "model.remat=full",
        "mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1", f"data.global_batch={args.batch}",
        f"data.seq_len={args.seq}", f"train.steps={args.warmup + args.steps + 20}", "log.tensorboard=false",
        *args.set])
    cfg, device = run_cfg.model, jax.devices()[0]
    counts = param_counts(cfg)
    print(f"device: {device.device_kind} ({device.platform}); model: {counts['total'] / 1e9:.2f}B parameters, "
          f"{counts['active'] / 1e9:.2f}B active, batch {args.batch} x {args.seq}", flush=True)
    mesh = make_mesh(MeshConfig(data=1), cfg, devices=[device], global_batch=args.batch)
    rules = Rules.of_run(run_cfg)
    state, shardings, step_fn = setup(run_cfg, mesh, rules)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    ones = np.ones((args.batch, args.seq), np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
                            "loss_mask": ones.astype(np.float32)}, NamedSharding(mesh, rules.spec(("batch", None))))
    with sharded(mesh, rules, run_cfg.train.moe_transport, run_cfg.train.capacity_factor):
        t = time.perf_counter()
        step = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None)).lower(state, batch).compile()
        mem = step.memory_analysis()
        if mem is not None:
            print(f"compiled in {time.perf_counter() - t:.1f} s: {mem.argument_size_in_bytes / 2**30:.2f} GiB "
                  f"arguments + {mem.temp_size_in_bytes / 2**30:.2f} GiB temporaries", flush=True)
            compiled = mem.argument_size_in_bytes + mem.temp_size_in_bytes
            planned = planner_estimate(run_cfg, rules, device.platform)
            print(f"planner estimate (python -m plan): {planned / 2**30:.2f} GiB, {planned / compiled - 1:+.0%} "
                  "against the compiled total", flush=True)
        t = time.perf_counter()
        for _ in range(args.warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        print(f"warmed up in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        sec = (time.perf_counter() - t) / args.steps
        if args.profile:
            trace_dir = tempfile.mkdtemp(prefix="gpu_train_trace_")
            with jax.profiler.trace(trace_dir):
                for _ in range(args.profile):
                    state, metrics = step(state, batch)
                jax.block_until_ready(state)
            print_top_ops(trace_dir, args.profile, hlo_sources(step.as_text()))
    loss = float(metrics["loss"])
    tps = args.batch * args.seq / sec
    flops = flops_per_token(cfg, args.seq)["train"] * REMAT_FLOPS[cfg.remat]
    peak = args.peak or peak_flops(device)
    print(f"step {sec * 1000:.1f} ms, {tps:,.0f} tokens/s, loss {loss:.3f}, "
          f"MFU {tps * flops / peak:.1%} of {peak / 1e12:.3g} TFLOP/s bf16 (hardware FLOPs incl. remat)")
    return 0 if np.isfinite(loss) else 1


if __name__ == "__main__":
    sys.exit(main())
