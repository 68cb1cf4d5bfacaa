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
  group into [E, C, D], one batched matmul [E, C, D] x [E, D, F]; the first pass's blocks are
  gathered back into rows (no zero-filled output), later passes, which run while a group has
  rows left, scatter theirs (C = 1.25x the balanced load: one pass when routing is near
  balance, ceil(largest / C) in general). Its own backward runs the same passes, the first
  one's products starting dx and dw. Exact for any routing; costs E*C rows per pass in a few
  large matmuls, which suits backends with fast batched GEMMs and slow small kernels (GPUs).
- "blocked": the first pass of "batched" (every group's first C rows in one batched matmul per
  matrix, gathered back into rows), then "tiled" over the rows past C, starting from those
  rows (no zero-filled outputs or gradients); near balance there are few or none. Costs E*C
  rows at batched-matmul speed plus the overflow's tiles: on XLA:CPU a `small` step takes 7-16%
  less time than with "tiled" (tiled pays a copy of its expert's matrix per tile), and a
  skewed routing costs at most what "tiled" costs on top of the one pass.
- "tokamax": `tokamax.ragged_dot`, DeepMind's kernel library (the `gpu` extra): Mosaic GPU
  kernels on Hopper, Triton elsewhere, with their own backward; XLA's ragged_dot elsewhere.
  XLA:GPU runs `ragged_dot` like XLA:CPU (measured on an H200, jax 0.11.2: 33x the rows' matmul
  time, and the ~1B-active step of bench/gpu_train.py asks for 134.6 GiB of temporaries), and
  "tiled" there is a loop of small kernels (32x), so GPUs need a real kernel.
`choose_impl("auto")` picks blocked on CPU, megablox on TPU and tokamax on GPU ("batched", with a
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
    return {"cpu": "blocked", "tpu": "megablox"}.get(platform, "ragged")


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
    if impl in ("tiled", "batched", "blocked"):
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
    """(grouped_matmul(x, w, ...) for w in ws): "tiled", "batched" and "blocked" run every
    matrix in one pass over x's tiles / blocks, forward and backward (the experts' gate and up
    projections read the same rows); the other implementations make one call per matrix."""
    out = jnp.dtype(preferred_element_type or x.dtype)
    m, e = x.shape[0], ws[0].shape[0]
    if impl == "tiled":
        return _tiled(x, tuple(ws), sizes.astype(jnp.int32), tile_rows(m, e), out)
    if impl == "batched":
        return _batched(x, tuple(ws), sizes.astype(jnp.int32), block_rows(m, e), out)
    if impl == "blocked":
        return _blocked(x, tuple(ws), sizes.astype(jnp.int32), (block_rows(m, e), tile_rows(m, e)), out)
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
def _schedule(sizes, m: int, t: int, starts=None):
    """Per tile (static upper bound of tiles): its group, first row and number of valid rows;
    and the number of tiles actually used. Group e's rows start at starts[e] (default: the
    groups one after another from row 0)."""
    e = sizes.shape[0]
    starts = jnp.cumsum(sizes) - sizes if starts is None else starts
    tiles = (sizes + t - 1) // t
    tend = jnp.cumsum(tiles)
    n_max = m // t + e
    k = jnp.arange(n_max)
    group = jnp.minimum(jnp.searchsorted(tend, k, side="right"), e - 1)
    within = k - (tend - tiles)[group]
    row0 = starts[group] + within * t
    count = jnp.clip(sizes[group] - within * t, 0, t)
    return group, row0, count, tend[-1]


def _tile_loop(sizes, m: int, t: int, body, init, starts=None):
    """Run body(group, row0c, mask [T], carry) -> carry over the used tiles, in row order. row0c
    is the tile's first row clamped so that T rows fit; mask marks the tile's own rows in it."""
    group, row0, count, n = _schedule(sizes, m, t, starts)
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
    return _tile_products(x, ws, sizes, t, out, tuple(jnp.zeros((x.shape[0], w.shape[2]), out) for w in ws))


def _tile_products(x, ws, sizes, t, out, init, starts=None):
    """_tiles from init: the tiles' rows written into it, the other rows kept."""
    m = x.shape[0]

    def body(g, r0, mask, ys):
        xt = jax.lax.dynamic_slice_in_dim(x, r0, t)
        new = []
        for w, y in zip(ws, ys):
            yt = jnp.dot(xt, jax.lax.dynamic_index_in_dim(w, g, 0, keepdims=False), preferred_element_type=out)
            cur = jax.lax.dynamic_slice_in_dim(y, r0, t)
            new.append(jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mask[:, None], yt, cur), r0, 0))
        return tuple(new)

    return _tile_loop(sizes, m, t, body, init, starts)


def _keeping_inputs(forward, backward):
    """forward(x, ws, sizes, block, out) with its own backward(block, out, (x, ws, sizes), dys):
    the residuals are the inputs alone (the tiles / blocks are re-read in the backward)."""
    f = jax.custom_vjp(forward, nondiff_argnums=(3, 4))
    f.defvjp(lambda x, ws, sizes, b, out: (forward(x, ws, sizes, b, out), (x, ws, sizes)), backward)
    return f


def _tiled_bwd(t, out, res, dys):
    x, ws, sizes = res
    init = (jnp.zeros(x.shape, x.dtype), tuple(jnp.zeros(w.shape, jnp.float32) for w in ws))
    dx, dws = _tile_grads(x, ws, dys, sizes, t, init)
    return dx, tuple(d.astype(w.dtype) for d, w in zip(dws, ws)), None


def _tile_grads(x, ws, dys, sizes, t, init, starts=None):
    """One pass over the tiles from init = (dx, float32 dws): dx rows = sum_i dy_i @ w_i[e].T
    (written), dw_i[e] += x.T @ dy_i (accumulated)."""

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

    return _tile_loop(sizes, x.shape[0], t, body, init, starts)


_tiled = _keeping_inputs(_tiles, _tiled_bwd)


# --- batched: per-expert blocks of C rows, one batched matmul per pass -----------------------
def block_rows(m: int, e: int) -> int:
    """Rows per expert and pass: 1.25x the balanced load, a multiple of 8 (<= M). One pass
    covers every group of up to C rows; a larger group takes ceil(size / C) passes."""
    return max(1, min(m, -(-int(1.25 * m / max(e, 1)) // 8) * 8))


def _pass_rows(sizes, c: int, p):
    """Pass p's blocks: rows [E, C] (group e's row p*C + j, clamped to 0 where invalid) and valid."""
    within = p * c + jnp.arange(c)[None, :]
    valid = within < sizes[:, None]
    return jnp.where(valid, (jnp.cumsum(sizes) - sizes)[:, None] + within, 0), valid


def _gather_rows(blocks_ECF, sizes, c: int, m: int):
    """[M, F] rows of the first pass's blocks [E, C, F]: row r of group e at within-group
    position j < C reads blocks[e, j]; every other row (later passes, past the groups) is 0.
    A gather: the result needs no zero-filled buffer, unlike a scatter."""
    ends = jnp.cumsum(sizes)
    r = jnp.arange(m)
    g = jnp.minimum(jnp.searchsorted(ends, r, side="right"), sizes.shape[0] - 1)
    j = r - (ends - sizes)[g]
    ok = (j < c) & (r < ends[-1])
    flat = blocks_ECF.reshape(-1, blocks_ECF.shape[-1])
    return jnp.where(ok[:, None], flat[g * c + jnp.clip(j, 0, c - 1)], 0)


def _later_passes(sizes, c: int, body, init):
    """Run body(rows [E, C], valid [E, C], carry) -> carry for the passes p >= 1, while some
    group has rows left (none when every group fits in C rows)."""
    def step(carry):
        p, inner = carry
        return p + 1, body(*_pass_rows(sizes, c, p), inner)

    return jax.lax.while_loop(lambda cr: cr[0] * c < jnp.max(sizes), step, (1, init))[1]


def _pass_products(x, ws, rows, valid, out):
    """One pass's [E, C, F_i] blocks: the rows gathered into [E, C, D] (invalid ones 0) times
    ws[i] [E, D, F_i], one batched matmul each."""
    xb = jnp.where(valid[..., None], x[rows], 0)
    return [jnp.einsum("ecd,edf->ecf", xb, w, preferred_element_type=out) for w in ws]


def _pass_grads(x, ws, dys, rows, valid):
    """One pass's backward: dx blocks sum_i dy_i @ w_i.T [E, C, D] in x's dtype and the float32
    weight gradients x_blocks.T @ dy_blocks [E, D, F_i]."""
    xb = jnp.where(valid[..., None], x[rows], 0)
    acc, dws = 0.0, []
    for w, dy in zip(ws, dys):
        gb = jnp.where(valid[..., None], dy[rows], 0).astype(x.dtype)
        acc = acc + jnp.einsum("ecf,edf->ecd", gb, w, preferred_element_type=jnp.float32)
        dws.append(jnp.einsum("ecd,ecf->edf", xb, gb, preferred_element_type=jnp.float32))
    return acc.astype(x.dtype), dws


def _blocks(x, ws, sizes, c, out):
    """ys [M, F_i]: pass p gathers group e's rows p*C .. p*C + C-1 into [E, C, D] blocks and
    multiplies them by ws[i] [E, D, F] in one batched matmul; the first pass's results are
    gathered into rows (rows outside the groups: 0), later passes scatter theirs."""
    m = x.shape[0]

    def body(rows, valid, ys):
        dest = jnp.where(valid, rows, m)  # out of range: dropped
        return tuple(y.at[dest].set(b, mode="drop") for y, b in zip(ys, _pass_products(x, ws, rows, valid, out)))

    first = _pass_products(x, ws, *_pass_rows(sizes, c, 0), out)
    return _later_passes(sizes, c, body, tuple(_gather_rows(b, sizes, c, m) for b in first))


def _batched_bwd(c, out, res, dys):
    """The same passes: dx = sum_i dy_i @ w_i[e].T and dw_i = sum over passes of
    x_blocks.T @ dy_blocks (the first pass's products start both, no zero fills)."""
    x, ws, sizes = res
    m = x.shape[0]

    def body(rows, valid, carry):
        dx, dws = carry
        acc, new = _pass_grads(x, ws, dys, rows, valid)
        dx = dx.at[jnp.where(valid, rows, m)].set(acc, mode="drop")
        return dx, tuple(a + b for a, b in zip(dws, new))

    acc, dws = _pass_grads(x, ws, dys, *_pass_rows(sizes, c, 0))
    dx, dws = _later_passes(sizes, c, body, (_gather_rows(acc, sizes, c, m), tuple(dws)))
    return dx, tuple(d.astype(w.dtype) for d, w in zip(dws, ws)), None


_batched = _keeping_inputs(_blocks, _batched_bwd)


# --- blocked: one batched pass of per-expert blocks, the rows past them by tiles --------------
def _overflow(sizes, c: int):
    """Rows of each group past its first C (their count, their first row)."""
    return jnp.maximum(sizes - c, 0), jnp.cumsum(sizes) - sizes + c


def _blocked_fwd(x, ws, sizes, ct, out):
    """The first pass of "batched" (every group's first C rows in [E, C] blocks, gathered back
    into rows), then "tiled" over the rows past C (none when routing is near balance)."""
    c, t = ct
    first = _pass_products(x, ws, *_pass_rows(sizes, c, 0), out)
    ys = tuple(_gather_rows(b, sizes, c, x.shape[0]) for b in first)
    over, starts = _overflow(sizes, c)
    return _tile_products(x, ws, over, t, out, ys, starts)


def _blocked_bwd(ct, out, res, dys):
    c, t = ct
    x, ws, sizes = res
    acc, dws = _pass_grads(x, ws, dys, *_pass_rows(sizes, c, 0))
    over, starts = _overflow(sizes, c)
    dx, dws = _tile_grads(x, ws, dys, over, t, (_gather_rows(acc, sizes, c, x.shape[0]), tuple(dws)), starts)
    return dx, tuple(d.astype(w.dtype) for d, w in zip(dws, ws)), None


_blocked = _keeping_inputs(_blocked_fwd, _blocked_bwd)


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
