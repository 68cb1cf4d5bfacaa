"""Grouped matrix products of the MoE: rows sorted by expert, each group times its expert's matrix.

Legend: M rows (sorted by group), D input dim, F output dim, E groups (experts), T tile rows.

`grouped_matmul(x_MD, w_EDF, sizes_E, impl)` returns y [M, F] with y[rows of group e] =
x[rows of e] @ w[e] for the consecutive groups of `sizes` rows, and 0 for rows past sum(sizes).
Every implementation computes exactly that; they differ in what the backend makes of them:
- "dense": every row times every matrix, the row's own selected (the exactness oracle).
- "ragged": `jax.lax.ragged_dot`. Fine where the backend has a grouped kernel; XLA:CPU runs it
  as a masked product over every group (E times the FLOPs, measured 20-300x slower than the
  rows' own matmuls), so it stays the reference on CPU.
- "tiled": a loop over tiles of T consecutive rows of one group, each a plain [T, D] x [D, F]
  matmul with that group's matrix read in place (no gathered weights, no padded copies), with
  its own backward (the same loop for dx, and dw[e] accumulated in place). It costs the routed
  rows' FLOPs plus at most one partial tile per group, at matmul speed on XLA:CPU.
- "megablox": the Pallas TPU grouped-matmul kernel (jax.experimental.pallas.ops.tpu.megablox),
  with its transposed kernel for the weight gradient.
`choose_impl("auto")` picks tiled on CPU, megablox on TPU and ragged on GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .config import MOE_IMPLS as IMPLS  # the values of model.moe_impl


def choose_impl(impl: str, platform: str | None = None) -> str:
    """The grouped-matmul implementation `impl` means on `platform` (default: JAX's backend)."""
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return {"cpu": "tiled", "tpu": "megablox"}.get(platform, "ragged")


def grouped_matmul(x, w, sizes, impl: str, preferred_element_type=None):
    """y [M, F] = per-group x [M, D] @ w [E, D, F] for consecutive groups of `sizes` [E] rows."""
    out = preferred_element_type or x.dtype
    if impl == "dense":
        return _dense(x, w, sizes, out)
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=out)
    if impl == "tiled":
        return _tiled(x, w, sizes.astype(jnp.int32), tile_rows(x.shape[0], w.shape[0]), jnp.dtype(out))
    if impl == "megablox":
        return _megablox(x, w, sizes.astype(jnp.int32), jnp.dtype(out))
    raise ValueError(f"grouped_matmul: no implementation {impl!r}; use one of {IMPLS[1:]}")


def _dense(x, w, sizes, out):
    """Reference: every row times every group's matrix, the row's own group selected."""
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side="right")
    y = jnp.einsum("md,edf->mef", x, w, preferred_element_type=out)
    onehot = jax.nn.one_hot(group, w.shape[0], dtype=out)  # rows past the groups: all zero
    return jnp.einsum("mef,me->mf", y, onehot)


def tile_rows(m: int, e: int) -> int:
    """Rows per tile: a power of two near the mean group size, within [16, 128] (and <= M).
    Smaller tiles waste less on each group's last partial tile; larger ones run faster."""
    t = 16
    while t < 128 and 2 * t <= m / max(e, 1):
        t *= 2
    return max(1, min(t, m))


# --- tiled: a while loop of plain matmuls ---------------------------------------------------
def _schedule(sizes, m: int, t: int):
    """Per tile (static upper bound of tiles): its group, first row and number of valid rows;
    and the number of tiles actually used."""
    e = sizes.shape[0]
    tiles = (sizes + t - 1) // t
    tend = jnp.cumsum(tiles)
    n_max = m // t + e
    k = jnp.arange(n_max)
    group = jnp.minimum(jnp.searchsorted(tend, k, side="right"), e - 1)
    within = k - (tend - tiles)[group]
    row0 = (jnp.cumsum(sizes) - sizes)[group] + within * t
    count = jnp.clip(sizes[group] - within * t, 0, t)
    return group, row0, count, tend[-1]


def _tile_loop(sizes, m: int, t: int, body, init):
    """Run body(group, row0c, mask [T], carry) -> carry over the used tiles, in row order. row0c
    is the tile's first row clamped so that T rows fit; mask marks the tile's own rows in it."""
    group, row0, count, n = _schedule(sizes, m, t)
    lanes = jnp.arange(t)

    def step(i, carry):
        r0 = jnp.minimum(row0[i], m - t)
        shift = row0[i] - r0
        mask = (lanes >= shift) & (lanes < shift + count[i])
        return body(group[i], r0, mask, carry)

    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, step(c[0], c[1])), (0, init))[1]


def _rows_times(x, w, sizes, t, out, contract_w: int):
    """y [M, out dim] = x's tiles times w[group] contracted on w's axis `contract_w` (1: x @ w[e],
    2: x @ w[e].T); rows outside the groups stay 0."""
    m = x.shape[0]
    width = w.shape[3 - contract_w]

    def body(g, r0, mask, y):
        we = jax.lax.dynamic_index_in_dim(w, g, 0, keepdims=False)
        xt = jax.lax.dynamic_slice_in_dim(x, r0, t)
        yt = jax.lax.dot_general(xt, we, (((1,), (contract_w - 1,)), ((), ())), preferred_element_type=out)
        cur = jax.lax.dynamic_slice_in_dim(y, r0, t)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mask[:, None], yt.astype(out), cur), r0, 0)

    return _tile_loop(sizes, m, t, body, jnp.zeros((m, width), out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled(x, w, sizes, t, out):
    return _rows_times(x, w, sizes, t, out, 1)


def _tiled_fwd(x, w, sizes, t, out):
    return _rows_times(x, w, sizes, t, out, 1), (x, w, sizes)


def _tiled_bwd(t, out, res, dy):
    x, w, sizes = res
    dx = _rows_times(dy.astype(x.dtype), w, sizes, t, x.dtype, 2)

    def body(g, r0, mask, dw):
        xt = jax.lax.dynamic_slice_in_dim(x, r0, t)
        gt = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(dy, r0, t), 0).astype(x.dtype)
        upd = jax.lax.dot_general(xt, gt, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        cur = jax.lax.dynamic_index_in_dim(dw, g, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(dw, cur + upd, g, 0)

    dw = _tile_loop(sizes, x.shape[0], t, body, jnp.zeros(w.shape, jnp.float32))
    return dx, dw.astype(w.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


# --- megablox: the Pallas TPU kernel --------------------------------------------------------
def _megablox(x, w, sizes, out, interpret: bool = False):
    """Rows padded to the kernel's row tile; rows past the groups zeroed. interpret=True runs
    the kernel in Pallas' interpreter (any backend: how the tests check it on CPU)."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m, d = x.shape
    f = w.shape[2]
    tm = min(128, -(-m // 8) * 8)
    pad = -m % tm
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    tiling = (tm, _tile(d), _tile(f))
    y = gmm(xp, w, sizes, out, tiling, None, None, False, interpret)[:m]
    return jnp.where((jnp.arange(m) < jnp.sum(sizes))[:, None], y, 0).astype(out)


def _tile(n: int) -> int:
    """The largest of 512, 256, 128 dividing n, else n itself (a full-width block)."""
    return next((b for b in (512, 256, 128) if n % b == 0), n)
