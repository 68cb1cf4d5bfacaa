"""Optax optimisers: V4's Muon + AdamW partition (default) or plain AdamW; schedule; clipping.

Muon (train/muon.py: optax.contrib.muon's update, Nesterov momentum, Newton-Schulz
orthogonalisation of whole matrices per device, update RMS rescaled to `muon_rms` *
sqrt(max(fan_in, fan_out)), decoupled weight decay) for the weight matrices; AdamW for the
embedding, the LM head, norm weights, mHC projections / biases / scales (the "gates"),
attention sinks, compressor positional biases and every other non-matrix.
The 10 Newton-Schulz steps follow the spec: 8 with (3.4445, -4.7750, 2.0315), then 2 with
(2, -1.5, 0.5). Stacked layers and experts are batch axes of the orthogonalisation: each layer's
(each expert's) matrix is orthogonalised on its own.
"""
from __future__ import annotations

import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from .muon import scale_by_muon

NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
ADAM_ONLY = ("embed", "hc_head", "attn_hc", "ffn_hc", "ape", "sink")  # path parts never given to Muon
BATCH_NAMES = ("layers", "experts")
OUTPUT_GROUPS = (("heads", "head_dim"), ("index_heads", "index_head_dim"))


def schedule(cfg, steps: int):
    """Linear warm-up to cfg.lr, then cosine / linear decay to min_lr_ratio * lr, or constant."""
    floor = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(cfg.lr, floor, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    warm = optax.linear_schedule(0.0 if cfg.warmup_steps else cfg.lr, cfg.lr, max(cfg.warmup_steps, 1))
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def muon_dims(path: tuple, names: tuple[str, ...]) -> MuonDimensionNumbers | None:
    """How Muon sees a parameter (reduction / output axes; the rest are batch axes), or None
    for AdamW. `names` are the parameter's logical axis names."""
    parts = {str(p) for p in path}
    core = [i for i, n in enumerate(names) if n not in BATCH_NAMES]
    if "vocab" in names or parts & set(ADAM_ONLY) or len(core) < 2:
        return None
    if "o_group_in" in names:  # block-diagonal grouped projection: one matrix per group
        core = [i for i in core if names[i] != "o_groups"]
    for group in OUTPUT_GROUPS:
        if all(g in names for g in group):
            out = tuple(names.index(g) for g in group)
            return MuonDimensionNumbers(tuple(i for i in core if i not in out), out)
    return MuonDimensionNumbers(tuple(core[:-1]), (core[-1],))


def nest(flat: dict) -> dict:
    """{path tuple: value} -> nested dict, the layout of nnx.to_pure_dict."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _names(var) -> tuple[str, ...]:
    return tuple(var.get_metadata().get("out_sharding") or ())


def muon_partition(params: nnx.State) -> dict:
    """Nested dict mirroring nnx.to_pure_dict(params): MuonDimensionNumbers for Muon
    parameters, None for AdamW ones."""
    return nest({path: muon_dims(path, _names(var)) for path, var in nnx.to_flat_state(params)})


def _decay_mask(params: nnx.State) -> dict:
    """AdamW decays the embedding and head matrices, not norms, biases, scales or sinks."""
    return nest({path: var.get_value().ndim - ("layers" in _names(var)) >= 2
                 for path, var in nnx.to_flat_state(params)})


def make_optimizer(cfg, steps: int, params: nnx.State, mesh=None, rules=None) -> optax.GradientTransformation:
    """The update rule (clipping + optimiser) for the pure-dict form of `params` (an nnx.State
    of nnx.Param, read for shapes and logical axis names). With the `mesh` and `rules` the
    parameters are sharded by, Muon orthogonalises whole matrices per device (train/muon.py)."""
    lr = schedule(cfg, steps)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=_decay_mask(params))
    if cfg.name == "adamw":
        tx = adamw
    else:
        specs = None
        if mesh is not None:
            specs = nest({path: rules.var_spec(var) for path, var in nnx.to_flat_state(params)})
        muon = optax.chain(
            scale_by_muon(muon_partition(params), NS_COEFFS, cfg.muon_momentum, cfg.muon_rms, specs=specs, mesh=mesh,
                          dtype=cfg.muon_dtype),
            optax.add_decayed_weights(cfg.weight_decay), optax.scale_by_learning_rate(lr))
        labels = nest({path: "adamw" if muon_dims(path, _names(var)) is None else "muon"
                       for path, var in nnx.to_flat_state(params)})
        tx = optax.partition({"muon": muon, "adamw": adamw}, labels)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
