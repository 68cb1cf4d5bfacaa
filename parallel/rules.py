"""The one table from logical axis names to mesh axes, and sharded model state built from it.

Parameters name their dimensions (`embed`, `heads`, `experts`, ... in their `out_sharding`
metadata); activations name theirs where the model calls `model.layers.constrain`. Changing a
parallelism strategy means editing RULES or overriding entries from YAML (`rules:` mapping of
logical name -> mesh axis, list of mesh axes, or null), never model code.

Choices: the batch is split over data, fsdp and expert (expert devices also do data
parallelism outside the MoE); every parameter matrix is FSDP-sharded on its embed dimension
(or, where it has none, on another input dimension: `q_lora_in`, `o_group_in`, `hc_embed`);
experts over `expert`; heads, output groups, indexer heads, expert and shared-expert hidden
units and the vocabulary over `tensor`. The single shared K=V head (and the compressors' and
indexer's keys) is replicated over `tensor`: every tensor device projects and compresses the
same keys (D x 512 per token, plus the fp32 compressors on compressed layers) instead of
sharding the sequence, which would add an all-gather of keys per layer.
"""
from __future__ import annotations

import contextlib
import math
from typing import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import layers as model_layers
from model.config import ConfigError, ModelConfig, check_keys
from model.transformer import Model, abstract

from .mesh import AXES, BATCH_AXES

RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": BATCH_AXES,
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": None,
    "q_lora": None,
    "q_lora_in": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "o_groups": "tensor",
    "o_group_in": "fsdp",
    "o_lora": None,
    "compress_out": None,
    "compress_slot": None,
    "compress_width": None,
    "index_heads": "tensor",
    "index_head_dim": None,
    "experts": "expert",
    "experts_router": None,
    "expert_mlp": "tensor",
    "mlp": "tensor",
    "topk": None,
    "hc_embed": "fsdp",
    "hc_mix": None,
    "hc_scale": None,
    "hc_streams": None,
    "hc_scale_head": None,
}


class Rules:
    """Logical -> mesh axis table with validation; `spec(names)` gives a PartitionSpec,
    `param_spec(names, shape)` a parameter's. Parameters whose one layer holds fewer than
    `fsdp_min_size` elements stay whole over fsdp (mesh.fsdp_min_size of a run)."""

    def __init__(self, overrides: Mapping[str, object] | None = None, fsdp_min_size: int = 0):
        if fsdp_min_size < 0:
            raise ConfigError(f"mesh.fsdp_min_size: must be >= 0, got {fsdp_min_size}")
        self.fsdp_min_size = fsdp_min_size
        table = dict(RULES)
        for name, axes in (overrides or {}).items():
            check_keys([name], RULES, "rules.", "not a logical axis name")
            axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
            for a in (axes if isinstance(axes, tuple) else (axes,)):
                if a is not None and a not in AXES:
                    raise ConfigError(f"rules.{name}: {a!r} is not a mesh axis; use one of {AXES} or null")
            table[name] = axes
        self.table = table

    @classmethod
    def of_run(cls, cfg) -> "Rules":
        """The rules of a RunConfig: its `rules:` overrides and mesh.fsdp_min_size."""
        return cls(cfg.rules, cfg.mesh.fsdp_min_size)

    @classmethod
    def from_yaml(cls, path) -> "Rules":
        """Rules with the overrides of a YAML file's `rules:` mapping (safe loading)."""
        import yaml

        with open(path) as f:
            content = yaml.safe_load(f) or {}
        return cls(content.get("rules") or {})

    def spec(self, names) -> P:
        """PartitionSpec for logical `names`; a mesh axis may shard at most one dimension."""
        used, out = {}, []
        for name in names:
            if name is not None and name not in self.table:
                raise ConfigError(f"rules: no rule for logical axis {name!r}")
            axes = None if name is None else self.table[name]
            for a in (axes if isinstance(axes, tuple) else (axes,)):
                if a is None:
                    continue
                if a in used:
                    raise ConfigError(f"rules: mesh axis {a!r} would shard both {used[a]!r} and {name!r} "
                                      f"of one array {tuple(names)}; change one of the two rules")
                used[a] = name
            out.append(axes)
        return P(*out)

    def param_spec(self, names, shape) -> P:
        """PartitionSpec of a parameter with logical `names` and `shape`: spec(names), less the
        fsdp axis when one layer of it (the shape without its `layers` dimension) has fewer
        than fsdp_min_size elements. Gathering such a slice over fsdp costs a collective's
        latency for next to no memory (DeepSpeed's ZeRO-3 keeps such parameters whole by the
        same kind of threshold); whole, they need no all-gather at all and their gradients
        join the one combined all-reduce of the data-parallel gradients."""
        spec = self.spec(names)
        layer = math.prod(n for n, name in zip(shape, names) if name != "layers")
        if layer >= self.fsdp_min_size:
            return spec
        return P(*(_without(axes, "fsdp") for axes in spec))

    def var_spec(self, var) -> P:
        """param_spec of an nnx Variable (its `out_sharding` names and its value's shape)."""
        return self.param_spec(var.get_metadata().get("out_sharding") or (), var.get_value().shape)

    def param_specs(self, model) -> nnx.State:
        """A State of PartitionSpecs mirroring the model's variables."""
        return jax.tree.map(self.var_spec, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _without(axes, axis: str):
    """A PartitionSpec entry (None, a mesh axis or a tuple of them) less `axis`."""
    if not isinstance(axes, tuple):
        return None if axes == axis else axes
    kept = tuple(a for a in axes if a != axis)
    return kept if len(kept) > 1 else (kept[0] if kept else None)


def shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def create_sharded(cfg: ModelConfig, mesh, rules: Rules, seed: int = 0) -> Model:
    """The model initialised directly into its shards (never whole on one device): the
    initialiser is jitted with the rules' shardings as its output shardings."""
    shapes = abstract(cfg)
    graphdef, _ = nnx.split(shapes)
    out = shardings(mesh, rules.param_specs(shapes))
    state = jax.jit(lambda: nnx.split(Model(cfg, nnx.Rngs(seed)))[1], out_shardings=out)()
    return nnx.merge(graphdef, state)


def abstract_sharded(cfg: ModelConfig, mesh, rules: Rules) -> Model:
    """The model with ShapeDtypeStructs for values, each carrying the sharding the rules give
    it on `mesh`: what create_sharded would make, without memory or a compile (a restore
    target)."""
    shapes = abstract(cfg)
    graphdef, state = nnx.split(shapes)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                         state, shardings(mesh, rules.param_specs(shapes)),
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def per_device_shapes(cfg: ModelConfig, mesh, rules: Rules) -> dict[str, tuple[tuple, tuple, int]]:
    """Path -> (global shape, per-device shape, per-device bytes) of every variable, from the
    abstract model and a (possibly abstract) mesh: no devices and no memory needed."""
    abstract = nnx.eval_shape(lambda: Model(cfg, nnx.Rngs(0)))
    specs = rules.param_specs(abstract)
    out = {}
    flat_vars = dict(nnx.to_flat_state(nnx.state(abstract)))
    flat_specs = dict(nnx.to_flat_state(specs))
    for path, var in flat_vars.items():
        spec = flat_specs[path]
        shape = var.get_value().shape
        local = list(shape)
        for i, axes in enumerate(spec):
            for a in (axes if isinstance(axes, tuple) else (axes,)):
                if a is not None:
                    local[i] = -(-local[i] // mesh.shape[a])
        n = 1
        for d in local:
            n *= d
        out["/".join(map(str, path))] = (tuple(shape), tuple(local), n * var.get_value().dtype.itemsize)
    return out


@contextlib.contextmanager
def activation_sharding(mesh, rules: Rules):
    """Inside: the model's `constrain(x, names)` calls pin activations to the rules' specs."""
    def constrain(x, names):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules.spec(names)))

    with model_layers.using_hooks(constrain=constrain):
        yield
