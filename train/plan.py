"""`python -m train.plan --config C --topology T`: does a run fit a pod, and how fast should it go?

Everything here runs on a laptop, without accelerators:
- The train state's per-device bytes (parameters, routing tables, optimiser state, gradients)
  come from the abstract model and optimiser (jax.eval_shape) laid out by the sharding rules on
  an abstract mesh of the topology's size: exact, the layout `python -m train` creates.
- Activations: the residuals autodiff keeps for the backward pass, read off `jax.vjp` of the
  real loss traced abstractly (no FLOPs, no memory) at 1 and 2 sequences, so the policy of
  `model.remat` is applied by JAX itself. Per-sequence residuals scale with the sequences each
  device holds; the rest (weights cast to the compute dtype, kept for the backward) is counted
  sharded like the parameters. A rematerialised block recomputes its forward during the
  backward: one block's residuals (the remat-none residuals over the layer count) are added as
  the working set. Activations sharded over `tensor` are counted whole (an upper bound).
- Step time: model FLOPs per token (model/counts.py) x tokens per step / (devices x peak x MFU).
- With `libtpu` installed (`pip install -e '.[tpu]'`), TPU topologies are also compiled ahead
  of time: the actual train step for the topology's devices, whose compiled memory analysis is
  printed next to the estimate (`--no-compile` skips it).

Mesh suggestion (when the config has no `mesh:` section, or with `--mesh auto`): tensor = 1
unless the global batch cannot give every device a sequence; expert = the largest divisor of
the routed experts and of the devices up to 64 (the all-to-all stays within a 64-chip cube);
fsdp = the smallest divisor of the remaining devices with which the estimate fits in
FIT_FRACTION of HBM; data = the rest.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass

GiB = 2 ** 30
MiB = 2 ** 20
FIT_FRACTION = 0.9  # of HBM: what the estimate may use (XLA's temporaries, fragmentation)
MAX_EXPERT = 64


@dataclass(frozen=True)
class Chip:
    kind: str
    hbm: float             # bytes per JAX device
    peak: float            # dense bf16 FLOP/s per JAX device
    devices_per_chip: int  # JAX devices per chip (TPU7x: one per TensorCore)
    units_per_chip: int    # what N in "family-N" counts per chip (TensorCores on v4 / v5p / TPU7x)
    torus: int             # torus dimensions of a TPU slice; 0 for GPUs


# Google Cloud TPU docs (per chip: v5p 459 TF / 95 GiB, v6e 918 TF / 32 GiB, v5e 197 TF /
# 16 GiB, v4 275 TF / 32 GiB, TPU7x 2307 TF / 192 GiB over its two TensorCores); NVIDIA data
# sheets (dense bf16 989 TF) with the memory nvidia-smi reports (H100 81559 MiB, H200 143771 MiB).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1, 2, 3),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 1, 1, 2),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 1, 2, 3),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GiB, 918e12, 1, 1, 2),
    "tpu7x": Chip("TPU7x (Ironwood)", 96 * GiB, 1153.5e12, 2, 2, 3),
    "h100": Chip("NVIDIA H100 SXM", 81559 * MiB, 989e12, 1, 1, 0),
    "h200": Chip("NVIDIA H200", 143771 * MiB, 989e12, 1, 1, 0),
}


@dataclass(frozen=True)
class Topology:
    name: str
    family: str
    chips: int
    shape: tuple[int, ...]  # chips per torus dimension (TPU); () for GPUs

    @property
    def chip(self) -> Chip:
        return CHIPS[self.family]

    @property
    def devices(self) -> int:
        return self.chips * self.chip.devices_per_chip

    @property
    def tpu_name(self) -> str | None:
        """The name jax.experimental.topologies knows this slice by, e.g. `v5p:8x8x8`."""
        return f"{self.family}:{'x'.join(map(str, self.shape))}" if self.shape else None

    def describe(self) -> str:
        c = self.chip
        where = f"{self.chips} chips ({'x'.join(map(str, self.shape))})" if self.shape else f"{self.chips} GPUs"
        return (f"{self.name} = {where}, {self.devices} JAX devices of {c.hbm / GiB:.1f} GiB HBM "
                f"and {c.peak / 1e12:.0f} TFLOP/s bf16 each ({c.kind})")


class PlanError(ValueError):
    """A topology, mesh or config the planner cannot use; the message says why."""


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Google's slice shape for a power-of-two chip count: 4 -> 2x2x1, 64 -> 4x4x4,
    128 -> 4x4x8, 256 (2-D) -> 16x16."""
    if chips < 1 or chips & (chips - 1):
        raise PlanError(f"{chips} chips is not a power of two; name the slice shape instead, "
                        "e.g. v5p:4x4x12")
    shape = [1] * dims
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(s for s in shape if s > 1)) + (1,) * shape.count(1)


def parse_topology(text: str) -> Topology:
    """`v5p-1024` (the accelerator type: v4 / v5p / TPU7x count TensorCores, v5e / v6e chips),
    `v5p:8x8x8` (a slice shape in chips), or `gpu:h200x64`."""
    m = re.fullmatch(r"gpu:(\w+?)x(\d+)", text)
    if m:
        family, n = m.group(1), int(m.group(2))
        if family not in CHIPS or CHIPS[family].torus:
            gpus = [k for k, c in CHIPS.items() if not c.torus]
            raise PlanError(f"--topology {text}: unknown GPU {family!r}; known: {gpus}")
        return Topology(text, family, n, ())
    m = re.fullmatch(r"(\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    if not m or m.group(1) not in CHIPS or not CHIPS[m.group(1)].torus:
        tpus = [k for k, c in CHIPS.items() if c.torus]
        raise PlanError(f"--topology {text}: expected FAMILY-N (e.g. v5p-1024, v6e-256, tpu7x-128), "
                        f"FAMILY:AxBxC or gpu:h200x64; TPU families: {tpus}")
    family, chip = m.group(1), CHIPS[m.group(1)]
    if m.group(3):
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != chip.torus:
            raise PlanError(f"--topology {text}: {family} slices have {chip.torus} dimensions")
        return Topology(text, family, math.prod(shape), shape)
    units = int(m.group(2))
    if units % chip.units_per_chip:
        raise PlanError(f"--topology {text}: {family}-N counts TensorCores, {chip.units_per_chip} per chip")
    chips = units // chip.units_per_chip
    return Topology(text, family, chips, torus_shape(chips, chip.torus))


# --- the train state, abstractly ----------------------------------------------------------
class StateLayout:
    """The train state's structure (params, rest, opt) as ShapeDtypeStructs, with the
    PartitionSpec of every leaf from the rules: no memory, any model size."""

    def __init__(self, run_cfg, rules):
        import jax
        from flax import nnx
        from jax.sharding import PartitionSpec as P

        from model.counts import weight_classes
        from model.transformer import abstract
        from train.optim import make_optimizer, nest
        from train.step import match_params

        model = abstract(run_cfg.model)
        self.rules = rules
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.param_state = params  # logical axis names: make_optimizer(..., mesh, rules) on a mesh
        self.tx = make_optimizer(run_cfg.optim, run_cfg.train.steps, params)
        specs = dict(nnx.to_flat_state(rules.param_specs(model)))
        self.params, self.rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        self.opt = jax.eval_shape(self.tx.init, self.params)
        spec = {k: nest({p: specs[p] for p, _ in nnx.to_flat_state(s)}) for k, s in (("params", params), ("rest", rest))}
        spec["opt"] = match_params(self.opt, self.params, spec["params"], P())
        self.specs = spec
        self.param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
        self.weight_classes = weight_classes(model)

    def abstract(self, mesh) -> dict:
        """The state as ShapeDtypeStructs sharded on `mesh` (step counters replicated)."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        def place(tree, specs):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                                tree, specs, is_leaf=lambda x: isinstance(x, P))

        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
        return {"step": scalar, "params": place(self.params, self.specs["params"]),
                "rest": place(self.rest, self.specs["rest"]), "opt": place(self.opt, self.specs["opt"]),
                "bad": scalar, "skipped": scalar}

    def param_elements(self, mesh=None) -> dict[tuple, int]:
        """Elements of every parameter: whole, or on the device holding the most of `mesh`."""
        import jax

        tree = self.params if mesh is None else self.abstract(mesh)["params"]
        shape = (lambda x: x.shape) if mesh is None else (lambda x: x.sharding.shard_shape(x.shape))
        return {tuple(k.key for k in path): math.prod(shape(x))
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def bytes_per_device(self, mesh) -> dict[str, int]:
        """Bytes of params / rest / opt on the device holding the most (ceil-divided shards)."""
        import jax

        state = self.abstract(mesh)
        return {k: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state[k]))
                for k in ("params", "rest", "opt")}


@dataclass(frozen=True)
class Activations:
    """Autodiff residuals of the loss, in bytes: per sequence and independent of the batch."""
    per_seq: float       # under the config's model.remat
    fixed: float         # weight-sized residuals (casts of weights kept for the backward)
    block: float         # one block's forward residuals per sequence (remat-none / blocks)


def residual_bytes(run_cfg, layout, n_seqs: int) -> int:
    """Bytes of what jax.vjp keeps for the backward of the loss on `n_seqs` sequences,
    excluding the arguments themselves (parameters, routing tables, batch)."""
    import jax
    import jax.numpy as jnp

    from train.step import denominators, loss_weights, make_forward

    forward = make_forward(layout.graphdef, run_cfg.model)
    seq = jax.ShapeDtypeStruct((n_seqs, run_cfg.data.seq_len), jnp.int32)
    batch = dict.fromkeys(("inputs", "targets", "segment_ids", "loss_mask"), seq)

    def kept(params, rest, mb):
        denoms, weights = denominators(mb, run_cfg.model), loss_weights(run_cfg.loss, 0, run_cfg.train.steps)
        _, f_vjp, _ = jax.vjp(lambda p: forward(p, rest, mb, denoms, weights, False), params, has_aux=True)
        given = {id(x) for x in jax.tree.leaves((params, rest, mb))}
        return [r for r in jax.tree.leaves(f_vjp) if id(r) not in given]

    out = jax.eval_shape(kept, layout.params, layout.rest, batch)
    return sum(x.size * x.dtype.itemsize for x in out)


def activations(run_cfg, layout) -> Activations:
    import dataclasses

    one, two = residual_bytes(run_cfg, layout, 1), residual_bytes(run_cfg, layout, 2)
    per_seq, fixed = two - one, 2 * one - two
    block = 0.0
    if run_cfg.model.remat != "none":
        import copy

        from flax import nnx

        from model.transformer import abstract

        plain = dataclasses.replace(run_cfg, model=run_cfg.model.replace(remat="none"))
        plain_layout = copy.copy(layout)  # same state; only the block call (graphdef) differs
        plain_layout.graphdef = nnx.split(abstract(plain.model), nnx.Param, ...)[0]
        none_seq = residual_bytes(plain, plain_layout, 2) - residual_bytes(plain, plain_layout, 1)
        block = none_seq / (run_cfg.model.n_layers + run_cfg.model.n_mtp_layers)
    return Activations(per_seq, fixed, block)


# --- the estimate -------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Per-device bytes of one training step (the device holding the most)."""
    params: float
    rest: float
    grads: float
    opt: float
    batch: float
    saved: float      # activations kept for the backward
    working: float    # one block recomputed during the backward (remat), weight casts
    seqs: float       # sequences per device per micro-batch

    @property
    def total(self) -> float:
        return self.params + self.rest + self.grads + self.opt + self.batch + self.saved + self.working

    def rows(self, run_cfg) -> list[tuple[str, float]]:
        m = run_cfg.model
        micro = run_cfg.train.micro_batches
        return [(f"parameters ({m.param_dtype})", self.params),
                ("routing biases and hash tables", self.rest),
                ("gradients" + (" (+ accumulator)" if micro > 1 else ""), self.grads),
                (f"optimiser state ({run_cfg.optim.name})", self.opt),
                ("batch (inputs, targets, segments, mask)", self.batch),
                (f"activations kept (remat {m.remat}, {self.seqs:g} seq x {run_cfg.data.seq_len})", self.saved),
                ("recompute working set + weight casts", self.working)]


def estimate(run_cfg, layout, act: Activations, sizes: dict[str, int]) -> Memory:
    from parallel.mesh import abstract_mesh

    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = run_cfg.train.micro_batches
    seqs = run_cfg.data.global_batch / shards / micro
    state = layout.bytes_per_device(abstract_mesh(sizes))
    param_share = state["params"] / layout.param_bytes
    grads = state["params"] * (2 if micro > 1 else 1)
    batch = 4 * 4 * run_cfg.data.global_batch / shards * run_cfg.data.seq_len
    return Memory(state["params"], state["rest"], grads, state["opt"], batch, act.per_seq * seqs,
                  act.block * seqs + act.fixed * param_share, seqs)


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


# --- meshes -------------------------------------------------------------------------------
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


def why_not(run_cfg, mem: Memory, hbm: float) -> list[str]:
    """Lines saying what dominates an estimate over budget and what would shrink it."""
    rows = sorted(mem.rows(run_cfg), key=lambda r: -r[1])
    out = [f"needs {mem.total / GiB:.1f} GiB per device, over {FIT_FRACTION:.0%} of {hbm / GiB:.1f} GiB; "
           f"largest: {rows[0][0]} {rows[0][1] / GiB:.1f} GiB, {rows[1][0]} {rows[1][1] / GiB:.1f} GiB"]
    act = mem.saved + mem.working
    if act > mem.total / 2:
        if run_cfg.model.remat == "none":
            out.append("activations dominate: model.remat=full keeps only each block's input")
        micro = run_cfg.train.micro_batches
        free = FIT_FRACTION * hbm - (mem.total - act) - (mem.grads if micro == 1 else 0)  # + accumulator
        seqs = round(mem.seqs * micro)  # per device per step
        more = [m for m in _divisors(seqs) if m > micro and act * micro / m <= free]
        if more:
            out.append(f"activations dominate: train.micro_batches={more[0]} divides them by {more[0] / micro:g}")
    else:
        out.append("the train state dominates: shard it over more devices (fsdp / expert) or a larger slice")
    return out


# --- ahead-of-time compile for a TPU slice ------------------------------------------------
def compile_step(run_cfg, layout, topo: Topology, mesh_cfg, dump: str | None = None):
    """(compiled memory analysis, (FLOPs per device, loops of unknown trip count) from
    train/hlo_flops.py, seconds): the actual jitted train step lowered and compiled for the
    slice's devices by libtpu on this host; `dump`: a directory for XLA's dump (optimised HLO,
    buffer assignment, the memory-usage report). Raises ImportError without libtpu."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding

    from parallel import Rules, make_mesh, sharded
    from train.hlo_flops import hlo_flops
    from train.optim import make_optimizer, schedule
    from train.step import make_train_step

    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no host probing on a laptop
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is used: no lock file
    try:
        devices = topologies.get_topology_desc(topo.tpu_name, "tpu").devices
    except RuntimeError as e:
        raise ImportError(f"libtpu could not describe {topo.tpu_name}: {str(e).splitlines()[0]}") from e
    mesh = make_mesh(mesh_cfg, run_cfg.model, devices=devices, global_batch=run_cfg.data.global_batch)
    rules = Rules(run_cfg.rules)
    state = layout.abstract(mesh)
    seq = jax.ShapeDtypeStruct((run_cfg.data.global_batch, run_cfg.data.seq_len), jnp.int32,
                               sharding=NamedSharding(mesh, rules.spec(("batch", None))))
    batch = dict.fromkeys(("inputs", "targets", "segment_ids", "loss_mask"), seq)
    tx = make_optimizer(run_cfg.optim, run_cfg.train.steps, layout.param_state, mesh, rules)
    step = make_train_step(layout.graphdef, tx, run_cfg, schedule(run_cfg.optim, run_cfg.train.steps))
    t = time.perf_counter()
    with sharded(mesh, rules, run_cfg.train.moe_transport, run_cfg.train.capacity_factor):
        out = jax.tree.map(lambda x: x.sharding, state)
        lowered = jax.jit(step, donate_argnums=0, out_shardings=(out, None)).lower(state, batch)
        options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True} if dump else None
        compiled = lowered.compile(compiler_options=options)
    return compiled.memory_analysis(), hlo_flops(compiled.as_text()), time.perf_counter() - t


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


# --- the report ---------------------------------------------------------------------------
def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def _mesh_text(sizes) -> str:
    return " x ".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "1 device"


def _parse_mesh(text: str):
    from parallel.mesh import MeshConfig

    try:
        given = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
        if -1 in given.values():  # axes not named are 1; data takes the rest unless another does
            given = {"data": 1, **given}
        return MeshConfig.from_dict(given)
    except ValueError as e:
        raise PlanError(f"--mesh {text}: expected auto or e.g. fsdp=-1,expert=16 ({e})") from e


def plan(run_cfg, topo: Topology, mesh_cfg=None, mfu: float = 0.4, compile_: bool | None = None,
         out=print, dump: str | None = None) -> int:
    """Print the plan; returns 0 when the run fits, 1 when it does not (or cannot run)."""
    from model.config import ConfigError
    from model.counts import param_counts
    from parallel import Rules

    t0 = time.perf_counter()
    cfg, chip = run_cfg.model, topo.chip
    counts = param_counts(cfg)
    out(f"model: {counts['total'] / 1e9:.1f}B parameters ({counts['active'] / 1e9:.1f}B active), "
        f"params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}, optimiser {run_cfg.optim.name}")
    out(f"batch: {run_cfg.data.global_batch} x {run_cfg.data.seq_len} tokens, "
        f"{run_cfg.train.micro_batches} micro-batch(es)")
    out(f"topology: {topo.describe()}")
    if mesh_cfg is not None:  # a requested mesh is checked before anything is traced
        try:
            sizes = mesh_cfg.resolve(topo.devices)
        except ConfigError as e:
            out(f"mesh: the requested mesh cannot run here: {e}")
            return 1
        problem = check_mesh(run_cfg, sizes)
        if problem:
            out(f"mesh: {_mesh_text(sizes)} cannot run this config: {problem}")
            return 1
    layout = StateLayout(run_cfg, Rules(run_cfg.rules))
    act = activations(run_cfg, layout)
    budget, other = FIT_FRACTION * chip.hbm, None
    if mesh_cfg is None:
        sizes, mem = suggest(run_cfg, layout, act, topo.devices, chip.hbm)
        if sizes is None and mem is None:
            out("mesh: no mesh of these devices divides the batch and the model; change data.global_batch")
            return 1
        if sizes is None:
            sizes, mem = mem
            out(f"mesh: none fits; the closest is {_mesh_text(sizes)} (tensor=1 unless the batch is too "
                "small, expert <= 64, smallest fsdp that fits, data for the rest)")
        else:
            out(f"mesh: {_mesh_text(sizes)} (suggested: tensor=1 unless the batch is too small, "
                "expert <= 64, smallest fsdp that fits, data for the rest)")
    else:
        mem = estimate(run_cfg, layout, act, sizes)
        out(f"mesh: {_mesh_text(sizes)} (requested)")
        if mem.total > budget:
            other = suggest(run_cfg, layout, act, topo.devices, chip.hbm)[0]
    fits = report_memory(run_cfg, mem, chip, out)
    report_storage(run_cfg, layout, sizes, out)
    if not fits and other:
        out(f"  a mesh that fits: {_mesh_text(other)} (--mesh auto)")
    if sizes["tensor"] > 1:
        out("  (activations sharded over tensor are counted whole: an upper bound)")
    flops = flops_per_step(run_cfg)
    step_s = flops / (topo.devices * chip.peak * mfu)
    tokens = run_cfg.data.global_batch * run_cfg.data.seq_len
    out(f"compute: {flops:.3g} model FLOP per step ({flops / topo.devices:.3g} per device); at {mfu:.0%} MFU "
        f"{step_s:.2f} s per step, {tokens / step_s:,.0f} tokens/s"
        + (" (remat recomputes the forward: +1/3 hardware FLOPs)" if cfg.remat != "none" else ""))
    out(f"analytic plan in {time.perf_counter() - t0:.1f} s")
    if compile_ is None:
        compile_ = bool(topo.shape) and libtpu_available()
    if compile_ and not topo.shape:
        out("compile: ahead-of-time compilation needs a TPU topology (libtpu); skipped for GPUs")
    elif compile_:
        fits = report_compile(run_cfg, layout, topo, sizes, mem, out, dump) and fits
    return 0 if fits else 1


def report_memory(run_cfg, mem: Memory, chip: Chip, out) -> bool:
    """The per-device table; True when the estimate fits in FIT_FRACTION of HBM."""
    unit, name = (GiB, "GiB") if mem.total >= GiB else (MiB, "MiB")
    out(f"per device{'':44}{name}")
    for row, value in mem.rows(run_cfg):
        out(f"  {row:<46}{value / unit:8.2f}")
    fits = mem.total <= FIT_FRACTION * chip.hbm
    out(f"  {'total (estimate)':<46}{mem.total / unit:8.2f}  of {chip.hbm / GiB:.1f} GiB HBM "
        f"({mem.total / chip.hbm:.0%}): {'fits' if fits else 'DOES NOT FIT'}")
    if not fits:
        for line in why_not(run_cfg, mem, chip.hbm):
            out(f"  {line}")
    return fits


def report_storage(run_cfg, layout, sizes, out) -> None:
    """The weights' bytes as DeepSeek stores them (serving, checkpoints), whole and per device."""
    from model.counts import STORAGES, storage_bytes
    from parallel.mesh import abstract_mesh

    cfg, classes = run_cfg.model, layout.weight_classes
    whole = storage_bytes(cfg, layout.param_elements(), classes)
    local = storage_bytes(cfg, layout.param_elements(abstract_mesh(sizes)), classes)
    out("weights stored as  " + " | ".join(f"{s} {whole[s] / GiB:,.1f} GiB ({local[s] / GiB:.2f} per device)"
                                           for s in STORAGES))


def model_flops_per_device(run_cfg, layout, devices: int) -> tuple[float, float]:
    """(forward + backward FLOPs x the remat factor, Muon's Newton-Schulz FLOPs), per device
    (the optimiser's spread evenly): what the compiled step should cost."""
    train = flops_per_step(run_cfg) * REMAT_FLOPS[run_cfg.model.remat] / devices
    return train, optimizer_flops(run_cfg, layout) / devices


def report_compile(run_cfg, layout, topo: Topology, sizes, mem: Memory, out, dump: str | None = None) -> bool:
    """Compile for the slice and print the compiler's memory and FLOPs next to the estimate;
    True when it fits in HBM with 10% to spare (or when libtpu is missing: nothing to say)."""
    from parallel.mesh import AXES, MeshConfig

    out(f"compiling the train step for {topo.tpu_name} ({topo.devices} devices) with libtpu ...")
    t = time.perf_counter()
    try:
        ma, (flops, unknown), secs = compile_step(run_cfg, layout, topo, MeshConfig(**{a: sizes[a] for a in AXES}),
                                                  dump)
    except ImportError as e:
        out(f"compile: skipped ({e})")
        return True
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory verdict is a JaxRuntimeError
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        out(f"compiled in {time.perf_counter() - t:.1f} s: DOES NOT FIT: {str(e).splitlines()[0]}")
        return False
    compiled = compiled_total(ma)
    out(f"compiled in {secs:.1f} s; per device: arguments {_size(ma.argument_size_in_bytes)} "
        f"(estimate {_size(mem.params + mem.rest + mem.opt + mem.batch)}), outputs "
        f"{_size(ma.output_size_in_bytes)} (aliased {_size(ma.alias_size_in_bytes)}), temporaries "
        f"{_size(ma.temp_size_in_bytes)} (estimate {_size(mem.saved + mem.working + mem.grads)}), "
        f"code {_size(ma.generated_code_size_in_bytes)}")
    hbm = topo.chip.hbm
    fits = compiled <= FIT_FRACTION * hbm
    out(f"compiled total {_size(compiled)} of {hbm / GiB:.1f} GiB ({compiled / hbm:.0%}): "
        f"{'fits' if fits else 'DOES NOT FIT'} (with {1 - FIT_FRACTION:.0%} of HBM to spare)")
    gap = mem.total / compiled - 1
    out(f"estimate {_size(mem.total)} is {abs(gap):.0%} {'above' if gap > 0 else 'below'} the compiled total; "
        "trust the compiled figure (the buffers XLA will allocate), the estimate says what they are")
    train, optim = model_flops_per_device(run_cfg, layout, topo.devices)
    out(f"FLOPs per device: compiled {flops:.3g} (its matmuls, loops x trip counts) vs model {train + optim:.3g} "
        f"(forward + backward x {REMAT_FLOPS[run_cfg.model.remat]:.3g} remat {train:.3g} + Muon "
        f"Newton-Schulz {optim:.3g}): ratio {flops / (train + optim):.2f}"
        + (f"; {unknown} loop(s) of unknown trip count counted once" if unknown else ""))
    if dump:
        out(f"XLA dump (optimised HLO, buffer assignment, *memory-usage-report.txt) in {dump}")
    return fits


def compiled_total(ma) -> float:
    """Per-device bytes of a compiled step: arguments + temporaries + outputs not aliased."""
    return ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="run configuration YAML")
    ap.add_argument("--topology", required=True,
                    help="v5p-1024, v6e-256, tpu7x-128 (accelerator types), v5p:4x4x8 (slice shape) or gpu:h200x64")
    ap.add_argument("--mesh", help="auto, or sizes like fsdp=-1,expert=16 (default: the config's mesh: "
                                   "section, else auto)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
    ap.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=None,
                    help="ahead-of-time compile for a TPU topology (default: when libtpu is installed)")
    ap.add_argument("--dump", metavar="DIR", help="with the compile: write XLA's dump there (optimised HLO, "
                                                  "buffer assignment, memory-usage report: where the bytes go)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.global_batch=1024")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Exit codes: 0 fits, 1 does not fit, 2 a configuration / topology error."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning needs no accelerator
    import yaml

    from model.config import ConfigError
    from train.config import load_run_config

    try:
        run_cfg = load_run_config(args.config, args.overrides)
        topo = parse_topology(args.topology)
        if args.mesh == "auto":
            mesh_cfg = None
        elif args.mesh:
            mesh_cfg = _parse_mesh(args.mesh)
        else:
            with open(args.config) as f:
                given = "mesh" in (yaml.safe_load(f) or {})
            given = given or any(o.startswith("mesh.") for o in args.overrides)
            mesh_cfg = run_cfg.mesh if given else None
        if not 0 < args.mfu <= 1:
            raise PlanError(f"--mfu must be in (0, 1], got {args.mfu}")
    except (ConfigError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return plan(run_cfg, topo, mesh_cfg, args.mfu, args.compile_, dump=args.dump)


if __name__ == "__main__":
    sys.exit(main())
