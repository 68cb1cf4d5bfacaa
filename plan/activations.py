"""What autodiff keeps for the backward, traced abstractly (jax.eval_shape of jax.vjp: no FLOPs,
no memory): the loss's residuals per sequence, one block's, and the local experts' of an
expert-parallel MoE layer. plan/memory.py turns them into the estimate's rows."""
from __future__ import annotations

from dataclasses import dataclass


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
