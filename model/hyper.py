"""mHC: manifold-constrained hyper-connections, computed in float32.

Legend: B batch, S sequence, N residual streams (hc_mult), D model dim, M = (2 + N) * N mixing logits.
The residual is N streams; around every sublayer a projection of the RMS-normalised flattened
streams gives N "pre" weights (collapse), N "post" weights (spread) and an N x N "comb" matrix
projected onto doubly stochastic matrices by Sinkhorn iterations (row softmax first).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import constant, normal


def sinkhorn(logits_NN, iters: int, eps: float):
    """Row softmax + eps, then alternate column / row normalisation (columns first), `iters`
    column normalisations in all, as the reference kernel."""
    column = lambda c: c / (c.sum(-2, keepdims=True) + eps)
    row = lambda c: c / (c.sum(-1, keepdims=True) + eps)
    comb = column(jax.nn.softmax(logits_NN, axis=-1) + eps)
    # A rolled loop: unrolled, the 2 x iters tiny normalisations of every hyper-connection (and
    # their transposes) were half of the compiled program and half of its compile time.
    return jax.lax.fori_loop(1, iters, lambda _, c: column(row(c)), comb)


def normalized_mixes(x_BSND, fn_IM, eps: float):
    """RMSNorm(flattened streams) @ fn in float32, as (x @ fn) * rsqrt(mean(x^2) + eps): the
    per-token scale applied after the projection (as DeepSeek's reference does), so that no
    normalised [B, S, N*D] copy exists (XLA:CPU fused its reduction into every element of the
    copy a layer scan keeps for the backward: ~40% of a `small` step)."""
    flat = x_BSND.reshape(*x_BSND.shape[:-2], -1).astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + eps)
    return jnp.einsum("bsi,im->bsm", flat, fn_IM.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * r


def collapse(pre_BSN, x_BSND):
    """sum_n pre_n * x_n in float32, cast to x's dtype. Written as N multiply-adds rather than
    an einsum: with N = 4 a contraction becomes B*S tiny matmuls, which XLA:CPU runs one by one
    (the largest cost of a small model's step); the elementwise form fuses into one loop."""
    out = pre_BSN[..., 0, None] * x_BSND[..., 0, :].astype(jnp.float32)
    for n in range(1, x_BSND.shape[-2]):
        out = out + pre_BSN[..., n, None] * x_BSND[..., n, :].astype(jnp.float32)
    return out.astype(x_BSND.dtype)


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

    @staticmethod
    def merge(y_BSD, x_BSND, post_BSN, comb_BSNN):
        """New stream k = post_k * y + sum_j comb[j, k] * x_j (comb is applied transposed)."""
        out = post_BSN[..., None] * y_BSD[..., None, :].astype(jnp.float32)
        for j in range(x_BSND.shape[-2]):  # N multiply-adds: one elementwise fusion (see collapse)
            out = out + comb_BSNN[..., j, :, None] * x_BSND[..., j, None, :].astype(jnp.float32)
        return out.astype(x_BSND.dtype)


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
