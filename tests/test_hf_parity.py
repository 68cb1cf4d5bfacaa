"""Numerical parity with Hugging Face transformers' DeepseekV4ForCausalLM (float32).

The same random weights go through `model.hf.load_hf_weights` (the checkpoint importer) into
our model; logits must agree to a relative error < 1e-4, and each component is compared on its
own so that a failure points at its cause.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_oracle as O
from model import build
from model.compressor import visible_blocks
from model.hf import config_from_hf, load_hf_weights
from model.layers import rope_angles
from model.transformer import layer_block

SCAN_TYPES = ["sliding_attention", "sliding_attention"] + [
    "compressed_sparse_attention", "heavily_compressed_attention"] * 2 + ["compressed_sparse_attention"]


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))


forward = nnx.jit(lambda m, x: m(x))  # eager mode would compile every op for every shape


def ours(hcfg, tensors, **changes):
    cfg = config_from_hf(hcfg, dtype="float32", n_mtp_layers=0, **changes)
    m = build(cfg, rngs=nnx.Rngs(1))
    load_hf_weights(m, tensors)
    return m


@pytest.fixture(scope="module")
def five():
    """Layers: window+hash, CSA+hash, HCA, CSA, window (ratios 0, 4, 8, 4, 0)."""
    hcfg = O.hf_config()
    hf, tensors = O.build_hf_model(hcfg, seed=0)
    return hcfg, hf, tensors, ours(hcfg, tensors)


@pytest.fixture(scope="module")
def scanned():
    """7 layers whose repeats are scanned: [2 x window+hash] [2 x (CSA, HCA)] [CSA]."""
    hcfg = O.hf_config(num_hidden_layers=7, layer_types=SCAN_TYPES)
    hf, tensors = O.build_hf_model(hcfg, seed=3)
    return hcfg, hf, tensors, ours(hcfg, tensors)


def ids_for(hcfg, b, s, seed):
    return np.random.default_rng(seed).integers(0, hcfg["vocab_size"], (b, s))


def test_logits_match_hf_with_scanned_mixed_layers(scanned):
    hcfg, hf, _, m = scanned
    assert [(seg.period, seg.count) for seg in m.segments] == [(1, 2), (2, 2), (1, 1)]
    ids = ids_for(hcfg, 2, 48, 0)  # 12 CSA blocks (top-3 selects), 6 HCA blocks, window 8
    ref = O.hf_logits(hf, ids)
    got, _ = forward(m, jnp.asarray(ids, jnp.int32))
    assert rel_err(got, ref) < 1e-4
    assert not np.allclose(ref[0], ref[1])


@pytest.mark.parametrize("s", [37, 40])
def test_logits_match_hf_ragged_and_dense_moe(five, s):
    hcfg, hf, tensors, m = five
    ids = ids_for(hcfg, 3, s, s)  # lengths that are and are not multiples of window / ratios
    ref = O.hf_logits(hf, ids)
    got, _ = forward(m, jnp.asarray(ids, jnp.int32))
    assert rel_err(got, ref) < 1e-4
    dense = ours(hcfg, tensors, moe_impl="dense")
    got_dense, _ = forward(dense, jnp.asarray(ids, jnp.int32))
    assert rel_err(got_dense, ref) < 1e-4


@pytest.fixture(scope="module")
def captured(five):
    hcfg, hf, _, m = five
    ids = ids_for(hcfg, 2, 40, 7)
    names = ["model.layers.2.attn_hc", "model.layers.1.self_attn.compressor",
             "model.layers.2.self_attn.compressor", "model.layers.1.self_attn.compressor.indexer",
             "model.layers.3.self_attn.compressor.indexer", "model.layers.0.mlp.gate",
             "model.layers.2.mlp.gate", "model.layers.3.self_attn", "model.layers.3.mlp"]
    return ids, O.capture(hf, ids, names)


def test_mhc_pre_post_comb(five, captured):
    _, rec = captured
    x = rec["model.layers.2.attn_hc"]["inputs"][0]
    post, comb, collapsed = rec["model.layers.2.attn_hc"]["outputs"]
    y, p, c = layer_block(five[3], 2).attn_hc(jnp.asarray(x))
    for got, ref in ((y, collapsed), (p, post), (c, comb)):
        assert rel_err(got, ref) < 1e-5
    np.testing.assert_allclose(np.asarray(c).sum(-1), 1.0, atol=1e-4)  # doubly stochastic
    np.testing.assert_allclose(np.asarray(c).sum(-2), 1.0, atol=1e-4)


@pytest.mark.parametrize("layer, ratio", [(1, 4), (2, 8)])
def test_compressor_csa_overlap_and_hca(five, captured, layer, ratio):
    cfg, m = five[3].cfg, five[3]
    r = captured[1][f"model.layers.{layer}.self_attn.compressor"]
    x, ref = r["inputs"][0], r["outputs"][0][:, 0]
    angles = rope_angles(cfg, jnp.arange(x.shape[1]), True)
    got, _ = layer_block(m, layer).attn.compressor(jnp.asarray(x), angles, jnp.zeros(x.shape[:2], jnp.int32))
    assert got.shape == ref.shape == (2, 40 // ratio, cfg.head_dim)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("layer", [1, 3])
def test_indexer_selects_the_same_blocks(five, captured, layer):
    cfg, m = five[3].cfg, five[3]
    r = captured[1][f"model.layers.{layer}.self_attn.compressor.indexer"]
    x, qr, ref = r["inputs"][0], r["inputs"][1], r["outputs"]
    pos = jnp.arange(x.shape[1])
    idx = layer_block(m, layer).attn.indexer
    seg = jnp.zeros(x.shape[:2], jnp.int32)
    got = idx.select(idx.scores(jnp.asarray(x), jnp.asarray(qr), rope_angles(cfg, pos, True), pos, seg))
    got = np.sort(np.asarray(got), -1)
    np.testing.assert_array_equal(got, np.sort(ref, -1))
    visible = np.asarray(visible_blocks(pos, 4))
    assert (visible > cfg.index_topk).sum() >= 20  # sparsity really selects on most positions


def test_router_choices_hash_and_score(five, captured):
    ids, rec = captured
    m = five[3]
    for layer in (0, 2):
        r = rec[f"model.layers.{layer}.mlp.gate"]
        _, ref_w, ref_i = r["outputs"]
        x = r["inputs"][0].reshape(-1, m.cfg.dim)
        got_i, got_w, _ = layer_block(m, layer).ffn.route(jnp.asarray(x), jnp.asarray(ids).reshape(-1))
        order_ref, order_got = np.argsort(ref_i, -1), np.argsort(np.asarray(got_i), -1)
        np.testing.assert_array_equal(np.take_along_axis(np.asarray(got_i), order_got, -1),
                                      np.take_along_axis(ref_i, order_ref, -1))
        assert rel_err(np.take_along_axis(np.asarray(got_w), order_got, -1),
                       np.take_along_axis(ref_w, order_ref, -1)) < 1e-5
    # the selection bias matters: without it layer 2 would pick differently somewhere
    blk = layer_block(m, 2).ffn
    x = rec["model.layers.2.mlp.gate"]["inputs"][0].reshape(-1, m.cfg.dim)
    s = np.asarray(jnp.sqrt(jax.nn.softplus(jnp.asarray(x) @ blk.gate.w[...])))
    unbiased = np.sort(np.argsort(-s, -1)[:, :2], -1)
    assert (unbiased != np.sort(np.asarray(blk.route(jnp.asarray(x), None)[0]), -1)).any()


def test_attention_layer_and_moe_block(five, captured):
    ids, rec = captured
    m = five[3]
    blk = layer_block(m, 3)
    r = rec["model.layers.3.self_attn"]
    x = r["inputs"][0]
    pos = jnp.arange(x.shape[1])
    got, (kl, queries) = blk.attn(jnp.asarray(x), pos, rope_angles(m.cfg, pos, True))
    assert rel_err(got, r["outputs"][0]) < 1e-5 and float(kl) > 0 and int(queries) > 0
    r = rec["model.layers.3.mlp"]
    x = r["inputs"][0]
    got, stats = blk.ffn(jnp.asarray(x), jnp.asarray(ids, jnp.int32))
    assert rel_err(got, r["outputs"]) < 1e-5
    assert int(stats["counts"].sum()) == x.shape[0] * x.shape[1] * m.cfg.n_activated_experts
