"""The mesh for a run: which meshes can run a config, and which one to suggest.

When the config has no `mesh:` section (or with `--mesh auto`): tensor = 1 unless the global
batch cannot give every device a sequence; expert = the largest divisor of the routed experts
and of the devices up to MAX_EXPERT (the all-to-all stays within a 64-chip cube); fsdp = the
smallest divisor of the remaining devices with which the estimate fits in FIT_FRACTION of HBM;
data = the rest. When nothing fits, `why_not` says what dominates and what would shrink it.
"""
from __future__ import annotations

import math

from plan.hardware import GiB
from plan.memory import FIT_FRACTION, Memory, estimate

MAX_EXPERT = 64


def check_mesh(run_cfg, sizes) -> str | None:
    """Why a mesh cannot run this config (divisibility), or None."""
    from model.config import ConfigError
    from parallel.mesh import validate

    try:
        validate(sizes, run_cfg.model, run_cfg.data.global_batch)
    except ConfigError as e:
        return str(e)
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if run_cfg.data.global_batch // shards % run_cfg.train.micro_batches:
        return (f"train.micro_batches={run_cfg.train.micro_batches} does not divide the "
                f"{run_cfg.data.global_batch // shards} sequences per device")
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest(run_cfg, layout, act, devices: int, hbm: float):
    """(sizes, memory) of the heuristic's mesh, or (None, best candidate or None) when none fits."""
    cfg = run_cfg.model
    best = None
    for tensor in (1, 2, 4, 8):
        if devices % tensor:
            continue
        shards = devices // tensor
        expert = max(d for d in _divisors(math.gcd(cfg.n_routed_experts, shards)) if d <= MAX_EXPERT)
        for fsdp in _divisors(shards // expert):
            sizes = {"data": shards // expert // fsdp, "fsdp": fsdp, "expert": expert, "tensor": tensor}
            if check_mesh(run_cfg, sizes):
                continue
            mem = estimate(run_cfg, layout, act, sizes)
            if mem.total <= FIT_FRACTION * hbm:
                return sizes, mem
            if best is None or mem.total < best[1].total:
                best = (sizes, mem)
    return None, best


def why_not(run_cfg, mem: Memory, hbm: float, reestimate) -> list[str]:
    """Lines saying what dominates an estimate over budget and what would shrink it;
    `reestimate(micro_batches)` gives the estimate with that many micro-batches."""
    rows = sorted(mem.rows(run_cfg), key=lambda r: -r[1])
    out = [f"needs {mem.total / GiB:.1f} GiB per device, over {FIT_FRACTION:.0%} of {hbm / GiB:.1f} GiB; "
           f"largest: {rows[0][0]} {rows[0][1] / GiB:.1f} GiB, {rows[1][0]} {rows[1][1] / GiB:.1f} GiB"]
    if mem.saved + mem.working > mem.total / 2 and run_cfg.model.remat == "none":
        out.append("activations dominate: model.remat=full keeps only each block's input")
    if mem.logits > mem.working:
        out.append(f"the loss head's logits ({mem.logits / GiB:.1f} GiB): model.head_chunks divides them "
                   "(vocabulary slices at a time)")
    micro = run_cfg.train.micro_batches
    seqs = round(mem.seqs * micro)  # per device per step
    more = [m for m in _divisors(seqs) if m > micro and reestimate(m).total <= FIT_FRACTION * hbm]
    if more:  # whatever dominates, fewer sequences at a time is the change that keeps the job
        out.append(f"activations: train.micro_batches={more[0]} divides them by {more[0] / micro:g} and fits")
    else:
        state = mem.arguments + mem.grads
        out.append(("the train state dominates" if state > mem.total / 2 else "no micro-batch count fits")
                   + ": shard it over more devices (fsdp / expert) or a larger slice")
    return out
