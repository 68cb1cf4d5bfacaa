"""Block-scaled low-precision formats of DeepSeek-V4: e4m3 (FP8) and e2m1 (FP4), UE8M0 scales.

One scale per block of values: `block` is an int (blocks of that many consecutive elements
along the last axis, e.g. activations 1 x 128, experts 1 x 32, KV 1 x 64) or a (rows, cols)
tuple (2-D blocks over the last two axes, e.g. weights 128 x 128). A block's scale is

    amax  = max(max |x| over the block, floor)      floor: e4m3 1e-4, e2m1 6 * 2^-126
    scale = amax * (1 / fmax)                       fmax: e4m3 448, e2m1 6
    scale = 2^ceil(log2(scale))                     when scale_fmt = "ue8m0" (V4's default)

and the stored value is clip(x / scale, -fmax, fmax) rounded to the format (nearest, ties to
even). This is DeepSeek's training-time `act_quant` / `fp4_act_quant` (the floor applies to
amax; FlashMLA's KV-cache writer floors amax / 448 instead: that one lives in infer/).

`qdq` (quantise-dequantise) is the fake quantisation of quantisation-aware training: forward
value = dequantize(quantize(x)), gradient = identity (straight-through). Non-finite input: a
block holding a NaN or an infinity dequantises to NaN in every element (its scale is NaN),
so a diverging run shows NaN instead of silently saturating.

Storage helpers: `ue8m0_encode/decode` (scale <-> exponent byte, value = 2^(byte - 127)) and
`pack_e2m1/unpack_e2m1` (two e2m1 codes per byte, first element in the low nibble, as
PyTorch's float4_e2m1fn_x2 and DeepSeek's checkpoints store them).
"""
from __future__ import annotations

import functools
import math
import string

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError

F32 = jnp.float32
# format -> (storage dtype, largest finite magnitude, floor of the block amax)
FORMATS = {
    "e4m3": (jnp.float8_e4m3fn, 448.0, 1e-4),
    "e2m1": (jnp.float4_e2m1fn, 6.0, 6.0 * 2.0 ** -126),
}
SCALE_FMTS = ("ue8m0", "float32")


def _format(fmt: str):
    if fmt not in FORMATS:
        raise ConfigError(f"quant format: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _blocks(shape, block, what: str = "x"):
    """The block shape as a tuple over the last len(block) axes, checked against `shape`."""
    block = (block,) if isinstance(block, int) else tuple(block)
    if len(block) not in (1, 2) or any(not isinstance(b, (int, np.integer)) or b <= 0 for b in block):
        raise ConfigError(f"quant block: {block!r} must be a positive int or a (rows, cols) pair")
    if len(shape) < len(block):
        raise ConfigError(f"{what}: shape {tuple(shape)} has fewer axes than the block {block}")
    tail = tuple(shape[len(shape) - len(block):])
    bad = [(n, b) for n, b in zip(tail, block) if n % b]
    if bad:
        raise ConfigError(f"{what}: block {block} does not divide the last axes {tail} of shape "
                          f"{tuple(shape)}; use a block that divides every axis it tiles")
    return block


def _split(x, block):
    """[..., R, C] -> [..., R/r, r, C/c, c] (2-D) or [..., N] -> [..., N/b, b] (1-D)."""
    lead = x.shape[: x.ndim - len(block)]
    parts = []
    for n, b in zip(x.shape[x.ndim - len(block):], block):
        parts += [n // b, b]
    return x.reshape(*lead, *parts)


def _block_axes(ndim_split: int, block) -> tuple[int, ...]:
    return (ndim_split - 1,) if len(block) == 1 else (ndim_split - 3, ndim_split - 1)


def pow2_ceil(s):
    """The smallest power of two >= s (s > 0, float32), exactly, on the bits: a normal number's
    non-zero mantissa carries into the exponent, then the mantissa is cleared; a subnormal's
    bits are an integer times 2^-149, rounded up to a power of two. A few integer ops per
    element (frexp / ldexp's jitted bodies were traced and lowered again for every new shape;
    float arithmetic would flush subnormals to zero on CPU)."""
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    normal = (bits + jnp.uint32(0x7FFFFF)) & jnp.uint32(0xFF800000)
    subnormal = jnp.uint32(1) << (jnp.uint32(32) - jax.lax.clz(bits - jnp.uint32(1)))
    return jax.lax.bitcast_convert_type(jnp.where(bits < 0x800000, subnormal, normal), F32)


def _scales(xb, fmt: str, block, scale_fmt: str):
    """Scales of the split blocks `xb` (block axes kept as size-1 axes), NaN for a block with a
    non-finite element."""
    _, fmax, floor = _format(fmt)
    if scale_fmt not in SCALE_FMTS:
        raise ConfigError(f"quant scale_fmt: {scale_fmt!r}; choose one of {SCALE_FMTS}")
    axes = _block_axes(xb.ndim, block)
    amax = jnp.max(jnp.abs(xb), axis=axes, keepdims=True)
    finite = jnp.all(jnp.isfinite(xb), axis=axes, keepdims=True)
    scale = jnp.maximum(amax, floor) * F32(1.0 / fmax)
    if scale_fmt == "ue8m0":
        scale = pow2_ceil(scale)
    return jnp.where(finite, scale, jnp.nan)


def _round_e2m1(v):
    """v (|v| <= 6) on the e2m1 grid, ties to even, in float32: the grid step is 0.5 below 2,
    1 below 4 and 2 up to 6, and round-half-even of v / step picks the even code. Every
    operation is exact, so the cast that follows is too, whatever the backend's conversion
    does (XLA:CPU's elemental emitter, --xla_cpu_use_fusion_emitters=false, converts float32
    -> e2m1 through float16, rounding twice: 5.0001 becomes 4, not 6)."""
    a = jnp.abs(v)
    step = jnp.where(a < 2, F32(0.5), jnp.where(a < 4, F32(1.0), F32(2.0)))
    return jnp.round(v / step) * step


def _codes(xb, scale, fmt: str):
    dtype, fmax, _ = _format(fmt)
    v = jnp.clip(xb / scale, -fmax, fmax)
    return (_round_e2m1(v) if fmt == "e2m1" else v).astype(dtype)


def quantize(x, fmt: str, block, scale_fmt: str = "ue8m0"):
    """(values in the format's dtype, x's shape; float32 scales [..., N/b] or [..., R/r, C/c])."""
    block = _blocks(x.shape, block)
    xb = _split(x.astype(F32), block)
    scale = _scales(xb, fmt, block, scale_fmt)
    values = _codes(xb, scale, fmt).reshape(x.shape)
    return values, jnp.squeeze(scale, _block_axes(xb.ndim, block))


def dequantize(values, scales, fmt: str, block, dtype=F32):
    """values * their block's scale, in `dtype`; a scale of the wrong shape is an error."""
    _format(fmt)
    block = _blocks(values.shape, block, "values")
    lead = values.shape[: values.ndim - len(block)]
    expect = lead + tuple(n // b for n, b in zip(values.shape[values.ndim - len(block):], block))
    if tuple(scales.shape) != expect:
        raise ConfigError(f"scales: shape {tuple(scales.shape)} does not match values "
                          f"{tuple(values.shape)} in blocks {block}; expected {expect}")
    vb = _split(values.astype(F32), block)
    s = jnp.expand_dims(scales.astype(F32), _block_axes(vb.ndim, block))
    return (vb * s).reshape(values.shape).astype(dtype)


def _qdq_value(x, fmt, block, scale_fmt):
    xb = _split(x.astype(F32), block)
    scale = _scales(xb, fmt, block, scale_fmt)
    return (_codes(xb, scale, fmt).astype(F32) * scale).reshape(x.shape).astype(x.dtype)


def _qdq_fwd(x, fmt, block, scale_fmt):
    return _qdq_value(x, fmt, block, scale_fmt), None


def _qdq_bwd(fmt, block, scale_fmt, _, g):
    return (g,)


_qdq = jax.custom_vjp(_qdq_value, nondiff_argnums=(1, 2, 3))
_qdq.defvjp(_qdq_fwd, _qdq_bwd)


def qdq(x, fmt: str, block, scale_fmt: str = "ue8m0"):
    """Fake quantisation: x rounded to `fmt` in blocks (x's shape and dtype), with a
    straight-through gradient (d qdq / dx = identity)."""
    _format(fmt)
    block = _blocks(x.shape, block)
    return _qdq(x, fmt, block, scale_fmt)


# --- the real FP8 matmul ---------------------------------------------------------------------
def _native_specs(spec: str, in_axis: int):
    """einsum specs of fp8_einsum: (per-block products, x scales' letters, w scales' letters,
    the products' letters, the output's letters); the block index gets a letter unused in `spec`."""
    lhs, rest = spec.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    c, z = lhs[-1], next(ch for ch in reversed(string.ascii_lowercase) if ch not in spec)
    if "." in rhs or rhs[in_axis] != c or in_axis == len(rhs) - 1:
        raise ConfigError(f"fp8_einsum: {spec!r} must contract x's last axis {c!r} with axis {in_axis} "
                          "of the weight (not its last axis)")
    # every summed letter other than the block's own stays in the products: x's and w's scales
    # depend on it (o_groups of wo_b: one scale per group and block)
    summed = "".join(ch for ch in lhs[:-1] if ch in rhs and ch not in out and ch != ".")
    prods = f"{lhs[:-1]}{z}{c},{rhs[:in_axis]}{z}{rhs[in_axis:]}->{out}{summed}{z}"
    return prods, f"{lhs[:-1]}{z}", f"{rhs[:in_axis]}{z}{rhs[in_axis + 1:]}", f"{out}{summed}{z}", out


def quantize_tiles(w, axis: int, block: int):
    """quantize(w, "e4m3", (block, block)) over the tiles of (w's axis `axis`, its last axis),
    any other axis indexing separate matrices: (values in w's layout, scales in w's layout with
    those two axes counted in blocks)."""
    values, scales = quantize(jnp.moveaxis(w, axis, -2), "e4m3", (block, block))
    return jnp.moveaxis(values, -2, axis), jnp.moveaxis(scales, -2, axis)


def dequantize_tiles(values, scales, axis: int, block: int, dtype=F32):
    """The inverse of quantize_tiles."""
    out = dequantize(jnp.moveaxis(values, axis, -2), jnp.moveaxis(scales, axis, -2), "e4m3",
                     (block, block), dtype)
    return jnp.moveaxis(out, -2, axis)


def _fp8_einsum_value(x, w, spec, block, in_axis, dtype):
    prods, sx_spec, sw_spec, p_spec, out = _native_specs(spec, in_axis)
    k = x.shape[-1]
    xq, sx = quantize(x, "e4m3", block)                              # [..., K], [..., K/b]
    wq, sw = quantize_tiles(w, in_axis, block)                       # w's shape, e4m3
    sw = jnp.repeat(sw, block, axis=-1)                              # w's shape with K -> K/b
    xq = xq.reshape(*x.shape[:-1], k // block, block)
    wq = wq.reshape(*w.shape[:in_axis], k // block, block, *w.shape[in_axis + 1:])
    p = jnp.einsum(prods, xq, wq, preferred_element_type=F32)      # e4m3 x e4m3 -> f32 per block
    p = jnp.einsum(f"{p_spec},{sx_spec}->{p_spec}", p, sx)
    return jnp.einsum(f"{p_spec},{sw_spec}->{out}", p, sw).astype(dtype)


def _fp8_einsum_fwd(x, w, spec, block, in_axis, dtype):
    return _fp8_einsum_value(x, w, spec, block, in_axis, dtype), (x, w)


def _fp8_einsum_bwd(spec, block, in_axis, dtype, res, g):
    x, w = res
    xd = _qdq_value(x, "e4m3", (block,), "ue8m0").astype(dtype)
    wd = dequantize_tiles(*quantize_tiles(w, in_axis, block), in_axis, block, dtype)
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), xd, wd)
    gx, gw = vjp(g.astype(dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


_fp8_einsum = jax.custom_vjp(_fp8_einsum_value, nondiff_argnums=(2, 3, 4, 5))
_fp8_einsum.defvjp(_fp8_einsum_fwd, _fp8_einsum_bwd)


def fp8_einsum(spec: str, x, w, block: int, in_axis: int = 0, dtype=F32):
    """einsum(spec, x, w) as DeepSeek's FP8 GEMM, with e4m3 operands in the product itself: x in
    1 x block blocks along its last axis (the contracted one), w in block x block tiles of (its
    axis `in_axis`, its last axis), UE8M0 scales. One dot_general multiplies the e4m3 values
    with float32 results per contracted block (a batch axis over the K / block blocks), each
    block's products are scaled by its x and w scales and the blocks summed in float32; the
    result is cast to `dtype`. It equals einsum(spec, qdq(x), the weight's qdq) up to the order
    of float32 additions (the scales are powers of two). Memory: the per-block products are
    K / block times the output. Gradient: straight-through, as the simulation's (the backward
    multiplies the dequantised operands in `dtype`)."""
    _blocks(x.shape[-1:], block, "x")
    moved = [n for i, n in enumerate(w.shape) if i != in_axis]
    _blocks((*moved[:-1], w.shape[in_axis], moved[-1]), (block, block), "w (contracted axis, last axis)")
    return _fp8_einsum(x, w, spec, block, in_axis, jnp.dtype(dtype))


# --- storage ------------------------------------------------------------------------------
def ue8m0_encode(scales):
    """Power-of-two float32 scales -> uint8 exponent bytes (2^(byte - 127)); NaN -> 255."""
    _, e = jnp.frexp(scales.astype(F32))
    byte = jnp.clip(e - 1 + 127, 0, 254).astype(jnp.uint8)
    return jnp.where(jnp.isfinite(scales), byte, jnp.uint8(255))


def ue8m0_decode(byte):
    """uint8 exponent bytes -> float32 scales (255 -> NaN)."""
    e = byte.astype(jnp.int32) - 127
    return jnp.where(byte == 255, jnp.nan, jnp.ldexp(jnp.ones(byte.shape, F32), e))


def pack_e2m1(values):
    """e2m1 values [..., N] (N even) -> uint8 [..., N/2]: element 2i in the low nibble."""
    if values.shape[-1] % 2:
        raise ConfigError(f"pack_e2m1: last axis {values.shape[-1]} must be even")
    # the 4-bit code from the value (grid 0, .5, 1, 1.5, 2, 3, 4, 6 -> 0..7, sign bit 8):
    # arithmetic, since XLA:CPU cannot compile a fused float4 -> uint4 bitcast
    v = values.astype(jnp.float4_e2m1fn).astype(F32)
    a = jnp.abs(v)
    mag = jnp.where(a < 2, 2 * a, jnp.where(a < 4, a + 2, a / 2 + 4)).astype(jnp.uint8)
    codes = (mag | (jnp.signbit(v).astype(jnp.uint8) << 3)).reshape(*v.shape[:-1], -1, 2)
    return codes[..., 0] | (codes[..., 1] << 4)


def unpack_e2m1(packed):
    """uint8 [..., N/2] -> e2m1 values [..., N] (inverse of pack_e2m1)."""
    lo, hi = packed & 0xF, packed >> 4
    codes = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1).astype(jnp.uint4)
    return jax.lax.bitcast_convert_type(codes, jnp.float4_e2m1fn)


@functools.partial(jax.jit, static_argnums=(1, 2))
def held_tiles(w, axis: int, block: int):
    """(e4m3 values, UE8M0 scale bytes) of w in block x block tiles of (`axis`, last axis): the
    form a held fp8 weight keeps (one compiled program per weight shape, not one per operation)."""
    values, scales = quantize_tiles(w, axis, block)
    return values, ue8m0_encode(scales)


@functools.partial(jax.jit, static_argnums=(1, 2))
def held_blocks(w, fmt: str, block):
    """(values, UE8M0 scale bytes) of w in `fmt` blocks: e2m1 packed two per byte (pack_e2m1)
    or e4m3; the form held routed experts keep."""
    values, scales = quantize(w, fmt, block)
    return (pack_e2m1(values) if fmt == "e2m1" else values), ue8m0_encode(scales)


def hadamard(x):
    """Orthonormal Walsh-Hadamard transform of the last axis (a power of two): x @ H / sqrt(n).
    DeepSeek rotates the indexer's q and keys with it before FP4 so that outliers spread over
    the block (the transform itself leaves float dot products unchanged)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ConfigError(f"hadamard: last axis {n} must be a power of two")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return jnp.einsum("...i,ij->...j", x, jnp.asarray(h / math.sqrt(n), x.dtype))
