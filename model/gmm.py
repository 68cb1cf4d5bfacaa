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
  its own backward (one loop: each tile's dx and its dw[e], accumulated in place). It costs the
  routed rows' FLOPs plus at most one partial tile per group, at matmul speed on XLA:CPU.
  `grouped_matmuls(x, (w1, w3), ...)` runs several matrices in the same loop.
- "megablox": the Pallas TPU grouped-matmul kernel (jax.experimental.pallas.ops.tpu.megablox),
  with its transposed kernel for the weight gradient.
- "batched": passes of per-expert blocks: each pass gathers rows p*C .. (p+1)*C - 1 of every
  group into [E, C, D], one batched matmul [E, C, D] x [E, D, F], the valid rows scattered
  back; passes run while a group has rows left (C = 1.25x the balanced load: one pass when
  routing is near balance, ceil(largest / C) in general), with its own backward over the same
  passes. Exact for any routing; costs E*C rows per pass in a few large matmuls, which suits
  backends with fast batched GEMMs and slow small kernels (GPUs); on XLA:CPU it is 1-2x tiled.
- "tokamax": `tokamax.ragged_dot`, DeepMind's kernel library (the `gpu` extra): Mosaic GPU
  kernels on Hopper, Triton elsewhere, with their own backward; XLA's ragged_dot elsewhere.
  XLA:GPU runs `ragged_dot` like XLA:CPU (measured on an H200, jax 0.11.2: 33x the rows' matmul
  time, and the ~1B-active step of bench/gpu_train.py asks for 134.6 GiB of temporaries), and
  "tiled" there is a loop of small kernels (32x), so GPUs need a real kernel.
`choose_impl("auto")` picks tiled on CPU, megablox on TPU and tokamax on GPU ("batched", with a
warning, where tokamax is not installed or its kernels do not build).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import jax
import jax.numpy as jnp

from .config import MOE_IMPLS as IMPLS  # the values of model.moe_impl


def choose_impl(impl: str, platform: str | None = None) -> str:
    """The grouped-matmul implementation `impl` means on `platform` (default: JAX's backend)."""
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "gpu":
        return "tokamax" if _has_tokamax() else "batched"
    return {"cpu": "tiled", "tpu": "megablox"}.get(platform, "ragged")


@functools.cache
def _has_tokamax() -> bool:
    if importlib.util.find_spec("tokamax") is None:
        warnings.warn("model.moe_impl auto: tokamax is not installed (pip install '.[gpu]'); the MoE runs "
                      "'batched' (per-expert blocks in batched matmuls) instead of its grouped kernels")
        return False
    return True


def grouped_matmul(x, w, sizes, impl: str, preferred_element_type=None):
    """y [M, F] = per-group x [M, D] @ w [E, D, F] for consecutive groups of `sizes` [E] rows."""
    out = preferred_element_type or x.dtype
    if impl == "dense":
        return _dense(x, w, sizes, out)
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=out)
    if impl in ("tiled", "batched"):
        return grouped_matmuls(x, (w,), sizes, impl, out)[0]
    if impl == "megablox":
        return _megablox(x, w, sizes.astype(jnp.int32), jnp.dtype(out))
    if impl == "tokamax":
        return _tokamax_ragged_dot(x, w, sizes.astype(jnp.int32), out)
    raise ValueError(f"grouped_matmul: no implementation {impl!r}; use one of {IMPLS[1:]}")


def _tokamax_ragged_dot(x, w, sizes, out):
    """tokamax.ragged_dot, or "batched" (with a warning) where tokamax's kernels do not build
    against this jax: tokamax follows jax's internal Pallas APIs release by release (measured:
    tokamax 0.0.12 under jax 0.11.2 fails in both its Mosaic GPU and Triton kernels with a
    TypeError / AttributeError while tracing)."""
    try:
        return _tokamax().ragged_dot(x, w, sizes, preferred_element_type=out)
    except (TypeError, AttributeError) as e:
        warnings.warn(f"model.moe_impl tokamax: its kernel failed to build ({type(e).__name__}: {e}); "
                      "running 'batched' instead")
        return grouped_matmul(x, w, sizes, "batched", out)


@functools.cache
def _tokamax():
    """tokamax, with absl's flags marked parsed: its options otherwise parse sys.argv on first
    use and fail on any command line of ours (`python -m train --config ...`)."""
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def grouped_matmuls(x, ws, sizes, impl: str, preferred_element_type=None):
    """(grouped_matmul(x, w, ...) for w in ws): "tiled" and "batched" run every matrix in one
    pass over x's tiles / blocks, forward and backward (the experts' gate and up projections
    read the same rows); the other implementations make one call per matrix."""
    out = jnp.dtype(preferred_element_type or x.dtype)
    m, e = x.shape[0], ws[0].shape[0]
    if impl == "tiled":
        return _tiled(x, tuple(ws), sizes.astype(jnp.int32), tile_rows(m, e), out)
    if impl == "batched":
        return _batched(x, tuple(ws), sizes.astype(jnp.int32), block_rows(m, e), out)
    return tuple(grouped_matmul(x, w, sizes, impl, preferred_element_type) for w in ws)


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


def _tiles(x, ws, sizes, t, out):
    """ys [M, F_i] = x's tiles times ws[i][group], one pass over the tiles for every matrix;
    rows outside the groups stay 0."""
    m = x.shape[0]

    def body(g, r0, mask, ys):
        xt = jax.lax.dynamic_slice_in_dim(x, r0, t)
        new = []
        for w, y in zip(ws, ys):
            yt = jnp.dot(xt, jax.lax.dynamic_index_in_dim(w, g, 0, keepdims=False), preferred_element_type=out)
            cur = jax.lax.dynamic_slice_in_dim(y, r0, t)
            new.append(jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mask[:, None], yt, cur), r0, 0))
        return tuple(new)

    return _tile_loop(sizes, m, t, body, tuple(jnp.zeros((m, w.shape[2]), out) for w in ws))


def _keeping_inputs(forward, backward):
    """forward(x, ws, sizes, block, out) with its own backward(block, out, (x, ws, sizes), dys):
    the residuals are the inputs alone (the tiles / blocks are re-read in the backward)."""
    f = jax.custom_vjp(forward, nondiff_argnums=(3, 4))
    f.defvjp(lambda x, ws, sizes, b, out: (forward(x, ws, sizes, b, out), (x, ws, sizes)), backward)
    return f


def _tiled_bwd(t, out, res, dys):
    """One pass over the tiles: dx = sum_i dy_i @ w_i[e].T and dw_i[e] += x.T @ dy_i."""
    x, ws, sizes = res

    def body(g, r0, mask, carry):
        dx, dws = carry
        xt = jax.lax.dynamic_slice_in_dim(x, r0, t)
        acc, new = 0.0, []
        for w, dy, dw in zip(ws, dys, dws):
            we = jax.lax.dynamic_index_in_dim(w, g, 0, keepdims=False)
            gt = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(dy, r0, t), 0).astype(x.dtype)
            acc = acc + jax.lax.dot_general(gt, we, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            upd = jax.lax.dot_general(xt, gt, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            cur = jax.lax.dynamic_index_in_dim(dw, g, 0, keepdims=False)
            new.append(jax.lax.dynamic_update_index_in_dim(dw, cur + upd, g, 0))
        cur = jax.lax.dynamic_slice_in_dim(dx, r0, t)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(mask[:, None], acc.astype(x.dtype), cur), r0, 0)
        return dx, tuple(new)

    init = (jnp.zeros(x.shape, x.dtype), tuple(jnp.zeros(w.shape, jnp.float32) for w in ws))
    dx, dws = _tile_loop(sizes, x.shape[0], t, body, init)
    return dx, tuple(d.astype(w.dtype) for d, w in zip(dws, ws)), None


_tiled = _keeping_inputs(_tiles, _tiled_bwd)


# --- batched: per-expert blocks of C rows, one batched matmul per pass -----------------------
def block_rows(m: int, e: int) -> int:
    """Rows per expert and pass: 1.25x the balanced load, a multiple of 8 (<= M). One pass
    covers every group of up to C rows; a larger group takes ceil(size / C) passes."""
    return max(1, min(m, -(-int(1.25 * m / max(e, 1)) // 8) * 8))


def _block_loop(sizes, m: int, c: int, body, init):
    """Run body(rows [E, C], valid [E, C], carry) -> carry for each pass p: rows[e, j] =
    group e's row p*C + j (clamped into [0, M) where invalid), while some group has rows left."""
    starts = jnp.cumsum(sizes) - sizes
    lanes = jnp.arange(c)

    def step(carry):
        p, inner = carry
        within = p * c + lanes[None, :]
        valid = within < sizes[:, None]
        rows = jnp.where(valid, starts[:, None] + within, 0)
        return p + 1, body(rows, valid, inner)

    return jax.lax.while_loop(lambda cr: cr[0] * c < jnp.max(sizes), step, (0, init))[1]


def _blocks(x, ws, sizes, c, out):
    """ys [M, F_i]: each pass gathers [E, C, D] rows, multiplies them by ws[i] [E, D, F] in one
    batched matmul and scatters the valid rows back; rows outside the groups stay 0."""
    m = x.shape[0]

    def body(rows, valid, ys):
        xb = jnp.where(valid[..., None], x[rows], 0)
        dest = jnp.where(valid, rows, m)  # out of range: dropped
        return tuple(y.at[dest].set(jnp.einsum("ecd,edf->ecf", xb, w, preferred_element_type=out), mode="drop")
                     for w, y in zip(ws, ys))

    return _block_loop(sizes, m, c, body, tuple(jnp.zeros((m, w.shape[2]), out) for w in ws))


def _batched_bwd(c, out, res, dys):
    """The same passes: dx = sum_i dy_i @ w_i[e].T and dw_i += x_blocks.T @ dy_blocks."""
    x, ws, sizes = res
    m = x.shape[0]

    def body(rows, valid, carry):
        dx, dws = carry
        xb = jnp.where(valid[..., None], x[rows], 0)
        acc, new = 0.0, []
        for w, dy, dw in zip(ws, dys, dws):
            gb = jnp.where(valid[..., None], dy[rows], 0).astype(x.dtype)
            acc = acc + jnp.einsum("ecf,edf->ecd", gb, w, preferred_element_type=jnp.float32)
            new.append(dw + jnp.einsum("ecd,ecf->edf", xb, gb, preferred_element_type=jnp.float32))
        return dx.at[jnp.where(valid, rows, m)].set(acc.astype(x.dtype), mode="drop"), tuple(new)

    init = (jnp.zeros(x.shape, x.dtype), tuple(jnp.zeros(w.shape, jnp.float32) for w in ws))
    dx, dws = _block_loop(sizes, m, c, body, init)
    return dx, tuple(d.astype(w.dtype) for d, w in zip(dws, ws)), None


_batched = _keeping_inputs(_blocks, _batched_bwd)


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
    return _zero_past(y, jnp.sum(sizes)).astype(out)


@jax.custom_vjp
def _zero_past(y, n):
    """y with its rows from n on set to 0 (the kernel leaves them unwritten). Its backward
    passes the cotangent through whole: the kernel's weight gradient (tgmm) reads the groups'
    rows only, and its input gradient past the groups is unwritten either way; a masked
    cotangent was a [rows, F] select kept live in the pods' MoE backward."""
    return jnp.where((jnp.arange(y.shape[0]) < n)[:, None], y, 0)


_zero_past.defvjp(lambda y, n: (_zero_past(y, n), None), lambda _, dy: (dy, None))


def _tile(n: int) -> int:
    """The largest of 512, 256, 128 dividing n, else n itself (a full-width block)."""
    return next((b for b in (512, 256, 128) if n % b == 0), n)
