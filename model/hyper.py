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
from .layers import constant, normal, rms_normalize


def sinkhorn(logits_NN, iters: int, eps: float):
    """Row softmax + eps, then alternate column / row normalisation (columns first), `iters`
    column normalisations in all, as the reference kernel."""
    comb = jax.nn.softmax(logits_NN, axis=-1) + eps
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    return comb


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
        flat = rms_normalize(x_BSND.reshape(*x_BSND.shape[:-2], -1), self.norm_eps)
        mixes = jnp.einsum("bsi,im->bsm", flat, self.fn[...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
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
        flat = rms_normalize(x_BSND.reshape(*x_BSND.shape[:-2], -1), self.norm_eps)
        mixes = jnp.einsum("bsi,in->bsn", flat, self.fn[...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        pre = jax.nn.sigmoid(mixes * self.scale[...][0] + self.base[...]) + self.eps
        return collapse(pre, x_BSND)
