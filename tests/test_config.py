"""ModelConfig validation, presets and their YAML twins."""
import glob
import os

import pytest

from model.config import PRESETS, ConfigError, ModelConfig, load_yaml, preset

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.parametrize("changes, field, words", [
    (dict(n_heads=6, o_groups=4), "o_groups", "not divisible"),
    (dict(compress_ratios=(0, 4, 16)), "compress_ratios", "has 3 entries but n_layers is 6"),
    (dict(n_activated_experts=9), "n_activated_experts", "larger than n_routed_experts=8"),
    (dict(n_hash_layers=7), "n_hash_layers", "only n_layers=6"),
    (dict(score_func="relu"), "score_func", "must be one of"),
    (dict(rope_head_dim=40), "rope_head_dim", "head_dim=32"),
    (dict(dim=0), "dim", "positive integer"),
])
def test_bad_values_name_the_field(changes, field, words):
    with pytest.raises(ConfigError) as e:
        preset("tiny", **changes)
    assert str(e.value).startswith(f"{field}: ") and words in str(e.value)


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"n_head: not a ModelConfig field; did you mean 'n_heads'\?"):
        ModelConfig.from_dict({"preset": "tiny", "n_head": 8})
    with pytest.raises(ConfigError, match="preset: unknown preset 'v5'"):
        ModelConfig.from_dict({"preset": "v5"})


def test_preset_plus_overrides_from_dict():
    c = ModelConfig.from_dict({"preset": "tiny", "dim": 128})
    assert c.dim == 128 and c.n_layers == PRESETS["tiny"].n_layers


def test_yaml_twins_equal_presets():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "model", "*.yaml")))
    names = {os.path.basename(f)[:-5] for f in files}
    assert names == set(PRESETS)
    for f in files:
        assert load_yaml(f) == PRESETS[os.path.basename(f)[:-5]], f


def test_presets_reproduce_published_schedules():
    flash, pro = PRESETS["v4-flash"], PRESETS["v4-pro"]
    assert flash.compress_ratios == (0, 0) + (4, 128) * 20 + (4,)
    assert pro.compress_ratios == (128, 128) + (4, 128) * 29 + (4,)
    assert (flash.route_scale, pro.route_scale) == (1.5, 2.5)
    assert (flash.index_topk, pro.index_topk) == (512, 1024)
