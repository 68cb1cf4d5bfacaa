"""Where a compiled step's memory goes over time, from an XLA dump (`python -m plan ... --dump DIR`).

Usage: python tools/live_ranges.py DIR [--at POSITION] [--top N]

XLA writes, per module, the buffer assignment (`*after_optimizations-buffer-assignment.txt`:
every value's allocation, offset and size), the live ranges (`*after_optimizations-live-range.txt`:
every value's first and last position in the flattened instruction order) and the optimised
HLO. This sums the sizes over the ranges (values sharing a slice of an allocation counted once;
the parameters apart) and prints:
- the preallocated temporaries of the assignment, and the peak of live temporaries, with its
  position and instruction;
- the live bytes in 40 windows of the order (where the phases of the backward are);
- the tuple carried by each top-level layer loop (`jit(step)/jvp()/while`, the forward, and
  `jit(step)/transpose(jvp())/while`): libtpu's reported temporaries exceed its dumped
  assignment by about the forward loops' tuple (docs/benchmarks.md, 2026-12-05);
- with --at: the largest values live there, with their shapes, ranges and op names.
This is how libtpu's scheduling of the MTP block's weight gradients after the layer loop was
found (model/transformer.py `_remat`).
"""
from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re

GiB = 2 ** 30
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f16": 2, "s64": 8, "f64": 8,
          "f8e4m3fn": 1, "f8e5m2": 1}


def _one(directory: str, suffix: str) -> str:
    """The dump's file of the train step's module (the largest, if there is no jit_step)."""
    found = glob.glob(f"{directory}/*{suffix}")
    if not found:
        raise SystemExit(f"no *{suffix} in {directory}: compile with --dump DIR first")
    return max(found, key=lambda p: ("jit_step" in os.path.basename(p), os.path.getsize(p)))


def read_assignment(path: str):
    """{value: (allocation, offset, size, kind, shape)}; total preallocated temporaries."""
    values, temps, alloc, kind = {}, 0, None, None
    for line in open(path):
        m = re.match(r"allocation (\d+): size (\d+), (.*)", line)
        if m:
            alloc, rest = int(m.group(1)), m.group(3)
            kind = "temp" if "preallocated-temp" in rest else "param" if "parameter" in rest else "other"
            temps += int(m.group(2)) if kind == "temp" else 0
            continue
        m = re.match(r" value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
        if m:
            name = m.group(1) if "{" in m.group(1) else m.group(1) + "{}"
            values[name] = (alloc, int(m.group(3)), int(m.group(2)), kind, m.group(4))
    return values, temps


def read_live_ranges(path: str):
    """(instruction order, {value: (first, last)})."""
    order, ranges, section = [], {}, None
    for line in open(path):
        if line.startswith("  InstructionSequence"):
            section = order
        elif line.startswith("  BufferLiveRange"):
            section = ranges
        elif line.startswith("  Live ranges at"):
            break
        elif section is order and (m := re.match(r"\s+\d+:(\S+)", line)):
            order.append(m.group(1))
        elif section is ranges and (m := re.match(r"\s+(\S+):(\d+)-(\d+)", line)):
            ranges[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return order, ranges


def live_bytes(values, ranges, length: int) -> list[int]:
    """Temporaries live at each position (a slice of an allocation counted once at a time)."""
    spans = collections.defaultdict(list)
    for name, (first, last) in ranges.items():
        if name in values and values[name][3] != "param":
            alloc, offset, size = values[name][:3]
            spans[(alloc, offset, size)].append((first, last))
    delta = [0] * (length + 2)
    for (_, _, size), intervals in spans.items():
        intervals.sort()
        start, end = intervals[0]
        for a, b in intervals[1:] + [(length + 1, length + 1)]:
            if a <= end + 1:
                end = max(end, b)
                continue
            delta[start] += size
            delta[end + 1] -= size
            start, end = a, b
    out, running = [], 0
    for d in delta[:length]:
        running += d
        out.append(running)
    return out


def read_hlo(path: str):
    """({instruction: op name}, [(loop, op name, bytes of its carried tuple)] of the step's
    top-level layer loops, largest first)."""
    ops, loops = {}, []
    for line in open(path):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        ops[m.group(1)] = op.group(1) if op else ""
        loop = re.match(r"\s*(?:ROOT )?%?(while[\w.\-]*) = \((.*?)\) while\(", line)
        if loop and ops[m.group(1)] in ("jit(step)/jvp()/while", "jit(step)/transpose(jvp())/while"):
            size = sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
                       for dt, dims in re.findall(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([\d,]*)\]", loop.group(2))
                       if dt in _BYTES)
            loops.append((loop.group(1), ops[m.group(1)], size))
    return ops, sorted(loops, key=lambda x: -x[2])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump", help="the directory given to --dump")
    ap.add_argument("--at", type=int, help="list the values live at this position")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    values, temps = read_assignment(_one(args.dump, "after_optimizations-buffer-assignment.txt"))
    order, ranges = read_live_ranges(_one(args.dump, "after_optimizations-live-range.txt"))
    live = live_bytes(values, ranges, len(order))
    peak = max(range(len(live)), key=live.__getitem__)
    print(f"dumped assignment: {temps / GiB:.2f} GiB of preallocated temporaries")
    print(f"live temporaries peak at {live[peak] / GiB:.2f} GiB, position {peak} ({order[peak]})")
    width = max(1, len(order) // 40)
    for start in range(0, len(order), width):
        at = max(range(start, min(start + width, len(order))), key=live.__getitem__)
        print(f"  {start:7d}+  {live[at] / GiB:6.2f} GiB at {at} {order[at][:50]}")
    ops, loops = read_hlo(_one(args.dump, "after_optimizations.txt"))
    for name, op, size in loops:
        print(f"loop {name} ({op}) carries {size / GiB:.2f} GiB")
    if args.at is not None:
        here = {values[n][:3]: (n, values[n], r) for n, r in ranges.items()
                if n in values and values[n][3] != "param" and r[0] <= args.at <= r[1]}
        print(f"live at {args.at}: {sum(k[2] for k in here) / GiB:.2f} GiB")
        for (_, _, size), (name, value, (first, last)) in sorted(here.items(), key=lambda kv: -kv[0][2])[:args.top]:
            op = ops.get(name.split("{")[0], "").replace("jit(step)/", "")
            print(f"  {size / 2 ** 20:9.1f} MiB  {name[:30]:30s} {value[4][:44]:44s} {first}-{last}  {op[-60:]}")


if __name__ == "__main__":
    main()
