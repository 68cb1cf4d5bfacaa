"""infer/kvformat.py against a NumPy byte-level re-derivation of FlashMLA's MODEL1 page format.

The reference builds each page byte by byte in Python (ml_dtypes for the e4m3 cast, struct
for little-endian bf16 bytes, float64 log2 for the scale exponent), sharing no code with the
jax implementation. Layout and rules: see the docstring of infer/kvformat.py."""
import math
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from infer import kvformat
from infer.kvformat import MODEL1_ENTRY_BYTES, dequantize_model1, page_bytes, quantize_model1
from model.config import ConfigError

BF16, E4M3 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn


def ref_scale_exp(tile):
    """Exponent k of the tile scale 2^k = 2^ceil(log2(max(amax / 448, 1e-4))) (float32 math)."""
    s_inv = max(np.float32(np.abs(tile).max()) / np.float32(448.0), np.float32(1e-4))
    return math.ceil(math.log2(float(s_inv)))


def ref_quantize(kv):
    """kv: ml_dtypes.bfloat16 [P, B, 512] -> uint8 [P, page bytes], pads 0."""
    n, bsz, _ = kv.shape
    size = -(-bsz * 584 // 576) * 576
    out = np.zeros((n, size), np.uint8)
    for p in range(n):
        for t in range(bsz):
            x = kv[p, t].astype(np.float32)
            row, exps = b"", []
            for i in range(7):
                tile = x[64 * i: 64 * (i + 1)]
                k = ref_scale_exp(tile)
                exps.append(k + 127)
                row += (tile / np.float32(2.0 ** k)).astype(E4M3).tobytes()
            row += struct.pack("<64H", *kv[p, t, 448:].view(np.uint16).tolist())
            out[p, 576 * t: 576 * (t + 1)] = np.frombuffer(row, np.uint8)
            out[p, 576 * bsz + 8 * t: 576 * bsz + 8 * t + 8] = exps + [0]
    return out


def ref_roundtrip(kv):
    """NoPE dims rounded to e4m3 at their tile scale, RoPE dims unchanged (bf16)."""
    x = kv.astype(np.float32)
    out = x.copy()
    for idx in np.ndindex(*kv.shape[:2]):
        for i in range(7):
            tile = x[idx][64 * i: 64 * (i + 1)]
            s = np.float32(2.0 ** ref_scale_exp(tile))
            out[idx][64 * i: 64 * (i + 1)] = (tile / s).astype(E4M3).astype(np.float32) * s
    return out.astype(BF16)


def make_kv(pages, bsz, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((pages, bsz, 512)).astype(np.float32)
    # per-tile magnitudes over a wide range (2^-20 .. 2^20), RoPE dims too
    x *= np.exp2(rng.integers(-20, 21, (pages, bsz, 8)).repeat(64, axis=-1))
    t = [i % bsz for i in range(5)]            # special tiles use distinct tile columns
    x[0, t[0], 0:64] = 0.0                                       # all-zero tile
    x[0, t[1], 64:128] = rng.uniform(-4e-2, 4e-2, 64)            # amax < 448e-4: scale 2^-13
    x[0, t[1], 64:70] = [1e-7, -3e-6, 2e-5, 0.0, -0.0, 1.2e-4]   # e4m3 subnormals / underflow
    x[-1, t[2], 128:192] = rng.uniform(-56, 56, 64)              # +-448 x 2^-3 exactly
    x[-1, t[2], 128:130] = [56.0, -56.0]
    x[-1, t[3], 192:256] = rng.uniform(-0.1, 0.1, 64)
    x[-1, t[3], 192] = 448.0 * 2.0 ** -12 * (1 + 2.0 ** -6)      # just above a power: 2^-11
    x[0, t[4], 384:448] = -448.0 * 2.0 ** 5                      # constant tile at -448 x 2^5
    return x.astype(BF16)


@pytest.mark.parametrize("pages,bsz", [(3, 64), (2, 3)])
def test_bytes_match_reference(pages, bsz):
    kv = make_kv(pages, bsz)
    got = np.asarray(quantize_model1(jnp.asarray(kv)))
    assert got.dtype == np.uint8 and got.shape == (pages, page_bytes(bsz))
    np.testing.assert_array_equal(got, ref_quantize(kv))
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize_model1)(jnp.asarray(kv))), got)


@pytest.mark.parametrize("pages,bsz", [(3, 64), (2, 3)])
def test_roundtrip(pages, bsz):
    kv = make_kv(pages, bsz, seed=1)
    out = dequantize_model1(quantize_model1(jnp.asarray(kv)), bsz)
    out = np.asarray(out)
    assert out.dtype == BF16 and out.shape == kv.shape
    np.testing.assert_array_equal(out[..., 448:].view(np.uint16), kv[..., 448:].view(np.uint16))
    np.testing.assert_array_equal(out.view(np.uint16), ref_roundtrip(kv).view(np.uint16))
    jitted = jax.jit(dequantize_model1, static_argnums=1)(quantize_model1(jnp.asarray(kv)), bsz)
    np.testing.assert_array_equal(np.asarray(jitted).view(np.uint16), out.view(np.uint16))


def test_nonfinite_tile_dequantises_to_nan():
    kv = make_kv(1, 2)
    kv[0, 1, 70] = np.inf
    kv[0, 0, 200] = np.nan
    pages = np.asarray(quantize_model1(jnp.asarray(kv)))
    assert pages[0, 576 * 2 + 8 + 1] == 255 and pages[0, 576 * 2 + 3] == 255
    out = np.asarray(dequantize_model1(jnp.asarray(pages), 2)).astype(np.float32)
    assert np.isnan(out[0, 1, 64:128]).all() and np.isnan(out[0, 0, 192:256]).all()
    assert np.isfinite(out[0, 1, :64]).all() and np.isfinite(out[0, 0, 256:]).all()


def test_page_bytes():
    assert MODEL1_ENTRY_BYTES == 448 + 64 * 2 + 7 + 1 == 584
    # FlashMLA tests/quant.py: size_per_block_padded = ceil(block_size * 584 / 576) * 576;
    # block_size 64: 64 * 584 = 37376 bytes -> 65 rows of 576 = 37440 (64 bytes of padding).
    assert page_bytes(64) == 37440
    assert page_bytes(1) == 1152 and page_bytes(72) == 72 * 584    # 72 * 584 = 73 * 576


def test_bad_inputs():
    good = jnp.zeros((2, 64, 512), jnp.bfloat16)
    with pytest.raises(ConfigError, match=r"kv: .*\[num_pages, block_size, 512\]"):
        quantize_model1(jnp.zeros((2, 64, 576), jnp.bfloat16))
    with pytest.raises(ConfigError, match=r"kv: got float32"):
        quantize_model1(good.astype(jnp.float32))
    with pytest.raises(ConfigError, match=r"kv: "):
        quantize_model1(good[0])
    pages = quantize_model1(good)
    with pytest.raises(ConfigError, match=r"pages: .*\[num_pages, 37440\]"):
        dequantize_model1(pages[:, :-1], 64)
    with pytest.raises(ConfigError, match=r"pages: .*\[num_pages, 1152\]"):
        dequantize_model1(pages, 1)
    with pytest.raises(ConfigError, match=r"pages: got int8"):
        dequantize_model1(pages.astype(jnp.int8), 64)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="block_size"):
            dequantize_model1(pages, bad)


def test_matches_torch_reimplementation():
    """Codes and scale bytes as torch computes them (float32 division, log2/ceil/pow, torch's
    own float8 casts), for the NoPE part of the pages above."""
    torch = pytest.importorskip("torch")
    kv = make_kv(2, 64, seed=2)
    x = torch.from_numpy(kv.view(np.int16)).view(torch.bfloat16)
    t = x[..., :448].float().reshape(2, 64, 7, 64)
    s = torch.pow(2, (t.abs().amax(-1) / 448.0).clamp_min(1e-4).log2().ceil())
    codes = (t / s[..., None]).to(torch.float8_e4m3fn).view(torch.uint8).reshape(2, 64, 448)
    sbytes = s.to(torch.float8_e8m0fnu).view(torch.uint8)
    got = np.asarray(quantize_model1(jnp.asarray(kv)))
    np.testing.assert_array_equal(got[:, : 64 * 576].reshape(2, 64, 576)[..., :448], codes.numpy())
    np.testing.assert_array_equal(got[:, 64 * 576: 64 * 584].reshape(2, 64, 8)[..., :7],
                                  sbytes.numpy())
