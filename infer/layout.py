"""The model's parameters as decoding wants them: every layer its own block, no stacks.

Training stores repeated layers stacked on a `layers` axis and scans them (model/transformer.py).
The cached path runs the layers one by one (infer/step.py), so inside a jitted step each layer's
parameters would be a slice of its stack, and XLA:CPU materialises such slices: a decode step of
`small` copied every expert matrix of its scanned layers at every token (325 ms a step at batch
1, 24 ms with the layers sliced once beforehand). `unscan` slices once: the same model with each
layer in a segment of its own (count 1), the parameters sharded as they were. It copies the
stacked parameters (the original model keeps its own); `generate` calls it, once per call, and
callers of prefill / decode_step run faster with `unscan(model)`.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx

from model.transformer import Model, Segment, layer_block


@functools.lru_cache(maxsize=16)
def _flat(cfg):
    """(graphdef, abstract state) of a model of `cfg` with one count-1 segment per layer."""
    def make():
        m = Model(cfg, nnx.Rngs(0))
        m.segments = nnx.List([Segment(cfg, i, (cfg.layer_kind(i),), 1, nnx.Rngs(0))
                               for i in range(cfg.n_layers)])
        return m

    return nnx.split(nnx.eval_shape(make))


def unscan(model: Model) -> Model:
    """`model` with every layer its own block (stacked parameters sliced once); the model itself
    when nothing is stacked."""
    if all(seg.count == 1 for seg in model.segments):
        return model
    graphdef, abstract = _flat(model.cfg)
    values = nnx.to_pure_dict(nnx.state(model))
    values["segments"] = {i: {"blocks": {0: nnx.to_pure_dict(nnx.state(layer_block(model, i)))}}
                          for i in range(model.cfg.n_layers)}
    state = jax.tree.map(lambda x: x, abstract)                # fresh variables, per-layer metadata
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)
