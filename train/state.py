"""The train state: one typed pytree, created, placed and described here only.

`TrainState` holds pure pytrees (nested dicts of arrays, the layout of `nnx.to_pure_dict`):
`params` (what the optimiser updates), `rest` (routing biases and hash tables, updated by the
step's bias rule, never by the optimiser), `opt` (the optax state), and three int32 counters.
It is a `flax.struct.dataclass`: jit, donation, Orbax and `jax.tree` see its fields as pytree
children named by attribute (leaf paths read `params/...`, `opt/...`, as checkpoints record).

The optimiser state's shardings are derived from the parameters': `tx.init` runs abstractly
on parameters that carry their sharding as pytree metadata (`_Carry`), so every state leaf
that the optimiser derived from a parameter (momenta, second moments) comes out carrying that
parameter's sharding, whatever the optimiser's nesting (partition, chain, masks); leaves it
created otherwise (step counts) are replicated.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P


@struct.dataclass
class TrainState:
    step: jax.Array     # int32 scalar: steps taken, skipped (non-finite) ones included
    params: Any         # nested dict of the nnx.Param arrays
    rest: Any           # nested dict of the other model variables (routing biases, hash tables)
    opt: Any            # the optax state of `params`
    bad: jax.Array      # int32: consecutive non-finite steps (the run stops at train.max_bad_steps)
    skipped: jax.Array  # int32: all non-finite steps so far


class _Carry:
    """A parameter leaf with a tag (its sharding) riding along as pytree metadata."""

    def __init__(self, value, tag):
        self.value, self.tag = value, tag


jax.tree_util.register_pytree_node(_Carry, lambda c: ((c.value,), c.tag),
                                   lambda tag, children: _Carry(children[0], tag))


def mirror_params(tx, params, tags, other):
    """A tree shaped like `tx.init(params)` whose leaves are the entry of `tags` (a tree shaped
    like `params`: shardings, PartitionSpecs) of the parameter each state leaf was derived
    from, and `other` for leaves not derived from a parameter or of another shape."""
    is_tag = lambda t: t is None or isinstance(t, (P, jax.sharding.Sharding))
    carried = jax.tree.map(lambda p, t: _Carry(p, (p.shape, t)), params, tags, is_leaf=is_tag)
    state = jax.eval_shape(tx.init, carried)

    def tag_of(x):
        if not isinstance(x, _Carry):
            return other
        if not hasattr(x.value, "shape"):  # a masked-out parameter (optax.MaskedNode): no leaf
            return x.value
        shape, tag = x.tag
        return tag if x.value.shape == shape else other

    return jax.tree.map(tag_of, state, is_leaf=lambda x: isinstance(x, _Carry))


def _zero():  # a separate buffer per counter: the step donates every leaf
    return jnp.zeros((), jnp.int32)


def init_state(model, tx, mesh=None) -> tuple[Any, TrainState]:
    """(graphdef, TrainState) from a model. With the `mesh` of a sharded model the optimiser
    state is created sharded like the parameters it mirrors (what the planner counts)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    out = None
    if mesh is not None:
        out = mirror_params(tx, params, jax.tree.map(lambda x: x.sharding, params), NamedSharding(mesh, P()))
    opt = jax.jit(tx.init, out_shardings=out)(params)
    return graphdef, TrainState(step=_zero(), params=params, rest=rest, opt=opt, bad=_zero(), skipped=_zero())


def abstract_state(model, tx, mesh) -> tuple[Any, TrainState]:
    """(graphdef, TrainState of ShapeDtypeStructs with shardings) for a model whose values are
    ShapeDtypeStructs with shardings (parallel.abstract_sharded): what init_state + place_state
    would make, without memory or a compile; the target of a restore."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    replicated = NamedSharding(mesh, P())
    tags = mirror_params(tx, params, jax.tree.map(lambda x: x.sharding, params), replicated)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(tx.init, params), tags)
    count = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return graphdef, TrainState(step=count, params=params, rest=rest, opt=opt, bad=count, skipped=count)


def place_state(state: TrainState, mesh) -> tuple[TrainState, TrainState]:
    """(state, its shardings) with every leaf on `mesh`: leaves created outside the sharded
    initialiser (the counters, unsharded optimiser counts) are replicated."""
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)
    return state, jax.tree.map(lambda x: x.sharding, state)
