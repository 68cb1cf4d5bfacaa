"""Decoding (infer/) against the training forward `model(ids)`, the independent reference.

The tiny preset cut to its first 3 layers (window + hash routing, CSA ratio 4 with index_topk
4, HCA ratio 16; one MTP block; the other 3 layers repeat these kinds and would double every
compile of the unscanned decode model) over 56 tokens: the window ring wraps three times, CSA
layers see up to 14 blocks of which the indexer keeps 4, HCA layers see 3. Float caches must
reproduce the forward's logits to float32 rounding (1e-5 of the largest logit: the two paths
sum the same terms in a different order); FP8 caches are checked byte for byte against
infer.kvformat and numerically with an FP8-sized tolerance.
Greedy generation is checked against Hugging Face transformers' `generate`, speculative
decoding against plain greedy decoding, sharded decoding against one device, and the CLI
in-process. Compiles dominate the time: the tests share the module fixtures and the cache /
chunk sizes (3 slots, 56 tokens, pages of 16, chunks of 32), so most steps compile once.
"""
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from infer import kvformat
from infer.cache import init_cache
from infer.layout import unscan
from infer.pages import PageAllocator, PoolExhausted
from infer.sample import generate
from infer.step import decode_step, prefill
from model import build, kv_cache_bytes_per_token, preset
from model.config import ConfigError

L = 56                      # every test sequence's full length
LAYERS = dict(n_layers=3, compress_ratios=(0, 4, 16))


@nnx.jit
def _forward(m, ids):
    logits, aux = m(ids)
    return logits, (aux.mtp_logits[0] if aux.mtp_logits else logits)


def forward(m, ids, mtp=False):
    """The training forward's logits [B, S, V] (with mtp: the MTP block's, predicting t + 2)."""
    return np.asarray(_forward(m, jnp.asarray(ids))[int(mtp)])


def close(got, ref, scale, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny", **LAYERS)           # with its MTP block (speculative decoding)
    m = unscan(build(cfg, rngs=nnx.Rngs(1)))  # as generate runs it: one compile of each step
    # (seed 1: greedy's top-2 margins are >= 2e-3, test_greedy_is_argmax_of_forward_and_hf_generate)
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
    assert cfg.compress_ratios == (0, 4, 16)


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


def test_greedy_is_argmax_of_forward_and_hf_generate(tiny):
    """Greedy decoding of 3 prompts (24, 3 and 17 tokens) as one batch, 32 new tokens: the
    argmax of the forward at every step, and the tokens of transformers' DeepseekV4ForCausalLM
    `generate` on the same weights (model.export's HF config and tensors, float32), run one
    prompt at a time (no padding). No step is decided by rounding: the top-2 logit margin is
    > 1e-4 at every step (measured >= 2e-3; the logits are ~0.6)."""
    torch = pytest.importorskip("torch")
    import hf_oracle as O
    from model.export import hf_config
    from model.hf import hf_tensors

    cfg, m, _, _ = tiny
    out = gen(m)
    ids = np.zeros((3, L), np.int32)
    for b, (p, o) in enumerate(zip(PROMPTS, out)):
        assert len(o) == L - 24
        ids[b, : len(p) + len(o)] = p + o
    ref = forward(m, ids)
    for b, (p, o) in enumerate(zip(PROMPTS, out)):
        steps = ref[b, len(p) - 1: len(p) + len(o) - 1]
        np.testing.assert_array_equal(steps.argmax(-1), o)
        top2 = np.sort(steps, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-4
    hf, _ = O.build_hf_model(hf_config(cfg), seed=0)
    hf.load_state_dict({k: torch.tensor(v) for k, v in hf_tensors(m).items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # next to JAX's threads more of them only oversubscribe the cores
    try:
        for p, o in zip(PROMPTS, out):
            got = hf.generate(torch.tensor([p]), max_new_tokens=len(o), do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            assert got[0, len(p):].tolist() == o
    finally:
        torch.set_num_threads(threads)


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
    # streaming: on_token sees every token as it is produced, step by step across the slots
    seen = []
    assert gen(m, on_token=lambda i, t: seen.append((i, t))) == greedy
    assert seen[:3] == [(b, greedy[b][0]) for b in range(3)] and len(seen) == sum(map(len, greedy))


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


# --- speculative decoding with the MTP block -----------------------------------------------------
SPEC_PROMPTS = [[7, 8, 9], [100] * 9, list(range(1, 25))]


def fit_mtp(m, seqs, lens, steps=40):
    """A copy of `m` whose MTP block alone is trained (Adam, full batch) to predict token t + 2
    of `seqs` from the main model's streams: the stand-in for a trained model's MTP block."""
    import optax

    from model.layers import rope_angles

    cfg, (b, s) = m.cfg, seqs.shape
    _, _, h = prefill(m, seqs, init_cache(cfg, b, s, page_tokens=16), lens, chunk=32, hidden=True)
    graphdef, params, rest = nnx.split(m.mtp[0], nnx.Param, ...)
    pos = jnp.arange(s - 1)
    angles = (rope_angles(cfg, pos, False), rope_angles(cfg, pos, True))
    ids, embed, head = jnp.asarray(seqs), m.embed[...], m.head.w[...]
    mask = jnp.arange(2, s)[None, :] < jnp.asarray(lens)[:, None]
    tx = optax.adam(1e-2)

    def loss(params):
        nxt = ids[:, 1:]
        _, y, _ = nnx.merge(graphdef, params, rest)(h[:, :-1], embed[nxt], nxt, pos, angles, 0 * nxt)
        logp = jax.nn.log_softmax(y[:, :-1] @ head)
        return -jnp.sum(jnp.take_along_axis(logp, ids[:, 2:, None], -1)[..., 0] * mask) / jnp.sum(mask)

    @jax.jit
    def step(params, opt):
        upd, opt = tx.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, upd), opt

    opt = tx.init(params)
    for _ in range(steps):
        params, opt = step(params, opt)
    trained = nnx.clone(m)
    nnx.update(trained.mtp[0], params)
    return trained


def test_speculative_step_commits_only_accepted_tokens(tiny):
    """One verify step over [token, draft] per slot: slot 0's draft is the greedy token
    (accepted), slot 1's is not (rejected), slot 2 idles. The cache afterwards is plain
    decoding's (two steps for slot 0, one for slot 1), although slot 1's rejected token at
    position 15 completes a CSA and an HCA block: nothing of it is written. The MTP drafts (after
    the prompt, and after the step) are the training forward's MTP argmax."""
    from infer.speculative import mtp_prefill, mtp_ring, spec_step
    from infer.step import jit_for

    cfg, m, ids, _ = tiny
    lens = np.array([30, 14, 20])
    cache = init_cache(cfg, 3, L, page_tokens=16)
    logits, cache, hidden = prefill(m, ids, cache, lens, chunk=32, hidden=True)
    tok = np.asarray(jnp.argmax(logits, -1))
    ring, first = mtp_prefill(m, mtp_ring(cache), hidden, ids, lens, tok, 32)
    l1, plain = decode_step(m, jax.tree.map(jnp.copy, cache), tok, [30, 14, -1])
    g0 = np.asarray(jnp.argmax(l1, -1))
    l2, plain = decode_step(m, plain, g0, [31, -1, -1])
    g1 = np.asarray(jnp.argmax(l2, -1))
    draft = np.array([g0[0], (g0[1] + 1) % cfg.vocab_size, 0])
    step, leaves = jit_for(spec_step, m, donate=(1, 2))
    g, acc, drafts, spec, _ = step(leaves, cache, ring, jnp.asarray(tok), jnp.asarray(draft), jnp.asarray([30, 14, -1]))
    assert np.asarray(acc).tolist() == [True, False, False]
    assert np.asarray(g)[0].tolist() == [g0[0], g1[0]] and int(g[1, 0]) == g0[1]
    for got, want in zip(jax.tree.leaves(spec), jax.tree.leaves(plain)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        close(got, want, np.abs(want[np.isfinite(want)]).max(initial=1.0))
    seqs = ids.copy()
    seqs[np.arange(3), lens] = tok
    seqs[[0, 1], [31, 15]] = g0[:2]
    seqs[0, 32] = g1[0]
    mtp = forward(m, seqs, mtp=True)              # position t predicts token t + 2
    np.testing.assert_array_equal(np.asarray(first), mtp[np.arange(3), lens - 1].argmax(-1))
    assert np.asarray(drafts)[:2].tolist() == [mtp[0, 31].argmax(), mtp[1, 14].argmax()]


@pytest.fixture(scope="module")
def trained(tiny):
    """The tiny model with its MTP block fitted to the greedy continuations of PROMPTS."""
    cfg, m, _, _ = tiny
    seqs, lens = np.zeros((3, L), np.int32), []
    for b, (p, o) in enumerate(zip(PROMPTS, gen(m))):
        seqs[b, : len(p) + len(o)] = p + o
        lens.append(len(p) + len(o))
    return fit_mtp(m, seqs, np.array(lens))


def test_speculative_equals_greedy(tiny, trained):
    """Speculative decoding gives plain greedy decoding's tokens: with the random MTP block
    (drafts rejected) and with the fitted one on other prompts (some drafts accepted, some
    rejected: fewer main-model steps), also when a stop token ends a sequence."""
    cfg, m, _, _ = tiny
    kw = dict(max_len=L, chunk=32, page_tokens=16)
    for model, prompts in ((m, PROMPTS), (trained, SPEC_PROMPTS)):
        plain, stats = generate(m, prompts, 32, **kw), {}
        assert generate(model, prompts, 32, speculative=True, stats=stats, **kw) == plain
        print("MTP drafts accepted:", stats)
    assert 0 < stats["acceptance"] < 1 and stats["steps"] < 31
    stop = [plain[2][5]]
    assert (generate(trained, SPEC_PROMPTS, 32, speculative=True, stop_tokens=stop, **kw)
            == generate(m, SPEC_PROMPTS, 32, stop_tokens=stop, **kw))
    with pytest.raises(ConfigError, match="greedy"):
        generate(m, PROMPTS, 4, temperature=1.0, speculative=True)


# --- several devices ----------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [dict(data=2, expert=2, tensor=2),
                                  pytest.param(dict(data=1, expert=8), marks=pytest.mark.slow)],
                         ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_decode_equals_single_device(tiny, axes):
    """A 3-layer tiny model (window + hash routing, CSA, HCA; fewer layers than the fixture
    because the sharded steps' compile time grows with them) placed on 8 devices by parallel/'s
    rules (expert-parallel MoE, heads and vocabulary over tensor, the batch over data x expert;
    with device_put rather than create_sharded's jitted initialiser, an 18 s compile), the steps
    traced under parallel.sharded: prefill + 3 decode steps give the single-device forward's
    logits (which single-device decoding reproduces, above) to 1e-5 of the largest logit. The
    window rings and compressor states follow the batch's sharding."""
    from parallel import MeshConfig, Rules, make_mesh, sharded, shardings

    cfg = preset("tiny", n_layers=3, compress_ratios=(0, 4, 16), n_hash_layers=1, n_mtp_layers=0)
    _, _, ids, _ = tiny
    m = build(cfg, rngs=nnx.Rngs(0))
    ref = forward(m, ids)
    b = 8 if axes["expert"] == 8 else 4
    rows, lens = np.arange(b) % 3, np.array([21, 9, 34, 16, 30, 5, 40, 12])[:b]
    rules = Rules()
    mesh = make_mesh(MeshConfig(**axes), cfg, global_batch=b)
    graphdef, state = nnx.split(m)
    m = nnx.merge(graphdef, jax.device_put(state, shardings(mesh, rules.param_specs(m))))
    assert m.head.w.get_value().sharding.spec == rules.spec(("embed", "vocab"))
    scale = np.abs(ref).max()
    with sharded(mesh, rules):
        logits, cache = prefill(m, ids[rows], init_cache(cfg, b, L, page_tokens=16), lens, chunk=32)
        close(logits, ref[rows, lens - 1], scale)
        for p in lens[None, :] + np.arange(3)[:, None]:
            logits, cache = decode_step(m, cache, ids[rows, p], p)
            close(logits, ref[rows, p], scale)
    assert logits.sharding.mesh == mesh and not cache.layers[1]["win"].sharding.is_fully_replicated


# --- python -m infer ------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
CLI = ["--config", str(ROOT / "configs/tiny.yaml"), "model.dtype=float32",   # the `tiny` fixture's model
       "model.n_layers=3", "model.compress_ratios=[0,4,16]", "train.seed=1"]


def cli(capsys, *args):
    from infer.__main__ import main

    code = main([*CLI, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    """Each mistake: `error: <what>` on one stderr line, exit status 2, nothing built."""
    from train.config import format_config, load_run_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(format_config(load_run_config(str(ROOT / "configs/tiny.yaml"))))
    (tmp_path / "bad.jsonl").write_text("prompt: a\n")
    cases = {
        "prompt 0 has 6 tokens but the context max_len is 4": ["--prompt", "abcdef", "--max-len", "4"],
        "exceeds the model's maximum position 4096": ["--prompt", "a", "--max-new-tokens", "5000"],
        "prompt 1 is empty": ["--prompt", "a", "--prompt", ""],
        "token ids [169, 195] are outside the vocabulary [0, 128)": ["--prompt", "\u00e9",
                                                                     "model.vocab_size=128"],
        "the run has no checkpoint yet": ["--run", str(run), "--prompt", "a"],
        "no config.yaml": ["--run", str(tmp_path), "--prompt", "a"],
        "line 1: not JSON": ["--batch-file", str(tmp_path / "bad.jsonl")],
        "no weight is quantised": ["--prompt", "a", "--hold-quantized"],
    }
    for msg, args in cases.items():
        code, out, err = cli(capsys, *args)
        assert (code, out) == (2, "") and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert msg in err, err


def test_cli_streams_one_prompt(capsys, monkeypatch):
    """One prompt: its text is printed as the tokens come, each piece when its token arrives (a
    split UTF-8 character when its last byte does), not once at the end. (generate calls
    on_token as it produces each token: test_sampling_controls.)"""
    import infer.sample

    produced, writes, word = [0], [], list("n\u00e9!".encode())      # the e-acute is two bytes

    def fake_generate(model, prompts, max_new_tokens, *, on_token=None, **kw):
        for t in word:
            produced[0] += 1
            on_token(0, t)
        return [word]

    class Out:
        def write(self, s):
            if s:
                writes.append((produced[0], s))

        def flush(self):
            pass

    monkeypatch.setattr(infer.sample, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdout", Out())
    code, _, err = cli(capsys, "--prompt", "To be", "--max-new-tokens", "4")
    assert code == 0 and "random weights" in err
    assert writes == [(0, "To be"), (1, "n"), (3, "\u00e9"), (4, "!"), (4, "\n")]


@pytest.mark.slow
def test_cli_holds_quantized_weights_with_the_same_tokens(capsys):
    """--hold-quantized (fp8 projections + fp4 experts held as codes + scales): the completion of
    the fake-quantised model, from the held bytes it reports."""
    quantised = ["model.quant_matmul=fp8", "model.quant_experts=fp4", "model.quant_block=16",
                 "model.n_layers=2", "model.compress_ratios=[0,4]", "model.n_hash_layers=1", "--prompt", "ROMEO:",
                 "--max-new-tokens", "1", "--max-len", "16", "--chunk", "8", "--page-tokens", "8"]
    outs = [cli(capsys, *quantised, *extra) for extra in ([], ["--hold-quantized"])]
    assert [code for code, _, _ in outs] == [0, 0] and outs[0][1] == outs[1][1]
    assert "weights held quantised:" in outs[1][2] and "weights held" not in outs[0][2]


def test_cli_batch_file(tiny, capsys, tmp_path):
    """--batch-file: a text file (one prompt a line) or JSONL ("prompt" fields), decoded as one
    batch; --speculative gives the same completions and reports the acceptance rate."""
    from train.tokenizer import ByteTokenizer

    cfg, m, _, _ = tiny
    texts = ["To be, or not", "ROMEO:", "What light through yonder"]
    want = generate(m, [list(t.encode()) for t in texts], 32, max_len=L, chunk=32, page_tokens=16,
                    stop_tokens=[257])
    rows = [{"prompt": t, "completion": ByteTokenizer().decode(o)} for t, o in zip(texts, want)]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    sizes = ["--max-new-tokens", "32", "--max-len", str(L), "--chunk", "32", "--page-tokens", "16"]
    for name, extra in (("p.txt", []), ("p.jsonl", ["--speculative"])):
        code, out, err = cli(capsys, "--batch-file", str(tmp_path / name), *sizes, *extra)
        assert code == 0 and [json.loads(line) for line in out.splitlines()] == rows
    assert "MTP drafts accepted" in err
