"""Routed experts for decoding: each (token, slot) pair multiplies by its own expert, gathered.

Legend: B batch slots, S tokens per slot, N = B * S tokens, k experts per token, D model dim,
F expert hidden, E routed experts.
A decode step has a handful of tokens. The training path's grouped matmul (model/gmm.py) sorts
the N * k (token, slot) pairs by expert and loops over expert tiles, copying each tile's expert
matrices, which for a few rows costs far more than the arithmetic. Here each pair's expert
matrices are gathered and applied to its token: N * k matrices read per projection, the same
float32 sums per pair as MoE._grouped in another order. It is installed as the model's `experts`
hook (model.layers.Hooks) while a decode step traces, only when the step has fewer pairs than
there are experts (else the usual path reads each expert once) and no hook is installed already
(parallel.sharded's expert parallelism keeps its own).
"""
from __future__ import annotations

import contextlib

import jax.numpy as jnp

from model.layers import dtype_of, hooks, using_hooks
from model.moe import swiglu

F32 = jnp.float32


def gathered(moe, x_BSD, idx_BSk, wts_BSk):
    """The experts hook: (routed + shared experts' output [B, S, D] float32, 0 dropped)."""
    cfg = moe.cfg
    b, s, d = x_BSD.shape
    dt, x_ND = dtype_of(cfg.dtype), x_BSD.reshape(b * s, d)
    idx = idx_BSk.reshape(b * s, -1)
    w1, w3, w2 = (w[idx].astype(dt) for w in moe.expert_weights())         # [N, k, D, F], [N, k, F, D]
    x = moe.expert_input(x_ND).astype(dt)
    # x repeated over k: (n, k) are then batch dimensions of both operands, a plain batched
    # matrix-vector product; with x shared across k, XLA:CPU first transposed the gathered
    # weights (2.3-3.3x slower for 1-7 tokens of `small`)
    xk = jnp.broadcast_to(x[:, None, :], (*idx.shape, d))
    h = swiglu(jnp.einsum("nkd,nkdf->nkf", xk, w1, preferred_element_type=F32),
               jnp.einsum("nkd,nkdf->nkf", xk, w3, preferred_element_type=F32), cfg.swiglu_limit)
    h = moe.expert_input(h * wts_BSk.reshape(b * s, -1, 1)).astype(dt)
    y = jnp.einsum("nkf,nkfd->nkd", h, w2, preferred_element_type=F32).sum(axis=1) + moe.shared(x_ND)
    return y.reshape(b, s, d), jnp.zeros((), jnp.int32)


@contextlib.contextmanager
def for_decoding(cfg, tokens: int):
    """Inside: MoE layers use `gathered` for a step of `tokens` tokens if it pays (see above)."""
    if hooks().experts is not None or tokens * cfg.n_activated_experts >= cfg.n_routed_experts:
        yield
        return
    with using_hooks(experts=gathered):
        yield
