"""Run configuration: every mistake is one line naming the field; the resolved file reloads exactly."""
import os
import re

import pytest
import yaml

from model.config import PRESETS, ConfigError
from train.config import (LogConfig, OptimConfig, RunConfig, TrainConfig, format_config,
                          load_run_config, save_resolved)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def write(tmp_path, content: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def fails(message: str, overrides=(), path=TINY):
    """Loading must raise exactly one line that starts with `message` (a literal prefix)."""
    with pytest.raises(ConfigError) as e:
        load_run_config(path, overrides)
    text = str(e.value)
    assert "\n" not in text and text.startswith(message), text
    return text


def test_tiny_yaml_is_the_default_run():
    c = load_run_config(TINY)
    # bf16 compute, fp32 parameters; the 2-repeat layer segment unrolled (faster on CPU)
    assert c.model == PRESETS["tiny"].replace(dtype="bfloat16", scan_unroll=2)
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor) == (2, 1, 2, 2)
    assert (c.data.source, c.data.paths, c.data.tokenizer) == ("jsonl", ("data/shakespeare.jsonl",), "byte")
    assert (c.data.seq_len, c.data.global_batch) == (128, 16)
    assert (c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.decay) == ("muon", 3e-3, 20, "cosine")
    assert c.train.steps == 300 and c.train.devices == 8 and c.log.run_dir == "runs/tiny"
    assert c.model.vocab_size >= 258  # the byte tokenizer's ids


def test_round_trip_through_yaml_is_exact(tmp_path):
    c = load_run_config(TINY, ["log.profile_steps=[5, 8]", "rules.batch=[data, expert]",
                               "train.capacity_factor=1.25", "data.paths=[a.jsonl, b.jsonl]"])
    text = yaml.safe_dump(c.to_dict())
    assert load_run_config(write(tmp_path, yaml.safe_load(text))) == c
    assert RunConfig.from_dict(yaml.safe_load(format_config(c))) == c
    assert "(" not in text  # plain lists, no python tuples


def test_resolved_config_saved_next_to_logs_is_loadable(tmp_path):
    c = load_run_config(TINY, ["optim.lr=1e-3"])
    path = save_resolved(c, tmp_path / "runs" / "x")
    assert path == tmp_path / "runs" / "x" / "config.yaml" and path.exists()
    assert load_run_config(str(path)) == c


def test_nested_overrides():
    c = load_run_config(TINY, ["optim.lr=3e-4", "mesh.expert=4", "mesh.data=1", "model.dim=128",
                               "model.remat=full", "loss.z_loss=1e-4", "data.shuffle=false"])
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert (c.mesh.expert, c.mesh.data, c.model.dim) == (4, 1, 128)
    assert c.model.n_layers == PRESETS["tiny"].n_layers  # other fields keep the preset's
    assert (c.model.remat, c.loss.z_loss, c.data.shuffle) == ("full", 1e-4, False)


def test_model_preset_switch():
    c = load_run_config(TINY, ["model.preset=v4-flash"])
    assert c.model == PRESETS["v4-flash"]
    assert load_run_config(TINY, ["model=v4-pro"]).model == PRESETS["v4-pro"]


def test_model_as_preset_name_string(tmp_path):
    c = load_run_config(write(tmp_path, {"model": "tiny", "train": {"steps": 50}}), ["model.dim=96"])
    assert c.model == PRESETS["tiny"].replace(dim=96) and c.train.steps == 50


def test_list_and_null_overrides():
    c = load_run_config(TINY, ["data.paths=[a.txt,b.txt]", "train.capacity_factor=null",
                               "train.devices=null", "rules.heads=null"])
    assert c.data.paths == ("a.txt", "b.txt")
    assert c.train.capacity_factor is None and c.train.devices is None and c.rules == {"heads": None}
    assert load_run_config(TINY, ["train.capacity_factor=2"]).train.capacity_factor == 2.0


def test_no_file_gives_defaults():
    c = load_run_config(None)
    assert c.optim == OptimConfig() and c.train == TrainConfig() and c.log == LogConfig()


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key; did you mean 'optim.lr'?"),
    (["optm.lr=1"], "optm: unknown key; did you mean 'optim'?"),
    (["model.dimm=1"], "model.dimm: unknown key; did you mean 'model.dim'?"),
    (["mesh.expret=2"], "mesh.expret: unknown key; did you mean 'mesh.expert'?"),
    (["data.seqlen=64"], "data.seqlen: unknown key; did you mean 'data.seq_len'?"),
    (["rules.hedas=tensor"], "rules.hedas: unknown key; did you mean 'rules.heads'?"),
    (["optim.lr.x=1"], "optim.lr.x: unknown key; optim.lr has no sub-keys"),
])
def test_unknown_keys_suggest_the_closest(overrides, message):
    assert fails(message, overrides) == message


def test_unknown_keys_in_the_file(tmp_path):
    fails("optm: unknown key; did you mean 'optim'?", path=write(tmp_path, {"optm": {"lr": 1.0}}))
    fails("train.stpes: unknown key; did you mean 'train.steps'?",
          path=write(tmp_path, {"train": {"stpes": 10}}))


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=ten"], "train.steps: expected int, got 'ten'"),
    (["train.steps=true"], "train.steps: expected int, got True"),
    (["train.steps=3.0"], "train.steps: expected int, got 3.0"),
    (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    (["log.tensorboard=1"], "log.tensorboard: expected bool, got 1"),
    (["optim.name=7"], "optim.name: expected str, got 7"),
    (["train.devices=many"], "train.devices: expected int or null, got 'many'"),
    (["data.paths=[a.txt, 3]"], "data.paths[1]: expected str, got 3"),
    (["log.profile_steps=[1, 2, 3]"], "log.profile_steps: expected list of 2 int or null"),
    (["model.dim=big"], "model.dim: expected int, got 'big'"),
    (["mesh.data=2.0"], "mesh.data: expected int, got 2.0"),
])
def test_wrong_types(overrides, message):
    fails(message, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=-5"], "train.steps: must be > 0, got -5"),
    (["optim.warmup_steps=500"], "optim.warmup_steps: warm-up (500) is longer than the run (300 steps)"),
    (["train.micro_batches=3"], "train.micro_batches: must divide the per-step batch"),
    (["train.micro_batches=8"], "train.micro_batches: a micro-batch of 2 sequences"),
    (["data.global_batch=6"], "data.global_batch: 6 is not divisible by data*fsdp*expert = 4"),
    (["optim.name=sgd"], "optim.name: must be one of ('muon', 'adamw')"),
    (["optim.decay=step"], "optim.decay: must be one of ('cosine', 'linear', 'constant')"),
    (["model.remat=some"], "model.remat: must be one of ('none', 'full', 'save_matmuls')"),
    (["train.moe_transport=x"], "train.moe_transport: must be one of"),
    (["optim.lr=0"], "optim.lr: must be > 0"),
    (["optim.b2=1.0"], "optim.b2: must be in [0, 1)"),
    (["loss.mtp_weight=-0.1"], "loss.mtp_weight: must be >= 0, got -0.1"),
    (["loss.balance_alpha=-1"], "loss.balance_alpha: must be >= 0"),
    (["loss.mtp_late_fraction=2"], "loss.mtp_late_fraction: must be in [0, 1]"),
    (["log.log_every=0"], "log.log_every: must be > 0, got 0"),
    (["log.profile_steps=[5, 2]"], "log.profile_steps: expected [start, stop]"),
    (["checkpoint.keep=0"], "checkpoint.keep: must be > 0"),
    (["mesh.fsdp=0"], "mesh.fsdp: must be a positive size or -1, got 0"),
    (["mesh.data=-1", "mesh.expert=-1"], "mesh: only one axis may be -1"),
    (["mesh.tensor=3"], "mesh.tensor: n_heads=4 is not divisible by tensor=3"),
    (["model.n_heads=5"], "model.o_groups: n_heads=5 is not divisible by o_groups=2"),
    (["model.preset=v9"], "model.preset: unknown preset 'v9'"),
    (["data.seq_len=0"], "data.seq_len: "),
    (["rules.heads=tensr"], "rules.heads: 'tensr' is not a mesh axis"),
])
def test_impossible_values(overrides, message):
    fails(message, overrides)


def test_batch_check_waits_for_devices_when_an_axis_is_minus_one():
    c = load_run_config(TINY, ["mesh.data=-1", "data.global_batch=6"])
    assert c.mesh.data == -1 and c.data.global_batch == 6


@pytest.mark.parametrize("item", ["optim.lr", "=3", ".lr=3", "optim..lr=1"])
def test_malformed_override(item):
    fails(f"bad override {item!r}: expected key=value", [item])


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    fails(f"{bad}: not valid YAML", path=str(bad))
    bad.write_text("- 1\n- 2\n")
    fails(f"{bad}: expected a mapping of sections", path=str(bad))
    fails("optim: expected a mapping, got 3", path=write(tmp_path, {"optim": 3}))
    fails(f"{tmp_path}/none.yaml: no such config file", path=str(tmp_path / "none.yaml"))


def test_yaml_is_read_safely(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("optim: !!python/object/apply:os.system ['true']\n")
    fails(f"{bad}: not valid YAML", path=str(bad))
    with pytest.raises(ConfigError, match=re.escape("bad override")):
        load_run_config(TINY, ["optim.name=!!python/name:os.system"])


def test_sections_validate_when_built_directly():
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0"):
        OptimConfig(lr=-1.0)
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)


def test_preset_switch_on_a_resolved_config(tmp_path):
    """A saved config lists every model field; switching the preset must still take effect."""
    path = save_resolved(load_run_config(TINY), tmp_path)
    c = load_run_config(str(path), ["model.dim=2048", "model.preset=v4-flash"])
    assert c.model == PRESETS["v4-flash"].replace(dim=2048)  # command-line model fields still apply


def test_yaml_1_1_exponent_text_reads_as_float(tmp_path):
    c = load_run_config(write(tmp_path, {"optim": {"lr": "3e-4"}}), ["log.peak_flops=6e10"])
    assert (c.optim.lr, c.log.peak_flops) == (3e-4, 6e10)
    assert load_run_config(TINY, ["data.paths=one.jsonl"]).data.paths == ("one.jsonl",)
