"""FLOPs of a train step: what the model needs (analytic) and what the compiled program does.

The model's: model/counts.py's FLOPs per token x the tokens of a step, times the forward passes
remat adds, plus Muon's Newton-Schulz iterations. The compiled program's: XLA's own cost
analysis (`compiled.cost_analysis()["flops"]`) counts a while loop's body once, so for a model
whose layers run in a scan (and Muon's Newton-Schulz steps) it reports a small fraction of the
real work. `hlo_flops` reads the optimised HLO text instead: every dot and convolution
(2 x output elements x contracted size), every custom call that states its FLOPs (Pallas
kernels' cost estimates), each multiplied by the trip counts of the loops around it. A loop's
trip count is read from its condition (`counter < constant`); loops whose bound is not a
constant (data-dependent: sorts, top-k) are counted once and reported.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np


# --- the model's FLOPs ----------------------------------------------------------------------
def flops_per_step(run_cfg) -> float:
    from model.counts import flops_per_token

    return flops_per_token(run_cfg.model, run_cfg.data.seq_len)["train"] * run_cfg.data.global_batch * run_cfg.data.seq_len


REMAT_FLOPS = {"none": 1.0, "save_matmuls": 1.0, "full": 4 / 3}  # forward recomputed: 3 -> 4 passes


def optimizer_flops(run_cfg, layout) -> float:
    """Muon's Newton-Schulz FLOPs per step, all matrices (0 for AdamW)."""
    from flax import nnx

    from train.muon import newton_schulz_flops
    from train.optim import NS_COEFFS, muon_dims

    if run_cfg.optim.name != "muon":
        return 0.0
    total = 0.0
    for path, var in nnx.to_flat_state(layout.param_state):
        dims = muon_dims(path, tuple(var.get_metadata().get("out_sharding") or ()))
        if dims is not None:
            total += newton_schulz_flops(var.get_value().shape, dims, len(NS_COEFFS))
    return total


def model_flops_per_device(run_cfg, layout, devices: int) -> tuple[float, float]:
    """(forward + backward FLOPs x the remat factor, Muon's Newton-Schulz FLOPs), per device
    (the optimiser's spread evenly): what the compiled step should cost."""
    train = flops_per_step(run_cfg) * REMAT_FLOPS[run_cfg.model.remat] / devices
    return train, optimizer_flops(run_cfg, layout) / devices


def kernel_fill(run_cfg, sizes: dict[str, int]) -> float:
    """The fraction of the ragged transport's receive buffer that a balanced routing fills. The
    grouped-matmul kernels (megablox gmm / tgmm) state FLOPs for the whole buffer, but their grid
    follows the group sizes: they visit the filled rows only."""
    from parallel.expert import ragged_capacity

    ep = sizes["expert"]
    if ep == 1:  # no transport: the kernels see exactly the routed pairs
        return 1.0
    shards = sizes["data"] * sizes["fsdp"] * ep
    tokens = run_cfg.data.global_batch * run_cfg.data.seq_len / shards / run_cfg.train.micro_batches
    pairs = round(tokens * run_cfg.model.n_activated_experts)
    return pairs / ragged_capacity(pairs, ep, run_cfg.train.capacity_factor)


# --- the compiled program's FLOPs, read from its optimised HLO ------------------------------
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|[\w\[\],{}:()]+?) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_LIST_CALLS = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")


def _dims(shape: str) -> list[int]:
    m = _SHAPE.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str):
    """{computation: [(name, shape, opcode, rest of line)]} and the entry computation's name, from
    HLO text (`compiled.as_text()`); rest holds the operands, attributes and metadata."""
    comps, current, entry = {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(_COMMENT.sub("", line))  # tuple shapes carry /*index=5*/ comments
        if m:
            comps[current].append(m.groups())
    return comps, entry


def _operands(rest: str) -> list[str]:
    depth, args = 0, ""
    for ch in rest:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                break
            depth -= 1
        args += ch
    return re.findall(r"%([\w.\-]+)", args)


def _own_flops(instr, shapes) -> float:
    name, shape, op, rest = instr
    out = math.prod(_dims(shape))
    if op == "dot":
        lhs = shapes.get(_operands(rest)[0], "")
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        contracted = [_dims(lhs)[int(i)] for i in m.group(1).split(",") if i] if m and _dims(lhs) else []
        return 2.0 * out * math.prod(contracted)
    if op == "convolution":  # per output element: input features x kernel taps on real input
        lhs_name, rhs_name = _operands(rest)[:2]
        lhs, rhs = _dims(shapes.get(lhs_name, "")), _dims(shapes.get(rhs_name, ""))
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
        if not labels or len(labels.group(2)) != len(rhs) or len(labels.group(1)) != len(lhs):
            return 0.0
        lhs_l, rhs_l, out_l = labels.groups()
        window, flops = _window(rest), 2.0 * out
        for d, lab in zip(rhs, rhs_l):
            if lab == "i":
                flops *= d
            elif lab != "o":
                w = window[int(lab)] if int(lab) < len(window) else {}
                flops *= _taps(lhs[lhs_l.index(lab)], d, _dims(shape)[out_l.index(lab)], w)
        return flops
    if op == "custom-call":
        m = re.search(r'\\?"flops\\?":\\?"?(\d+)', rest)
        return float(m.group(1)) if m else 0.0
    return 0.0


def _window(rest: str) -> list[dict]:
    """Per spatial dim of a convolution's window: size, stride, pad (low, high), lhs_dilate."""
    m = re.search(r"window=\{([^}]*)\}", rest)
    if not m:
        return []
    fields = dict(kv.split("=") for kv in m.group(1).split())
    n = len(fields["size"].split("x"))
    get = lambda key, default: fields[key].split("x") if key in fields else [default] * n  # noqa: E731
    return [{"size": int(a), "stride": int(b), "pad": tuple(int(v) for v in c.split("_")), "lhs_dilate": int(d)}
            for a, b, c, d in zip(get("size", "1"), get("stride", "1"), get("pad", "0_0"), get("lhs_dilate", "1"))]


def _taps(length: int, size: int, out: int, w: dict) -> float:
    """Mean number of kernel taps per output position that land on real (not padding, not
    dilation-hole) input along one spatial dim. XLA writes batch dims of batched matmuls as such
    dims (a dilated or fully padded window): there this is 1, not the window size."""
    stride, (lo, _), dilate = w.get("stride", 1), w.get("pad", (0, 0)), w.get("lhs_dilate", 1)
    o = np.arange(out)[:, None] * stride + np.arange(size)[None, :] - lo   # [outputs, taps]
    real = (o >= 0) & (o <= (length - 1) * dilate) & (o % dilate == 0)
    return float(real.sum()) / max(out, 1)


def _trip_count(cond, comps) -> int | None:
    """N of a loop condition `counter < N` (the compare possibly wrapped in a fusion)."""
    consts = {name: rest for name, shape, op, rest in cond
              if op == "constant" and shape.startswith(("s32", "u32", "s64"))}

    def is_lt(op, rest):
        if op == "compare":
            return "direction=LT" in rest
        called = _CALLS.findall(rest) if op == "fusion" else []
        return any(o == "compare" and "direction=LT" in r for c in called for _, _, o, r in comps.get(c, []))

    for name, shape, op, rest in cond:
        if is_lt(op, rest):
            for operand in _operands(rest):
                if operand in consts:
                    return int(re.match(r"\s*(-?\d+)", consts[operand]).group(1))
    return None


class HloFlops(NamedTuple):
    """Matmul FLOPs of a compiled program, loops included."""
    dots: float      # dots and convolutions
    kernels: float   # custom calls that state their FLOPs (Pallas kernels: their cost estimates)
    unknown: int     # loops whose trip count is unknown (counted once)

    @property
    def total(self) -> float:
        return self.dots + self.kernels


def hlo_flops(text: str) -> tuple[float, int]:
    """(matmul FLOPs of the program in `text`, number of loops whose trip count is unknown)."""
    counted = count_hlo_flops(text)
    return counted.total, counted.unknown


def count_hlo_flops(text: str) -> HloFlops:
    """hlo_flops, with the Pallas kernels' stated FLOPs apart from the dots'."""
    comps, entry = parse_hlo(text)
    shapes = {name: shape for instrs in comps.values() for name, shape, _, _ in instrs}
    unknown, memo = 0, {}

    def total(comp: str, seen: tuple = ()) -> np.ndarray:
        nonlocal unknown
        if comp not in comps or comp in seen:
            return np.zeros(2)
        if comp in memo:
            return memo[comp]
        flops = np.zeros(2)  # dots, kernels
        for instr in comps[comp]:
            name, shape, op, rest = instr
            flops[int(op == "custom-call")] += _own_flops(instr, shapes)
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                cond = re.search(r"condition=%?([\w.\-]+)", rest).group(1)
                trips = _trip_count(comps.get(cond, []), comps)
                unknown += trips is None
                flops = flops + (trips or 1) * total(body, seen + (comp,))
                continue
            called = _CALLS.findall(rest) + [c for group in _LIST_CALLS.findall(rest)
                                             for c in re.findall(r"%?([\w.\-]+)", group)]
            if op == "conditional":  # one branch runs: count the most expensive
                flops = flops + max((total(c, seen + (comp,)) for c in called), key=sum, default=np.zeros(2))
            elif op not in ("reduce", "reduce-window", "scatter", "sort", "select-and-scatter", "all-reduce",
                            "reduce-scatter", "map"):
                flops = flops + sum((total(c, seen + (comp,)) for c in called), np.zeros(2))
        memo[comp] = flops
        return flops

    dots, kernels = total(entry)
    return HloFlops(float(dots), float(kernels), unknown)
