"""Checkpoint import: both config spellings (Hugging Face config.json and DeepSeek's
inference/config.json) give the published presets, unknown architecture keys fail loudly, and
every parameter of a model, its MTP block included, survives an export -> load_hf_weights trip.

The config dicts below restate the values of the released DeepSeek-V4-Flash and V4-Pro files.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model.hf as hf
from model import PRESETS, ConfigError, build, preset
from model.hf import config_from_hf, load_hf_weights

# run choices, not architecture: quantisation formats, numerics, kernels, rematerialisation, scan
RUN_FIELDS = {"quant_matmul", "quant_experts", "quant_kv", "quant_indexer", "quant_block",
              "quant_fp4_block", "quant_kv_block", "dtype", "param_dtype", "moe_impl", "remat",
              "scan_max_period", "scan_unroll"}

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]      # 43 layers, then the MTP layer
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4] + [0]    # 61 layers, then the MTP layer

# DeepSeek's inference/config.json (ModelArgs field names)
DS_FLASH = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
    "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024,
    "head_dim": 512, "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
    "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32,
    "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
    "compress_rope_theta": 160000, "compress_ratios": FLASH_RATIOS,
}
DS_PRO = {**DS_FLASH, "dim": 7168, "moe_inter_dim": 3072, "n_layers": 61, "n_heads": 128,
          "n_routed_experts": 384, "route_scale": 2.5, "q_lora_rank": 1536, "o_groups": 16,
          "index_topk": 1024, "compress_ratios": PRO_RATIOS}

# Hugging Face config.json of the same releases
HF_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
    "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128, "index_n_heads": 64,
    "index_topk": 512, "initializer_range": 0.02, "max_position_embeddings": 1048576,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 6,
    "num_hidden_layers": 43, "num_hash_layers": 3, "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                     "original_max_position_embeddings": 65536, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "sliding_window": 128, "swiglu_limit": 10.0, "tie_word_embeddings": False,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.57.1",
    "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": FLASH_RATIOS,
}
HF_PRO = {**HF_FLASH, "hidden_size": 7168, "index_topk": 1024, "moe_intermediate_size": 3072,
          "n_routed_experts": 384, "num_attention_heads": 128, "num_hidden_layers": 61,
          "o_groups": 16, "q_lora_rank": 1536, "routed_scaling_factor": 2.5,
          "compress_ratios": PRO_RATIOS}


def architecture(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FIELDS}


@pytest.mark.parametrize("name, ds, hf_json", [("v4-flash", DS_FLASH, HF_FLASH), ("v4-pro", DS_PRO, HF_PRO)])
def test_both_spellings_give_the_preset(name, ds, hf_json):
    got_ds, got_hf = config_from_hf(ds), config_from_hf(hf_json)
    want = architecture(PRESETS[name])
    for got in (got_ds, got_hf):
        diff = {k: (v, want[k]) for k, v in architecture(got).items() if v != want[k]}
        assert not diff, diff
    assert got_ds == got_hf
    assert isinstance(got_ds.rope_theta, float) and isinstance(got_ds.compress_rope_theta, float)


def test_hf_spelling_as_before():
    d = {"model_type": "deepseek_v4", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 5,
         "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "qk_rope_head_dim": 16,
         "q_lora_rank": 24, "o_groups": 2, "o_lora_rank": 16, "n_routed_experts": 8,
         "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe", "moe"], "sliding_window": 8,
         "index_n_heads": 8, "index_head_dim": 16, "index_topk": 3,
         "layer_types": ["sliding_attention", "compressed_sparse_attention",
                         "heavily_compressed_attention", "compressed_sparse_attention",
                         "sliding_attention"],
         "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
         "rope_parameters": {"main": {"rope_type": "default", "rope_theta": 5000.0},
                             "compress": {"rope_type": "yarn", "rope_theta": 80000.0, "factor": 4,
                                          "original_max_position_embeddings": 64,
                                          "beta_fast": 32, "beta_slow": 1}}}
    cfg = config_from_hf(d, dtype="float32", n_mtp_layers=0)
    assert (cfg.dim, cfg.n_layers, cfg.rope_head_dim, cfg.n_hash_layers, cfg.n_mtp_layers) == (64, 5, 16, 2, 0)
    assert cfg.compress_ratios == (0, 4, 8, 4, 0) and cfg.csa_ratio == 4
    assert (cfg.rope_theta, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len) == (
        5000.0, 80000.0, 4.0, 64)
    assert cfg.dtype == "float32"
    # without YaRN the compressed layers use plain RoPE
    plain = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert config_from_hf(plain).original_seq_len == 0


def test_deepseek_keys_left_out_take_modelargs_defaults():
    cfg = config_from_hf({k: v for k, v in DS_FLASH.items() if k not in ("swiglu_limit", "route_scale")})
    assert (cfg.swiglu_limit, cfg.route_scale) == (0.0, 1.0)  # what DeepSeek's code would build


@pytest.mark.parametrize("d, key", [({**DS_FLASH, "n_dense_layers": 3}, "n_dense_layers"),
                                    ({**HF_FLASH, "first_k_dense_replace": 3}, "first_k_dense_replace"),
                                    ({**HF_FLASH, "n_hash_layers": 3}, "n_hash_layers"),
                                    ({**HF_FLASH, "tie_word_embeddings": True}, "tie_word_embeddings"),
                                    ({**HF_FLASH, "num_key_value_heads": 8}, "num_key_value_heads"),
                                    ({**DS_FLASH, "hidden_size": 4096}, "hidden_size"),
                                    ({**DS_FLASH, "compress_ratios": FLASH_RATIOS[:-1] + [4]}, "compress_ratios"),
                                    ({"vocab_size": 10}, "config")])
def test_unknown_or_unsupported_keys_raise(d, key):
    with pytest.raises(ConfigError, match=key):
        config_from_hf(d)


def test_ignored_keys_are_listed_and_accepted():
    assert {"torch_dtype", "architectures", "transformers_version", "bos_token_id", "eos_token_id",
            "quantization_config", "max_batch_size", "max_seq_len", "dtype", "expert_dtype",
            "scale_fmt"} <= set(hf.IGNORED_KEYS)
    assert config_from_hf({**DS_FLASH, "max_batch_size": 8, "max_seq_len": 1 << 20, "dtype": "bf16",
                           "scale_dtype": "fp32"}) == config_from_hf(DS_FLASH)


# --- weights: export -> load round trip, MTP block included ------------------------------
def _to_hf(name, fn, ours):
    """HF layout of our array(s): the inverse of the transform model/hf.py applies."""
    if name.endswith("experts.gate_up_proj"):
        return np.concatenate([w.transpose(0, 2, 1) for w in ours], axis=1)
    (x,) = ours
    if name.endswith("experts.down_proj"):
        return x.transpose(0, 2, 1)
    if name.endswith("o_a_proj.weight"):      # ours [G, H*K/G, O]
        return x.transpose(0, 2, 1).reshape(-1, x.shape[1])
    if name.endswith("o_b_proj.weight"):      # ours [G, O, D]
        return x.reshape(-1, x.shape[-1]).T
    if name.endswith("q_b_proj.weight"):      # ours [R, H, K]
        return x.reshape(x.shape[0], -1).T
    return x.T if fn is hf.T else x


def export(m):
    """Every name load_hf_weights expects (mtp.* included) with m's values."""
    targets = {**hf._targets(m), **hf._mtp_targets(m)}
    assert any(n.startswith("mtp.0.") for n in targets)
    out = {}
    for name, (module, index, path, fn) in targets.items():
        paths = path.split("|")
        ours = []
        for p in paths:
            v = np.asarray(hf._resolve(module, p).get_value())
            ours.append(v if index is None else v[index])
        out[name] = _to_hf(name, fn, ours)
        back = fn(out[name])
        for a, b in zip(back if len(paths) > 1 else (back,), ours):
            np.testing.assert_array_equal(a, b, err_msg=name)  # the inverse above is right
    return out


def perturb(m, seed):
    """Move every parameter and buffer off its initial value (norms, biases, hash tables too)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(m)
    leaves, tdef = jax.tree.flatten(state)
    new = []
    for x in leaves:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            x = x + (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
        else:  # hash routing tables: another (still distinct per row) expert choice
            x = (x + 1) % m.cfg.n_routed_experts
        new.append(jnp.asarray(x))
    nnx.update(m, jax.tree.unflatten(tdef, new))


def test_load_every_parameter_including_mtp():
    cfg = preset("tiny")
    assert cfg.n_mtp_layers == 1
    dst, src = build(cfg, rngs=nnx.Rngs(0)), build(cfg, rngs=nnx.Rngs(1))
    perturb(src, 1)
    tensors = export(src)
    flat = lambda m: jax.tree.flatten_with_path(nnx.state(m))[0]  # noqa: E731
    assert all(not np.array_equal(a, b) for (_, a), (_, b) in zip(flat(dst), flat(src)))
    load_hf_weights(dst, tensors)
    for (path, a), (_, b) in zip(flat(dst), flat(src)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    fwd = nnx.jit(lambda m, x: m(x))  # one program for both (eager: ~500 one-op compiles)
    (got, got_aux), (ref, ref_aux) = fwd(dst, ids), fwd(src, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert len(got_aux.mtp_logits) == 1
    np.testing.assert_array_equal(np.asarray(got_aux.mtp_logits[0]), np.asarray(ref_aux.mtp_logits[0]))


def test_partial_mtp_names_raise():
    m = build(preset("tiny"), rngs=nnx.Rngs(0))
    tensors = export(m)
    del tensors["mtp.0.e_proj.weight"]
    with pytest.raises(KeyError, match="mtp.0.e_proj.weight"):
        load_hf_weights(m, tensors)
