"""Analytic parameter / FLOP / KV-cache counts against the abstract model and published numbers."""
import time

import jax
import pytest
from flax import nnx

from model import PRESETS, abstract, flops_per_token, kv_cache_bytes_per_token, param_counts, preset
from model.counts import MODEL1_ENTRY_BYTES
from model.layers import HashTable, RoutingBias


def n_params(m):
    return sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_abstract_model_matches_analytic_count_exactly(name):
    t0 = time.perf_counter()
    m = abstract(PRESETS[name])
    assert time.perf_counter() - t0 < 20, "abstract build must take seconds"
    assert n_params(m) == param_counts(PRESETS[name])["total"]
    # non-trainable state is typed apart from parameters
    assert jax.tree.leaves(nnx.state(m, RoutingBias))
    assert jax.tree.leaves(nnx.state(m, HashTable))


def test_published_totals():
    # DeepSeek quotes totals without the MTP block (as V3's 671B excludes its 14B MTP module).
    flash, pro, t1 = (param_counts(PRESETS[n]) for n in ("v4-flash", "v4-pro", "v4-1t"))
    assert abs(flash["total_without_mtp"] / 284e9 - 1) < 0.01
    assert abs(flash["active"] / 13e9 - 1) < 0.03
    # Pro: 1.573T without MTP, which is "1.6T" at the two digits published; 1.599T with MTP.
    assert abs(pro["total"] / 1.6e12 - 1) < 0.01
    assert round(pro["total_without_mtp"] / 1e12, 1) == 1.6
    assert abs(pro["active"] / 49e9 - 1) < 0.01
    assert abs(t1["total_without_mtp"] / 1.0e12 - 1) < 0.02 and abs(t1["total"] / 1.0e12 - 1) < 0.02


def test_tiny_counts_by_hand():
    c = preset("tiny")
    d, v, e, f, n = c.dim, c.vocab_size, c.n_routed_experts, c.moe_inter_dim, c.hc_mult
    mix = (2 + n) * n
    expert_layer = e * d + (e + 1) * 3 * d * f  # router + routed + shared experts
    # one window-only layer written out in full
    attn = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.n_heads * c.head_dim + d * c.head_dim
            + c.head_dim + c.o_lora_rank * c.n_heads * c.head_dim + c.o_groups * c.o_lora_rank * d + c.n_heads)
    window_layer = attn + expert_layer + 2 * d + 2 * (mix * n * d + mix + 3)
    mtp = window_layer + 2 * d * d + 3 * d + (n * n * d + n + 1)
    assert param_counts(c.replace(n_layers=1, compress_ratios=(0,), n_hash_layers=0))["total"] == (
        2 * v * d + d + (n * n * d + n + 1) + window_layer + mtp)


def test_kv_cache_bytes():
    c = preset("tiny")
    s = 1024
    got = kv_cache_bytes_per_token(c, s)
    window = min(c.window_size, s) * 584 / s
    assert MODEL1_ENTRY_BYTES == 584
    assert got["window"] == pytest.approx(1 * window)
    assert got["csa"] == pytest.approx(3 * (window + (s // 4) * (584 + 132) / s))
    assert got["hca"] == pytest.approx(2 * (window + (s // 16) * 584 / s))
    # V4-Flash at 1M tokens needs about a tenth of V3.2's cache (61 MLA layers x 656 bytes).
    flash = kv_cache_bytes_per_token(PRESETS["v4-flash"])["total"]
    assert 0.08 < flash / (61 * 656) < 0.12


def test_flops_per_token():
    c = preset("tiny")
    fl = flops_per_token(c, 64)
    p = param_counts(c)
    assert fl["train"] == pytest.approx(3 * fl["forward"])
    assert fl["forward"] == pytest.approx(2 * (p["active"] + p["mtp_active"]) + fl["attention_forward"])
    # attention grows with context only through the window (capped) and compressed entries
    assert flops_per_token(c, 4096)["attention_forward"] > fl["attention_forward"]
    flash = flops_per_token(PRESETS["v4-flash"], 4096)
    assert 2 * 13e9 < flash["forward"] < 2 * 16e9
