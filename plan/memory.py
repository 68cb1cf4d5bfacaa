"""Per-device bytes of one training step, estimated without devices or FLOPs.

- The train state (parameters, routing tables, optimiser state, gradients): the abstract model
  and optimiser (jax.eval_shape) laid out by the sharding rules on an abstract mesh of the
  topology's size: exact, the layout `python -m train` creates.
- Activations: the residuals autodiff keeps for the backward pass, read off `jax.vjp` of the
  real loss traced abstractly (no FLOPs, no memory) at 1 and 2 sequences, so the policy of
  `model.remat` is applied by JAX itself, with the MoE's grouped matmul standing in for the
  target's kernel (traced_impl). Per-sequence residuals scale with the sequences each
  device holds; the rest (weights cast to the compute dtype, kept for the backward) is counted
  sharded like the parameters. A rematerialised block recomputes its forward during the
  backward: one block's residuals (the remat-none residuals over the layer count) are added as
  the working set. Activations sharded over `tensor` are counted whole (an upper bound).
- The loss head's float32 logits of one vocabulary slice (model.head_chunks; split over
  `tensor`) for the device's sequences, twice: the slice and, in the backward, its gradient
  (train/step.py's head_ce recomputes them slice by slice; they are never residuals). On one
  H200 (bench/gpu_train.py, head_chunks 1) they were 31.6 GiB of the 35.5 the estimate missed.
- The gradients of the embedding and the head, full-size on every device before their
  reduce-scatter (a device's tokens touch every row), twice (the partial and the collective's
  buffer); the head's one vocabulary slice at a time (model.head_chunks): StateLayout.vocab_partials.
- The expert-parallel MoE layer being recomputed and differentiated, which the one-device trace
  above does not have (its routed rows never leave the device and its experts work on the
  routed pairs, not on a receive buffer of capacity_factor x as many rows): `exchange_bytes`.
  The one-device trace's own expert residuals are taken out of the working set then.
- The phases: these rows are not all live at once. libtpu's live ranges (docs/benchmarks.md,
  2026-12-05) show the backward's peak either in the last blocks (MTP, every residual still
  kept, one block recomputed with its MoE backward), or in the layer loop (the gradients and
  the loop's stacked residuals, one block and its MoE), or in the loss head (every residual,
  the head's logits and the vocabulary partials). The temporaries are the largest phase.
- libtpu's copy of the layer loops' carried state: the temporaries libtpu reports exceed the
  buffer assignment it dumps by about the size of the forward layer loops' carried state (their
  stacked residuals and the looped layers' parameters): 0.87-1.09x on nine compiles of
  8 to 61 layers, 2 to 8 mHC streams, Muon and AdamW; no allocation in the dumped program holds
  it (a measured correspondence, not a mechanism). Counted for TPU targets only. For GPU
  targets the temporaries stay the sum of the rows (Memory: what one H200 compile showed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FIT_FRACTION = 0.9  # of HBM: what the estimate may use (XLA's temporaries, fragmentation)


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
        from train.state import mirror_params

        model = abstract(run_cfg.model)
        self.rules = rules
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.param_state = params  # logical axis names: make_optimizer(..., mesh, rules) on a mesh
        self.tx = make_optimizer(run_cfg.optim, run_cfg.train.steps, params)
        specs = dict(nnx.to_flat_state(rules.param_specs(model)))
        self.params, self.rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        self.opt = jax.eval_shape(self.tx.init, self.params)
        spec = {k: nest({p: specs[p] for p, _ in nnx.to_flat_state(s)}) for k, s in (("params", params), ("rest", rest))}
        spec["opt"] = mirror_params(self.tx, self.params, spec["params"], P())
        self.specs = spec
        self.param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
        self.weight_classes = weight_classes(model)

    def abstract(self, mesh):
        """The TrainState as ShapeDtypeStructs sharded on `mesh` (step counters replicated)."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        from train.state import TrainState

        def place(tree, specs):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                                tree, specs, is_leaf=lambda x: isinstance(x, P))

        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
        return TrainState(step=scalar, params=place(self.params, self.specs["params"]),
                          rest=place(self.rest, self.specs["rest"]), opt=place(self.opt, self.specs["opt"]),
                          bad=scalar, skipped=scalar)

    def param_elements(self, mesh=None) -> dict[tuple, int]:
        """Elements of every parameter: whole, or on the device holding the most of `mesh`."""
        import jax

        tree = self.params if mesh is None else self.abstract(mesh).params
        shape = (lambda x: x.shape) if mesh is None else (lambda x: x.sharding.shard_shape(x.shape))
        return {tuple(k.key for k in path): math.prod(shape(x))
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def vocab_partials(self, mesh, head_chunks: int = 1) -> int:
        """Bytes of the full-size gradients of the vocab-sized parameters (embedding, head) on one
        device before they are reduce-scattered: a device's tokens touch the whole parameter, so
        its partial gradient is sharded only over the mesh axes that do not split the batch. Each
        is counted twice: libtpu's memory report on v4-pro-pod shows the partial and the
        collective's buffer live together at the end of the backward (4 x 3.45 GiB there). The
        loss makes the head's gradient one vocabulary slice of `head_chunks` at a time."""
        from flax import nnx

        from parallel.mesh import BATCH_AXES

        total = 0
        for path, var in nnx.to_flat_state(self.param_state):
            names = var.get_metadata().get("out_sharding") or ()
            if "vocab" not in names:
                continue
            x = var.get_value()
            spec = tuple(self.rules.var_spec(var))
            split = math.prod(mesh.shape[a] for e in spec for a in ((e,) if isinstance(e, str) else e or ())
                              if a not in BATCH_AXES)
            split *= head_chunks if path[0] == "head" else 1
            total += 2 * x.size * x.dtype.itemsize // split
        return total

    def looped_param_bytes(self, mesh, segments) -> int:
        """Bytes on the device holding the most of the parameters of the model's `segments`."""
        import jax

        params = self.abstract(mesh).params.get("segments", {})
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for i in segments for x in jax.tree.leaves(params[i]))

    def bytes_per_device(self, mesh) -> dict[str, int]:
        """Bytes of params / rest / opt on the device holding the most (ceil-divided shards)."""
        import jax

        state = self.abstract(mesh)
        return {k: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                       for x in jax.tree.leaves(getattr(state, k)))
                for k in ("params", "rest", "opt")}


@dataclass(frozen=True)
class Activations:
    """Autodiff residuals of the loss, in bytes: per sequence and independent of the batch."""
    per_seq: float       # under the config's model.remat
    fixed: float         # weight-sized residuals (casts of weights kept for the backward)
    block: float         # one block's forward residuals per sequence (remat-none / blocks)
    moe: float = 0.0     # of `block`: its routed experts' residuals (one device: every pair)
    platform: str = "tpu"  # of the target: libtpu's copy of the layer loops' state (Memory)


_TRACED: dict = {}  # a full-depth model traces in 10-20 s: once per process, model and batch


def residual_bytes(run_cfg, layout, n_seqs: int, platform: str = "tpu") -> int:
    """Bytes of what jax.vjp keeps for the backward of the loss on `n_seqs` sequences,
    excluding the arguments themselves (parameters, routing tables, batch). `layout` holds
    `run_cfg.model`'s state; the MoE runs the grouped matmul `model.moe_impl` means on the
    target `platform` (traced_impl). The figure is remembered per model, sequence length and loss."""
    model = _traced_model(run_cfg.model, platform)
    key = (model, run_cfg.data.seq_len, run_cfg.loss, run_cfg.train.steps, n_seqs)
    if key not in _TRACED:
        _TRACED[key] = _residual_bytes(*_with_model(run_cfg, layout, model), n_seqs)
    return _TRACED[key]


def traced_impl(moe_impl: str, platform: str) -> str:
    """The grouped matmul to trace on this host for a `platform` ("tpu" or "gpu") target: the
    target's kernels (megablox, tokamax) keep only their inputs for the backward, as "tiled" does
    here; the host's own `auto` choice (blocked on CPU) would keep its [E, C, F] expert blocks."""
    from model.gmm import choose_impl

    impl = "tokamax" if (moe_impl, platform) == ("auto", "gpu") else choose_impl(moe_impl, platform)
    return "tiled" if impl in ("megablox", "tokamax") else impl


def _traced_model(model, platform: str):
    """`model` with the grouped matmul traced_impl gives for `platform`."""
    return model.replace(moe_impl=traced_impl(model.moe_impl, platform))


def _with_model(run_cfg, layout, model):
    """(run_cfg, layout) for `model`, a config with the same state as run_cfg.model's (only
    the modules' calls, in the graphdef, differ)."""
    if model == run_cfg.model:
        return run_cfg, layout
    import copy
    import dataclasses

    from flax import nnx

    from model.transformer import abstract

    other = copy.copy(layout)
    other.graphdef = nnx.split(abstract(model), nnx.Param, ...)[0]
    return dataclasses.replace(run_cfg, model=model), other


def _residual_bytes(run_cfg, layout, n_seqs: int) -> int:
    import jax
    import jax.numpy as jnp

    from train.step import denominators, loss_weights, make_forward

    forward = make_forward(layout.graphdef, run_cfg.model)
    seq = jax.ShapeDtypeStruct((n_seqs, run_cfg.data.seq_len), jnp.int32)
    batch = dict.fromkeys(("inputs", "targets", "segment_ids", "loss_mask"), seq)

    def kept(params, rest, mb):
        denoms, weights = denominators(mb, run_cfg.model), loss_weights(run_cfg.loss, 0, run_cfg.train.steps)
        _, f_vjp, _ = jax.vjp(lambda p: forward(p, rest, mb, denoms, weights, False), params, has_aux=True)
        return _new_residuals(f_vjp, (params, rest, mb))

    return _nbytes(jax.eval_shape(kept, layout.params, layout.rest, batch))


def _new_residuals(f_vjp, given) -> list:
    """What a jax.vjp closure keeps for the backward, without the arrays of `given` (its
    inputs, which exist anyway)."""
    import jax

    ids = {id(x) for x in jax.tree.leaves(given)}
    return [r for r in jax.tree.leaves(f_vjp) if id(r) not in ids]


def _nbytes(arrays) -> int:
    return sum(x.size * x.dtype.itemsize for x in arrays)


def activations(run_cfg, layout, platform: str = "tpu") -> Activations:
    one, two = (residual_bytes(run_cfg, layout, n, platform) for n in (1, 2))
    per_seq, fixed = two - one, 2 * one - two
    block = 0.0
    if run_cfg.model.remat != "none":
        # traced_impl applied here too, so that residual_bytes rebuilds no second graphdef
        plain = _with_model(run_cfg, layout, _traced_model(run_cfg.model.replace(remat="none"), platform))
        none_seq = residual_bytes(*plain, 2, platform) - residual_bytes(*plain, 1, platform)
        block = none_seq / (run_cfg.model.n_layers + run_cfg.model.n_mtp_layers)
    return Activations(per_seq, fixed, block, block_expert_residuals(run_cfg), platform)


def block_expert_residuals(run_cfg) -> float:
    """Per sequence: what one block's routed experts keep for the backward on one device (every
    (token, slot) pair of the sequence in the grouped products), as local_expert_residuals
    counts it; the weights' casts, the same for any number of rows, cancel."""
    m = run_cfg.model
    pairs = run_cfg.data.seq_len * m.n_activated_experts
    one, two = (local_expert_residuals(m, m.n_routed_experts, m.moe_inter_dim, n * pairs) for n in (1, 2))
    return two - one


def looped_segments(cfg) -> list[int]:
    """Indices of the model's segments that run as a layer loop (model/transformer.py Segment:
    repeated more often than cfg.scan_unroll)."""
    from model.transformer import plan_segments

    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    return [i for i, (_, _, count) in enumerate(plan_segments(kinds, cfg.scan_max_period))
            if count > 1 and cfg.scan_unroll < count]


def looped_layers(cfg) -> int:
    """How many of the model's layers run inside layer loops."""
    from model.transformer import plan_segments

    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    segments = plan_segments(kinds, cfg.scan_max_period)
    return sum(len(segments[i][1]) * segments[i][2] for i in looped_segments(cfg))


# --- importing a released checkpoint (model.load_pretrained, train.init_from) ----------------
STACKED = ("layers", "experts")  # logical axes a checkpoint stores as one tensor per index


def import_host_bytes(params, rules, mesh, local_devices: int) -> tuple[int, int]:
    """(largest device shard of one parameter, largest checkpoint tensor in float32) in bytes, for
    `params` (an nnx State of Params with their logical axes) laid out by `rules` on `mesh`.
    model.load_pretrained fills one parameter at a time: jax.make_array_from_callback assembles
    each of the process's `local_devices` shards before placing them, each shard from source
    tensors read one at a time and dequantised to float32. So one process needs about
    local_devices x shard + source bytes of host memory (replicas on one process share a shard:
    an upper bound), never the checkpoint or a whole stacked parameter."""
    from flax import nnx
    from jax.sharding import NamedSharding

    shard = source = 0
    for _, v in nnx.to_flat_state(params):
        x = v.get_value()
        names = v.get_metadata().get("out_sharding") or (None,) * x.ndim
        local = NamedSharding(mesh, rules.var_spec(v)).shard_shape(x.shape)
        shard = max(shard, math.prod(local) * x.dtype.itemsize)
        source = max(source, 4 * math.prod(n for n, a in zip(x.shape, names) if a not in STACKED))
    return shard, source


# --- the estimate -------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Per-device bytes of one training step (the device holding the most). On TPU the
    temporaries are the largest of three phases of the backward, which are never live together
    (the dumped live ranges of libtpu's compiles, docs/benchmarks.md 2026-12-05), plus libtpu's
    copy of the layer loops' carried state:
    - the loss head: every residual, the head's logits of one slice, the vocabulary partials;
    - the last blocks (MTP, unlooped): every residual, one block recomputed, its MoE backward;
    - the layer loop: the gradients, the loop's stacked residuals, one block and its MoE.
    On GPU they are the sum of the rows: one H200 compile (the ~1B-active step, 2026-12-04)
    held them all at once (estimate 3% under the compiled total summed, 32% under by phases);
    no GPU compile has been read for phases."""
    params: float
    rest: float
    grads: float
    opt: float
    batch: float
    saved: float      # activations kept for the backward
    working: float    # one block recomputed during the backward (remat), weight casts
    seqs: float       # sequences per device per micro-batch
    partials: float   # full-size embedding / head gradients before their reduce-scatter
    exchange: float   # the expert-parallel MoE layer's backward: buffers, residuals, cotangents
    logits: float     # the loss head's logits of one vocabulary slice and their gradient
    accumulator: float = 0.0  # the micro-batches' gradient sum (train.micro_batches > 1)
    stacks: float = 0.0       # of `saved`: the layer loops' stacked residuals
    loop_copy: float = 0.0    # libtpu: a second copy of the layer loops' carried state
    platform: str = "tpu"     # of the target: phases on TPU, the sum of the rows elsewhere

    @property
    def arguments(self) -> float:
        """What the step takes in: the train state and the batch."""
        return self.params + self.rest + self.opt + self.batch

    @property
    def phases(self) -> dict[str, float]:
        block = self.working + self.exchange
        return {"loss head": self.accumulator + self.saved + self.logits + self.partials,
                "last blocks": self.accumulator + self.saved + block,
                "layer loop": self.accumulator + self.grads + self.stacks + block}

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def temporaries(self) -> float:
        """What the step allocates while it runs: on TPU its largest phase and libtpu's copy,
        elsewhere every row."""
        if self.platform != "tpu":
            return (self.grads + self.accumulator + self.saved + self.working + self.exchange + self.logits
                    + self.partials)
        return max(self.phases.values()) + self.loop_copy

    @property
    def total(self) -> float:
        return self.arguments + self.temporaries

    def rows(self, run_cfg) -> list[tuple[str, float]]:
        m = run_cfg.model
        return [(f"parameters ({m.param_dtype})", self.params),
                ("routing biases and hash tables", self.rest),
                (f"optimiser state ({run_cfg.optim.name})", self.opt),
                ("batch (inputs, targets, segments, mask)", self.batch),
                ("gradients", self.grads),
                ("gradient accumulator (micro-batches)", self.accumulator),
                (f"activations kept (remat {m.remat}, {self.seqs:g} seq x {run_cfg.data.seq_len})", self.saved),
                ("  of which the layer loops' stacked residuals", self.stacks),
                ("recompute working set + weight casts", self.working),
                ("expert-parallel MoE layer (exchange, backward)", self.exchange),
                (f"loss head logits (vocab / {m.head_chunks}, + gradient)", self.logits),
                ("embedding / head grads before reduce-scatter", self.partials),
                ("libtpu: copy of the layer loops' carried state", self.loop_copy)]


def estimate(run_cfg, layout, act: Activations, sizes: dict[str, int]) -> Memory:
    from model.layers import dtype_of
    from parallel.mesh import abstract_mesh

    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = run_cfg.train.micro_batches
    seqs = run_cfg.data.global_batch / shards / micro
    mesh = abstract_mesh(sizes)
    state = layout.bytes_per_device(mesh)
    param_share = state["params"] / layout.param_bytes
    batch = 4 * 4 * run_cfg.data.global_batch / shards * run_cfg.data.seq_len
    m = run_cfg.model
    # a block's routed experts are the exchange row's when they sit behind an expert axis
    block = act.block - (act.moe if sizes["expert"] > 1 else 0)
    # a looped block keeps its input stream (remat full); under another policy every residual
    # is counted as the loops' (an upper bound)
    stream = run_cfg.data.seq_len * m.hc_mult * m.dim * dtype_of(m.dtype).itemsize
    stacks = (looped_layers(m) * stream if m.remat == "full" else act.per_seq) * seqs
    copy = stacks + layout.looped_param_bytes(mesh, looped_segments(m)) if act.platform == "tpu" else 0
    return Memory(state["params"], state["rest"], state["params"], state["opt"], batch, act.per_seq * seqs,
                  block * seqs + act.fixed * param_share, seqs,
                  layout.vocab_partials(mesh, m.head_chunks),
                  exchange_bytes(run_cfg, sizes["expert"], seqs, sizes["tensor"]),
                  head_logit_bytes(m, seqs * run_cfg.data.seq_len, sizes["tensor"]),
                  accumulator=state["params"] if micro > 1 else 0, stacks=stacks, loop_copy=copy,
                  platform=act.platform)


def head_logit_bytes(cfg, tokens: float, tp: int = 1) -> float:
    """Bytes of the loss head's float32 logits of one vocabulary slice for `tokens` tokens,
    vocabulary split over `tp`, and of their gradient: train/step.py's head_ce makes them slice
    by slice, forward and backward, and keeps none."""
    return 2 * 4 * tokens * math.ceil(cfg.vocab_size / cfg.head_chunks / tp)


def exchange_bytes(run_cfg, ep: int, seqs: float, tp: int = 1) -> int:
    """Bytes of one MoE layer's expert-parallel backward on a device holding `seqs` sequences
    (see the module's docstring), as libtpu's live ranges show them at the peak of the last
    blocks' backward (docs/benchmarks.md, 2026-12-05): the local experts' residuals at the
    receive buffer's rows (capacity_factor x the balanced load, or every sender's pairs when
    dropless: parallel.expert.ragged_capacity; expert hidden units split over `tp`), the
    received rows' cotangent [rows, dim] in the compute dtype, and the two float32 [rows,
    hidden] upcasts SwiGLU's backward makes. 0 without an expert axis."""
    from model.layers import dtype_of
    from parallel.expert import ragged_capacity

    if ep == 1:
        return 0
    m = run_cfg.model
    pairs = math.ceil(seqs * run_cfg.data.seq_len * m.n_activated_experts)
    rows = ragged_capacity(pairs, ep, run_cfg.train.capacity_factor)
    local, hidden = m.n_routed_experts // ep, m.moe_inter_dim // tp
    cotangent = rows * m.dim * dtype_of(m.dtype).itemsize
    upcasts = 2 * rows * hidden * 4
    return local_expert_residuals(m, local, hidden, rows) + cotangent + upcasts


def local_expert_residuals(cfg, local: int, hidden: int, rows: int) -> int:
    """Bytes jax.vjp keeps for the backward of `local` experts of `hidden` units on a receive
    buffer of `rows` rows (parallel.expert.ExpertParallel._run_local: sort, grouped products,
    SwiGLU, gate, unsort), excluding the received rows and the weights themselves. Traced
    abstractly with the tiled grouped matmul, whose residuals are its inputs, like the TPU
    kernel's."""
    key = (cfg, local, hidden, rows)
    if key not in _TRACED:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from model.layers import dtype_of
        from model.moe import MoE
        from parallel.expert import ExpertParallel

        moe = nnx.eval_shape(lambda: MoE(cfg, hashed=False, rngs=nnx.Rngs(0)))
        dt, pt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)

        def kept(xs, w1, w3, w2, e, w):
            def run(xs, w1, w3, w2):
                experts = lambda x, ee, valid: ExpertParallel._local_experts(  # noqa: E731
                    moe, "tiled", x, ee, valid, w1, w3, w2, dt)
                return ExpertParallel._run_local(None, experts, xs, e, w, jnp.ones(e.shape, bool))
            _, f_vjp = jax.vjp(run, xs, w1, w3, w2)
            return _new_residuals(f_vjp, (xs, w1, w3, w2, e, w))

        S = jax.ShapeDtypeStruct
        out = jax.eval_shape(kept, S((rows, cfg.dim), dt), S((local, cfg.dim, hidden), pt),
                             S((local, cfg.dim, hidden), pt), S((local, hidden, cfg.dim), pt),
                             S((rows,), jnp.int32), S((rows,), jnp.float32))
        _TRACED[key] = _nbytes(out)
    return _TRACED[key]
