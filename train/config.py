"""RunConfig: everything one training run needs, read from YAML plus `key=value` overrides.

Every mistake in a run file should fail here, in plain Python and in one line naming the dotted
field, rather than minutes later inside a JAX compile or a sharding error. So each section is a
frozen dataclass that checks its own values, the loader rejects unknown keys (suggesting the
closest one) and values of the wrong type, and RunConfig checks what spans sections (warm-up vs
run length, batch vs mesh). Nothing here initialises a JAX backend: the caller still chooses the
device count afterwards (importing `model.config` does import jax through `model/__init__`).

`save_resolved` writes the resolved configuration next to the logs; `to_dict` is exact, so
loading that file again gives an equal RunConfig and a run can always be repeated.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from model.config import PRESETS, ConfigError, ModelConfig, check, check_keys
from parallel.expert import TRANSPORTS
from parallel.mesh import AXES as MESH_AXES, BATCH_AXES, MeshConfig, validate
from parallel.rules import RULES, Rules
from train.coerce import coerce, field_types

if TYPE_CHECKING:  # train.data imports this module
    from train.data import DataConfig

OPTIMIZERS = ("muon", "adamw")
DECAYS = ("cosine", "linear", "constant")
SECTIONS = ("model", "mesh", "rules", "data", "optim", "loss", "train", "checkpoint", "log")


# --- small checks ----------------------------------------------------------------------------
def _bounds(obj, section: str, gt0=(), ge0=(), unit=(), frac=()) -> None:
    """Range checks shared by the sections: > 0 (None passes), >= 0, [0, 1), [0, 1]."""
    for names, ok, words in ((gt0, lambda v: v is None or v > 0, "must be > 0"),
                             (ge0, lambda v: v >= 0, "must be >= 0"),
                             (unit, lambda v: 0 <= v < 1, "must be in [0, 1)"),
                             (frac, lambda v: 0 <= v <= 1, "must be in [0, 1]")):
        for n in names:
            check(ok(getattr(obj, n)), f"{section}.{n}", f"{words}, got {getattr(obj, n)}")


def _one_of(value, choices: tuple, name: str) -> None:
    check(value in choices, name, f"must be one of {choices}, got {value!r}")


class _Section:
    """Base of the sections below: coerce fields to their types, then `_validate`, so a
    section built in code is as checked as one read from YAML. OptimConfig -> 'optim'."""

    def __post_init__(self):
        section = type(self).__name__.removesuffix("Config").lower()
        for name, tp in field_types(type(self)).items():
            object.__setattr__(self, name, coerce(getattr(self, name), tp, f"{section}.{name}"))
        self._validate()


# --- sections --------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimConfig(_Section):
    name: str = "muon"
    lr: float = 3e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_rms: float = 0.18  # RMS that Muon's orthogonalised update is scaled to
    # dtype of Muon's Newton-Schulz (and of its all_to_all exchange on a mesh); the update comes
    # back in the gradients' dtype. bfloat16: Muon's usual precision (coefficients rounded to
    # bf16 too); GPUs run float32 GEMMs on TF32 cores at half the bf16 rate, and on a mesh it
    # halves the bytes exchanged; float32 (default) is faster on CPUs
    muon_dtype: str = "float32"
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    warmup_steps: int = 20
    decay: str = "cosine"
    min_lr_ratio: float = 0.1

    def _validate(self):
        _one_of(self.name, OPTIMIZERS, "optim.name")
        _one_of(self.decay, DECAYS, "optim.decay")
        _one_of(self.muon_dtype, ("float32", "bfloat16"), "optim.muon_dtype")
        _bounds(self, "optim", gt0=("lr", "eps", "muon_rms"), ge0=("weight_decay", "clip_norm", "warmup_steps"),
                unit=("b1", "b2", "muon_momentum"), frac=("min_lr_ratio",))


@dataclass(frozen=True)
class LossConfig(_Section):
    mtp_weight: float = 0.3
    mtp_weight_late: float = 0.1
    mtp_late_fraction: float = 0.9  # fraction of the run after which mtp_weight_late applies
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    indexer_weight: float = 1.0
    indexer_dense_steps: int = 0  # dense-attention warm-up steps for the lightning indexer
    z_loss: float = 0.0

    def _validate(self):
        _bounds(self, "loss", ge0=("mtp_weight", "mtp_weight_late", "balance_alpha", "bias_gamma",
                                   "indexer_weight", "indexer_dense_steps", "z_loss"),
                frac=("mtp_late_fraction",))


@dataclass(frozen=True)
class TrainConfig(_Section):
    steps: int = 300
    micro_batches: int = 1  # gradient accumulation (rematerialisation: model.remat)
    seed: int = 0
    moe_transport: str = "auto"
    capacity_factor: float | None = None
    devices: int | None = 8  # emulated CPU devices per process (runs on the CPU); None = the real accelerators
    max_bad_steps: int = 5  # stop (exit 3) after this many consecutive non-finite steps
    # a DeepSeek-V4 checkpoint directory (safetensors + config.json, model.load_pretrained):
    # a fresh run starts from its parameters (new optimiser state, step 0); a resume ignores it
    init_from: str | None = None

    def _validate(self):
        _bounds(self, "train", gt0=("steps", "micro_batches", "capacity_factor", "devices",
                                    "max_bad_steps"))
        _one_of(self.moe_transport, TRANSPORTS, "train.moe_transport")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    enabled: bool = True  # also saves at the end of the run and on SIGTERM
    dir: str | None = None  # local path or gs://...; None = RUN_DIR/checkpoints
    interval_steps: int = 100  # 0: no step-based saves
    interval_minutes: float = 0.0  # 0: no time-based saves
    keep: int = 3  # the newest N checkpoints are kept ...
    keep_every: int = 0  # ... and every step divisible by this (0: none)
    async_save: bool = True  # write in a background thread while training continues

    def _validate(self):
        _bounds(self, "checkpoint", gt0=("keep",),
                ge0=("interval_steps", "interval_minutes", "keep_every"))


@dataclass(frozen=True)
class LogConfig(_Section):
    run_dir: str = "runs/tiny"
    log_every: int = 10
    tensorboard: bool = True
    profile_steps: tuple[int, int] | None = None  # [start, stop) of a profiler trace
    example_ids: bool = False  # write RUN_DIR/examples.jsonl: tokens per document id per step
    peak_flops: float = 6.0e10  # per device (CPU's measured f32 matmul peak), for MFU
    # held-out loss (eval_loss, eval_ppl) every N steps and at the end; 0: off. Needs
    # data.eval_fraction or data.eval_paths
    eval_every: int = 0

    def _validate(self):
        _bounds(self, "log", gt0=("log_every", "peak_flops"), ge0=("eval_every",))
        p = self.profile_steps
        check(p is None or 0 <= p[0] < p[1], "log.profile_steps",
              f"expected [start, stop] with 0 <= start < stop, got {p and list(p)}")


def _section_class(name: str):
    """The dataclass of a section (data is imported late: train.data imports this module)."""
    if name == "data":
        from train.data import DataConfig
        return DataConfig
    return {"model": ModelConfig, "mesh": MeshConfig, "optim": OptimConfig, "loss": LossConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig, "log": LogConfig}[name]


@dataclass(frozen=True)
class RunConfig:
    """One run. Sections validate themselves; this adds the checks that span sections."""
    model: ModelConfig = PRESETS["tiny"]
    mesh: MeshConfig = field(default_factory=lambda: _section_class("mesh")())
    rules: dict = field(default_factory=dict)  # logical axis -> mesh axis / list / null
    data: DataConfig = field(default_factory=lambda: _section_class("data")())
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        rules = {k: tuple(v) if isinstance(v, list) else v for k, v in self.rules.items()}
        object.__setattr__(self, "rules", rules)
        _check_rules(rules)
        _check_schedule(self)
        _check_mesh(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-dumpable dict (lists, not tuples); `from_dict` of it is equal to self."""
        return {name: _plain(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        return _from_raw(dict(d))


def _plain(x):
    if dataclasses.is_dataclass(x):
        return _plain({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --- checks across sections ------------------------------------------------------------------
def _check_rules(rules: dict) -> None:
    check_keys(rules, RULES, "rules.")
    Rules(rules)  # mesh-axis names; its errors already start with rules.<name>


def _check_schedule(c: RunConfig) -> None:
    steps = c.train.steps
    check(c.optim.warmup_steps <= steps, "optim.warmup_steps",
          f"warm-up ({c.optim.warmup_steps}) is longer than the run ({steps} steps)")
    check(c.loss.indexer_dense_steps <= steps, "loss.indexer_dense_steps",
          f"dense warm-up ({c.loss.indexer_dense_steps}) is longer than the run ({steps} steps)")
    gb, mb = c.data.global_batch, c.train.micro_batches
    check(gb % mb == 0, "train.micro_batches",
          f"must divide the per-step batch (data.global_batch = {gb}), got {mb}")


def _check_mesh(c: RunConfig) -> None:
    """What the mesh builder would reject later, as far as it is known without devices."""
    m = c.mesh
    ici = {a: getattr(m, a) for a in MESH_AXES}
    for a, v in ici.items():
        check(v == -1 or v >= 1, f"mesh.{a}", f"must be a positive size or -1, got {v}")
        check(getattr(m, f"dcn_{a}") >= 1, f"mesh.dcn_{a}", f"must be >= 1, got {getattr(m, f'dcn_{a}')}")
    free = [a for a, v in ici.items() if v == -1]
    check(len(free) <= 1, "mesh", f"only one axis may be -1, got {free}")
    sizes = {a: ici[a] * getattr(m, f"dcn_{a}") for a in MESH_AXES}
    if any(ici[a] == -1 for a in BATCH_AXES):
        return  # the batch split depends on the device count: the mesh builder checks it
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    gb, mb = c.data.global_batch, c.train.micro_batches
    check(gb % shards == 0, "data.global_batch", f"{gb} is not divisible by data*fsdp*expert = {shards}")
    check((gb // mb) % shards == 0, "train.micro_batches",
          f"a micro-batch of {gb // mb} sequences (data.global_batch / {mb}) is not divisible "
          f"by data*fsdp*expert = {shards}")
    if not free:
        validate(sizes, c.model)  # heads / experts / dim divisibility by the axes


# --- loading ---------------------------------------------------------------------------------
def _as_mapping(section: str, value) -> dict:
    if value is None:
        return {}
    if section == "model" and isinstance(value, str):
        return {"preset": value}
    if isinstance(value, Mapping):
        return dict(value)
    what = "a mapping or a preset name" if section == "model" else "a mapping"
    raise ConfigError(f"{section}: expected {what}, got {value!r}")


def _prefixed(section: str, err: ConfigError) -> ConfigError:
    """ModelConfig's errors say 'field: ...' (it does not know its section): 'model.field: ...'."""
    msg = str(err)
    return err if msg.startswith((f"{section}.", f"{section}:")) else ConfigError(f"{section}.{msg}")


def _build_section(name: str, raw):
    raw = _as_mapping(name, raw)
    if name == "rules":
        return raw
    cls = _section_class(name)
    hints = dict(field_types(cls))
    if name == "model":
        hints["preset"] = str
    check_keys(raw, hints, f"{name}.")
    kwargs = {k: coerce(v, hints[k], f"{name}.{k}") for k, v in raw.items()}
    try:
        return ModelConfig.from_dict(kwargs) if name == "model" else cls(**kwargs)
    except ConfigError as e:
        raise _prefixed(name, e) from None


def _from_raw(raw: dict) -> RunConfig:
    check_keys(raw, SECTIONS)
    return RunConfig(**{name: _build_section(name, raw[name]) for name in SECTIONS if name in raw})


def _read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path) as f:
            content = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {SECTIONS}, got {type(content).__name__}")
    return content


def _parse_override(item: str) -> tuple[list[str], Any]:
    """`section.field=value` (or `section=value`) -> (key parts, value read as safe YAML)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"bad override {item!r}: expected key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"bad override {item!r}: cannot read {text!r} as a YAML value") from None
    check_keys(parts[:1], SECTIONS)
    if len(parts) > 2:
        raise ConfigError(f"{key.strip()}: unknown key; {parts[0]}.{parts[1]} has no sub-keys")
    return parts, value


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig of YAML file `path` (None: all defaults) with dotted `key=value` overrides
    applied in order. Raises ConfigError (one line, starting with the dotted field).

    `model.preset=NAME` starts the model from that preset: the file's model fields are dropped
    (a resolved config.yaml lists them all), `model.*` overrides given alongside still apply."""
    raw = _read_yaml(path)
    parsed = [_parse_override(item) for item in ([overrides] if isinstance(overrides, str) else overrides)]
    if any(parts == ["model", "preset"] for parts, _ in parsed):
        raw["model"] = {}
    for parts, value in parsed:
        if len(parts) == 1:
            raw[parts[0]] = value
        else:
            raw[parts[0]] = {**_as_mapping(parts[0], raw.get(parts[0])), parts[1]: value}
    return _from_raw(raw)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, one line for lists of numbers/strings (compress_ratios)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=not any(isinstance(x, (list, dict)) for x in v)))


def format_config(cfg: RunConfig) -> str:
    """The resolved configuration as YAML: what a run prints at start and saves with its logs."""
    body = yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return "# Resolved run configuration (load it again with --config).\n" + body


def save_resolved(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml` (creating run_dir) so the run can be repeated exactly."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(format_config(cfg))
    return path
