"""mHC: manifold-constrained hyper-connections, computed in float32.

Legend: B batch, S sequence, N residual streams (hc_mult), D model dim, M = (2 + N) * N mixing logits.
The residual is N streams; around every sublayer a projection of the RMS-normalised flattened
streams gives N "pre" weights (collapse), N "post" weights (spread) and an N x N "comb" matrix
projected onto doubly stochastic matrices by Sinkhorn iterations (row softmax first).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import constant, constrain, normal

STREAMS = ("batch", "act_seq", None, "act_embed")  # logical axes of the streams [B, S, N, D]


def sinkhorn(logits_NN, iters: int, eps: float):
    """Row softmax + eps, then alternate column / row normalisation (columns first), `iters`
    column normalisations in all, as the reference kernel. Logits [..., N, N]."""
    # The N x N matrices are moved to the leading axes ([N, N, tokens]): every normalisation is
    # then N vector adds over the tokens, not a reduction over a minor axis of 4 (3x faster on
    # XLA:CPU, forward and backward).
    shape = logits_NN.shape
    c_NNT = jnp.moveaxis(logits_NN.reshape(-1, *shape[-2:]), 0, -1)
    return jnp.moveaxis(_sinkhorn(c_NNT, iters, eps), -1, 0).reshape(shape)


def _normalise(x, axis, eps):
    """x divided by its sums along `axis` (+ eps): one Sinkhorn normalisation."""
    return x / (x.sum(axis, keepdims=True) + eps)


def _normalise_vjp(g, x, axis, eps):
    """The cotangent of x for y = _normalise(x): (g - sum(g * y)) / (sum(x) + eps)."""
    d = x.sum(axis, keepdims=True) + eps
    return (g - (g * (x / d)).sum(axis, keepdims=True)) / d


def _iteration(c, eps):
    """Rows, then columns."""
    return _normalise(_normalise(c, 1, eps), 0, eps)


def _first(x_NNT, eps):
    """Row softmax + eps, then the first column normalisation."""
    return _normalise(jax.nn.softmax(x_NNT, axis=1) + eps, 0, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn(x_NNT, iters: int, eps: float):
    comb = _first(x_NNT, eps)
    # A rolled loop: unrolled, the 2 x iters tiny normalisations of every hyper-connection (and
    # their transposes) were half of the compiled program and half of its compile time.
    return jax.lax.fori_loop(1, iters, lambda _, c: _iteration(c, eps), comb)


def _sinkhorn_fwd(x_NNT, iters, eps):
    comb = _first(x_NNT, eps)
    comb, inputs = jax.lax.scan(lambda c, _: (_iteration(c, eps), c), comb, None, length=iters - 1)
    return comb, (x_NNT, inputs)


def _sinkhorn_bwd(iters, eps, res, g):
    """The transposed iterations from each one's saved input alone (JAX's autodiff of the loop
    kept six stacks of per-iteration intermediates)."""
    x, inputs = res

    def back(g, c):
        return _normalise_vjp(_normalise_vjp(g, _normalise(c, 1, eps), 0, eps), c, 1, eps), None

    g, _ = jax.lax.scan(back, g, inputs, reverse=True)
    s = jax.nn.softmax(x, axis=1)
    g_p = _normalise_vjp(g, s + eps, 0, eps)
    return (s * (g_p - (g_p * s).sum(1, keepdims=True)),)


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def normalized_mixes(x_BSND, fn_IM, eps: float):
    """RMSNorm(flattened streams) @ fn in float32, as (x @ fn) * rsqrt(mean(x^2) + eps): the
    per-token scale applied after the projection (as DeepSeek's reference does), so that no
    normalised [B, S, N*D] copy exists (XLA:CPU fused its reduction into every element of the
    copy a layer scan keeps for the backward: ~40% of a `small` step)."""
    # pinned to the streams' batch sharding: its gradient would otherwise take the fsdp
    # sharding of fn's input axis (N*D), and the partitioner re-gathers every stream to undo it
    flat = constrain(x_BSND.reshape(*x_BSND.shape[:-2], -1).astype(jnp.float32), ("batch", "act_seq", None))
    r = jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + eps)
    return jnp.einsum("bsi,im->bsm", flat, fn_IM.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * r


def _f32(a):
    return a.astype(jnp.float32)


# collapse and merge carry their own backward passes. Differentiated by JAX, the broadcasts of
# pre / post / comb to [B, S, N, D] became residuals: XLA:CPU materialised N + 1 float32
# copies of the streams' size per merge (a quarter of a CPU step on issue 11's dim-256 shape).
# Here the backward keeps only the operands and writes every gradient as multiply-adds or
# reductions over D.
@jax.custom_vjp
def collapse(pre_BSN, x_BSND):
    """sum_n pre_n * x_n in float32, cast to x's dtype. Written as N multiply-adds rather than
    an einsum: with N = 4 a contraction becomes B*S tiny matmuls, which XLA:CPU runs one by one
    (the largest cost of a small model's step); the elementwise form fuses into one loop."""
    out = pre_BSN[..., 0, None] * _f32(x_BSND[..., 0, :])
    for n in range(1, x_BSND.shape[-2]):
        out = out + pre_BSN[..., n, None] * _f32(x_BSND[..., n, :])
    return out.astype(x_BSND.dtype)


def _collapse_bwd(res, g_BSD):
    pre_BSN, x_BSND = res
    g = _f32(g_BSD)
    d_pre = jnp.sum(_f32(x_BSND) * g[..., None, :], axis=-1)
    d_x = constrain(pre_BSN[..., None] * g[..., None, :], STREAMS)
    return d_pre.astype(pre_BSN.dtype), d_x.astype(x_BSND.dtype)


collapse.defvjp(lambda pre, x: (collapse(pre, x), (pre, x)), _collapse_bwd)


@jax.custom_vjp
def merge(y_BSD, x_BSND, post_BSN, comb_BSNN):
    """New stream k = post_k * y + sum_j comb[j, k] * x_j (comb is applied transposed), in
    float32, cast to x's dtype; N multiply-adds: one elementwise fusion (see collapse)."""
    out = post_BSN[..., None] * _f32(y_BSD)[..., None, :]
    for j in range(x_BSND.shape[-2]):
        out = out + comb_BSNN[..., j, :, None] * _f32(x_BSND[..., j, None, :])
    return out.astype(x_BSND.dtype)


def _merge_bwd(res, g_BSND):
    y_BSD, x_BSND, post_BSN, comb_BSNN = res
    g, n = _f32(g_BSND), x_BSND.shape[-2]
    d_y = post_BSN[..., 0, None] * g[..., 0, :]
    for k in range(1, n):
        d_y = d_y + post_BSN[..., k, None] * g[..., k, :]
    d_post = jnp.sum(g * _f32(y_BSD)[..., None, :], axis=-1)
    d_comb = jnp.sum(_f32(x_BSND)[..., :, None, :] * g[..., None, :, :], axis=-1)  # [j, k]
    d_x = comb_BSNN[..., :, 0, None] * g[..., 0, None, :]  # d x_j = sum_k comb[j, k] * g_k
    for k in range(1, n):
        d_x = d_x + comb_BSNN[..., :, k, None] * g[..., k, None, :]
    d_y, d_x = constrain(d_y, ("batch", "act_seq", "act_embed")), constrain(d_x, STREAMS)
    return (d_y.astype(y_BSD.dtype), d_x.astype(x_BSND.dtype),
            d_post.astype(post_BSN.dtype), d_comb.astype(comb_BSNN.dtype))


merge.defvjp(lambda *a: (merge(*a), a), _merge_bwd)


class HyperConnection(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        n, self.n = cfg.hc_mult, cfg.hc_mult
        self.iters, self.eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
        mix = (2 + n) * n
        self.fn = normal(rngs, (n * cfg.dim, mix), ("hc_embed", "hc_mix"), cfg.init_std)
        self.base = constant((mix,), ("hc_mix",), 0.0)
        self.scale = constant((3,), ("hc_scale",), 1.0)

    def __call__(self, x_BSND):
        """Returns (sublayer input [B,S,D] in x's dtype, post [B,S,N], comb [B,S,N,N]) in fp32."""
        n = self.n
        mixes = normalized_mixes(x_BSND, self.fn[...], self.norm_eps)
        scale, base = self.scale[...], self.base[...]
        pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + self.eps
        post = 2.0 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb_logits = mixes[..., 2 * n:] * scale[2] + base[2 * n:]
        comb = sinkhorn(comb_logits.reshape(*comb_logits.shape[:-1], n, n), self.iters, self.eps)
        return collapse(pre, x_BSND), post, comb

    merge = staticmethod(merge)


class HyperHead(nnx.Module):
    """Final collapse of the N streams into one (sigmoid + eps weights, no Sinkhorn)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        n, self.n = cfg.hc_mult, cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps
        self.fn = normal(rngs, (n * cfg.dim, n), ("hc_embed", "hc_streams"), cfg.init_std)
        self.base = constant((n,), ("hc_streams",), 0.0)
        self.scale = constant((1,), ("hc_scale_head",), 1.0)

    def __call__(self, x_BSND):
        mixes = normalized_mixes(x_BSND, self.fn[...], self.norm_eps)
        pre = jax.nn.sigmoid(mixes * self.scale[...][0] + self.base[...]) + self.eps
        return collapse(pre, x_BSND)
