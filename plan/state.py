"""The train state of a run laid out on a mesh, abstractly (no devices, any model size): the
bytes each device holds (exact: the layout `python -m train` creates), which segments run as
layer loops, and the host memory of importing a released checkpoint."""
from __future__ import annotations

import math


class StateLayout:
    """The train state's structure (params, rest, opt) as ShapeDtypeStructs, with the
    PartitionSpec of every leaf from the rules: no memory, any model size."""

    def __init__(self, run_cfg, rules):
        import jax
        from flax import nnx
        from jax.sharding import PartitionSpec as P

        from model.counts import weight_classes
        from model.transformer import abstract
        from train.optim import make_optimizer, nest
        from train.state import mirror_params

        model = abstract(run_cfg.model)
        self.model_cfg = run_cfg.model
        self.rules = rules
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.param_state = params  # logical axis names: make_optimizer(..., mesh, rules) on a mesh
        self.tx = make_optimizer(run_cfg.optim, run_cfg.train.steps, params)
        specs = dict(nnx.to_flat_state(rules.param_specs(model)))
        self.params, self.rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        self.opt = jax.eval_shape(self.tx.init, self.params)
        spec = {k: nest({p: specs[p] for p, _ in nnx.to_flat_state(s)}) for k, s in (("params", params), ("rest", rest))}
        spec["opt"] = mirror_params(self.tx, self.params, spec["params"], P())
        self.specs = spec
        self.param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
        self.weight_classes = weight_classes(model)

    def abstract(self, mesh):
        """The TrainState as ShapeDtypeStructs sharded on `mesh` (step counters replicated)."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        from train.state import TrainState

        def place(tree, specs):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                                tree, specs, is_leaf=lambda x: isinstance(x, P))

        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
        return TrainState(step=scalar, params=place(self.params, self.specs["params"]),
                          rest=place(self.rest, self.specs["rest"]), opt=place(self.opt, self.specs["opt"]),
                          bad=scalar, skipped=scalar)

    def param_elements(self, mesh=None) -> dict[tuple, int]:
        """Elements of every parameter: whole, or on the device holding the most of `mesh`."""
        import jax

        tree = self.params if mesh is None else self.abstract(mesh).params
        shape = (lambda x: x.shape) if mesh is None else (lambda x: x.sharding.shard_shape(x.shape))
        return {tuple(k.key for k in path): math.prod(shape(x))
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def vocab_partials(self, mesh, head_chunks: int = 1) -> int:
        """Bytes of the full-size gradients of the vocab-sized parameters (embedding, head) on one
        device before they are reduce-scattered: a device's tokens touch the whole parameter, so
        its partial gradient is sharded only over the mesh axes that do not split the batch. Each
        is counted twice: libtpu's memory report on v4-pro-pod shows the partial and the
        collective's buffer live together at the end of the backward (4 x 3.45 GiB there). The
        loss makes the head's gradient one vocabulary slice of `head_chunks` at a time."""
        from flax import nnx

        from parallel.mesh import BATCH_AXES

        total = 0
        for path, var in nnx.to_flat_state(self.param_state):
            names = var.get_metadata().get("out_sharding") or ()
            if "vocab" not in names:
                continue
            x = var.get_value()
            spec = tuple(self.rules.var_spec(var))
            split = math.prod(mesh.shape[a] for e in spec for a in ((e,) if isinstance(e, str) else e or ())
                              if a not in BATCH_AXES)
            split *= head_chunks if path[0] == "head" else 1
            total += 2 * x.size * x.dtype.itemsize // split
        return total

    def bytes_per_device(self, mesh) -> dict[str, int]:
        """Bytes of params / rest / opt on the device holding the most (ceil-divided shards),
        and "looped": of the params, those of the segments that run as layer loops."""
        import jax

        state = self.abstract(mesh)

        def size(leaves):
            return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)

        out = {k: size(jax.tree.leaves(getattr(state, k))) for k in ("params", "rest", "opt")}
        segments = state.params.get("segments", {})
        out["looped"] = size(x for i in looped_segments(self.model_cfg) for x in jax.tree.leaves(segments[i]))
        return out


def looped_segments(cfg) -> list[int]:
    """Indices of the model's segments that run as a layer loop (model.transformer.model_segments)."""
    from model.transformer import model_segments

    return [i for i, (_, _, count) in enumerate(model_segments(cfg)) if count > 1 and cfg.scan_unroll < count]


def looped_layers(cfg) -> int:
    """How many of the model's layers run inside layer loops."""
    from model.transformer import model_segments

    segments = model_segments(cfg)
    return sum(len(segments[i][1]) * segments[i][2] for i in looped_segments(cfg))


# importing a released checkpoint (model.load_pretrained, train.init_from)
STACKED = ("layers", "experts")  # logical axes a checkpoint stores as one tensor per index


def import_host_bytes(params, rules, mesh, local_devices: int) -> tuple[int, int]:
    """(largest device shard of one parameter, largest checkpoint tensor in float32) in bytes, for
    `params` (an nnx State of Params with their logical axes) laid out by `rules` on `mesh`.
    model.load_pretrained fills one parameter at a time: jax.make_array_from_callback assembles
    each of the process's `local_devices` shards before placing them, each shard from source
    tensors read one at a time and dequantised to float32. So one process needs about
    local_devices x shard + source bytes of host memory (replicas on one process share a shard:
    an upper bound), never the checkpoint or a whole stacked parameter."""
    from flax import nnx
    from jax.sharding import NamedSharding

    shard = source = 0
    for _, v in nnx.to_flat_state(params):
        x = v.get_value()
        names = v.get_metadata().get("out_sharding") or (None,) * x.ndim
        local = NamedSharding(mesh, rules.var_spec(v)).shard_shape(x.shape)
        shard = max(shard, math.prod(local) * x.dtype.itemsize)
        source = max(source, 4 * math.prod(n for n, a in zip(x.shape, names) if a not in STACKED))
    return shard, source
