"""Device meshes from config: axes data, fsdp, expert, tensor; validated before any compile.

Axis order, outermost to innermost: data, fsdp, expert, tensor. `jax.make_mesh` lays the
innermost axis over the closest devices, so the axis with the most traffic per step gets the
fastest links: tensor (two collectives per layer on activations) innermost, then expert (two
all-to-alls per MoE layer), then fsdp (a weight all-gather / gradient reduce-scatter per layer),
and data outermost (one gradient all-reduce per step). Multi-slice pods add a data-centre-network
factor per axis (`dcn_data`, ...): the mesh is then built with `create_hybrid_device_mesh` so
that only the dcn factors cross slices (put them on data, the cheapest axis).

Mesh axes are `Auto`: parameters and batches carry explicit NamedShardings from
parallel/rules.py, activations carry logical constraints, and XLA's partitioner inserts the
collectives; only the MoE dispatch is written by hand (shard_map). Explicit axis types would
need an `out_sharding` on every contraction whose operands are sharded alike (the grouped
output projection, FSDP gathers, ...), which would put mesh decisions into model code.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
from jax.sharding import AxisType, Mesh

from model.config import ConfigError, ModelConfig, check_keys

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")


@dataclass(frozen=True)
class MeshConfig:
    """Per-axis sizes within a slice (-1: all remaining devices, at most one axis) and, for
    multi-slice jobs, per-axis factors across slices. Axis size = ici size * dcn size.
    fsdp_min_size: parameters whose one layer has fewer elements stay whole over fsdp
    (parallel/rules.py Rules.param_spec; 0 splits every parameter that has an fsdp dimension)."""
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1
    fsdp_min_size: int = 65536

    def __post_init__(self):
        if self.fsdp_min_size < 0:
            raise ConfigError(f"mesh.fsdp_min_size: must be >= 0, got {self.fsdp_min_size}")

    @classmethod
    def from_dict(cls, d) -> "MeshConfig":
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, "mesh.", "not a mesh field")
        return cls(**d)

    def dcn(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"dcn_{a}") for a in AXES)

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Axis sizes (ici * dcn) for `n_devices` devices; raises ConfigError naming the field."""
        dcn = self.dcn()
        for a, f in zip(AXES, dcn):
            if f < 1:
                raise ConfigError(f"mesh.dcn_{a}: must be >= 1, got {f}")
        slices = math.prod(dcn)
        if n_devices % slices:
            raise ConfigError(f"mesh: the dcn factors multiply to {slices} slices, which does not divide "
                              f"the {n_devices} devices")
        per_slice = n_devices // slices
        ici = [getattr(self, a) for a in AXES]
        free = [a for a, v in zip(AXES, ici) if v == -1]
        if len(free) > 1:
            raise ConfigError(f"mesh: only one axis may be -1, got {free}")
        for a, v in zip(AXES, ici):
            if v != -1 and v < 1:
                raise ConfigError(f"mesh.{a}: must be a positive size or -1, got {v}")
        fixed = math.prod(v for v in ici if v != -1)
        if free:
            if per_slice % fixed:
                raise ConfigError(f"mesh.{free[0]}: -1 cannot fill {per_slice} devices per slice: the "
                                  f"other axes multiply to {fixed}")
            ici = [per_slice // fixed if v == -1 else v for v in ici]
        elif fixed != per_slice:
            raise ConfigError(f"mesh: data*fsdp*expert*tensor = {fixed} per slice but there are "
                              f"{per_slice} devices per slice ({n_devices} devices, {slices} slices)")
        return {a: i * f for a, i, f in zip(AXES, ici, dcn)}


def validate(sizes: dict[str, int], cfg: ModelConfig, global_batch: int | None = None) -> None:
    """Model / batch constraints of a resolved mesh, each error naming the field."""
    tp, ep, fsdp = sizes["tensor"], sizes["expert"], sizes["fsdp"]
    for name, value in (("n_heads", cfg.n_heads), ("o_groups", cfg.o_groups),
                        ("index_n_heads", cfg.index_n_heads), ("moe_inter_dim", cfg.moe_inter_dim),
                        ("vocab_size", cfg.vocab_size)):
        if value % tp:
            raise ConfigError(f"mesh.tensor: {name}={value} is not divisible by tensor={tp}")
    if cfg.n_routed_experts % ep:
        raise ConfigError(f"mesh.expert: n_routed_experts={cfg.n_routed_experts} is not divisible by expert={ep}")
    if cfg.dim % fsdp:
        raise ConfigError(f"mesh.fsdp: dim={cfg.dim} is not divisible by fsdp={fsdp}")
    if global_batch is not None:
        shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
        if global_batch % shards:
            raise ConfigError(f"batch: global batch {global_batch} is not divisible by data*fsdp*expert = {shards}")


def make_mesh(mesh_cfg: MeshConfig, cfg: ModelConfig | None = None, *, devices=None,
              global_batch: int | None = None) -> Mesh:
    """A validated Mesh over `devices` (default: all), axes in AXES order, Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.resolve(len(devices))
    if cfg is not None:
        validate(sizes, cfg, global_batch)
    shape = tuple(sizes[a] for a in AXES)
    types = (AxisType.Auto,) * len(AXES)
    dcn = mesh_cfg.dcn()
    if math.prod(dcn) > 1:
        from jax.experimental import mesh_utils

        ici = tuple(s // f for s, f in zip(shape, dcn))
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(arr, AXES, axis_types=types)
    try:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    except NotImplementedError:  # e.g. expert=16 on a v5p 8x8x8 torus: split a physical axis
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(arr, AXES, axis_types=types)


def abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
    """A device-free mesh of the given axis sizes, for planning pod jobs on a laptop."""
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES,
                                     axis_types=(AxisType.Auto,) * len(AXES))


def platform_of(mesh) -> str | None:
    """The platform of a mesh's devices ("cpu", "tpu", "gpu"); None for an abstract mesh."""
    return mesh.devices.flat[0].platform if hasattr(mesh, "devices") else None


def describe(mesh) -> str:
    """`data=2 x expert=2 x tensor=2` (axes of size 1 left out)."""
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 device"
