"""Exporting (model/export.py): DeepSeek's naming round-trips through our importer (exact in
float32 and bf16, onto DeepSeek's FP8 / FP4 grid in fp8, checked against the numpy + ml_dtypes
release writer of tests/test_pretrained.py); HF's naming loads in transformers'
DeepseekV4ForCausalLM and gives our logits."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from model import build, load_pretrained
from model.export import deepseek_config, hf_config, save
from model.hf import config_from_hf
from test_pretrained import CFG, deepseek_tensors, perturb, release


@pytest.fixture(scope="module")
def src():
    m = build(CFG, rngs=nnx.Rngs(3))
    perturb(m, seed=4)
    return m


def _same_params(a, b):
    fa, fb = dict(nnx.to_flat_state(nnx.state(a))), dict(nnx.to_flat_state(nnx.state(b)))
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k].get_value()), np.asarray(fb[k].get_value()), err_msg=str(k))


def test_configs_read_back_as_the_model():
    assert config_from_hf(deepseek_config(CFG, "float32"), dtype=CFG.dtype) == CFG
    back = config_from_hf(json.loads(json.dumps(hf_config(CFG))), dtype=CFG.dtype, n_mtp_layers=CFG.n_mtp_layers)
    assert back == CFG


def test_deepseek_float32_round_trip_is_exact_in_several_shards(src, tmp_path):
    save(src, tmp_path, "deepseek", "float32", shard_bytes=1 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / f).is_file() for f in files)
    assert "mtp.0.e_proj.weight" in index["weight_map"] and "layers.3.ffn.experts.7.w2.weight" in index["weight_map"]
    _same_params(load_pretrained(tmp_path, dtype=CFG.dtype), src)
    with pytest.raises(FileExistsError):
        save(src, tmp_path, "deepseek", "float32")


def test_deepseek_bf16_round_trip_is_the_rounded_model(src, tmp_path):
    save(src, tmp_path, "deepseek", "bf16")
    got = deepseek_tensors(load_pretrained(tmp_path, dtype=CFG.dtype))
    for name, w in deepseek_tensors(src).items():
        want = w.astype(ml_dtypes.bfloat16).astype(np.float32) if np.issubdtype(w.dtype, np.floating) else w
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_deepseek_fp8_is_the_release_format(src, tmp_path):
    """Stored dtypes and every dequantised value equal the independent numpy release writer's."""
    save(src, tmp_path, "deepseek", "fp8")
    stored, expected = release(deepseek_tensors(src))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(stored)
    for name in ("layers.2.attn.wq_a.weight", "layers.2.attn.wq_a.scale", "layers.1.ffn.experts.3.w1.weight",
                 "layers.1.ffn.experts.3.w1.scale", "embed.weight", "layers.0.hc_attn_fn"):
        with safe_open(str(tmp_path / index[name]), framework="np") as f:
            assert f.get_slice(name).get_dtype() == {
                np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0",
                np.dtype(np.int8): "I8", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32",
            }[stored[name].dtype], name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "fp8" and config["expert_dtype"] == "fp4"
    got = deepseek_tensors(load_pretrained(tmp_path, dtype=CFG.dtype))
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_hf_export_loads_in_transformers_with_our_logits(src, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    save(src, tmp_path, "hf", "float32")
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    # 19 tokens: 4 CSA blocks = index_topk, so no top-k tie can pick differently in torch (tiny's
    # 4 index heads tie often; selection parity is tests/test_hf_parity.py's job); the window
    # (16) and one HCA block (ratio 16) are both exercised
    ids = np.array(jax.random.randint(jax.random.key(1), (2, 19), 0, CFG.vocab_size))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x)[0])(src, jnp.asarray(ids)))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(ValueError, match="fp8"):
        save(src, tmp_path / "x", "hf", "fp8")


def test_hf_tensors_are_the_inverse_of_the_importer(src):
    """Every HF layout (heads, groups, fused experts, stacked layers, MTP) inverts exactly: the
    indexer's weights included, which the transformers test above cannot see."""
    from model.hf import hf_tensors, load_hf_weights

    tensors = hf_tensors(src, mtp=True)
    assert tensors["model.layers.1.self_attn.compressor.indexer.q_b_proj.weight"].shape == (
        CFG.index_n_heads * CFG.index_head_dim, CFG.q_lora_rank)
    back = build(CFG, rngs=nnx.Rngs(9))
    load_hf_weights(back, tensors)
    _same_params(back, src)
