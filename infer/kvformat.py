"""DeepSeek-V4's MODEL1 FP8 sparse KV-cache pages, byte for byte as FlashMLA stores them.

One token's 512-dim compressed KV entry takes MODEL1_ENTRY_BYTES = 584 bytes: its first 448
("NoPE") dims as e4m3 in 7 tiles of 64 dims, one UE8M0 scale byte per tile, its last 64 (RoPE)
dims kept as bfloat16, and one pad byte: 448 + 64*2 + 7 + 1. A page of `block_size` tokens is
planar, then padded:

    bytes [0, 576*B)            token t at 576*t: its 448 e4m3 codes, then 64 bf16 (little-endian)
    bytes [576*B, 584*B)        token t at 576*B + 8*t: its 7 scale bytes, then the pad byte
    bytes [584*B, page_bytes)   padding up to a multiple of 576 bytes

The page stride is a multiple of 576 because FlashMLA's SM100 kernels address the cache with
TMA as rows of 576 bytes (they assert `k_cache.stride(0) % 576 == 0`). FlashMLA's writer
(tests/quant.py, quantize_k_cache) leaves the pad byte and the page padding uninitialised
(torch.empty) and no kernel uses them; here they are 0, so every defined byte is identical.

Scale of a tile (FlashMLA's rule): s = 2^ceil(log2(max(amax / 448, 1e-4))), stored as the
exponent byte log2(s) + 127; code = e4m3(x / s), round to nearest even, no clipping (|x / s|
<= 448 by construction). NOTE this floors amax / 448 at 1e-4, whereas DeepSeek's training-time
act_quant (model/quant.py) floors amax at 1e-4: the two differ for tiles with amax < 448e-4.
A tile holding a NaN or an infinity gets scale byte 255 (NaN) and dequantises to NaN, as in
FlashMLA; only that tile's e4m3 codes may differ from FlashMLA's (here NaN, there x / inf).

Shapes are checked eagerly, then the work runs jitted; both functions can be jitted by the caller
too (block_size static).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from model.config import ConfigError
from model.counts import MODEL1_ENTRY_BYTES
from model.quant import pow2_ceil, ue8m0_decode, ue8m0_encode

D_NOPE, D_ROPE, TILE = 448, 64, 64
N_TILES = D_NOPE // TILE                 # 7 scale bytes per token
DIM = D_NOPE + D_ROPE                    # 512: the compressed KV entry's width
ROW_BYTES = D_NOPE + 2 * D_ROPE          # 576: e4m3 codes + bf16 RoPE of one token
SCALE_BYTES = N_TILES + 1                # 8: the scales + 1 pad byte
E4M3_MAX, SCALE_FLOOR = 448.0, 1e-4
assert MODEL1_ENTRY_BYTES == ROW_BYTES + SCALE_BYTES == 584


def page_bytes(block_size: int) -> int:
    """Bytes of one page of `block_size` tokens: 584 * block_size rounded up to a multiple of 576."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ConfigError(f"block_size: {block_size!r} must be a positive int")
    return -(-block_size * MODEL1_ENTRY_BYTES // ROW_BYTES) * ROW_BYTES


def _bytes(x):
    """Any array -> its bytes along a new last axis, flattened into the last axis (uint8)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b.reshape(*x.shape[:-1], -1) if b.ndim > x.ndim else b


def quantize_model1(kv):
    """bfloat16 [num_pages, block_size, 512] -> uint8 [num_pages, page_bytes(block_size)]."""
    shape, dtype = tuple(getattr(kv, "shape", ())), getattr(kv, "dtype", None)
    if len(shape) != 3 or shape[-1] != DIM or dtype != jnp.bfloat16:
        raise ConfigError(f"kv: got {dtype} {shape}; expected bfloat16 [num_pages, block_size, "
                          f"{DIM}] ({D_NOPE} NoPE dims, then {D_ROPE} RoPE dims)")
    return _quantize(kv)


@jax.jit
def _quantize(kv):
    pages, bsz, _ = kv.shape
    x = kv[..., :D_NOPE].astype(jnp.float32).reshape(pages, bsz, N_TILES, TILE)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = pow2_ceil(jnp.maximum(amax / jnp.float32(E4M3_MAX), jnp.float32(SCALE_FLOOR)))
    scale = jnp.where(jnp.isfinite(amax), scale, jnp.nan)     # pow2_ceil(NaN) is not NaN
    codes = _bytes((x / scale).astype(jnp.float8_e4m3fn)).reshape(pages, bsz, D_NOPE)
    rows = jnp.concatenate([codes, _bytes(kv[..., D_NOPE:])], axis=-1)          # [P, B, 576]
    scales = jnp.concatenate([ue8m0_encode(scale[..., 0]),
                              jnp.zeros((pages, bsz, 1), jnp.uint8)], axis=-1)   # [P, B, 8]
    tail = jnp.zeros((pages, page_bytes(bsz) - bsz * MODEL1_ENTRY_BYTES), jnp.uint8)
    return jnp.concatenate([rows.reshape(pages, -1), scales.reshape(pages, -1), tail], axis=1)


def dequantize_model1(pages, block_size: int):
    """uint8 [num_pages, page_bytes(block_size)] -> bfloat16 [num_pages, block_size, 512]."""
    nbytes = page_bytes(block_size)
    shape, dtype = tuple(getattr(pages, "shape", ())), getattr(pages, "dtype", None)
    if len(shape) != 2 or shape[1] != nbytes or dtype != jnp.uint8:
        raise ConfigError(f"pages: got {dtype} {shape}; expected uint8 [num_pages, {nbytes}] "
                          f"(page_bytes({block_size}))")
    return _dequantize(pages, block_size)


@partial(jax.jit, static_argnums=1)
def _dequantize(pages, bsz: int):
    n = pages.shape[0]
    rows = pages[:, : bsz * ROW_BYTES].reshape(n, bsz, ROW_BYTES)
    codes = jax.lax.bitcast_convert_type(rows[..., :D_NOPE], jnp.float8_e4m3fn)
    rope = jax.lax.bitcast_convert_type(rows[..., D_NOPE:].reshape(n, bsz, D_ROPE, 2), jnp.bfloat16)
    sbytes = pages[:, bsz * ROW_BYTES: bsz * MODEL1_ENTRY_BYTES].reshape(n, bsz, SCALE_BYTES)
    scale = ue8m0_decode(sbytes[..., :N_TILES])[..., None]                      # [P, B, 7, 1]
    nope = codes.astype(jnp.float32).reshape(n, bsz, N_TILES, TILE) * scale
    return jnp.concatenate([nope.reshape(n, bsz, D_NOPE).astype(jnp.bfloat16), rope], axis=-1)
