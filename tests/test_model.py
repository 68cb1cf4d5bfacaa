"""Behaviour of the model beyond HF parity: causality, MTP, scanning, routing, losses' inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import abstract, build, plan_segments, preset
from model.indexer import indexer_kl
from model.moe import MoE, balanced_hash_table
from model.transformer import layer_block

from sizes import SMALL


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    m = build(cfg, rngs=nnx.Rngs(0))
    fwd = nnx.jit(lambda m, ids: m(ids))
    return cfg, m, fwd


def rand_ids(cfg, b, s, seed):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, cfg.vocab_size, jnp.int32)


def test_causal_and_mtp_sees_one_token_ahead(tiny):
    cfg, m, fwd = tiny
    ids = rand_ids(cfg, 2, 48, 0)
    logits, aux = fwd(m, ids)
    assert logits.shape == (2, 48, cfg.vocab_size) and len(aux.mtp_logits) == cfg.n_mtp_layers
    assert aux.mtp_logits[0].shape == logits.shape
    t = 29
    later = ids.at[:, t + 1:].set((ids[:, t + 1:] + 7) % cfg.vocab_size)
    logits2, aux2 = fwd(m, later)
    np.testing.assert_allclose(logits2[:, :t + 1], logits[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits2[:, t + 1:], logits[:, t + 1:], atol=1e-3)
    # MTP logits at position t predict token t + 2 from tokens <= t + 1
    np.testing.assert_allclose(aux2.mtp_logits[0][:, :t], aux.mtp_logits[0][:, :t], rtol=1e-5, atol=1e-5)
    assert not np.allclose(aux2.mtp_logits[0][:, t], aux.mtp_logits[0][:, t], atol=1e-3)
    only_next = ids.at[:, t + 2:].set((ids[:, t + 2:] + 7) % cfg.vocab_size)
    _, aux3 = fwd(m, only_next)
    np.testing.assert_allclose(aux3.mtp_logits[0][:, :t + 1], aux.mtp_logits[0][:, :t + 1], rtol=1e-5, atol=1e-5)


def test_router_statistics(tiny):
    cfg, m, fwd = tiny
    ids = rand_ids(cfg, 2, 48, 1)
    _, aux = fwd(m, ids)
    n_layers = cfg.n_layers + cfg.n_mtp_layers
    assert aux.expert_counts.shape == (n_layers, cfg.n_routed_experts)
    np.testing.assert_array_equal(aux.expert_counts.sum(-1), 2 * 48 * cfg.n_activated_experts)
    # f_i sums to E over experts for every sequence; P_i is a distribution
    np.testing.assert_allclose(aux.balance_f.sum(-1), cfg.n_routed_experts, rtol=1e-5)
    np.testing.assert_allclose(aux.balance_p.sum(-1), 1.0, rtol=1e-5)
    kl = np.asarray(aux.indexer_kl)
    csa = np.array([cfg.is_csa(r) for r in cfg.compress_ratios] + [False] * cfg.n_mtp_layers)
    assert (kl[csa] > 0).all() and (kl[~csa] == 0).all()


def test_balance_terms_by_hand():
    cfg = preset("tiny", dtype="float32")
    moe = MoE(cfg, hashed=False, rngs=nnx.Rngs(3))
    moe.bias.set_value(jnp.linspace(-0.5, 0.5, cfg.n_routed_experts))
    x = jax.random.normal(jax.random.key(0), (2, 10, cfg.dim))
    _, st = moe(x, jnp.zeros((2, 10), jnp.int32))
    s = np.sqrt(np.log1p(np.exp(np.asarray(x).reshape(-1, cfg.dim) @ np.asarray(moe.gate.w[...]))))
    top = np.argsort(-(s + np.asarray(moe.bias[...])), -1)[:, :cfg.n_activated_experts]
    e, k = cfg.n_routed_experts, cfg.n_activated_experts
    hits = np.zeros((2, e))
    for n, row in enumerate(top):
        hits[n // 10, row] += 1
    np.testing.assert_allclose(st["f"], hits * e / (k * 10), rtol=1e-6)
    np.testing.assert_allclose(st["p"], (s / s.sum(-1, keepdims=True)).reshape(2, 10, e).mean(1), rtol=1e-5)
    np.testing.assert_array_equal(st["counts"], hits.sum(0))


@pytest.mark.parametrize("impl", ["auto", "tiled", "batched"])  # auto: blocked on CPU
def test_ragged_equals_dense_with_repeated_experts(impl):
    cfg = preset("tiny", dtype="float32")
    ragged = MoE(cfg.replace(moe_impl=impl), hashed=True, rngs=nnx.Rngs(5))
    table = np.asarray(ragged.tid2eid[...]).copy()
    table[:, 1] = table[:, 0]  # every token picks its first expert twice
    ragged.tid2eid.set_value(jnp.asarray(table))
    dense = MoE(cfg.replace(moe_impl="dense"), hashed=True, rngs=nnx.Rngs(5))
    dense.tid2eid.set_value(jnp.asarray(table))
    x = jax.random.normal(jax.random.key(1), (2, 12, cfg.dim))
    ids = rand_ids(cfg, 2, 12, 2)

    def loss(moe, x):
        return jnp.sum(moe(x, ids)[0] ** 2)

    (la, ga), (lb, gb) = (nnx.jit(nnx.value_and_grad(loss))(mo, x) for mo in (ragged, dense))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(ga, nnx.Param)), jax.tree.leaves(nnx.state(gb, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # both slots add: a repeated expert counts twice, with half of the route scale each
    idx, w, _ = ragged.route(x.reshape(-1, cfg.dim), ids.reshape(-1))
    np.testing.assert_allclose(w, cfg.route_scale / 2, rtol=1e-6)
    xs, e = np.asarray(x[0, 0], np.float64), int(table[int(ids[0, 0]), 0])

    def swiglu_np(x, w1, w3, w2):
        g, u = x @ w1, np.clip(x @ w3, -cfg.swiglu_limit, cfg.swiglu_limit)
        g = np.minimum(g, cfg.swiglu_limit)
        return (g / (1 + np.exp(-g)) * u) @ w2

    p = {k: np.asarray(v[...], np.float64) for k, v in vars(ragged).items() if hasattr(v, "get_value")}
    want = cfg.route_scale * swiglu_np(xs, p["w1"][e], p["w3"][e], p["w2"][e]) + swiglu_np(
        xs, ragged.shared_w1.w[...], ragged.shared_w3.w[...], ragged.shared_w2.w[...])
    np.testing.assert_allclose(ragged(x, ids)[0][0, 0], want, rtol=1e-4, atol=1e-6)


def test_hash_tables_balanced_distinct_and_per_layer():
    t = balanced_hash_table(1000, 16, 6, seed=0)
    assert all(len(set(r)) == 6 for r in t.tolist())
    counts = np.bincount(t.ravel(), minlength=16)
    assert counts.max() - counts.min() <= 6  # exact per full group of 16 tokens; 1000 = 62 x 16 + 8
    assert len({tuple(sorted(r)) for r in t.tolist()}) > 100  # varied expert sets
    cfg = preset("tiny")
    real = build(cfg, rngs=nnx.Rngs(0))
    tables = [np.asarray(layer_block(real, i).ffn.tid2eid[...]) for i in range(cfg.n_hash_layers)]
    assert not np.array_equal(tables[0], tables[1])


def test_indexer_input_is_detached_and_kl_trains_only_the_indexer():
    cfg = preset("tiny", n_layers=2, compress_ratios=(0, 4), n_hash_layers=1, n_mtp_layers=0)
    m = build(cfg, rngs=nnx.Rngs(0))
    ids = rand_ids(cfg, 1, 32, 4)

    def ce(m):
        logits, _ = m(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    def kl(m):
        return jnp.sum(m(ids)[1].indexer_kl)

    graphdef, _, rest = nnx.split(m, nnx.Param, ...)
    grads = nnx.jit(lambda m: (nnx.grad(ce)(m), nnx.grad(kl)(m)))(m)
    g_ce, g_kl = (nnx.merge(graphdef, g, rest) for g in grads)
    blk = 1  # a CSA layer
    assert cfg.is_csa(cfg.compress_ratios[blk])
    ce_idx = layer_block(g_ce, blk).attn.indexer
    kl_blk = layer_block(g_kl, blk)
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(nnx.state(ce_idx, nnx.Param)))
    assert float(jnp.abs(kl_blk.attn.indexer.wq_b.w[...]).max()) > 0
    assert float(jnp.abs(kl_blk.attn.wq_b.w[...]).max()) == 0  # target is detached
    for leaf in jax.tree.leaves(nnx.state(g_ce, nnx.Param)):
        assert jnp.isfinite(leaf).all()


def test_indexer_kl_by_hand():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(1, 3, 5)).astype(np.float32)
    probs = rng.uniform(size=(1, 3, 2, 5)).astype(np.float32)
    mask = np.array([[[1, 1, 0, 0, 0], [1, 1, 1, 0, 1], [0, 0, 0, 0, 0]]], bool)
    total, count = indexer_kl(jnp.asarray(scores), jnp.asarray(probs), jnp.asarray(mask))
    assert int(count) == 2
    got = float(total) / int(count)
    want = []
    for q in range(2):
        sel = mask[0, q]
        p = probs[0, q].sum(0)[sel].astype(np.float64)
        p /= p.sum()
        s = scores[0, q][sel].astype(np.float64)
        logq = s - np.log(np.exp(s).sum())
        want.append(np.sum(p * (np.log(p) - logq)))
    assert got == pytest.approx(np.mean(want), rel=1e-5)


def test_sparse_csa_equals_dense_when_topk_covers_all_blocks():
    cfg = preset("tiny", index_topk=64, n_mtp_layers=0, **SMALL)
    m = build(cfg, rngs=nnx.Rngs(2))
    ids = rand_ids(cfg, 2, 40, 5)
    fwd = nnx.jit(lambda m, ids, dense: m(ids, dense_csa=dense), static_argnums=2)
    (a, _), (b, _) = fwd(m, ids, False), fwd(m, ids, True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    small = preset("tiny", n_mtp_layers=0, **SMALL)  # top-4 of up to 10 blocks: sparse now differs
    ms = build(small, rngs=nnx.Rngs(2))
    (c, _), (d, aux_d) = fwd(ms, ids, False), fwd(ms, ids, True)
    assert not np.allclose(c, d, atol=1e-4)
    assert np.isfinite(np.asarray(aux_d.indexer_kl)).all()


def test_scan_plan_covers_every_layer():
    flash = preset("v4-flash")
    kinds = [flash.layer_kind(i) for i in range(flash.n_layers)]
    plan = plan_segments(kinds, 4)
    assert plan == [(0, ((0, True),), 2), (2, ((4, True),), 1), (3, ((128, False), (4, False)), 20)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        kinds = [tuple(k) for k in rng.integers(0, 3, (rng.integers(1, 30), 2)).tolist()]
        flat = [k for start, unit, count in plan_segments(kinds, 4) for _ in range(count) for k in unit]
        assert flat == kinds  # in order, nothing dropped, nothing added
    assert plan_segments(list("ababa"), 4) == [(0, ("a", "b"), 2), (4, ("a",), 1)]


def test_hlo_does_not_grow_with_layers():
    def hlo_size(n_layers):
        cfg = preset("tiny", n_layers=n_layers, compress_ratios=(0, 0) + (4, 16) * ((n_layers - 2) // 2),
                     n_mtp_layers=0)
        graphdef, state = nnx.split(abstract(cfg))
        f = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids)[0])
        return len(f.lower(state, jax.ShapeDtypeStruct((1, 32), jnp.int32)).as_text())

    small, big = hlo_size(6), hlo_size(22)
    assert big < 1.1 * small


def test_unrolled_scan_equals_the_loop(tiny):
    """scan_unroll=2 runs tiny's (HCA, CSA) x 2 segment as straight-line code: the same stacked
    parameters (a run field: a checkpoint loads unchanged), the same logits."""
    cfg, m, fwd = tiny
    graphdef, state = nnx.split(m)
    unrolled = nnx.merge(nnx.split(abstract(preset("tiny", scan_unroll=2)))[0], state)
    ids = rand_ids(cfg, 2, 48, 3)
    np.testing.assert_allclose(fwd(unrolled, ids)[0], fwd(m, ids)[0], rtol=1e-5, atol=1e-5)
    scans = {}
    for name, model in (("loop", m), ("unrolled", unrolled)):
        g = nnx.split(model)[0]
        scans[name] = scan_shapes(jax.make_jaxpr(lambda st, ids: nnx.merge(g, st)(ids)[0])(state, ids).jaxpr)
    # the segment's scan (length 2): one repetition per iteration, or both at once
    assert (2, 1) in scans["loop"] and (2, 2) not in scans["loop"] and (2, 2) in scans["unrolled"]


def scan_shapes(jaxpr) -> list:
    """(length, unroll) of every scan in a jaxpr, nested calls included (not inside scans)."""
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            found.append((e.params["length"], e.params["unroll"]))
            continue
        for v in e.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None:
                found += scan_shapes(getattr(inner, "jaxpr", inner))
    return found


def test_packed_documents_do_not_see_each_other(tiny):
    """Attention, compressors and indexers stay inside a document of a packed sequence: the
    second document's logits do not change when the first document's tokens do."""
    cfg, m, _ = tiny
    fwd = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg)[0])
    ids = rand_ids(cfg, 2, 48, 6)
    seg = jnp.concatenate([jnp.ones((2, 21), jnp.int32), 2 * jnp.ones((2, 27), jnp.int32)], 1)
    base = fwd(m, ids, seg)
    other_first = ids.at[:, :21].set((ids[:, :21] + 11) % cfg.vocab_size)
    np.testing.assert_allclose(fwd(m, other_first, seg)[:, 21:], base[:, 21:], rtol=1e-5, atol=1e-5)
    # without the document boundary the same change does reach the second document
    one = jnp.ones_like(seg)
    assert not np.allclose(fwd(m, other_first, one)[:, 21:], fwd(m, ids, one)[:, 21:], atol=1e-3)


def attention_step(cfg, ratio: int, dense_csa: bool = False, seed: int = 0):
    """((output, indexer KL), gradients of parameters and input) of one attention layer of
    ratio `ratio` on 64 tokens of two packed documents (40 + 24), loss mean(y^2) + KL."""
    from model.attention import Attention
    from model.layers import rope_angles

    x = jax.random.normal(jax.random.key(seed), (2, 64, cfg.dim))
    seg = jnp.concatenate([jnp.zeros((2, 40), jnp.int32), jnp.ones((2, 24), jnp.int32)], 1)
    pos = jnp.arange(64)
    angles = rope_angles(cfg, pos, True)

    def loss(m, x):
        y, (kl, _) = m(x, pos, angles, seg, dense_csa=dense_csa)
        return jnp.mean(y ** 2) + kl, (y, kl)
    step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), grads = step(Attention(cfg, ratio, nnx.Rngs(1)), x)
    return out, jax.tree.leaves(nnx.to_pure_dict(grads[0])) + [grads[1]]


def assert_same_step(got, want):
    (y, kl), grads = want
    (y_g, kl_g), grads_g = got
    np.testing.assert_allclose(y_g, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl_g, kl, rtol=1e-5, atol=1e-6)
    for g, gg in zip(grads, grads_g):
        np.testing.assert_allclose(gg, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ratio,dense_csa", [(4, False), (4, True), (16, False)], ids=["csa-topk", "csa-dense", "hca"])
def test_query_chunks_equal_whole_sequence(ratio, dense_csa):
    """attn_query_chunk: one attention layer attending its queries 32 at a time (lax.map +
    remat) gives the whole-sequence output, indexer KL and gradients (parameters and input),
    with two packed documents."""
    cfg = preset("tiny")
    whole = attention_step(cfg, ratio, dense_csa)
    assert ratio != 4 or float(whole[0][1]) > 0  # the indexer's KL term is live on CSA
    assert_same_step(attention_step(cfg.replace(attn_query_chunk=32), ratio, dense_csa), whole)


@pytest.mark.parametrize("chunk", [0, 32], ids=["whole", "chunked"])
def test_csa_mask_equals_gather(chunk):
    """model.csa_select: reading the top-k blocks through a mask over all of them gives the
    gathered top-k's output, indexer KL and gradients (parameters and input), with two packed
    documents and queries that see fewer than k blocks (no picks)."""
    from model.attention import chosen

    cfg = preset("tiny", attn_query_chunk=chunk)
    gather = attention_step(cfg.replace(csa_select="gather"), 4, seed=3)
    assert float(gather[0][1]) > 0
    assert_same_step(attention_step(cfg.replace(csa_select="mask"), 4, seed=3), gather)
    # the mask by hand: picks 2 and 0 of row 0, nothing on row 1 (-1), a repeated pick
    got = chosen(jnp.array([[[2, 0, -1], [-1, -1, -1], [3, 3, 1]]]), 4)
    assert np.array_equal(got, [[[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]]])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_against_a_rotation_matrix(dtype):
    """apply_rope and its vector-Jacobian product against a float64 rotation matrix built by
    hand (rotary dims last, the rest untouched; the backward is the opposite rotation)."""
    from model.layers import apply_rope

    s, h, k, r = 5, 3, 12, 8
    x = jax.random.normal(jax.random.key(0), (2, s, h, k), jnp.float32).astype(dtype)
    g = jax.random.normal(jax.random.key(1), (2, s, h, k), jnp.float32).astype(dtype)
    angles = jnp.arange(s, dtype=jnp.float32)[:, None] * jnp.asarray([1.0, 0.3, 0.05, 0.01])
    rot = np.zeros((s, k, k))  # y[..., i] = sum_j x[..., j] rot[s, j, i]
    for p in range(s):
        rot[p] = np.eye(k)
        for i in range(r // 2):
            e, o, a = k - r + 2 * i, k - r + 2 * i + 1, float(angles[p, i])
            rot[p, e, e], rot[p, o, e], rot[p, e, o], rot[p, o, o] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    y, vjp = jax.vjp(lambda x: apply_rope(x, angles), x)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float64), np.einsum("bshj,sji->bshi", x64, rot), atol=tol)
    (dx,) = vjp(g)
    assert dx.dtype == dtype
    np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum("bshi,sji->bshj", g64, rot), atol=tol)
    np.testing.assert_array_equal(dx[..., :k - r], g[..., :k - r])
    back = apply_rope(apply_rope(x.astype(jnp.float32), angles), angles, inverse=True)
    np.testing.assert_allclose(back, x.astype(jnp.float32), atol=1e-6)
