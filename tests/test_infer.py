"""Decoding (infer/) against the training forward `model(ids)[0]`, the independent reference.

The tiny preset (window 16; CSA ratio 4 with index_topk 4; HCA ratio 16) over 56 tokens: the
window ring wraps three times, CSA layers see up to 14 blocks of which the indexer keeps 4, HCA
layers see 3. Float caches must reproduce the forward's logits to float32 rounding (1e-5 of
the largest logit: the two paths sum the same terms in a different order); FP8 caches are
checked byte for byte against infer.kvformat and numerically with an FP8-sized tolerance.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from infer import kvformat
from infer.cache import init_cache
from infer.pages import PageAllocator, PoolExhausted
from infer.sample import generate
from infer.step import decode_step, prefill
from model import build, kv_cache_bytes_per_token, preset
from model.config import ConfigError

L = 56                      # every test sequence's full length


def forward(m, ids):
    return np.asarray(nnx.jit(lambda m, x: m(x)[0])(m, jnp.asarray(ids)))


def close(got, ref, scale, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny", n_mtp_layers=0)     # decoding never runs the MTP block
    m = build(cfg, rngs=nnx.Rngs(0))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (3, L), 0, cfg.vocab_size))
    return cfg, m, ids, forward(m, ids)


def decode_rest(m, cache, ids, start_B, stop=L):
    """Teacher-forced decode of ids[b, p] for p in [start_B[b], stop): {(b, p): logits}."""
    out, pos = {}, np.array(start_B)
    while (pos < stop).any():
        p = np.where(pos < stop, pos, -1)
        logits, cache = decode_step(m, cache, ids[np.arange(len(p)), np.maximum(p, 0)], p)
        for b in np.flatnonzero(p >= 0):
            out[(b, p[b])] = np.asarray(logits[b])
        pos += 1
    return out, cache


def test_prefill_then_decode_matches_forward(tiny):
    cfg, m, ids, ref = tiny
    scale = np.abs(ref).max()
    lens = np.array([21, 9, 34])          # prompts end mid-block, in different chunks
    cache = init_cache(cfg, 3, L, page_tokens=16)
    logits, cache = prefill(m, ids, cache, lens, chunk=32, all_logits=True)   # chunk > window
    for b in range(3):
        close(logits[b, :lens[b]], ref[b, :lens[b]], scale)
    got, _ = decode_rest(m, cache, ids, lens)     # finished rows idle at position -1
    assert len(got) == sum(L - lens)
    for (b, p), lg in got.items():
        close(lg, ref[b, p], scale)
    # what the test covers: window wrap-around, CSA selection (more visible blocks than the
    # indexer keeps), several HCA blocks
    assert L > 3 * cfg.window_size and L // 4 > 3 * cfg.index_topk and L // 16 == 3
    assert cfg.compress_ratios == (0, 4, 16, 4, 16, 4)


def test_decode_from_empty_cache_matches_forward(tiny):
    """decode_step alone, one token at a time from position 0; slot 2 starts 7 steps late."""
    cfg, m, ids, ref = tiny
    cache = init_cache(cfg, 3, L, page_tokens=16)
    got, _ = decode_rest(m, cache, ids, np.array([0, 0, -7]))
    got = {k: v for k, v in got.items()}
    assert len(got) == 3 * L
    for (b, p), lg in got.items():
        close(lg, ref[b, p], np.abs(ref).max())


def test_paged_pool_shared_and_reused(tiny):
    """Slots 0 and 1 run A and B; when A ends, C starts in slot 0 on A's freed pages. Pages
    are handed out as sequences grow, so the block tables interleave; idle slot 2 holds four
    pages, so that the 12-page pool runs full. Each sequence's logits equal its own forward
    (rows of `ref` are three independent sequences)."""
    cfg, m, ids, ref = tiny
    scale = np.abs(ref).max()
    a_len, b_len, c_len = 40, L, 50
    prompts = {0: 20, 1: 12, 2: 25}
    cache = init_cache(cfg, 3, L, page_tokens=16, num_pages=12, paged=True)
    alloc = PageAllocator(cache.spec)
    alloc.reserve(0, prompts[0]), alloc.reserve(1, prompts[1]), alloc.reserve(2, L)
    logits, cache = prefill(m, ids, alloc.apply(cache), [prompts[0], prompts[1], 0], chunk=32)
    close(logits[0], ref[0, prompts[0] - 1], scale)
    close(logits[1], ref[1, prompts[1] - 1], scale)
    seq = {0: 0, 1: 1}                    # slot -> row of ids / ref
    pos = np.array([prompts[0], prompts[1], -1])
    ends = {0: a_len, 1: b_len, 2: c_len}
    checked, a_pages = 0, None
    while seq:
        for slot in seq:
            alloc.reserve(slot, pos[slot] + 1)
        p = np.array([pos[s] if s in seq else -1 for s in range(3)])
        tok = np.array([ids[seq.get(s, 0), max(p[s], 0)] for s in range(3)])
        logits, cache = decode_step(m, alloc.apply(cache), tok, p)
        for slot, row in seq.items():
            close(logits[slot], ref[row, p[slot]], scale)
            checked += 1
        pos += 1
        for slot, row in list(seq.items()):
            if pos[slot] == ends[row]:
                del seq[slot]
                if row == 0:              # A is done: C takes over slot 0
                    a_pages = set(alloc.release(0))
                    alloc.reserve(0, prompts[2])
                    ids_c = np.stack([ids[2], ids[2] * 0, ids[2] * 0])
                    logits, cache = prefill(m, ids_c, alloc.apply(cache), [prompts[2], 0, 0], chunk=32)
                    close(logits[0], ref[2, prompts[2] - 1], scale)
                    seq[0], pos[0] = 2, prompts[2]
    assert checked == (a_len - 20) + (b_len - 12) + (c_len - 25)
    # B and C fill the pool by the end, so they run on A's old pages too
    c_pages, b_pages = set(alloc.pages(0)), set(alloc.pages(1))
    assert a_pages <= b_pages | c_pages and b_pages.isdisjoint(c_pages)
    assert len(c_pages | b_pages) == 8 and not alloc.free
    # a full pool is reported, never silently shared
    small = PageAllocator(dataclasses.replace(cache.spec, num_pages=6))
    small.reserve(0, L)
    with pytest.raises(PoolExhausted):
        small.reserve(1, L)


# --- FP8 (MODEL1) storage ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8model():
    """The MODEL1 layout needs 512-dim entries with 64 rope dims; layer 0 is CSA, so its caches
    are written from the same values by the float and the FP8 runs."""
    cfg = preset("tiny", head_dim=512, rope_head_dim=64, index_head_dim=128, n_layers=2,
                 compress_ratios=(4, 16), n_mtp_layers=0)
    return cfg, build(cfg, rngs=nnx.Rngs(0))


def test_fp8_cache_is_model1_and_close_to_float(fp8model):
    cfg, m = fp8model
    ids = np.asarray(jax.random.randint(jax.random.key(2), (2, 64), 0, cfg.vocab_size))
    lens = np.array([32, 48])              # whole pages (16 tokens) after the prompts
    runs = {}
    for fp8 in (False, True):
        cache = init_cache(cfg, 2, 64, page_tokens=16, fp8=fp8)
        last, cache = prefill(m, ids, cache, lens, chunk=16)
        layer0 = jax.tree.map(np.asarray, cache.layers[0])
        got, _ = decode_rest(m, cache, ids, lens, stop=64)
        runs[fp8] = (np.asarray(last), layer0, got)
    f, q = runs[False][1], runs[True][1]
    # the window ring of each slot is one MODEL1 page of W tokens: byte-identical to kvformat's
    # quantisation of the float cache's values
    assert q["win"].dtype == np.uint8 and q["win"].shape == (2, kvformat.page_bytes(cfg.window_size))
    want = kvformat.quantize_model1(jnp.asarray(f["win"]).astype(jnp.bfloat16))
    np.testing.assert_array_equal(q["win"], np.asarray(want))
    # compressed pages (4 entries of 16 tokens each): the full ones, 8 for slot 0, 12 for slot 1
    full = [0, 1, 4, 5, 6]                 # slot b owns pages [4b, 4b + 4)
    want = kvformat.quantize_model1(jnp.asarray(f["ckv"][full]).astype(jnp.bfloat16))
    np.testing.assert_array_equal(q["ckv"][full], np.asarray(want))
    # index keys: e4m3 codes of key / scale, one float32 scale = amax / 448 per entry
    keys = f["ikeys"][full]
    scale = np.abs(keys).max(-1) * np.float32(1 / 448)
    np.testing.assert_array_equal(q["ikeys"][1][full], scale)
    np.testing.assert_array_equal(q["ikeys"][0][full].view(np.uint8),
                                  (keys / scale[..., None]).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    # logits: e4m3 keeps 3 mantissa bits (values off by up to 1/16 of themselves, ~1/64 RMS,
    # averaged by the softmax-weighted sums), rope dims are bf16, and fp8 index keys may swap
    # a near-tied top-k pick: measured 6e-3 of the largest logit; 2e-2 is the bound. The
    # difference must not vanish either (the FP8 path is really taken).
    ref, _, fgot = runs[False]
    qlast, _, qgot = runs[True]
    scale = max(np.abs(ref).max(), max(np.abs(v).max() for v in fgot.values()))
    diffs = [np.abs(qgot[k] - fgot[k]).max() for k in fgot] + [np.abs(qlast - ref).max()]
    print("fp8 vs float: max |logit difference| / max |logit| =", max(diffs) / scale)
    assert 1e-5 * scale < max(diffs) < 2e-2 * scale


def test_fp8_bytes_per_token():
    """584 bytes per window / compressed entry, 132 per index key: the cache's arrays add up
    to model.kv_cache_bytes_per_token when no page has padding (72 | entries per page)."""
    cfg = preset("tiny", head_dim=512, rope_head_dim=64, index_head_dim=128, n_layers=4,
                 compress_ratios=(4, 16, 0, 4), window_size=72)
    n = 1152                                # 288 CSA / 72 HCA entries per page
    cache = init_cache(cfg, 2, n, page_tokens=n, fp8=True)
    assert cache.layers[1]["ckv"].shape == (2, kvformat.page_bytes(72)) == (2, 72 * 584)
    stored = sum(a.nbytes for lc in cache.layers for k, v in lc.items() if k in ("win", "ckv", "ikeys")
                 for a in jax.tree.leaves(v))
    assert stored / (2 * n) == kv_cache_bytes_per_token(cfg, n)["total"]
    with pytest.raises(ConfigError, match="head_dim"):
        init_cache(preset("tiny"), 1, 64, fp8=True)


def test_bad_sizes_fail_with_the_field(tiny):
    cfg, m, _, _ = tiny
    with pytest.raises(ConfigError, match="page_tokens"):
        init_cache(cfg, 1, 64, page_tokens=24)          # not a multiple of the HCA ratio 16
    with pytest.raises(ConfigError, match="chunk"):
        prefill(m, np.zeros((1, 8), np.int32), init_cache(cfg, 1, 64), chunk=8)


# --- sampling -------------------------------------------------------------------------------------
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
           [300, 301, 302], [40] * 17]


def gen(m, **kw):
    # the cache and chunk sizes of the tests above: their compiled steps are reused
    return generate(m, PROMPTS, L - 24, chunk=32, page_tokens=16, **kw)


def test_greedy_is_argmax_of_forward(tiny):
    cfg, m, _, _ = tiny
    out = gen(m)
    ids = np.zeros((3, L), np.int32)
    for b, (p, o) in enumerate(zip(PROMPTS, out)):
        assert len(o) == L - 24
        ids[b, : len(p) + len(o)] = p + o
    ref = forward(m, ids)
    for b, (p, o) in enumerate(zip(PROMPTS, out)):
        np.testing.assert_array_equal(ref[b, len(p) - 1: len(p) + len(o) - 1].argmax(-1), o)


def test_sampling_controls(tiny):
    cfg, m, _, _ = tiny
    greedy = gen(m)
    assert gen(m, temperature=1.0, top_k=1, seed=3) == greedy
    assert gen(m, temperature=1.0, top_p=1e-6, seed=4) == greedy
    a = gen(m, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert gen(m, temperature=1.0, top_k=50, top_p=0.9, seed=7) == a
    assert gen(m, temperature=1.0, top_k=50, top_p=0.9, seed=8) != a
    assert a != greedy
    # a stop token ends only the sequence that produced it (and is its last token)
    stop = greedy[1][2]
    out = gen(m, stop_tokens=[stop])
    assert out[1] == greedy[1][: greedy[1].index(stop) + 1]
    for b in (0, 2):
        cut = greedy[b].index(stop) + 1 if stop in greedy[b] else len(greedy[b])
        assert out[b] == greedy[b][:cut]
    with pytest.raises(ConfigError, match="top_p"):
        gen(m, top_p=0.0)


def test_memory_report_by_hand(capsys):
    """python -m infer.memory: V4-Flash's MODEL1 bytes per token at 1M context derived by hand
    (43 layers keep a 128-entry window; 21 CSA layers one 584 + 132 byte entry per 4 tokens; 20
    HCA layers one 584-byte entry per 128), V3's MLA cache 61 x 576 bf16 values."""
    from infer.memory import main as memory

    n = 1 << 20
    flash = (43 * 128 * 584 + 21 * (n // 4) * (584 + 132) + 20 * (n // 128) * 584) / n
    assert memory(["--preset", "v4-flash", "--context", str(n)]) == 0
    out = capsys.readouterr().out
    assert f"| v4-flash MODEL1 (FP8) | {flash:,.0f} | {flash * n / 2**30:,.2f} | {flash / 70272:.1%} |" in out
    assert "| DeepSeek-V3 MLA, bf16 | 70,272 |" in out
    assert memory(["--context", "0"]) == 2
