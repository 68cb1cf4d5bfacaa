"""How the model meets a mesh: meshes (mesh.py), the sharding rules table (rules.py), expert
parallelism (expert.py). `sharded(mesh, rules, ...)` installs both model hooks."""
from __future__ import annotations

import contextlib

from model.layers import sorted_top_k, using_hooks

from .expert import ExpertParallel, choose_transport
from .mesh import AXES, BATCH_AXES, MeshConfig, abstract_mesh, describe, make_mesh, validate
from .rules import (RULES, Rules, abstract_sharded, activation_sharding, create_sharded, per_device_shapes,
                    shardings)


@contextlib.contextmanager
def sharded(mesh, rules: Rules, transport: str = "auto", capacity_factor: float | None = None):
    """Trace the model inside this context to run it on `mesh`: activations are constrained by
    the rules and MoE layers use expert parallelism over the mesh."""
    experts = ExpertParallel(mesh, rules, transport, capacity_factor)
    # XLA:CPU's TopK is not split by the partitioner (model.layers.sorted_top_k); TPU's is
    split_top_k = experts.platform == "cpu" and mesh.size > 1
    with using_hooks(experts=experts, top_k=sorted_top_k if split_top_k else None):
        with activation_sharding(mesh, rules):
            yield


__all__ = ["AXES", "BATCH_AXES", "MeshConfig", "abstract_mesh", "describe", "make_mesh", "validate",
           "RULES", "Rules", "abstract_sharded", "activation_sharding", "create_sharded", "per_device_shapes",
           "shardings", "ExpertParallel", "choose_transport", "sharded"]
