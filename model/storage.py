"""Weights held quantised inside the model, for inference: DeepSeek's release format in memory.

`hold_quantized(model)` replaces, in place, each fp8 projection's float weight by its e4m3
values and UE8M0 scale bytes (one per quant_block^2 tile), and the routed experts' weights by
e2m1 codes packed two per byte plus one scale byte per 1 x quant_fp4_block (quant_experts=fp4)
or by e4m3 tiles (fp8). The model computes exactly what it computed before (its matmuls saw
these values already, fake-quantised), from a quarter (fp8) or about an eighth (fp4) of the
float32 bytes of those weights. Only the sites the config quantises are held; everything else
keeps its dtype. A held model is for inference: its quantised weights are not Params and get no
gradient. `model.load_pretrained(path, hold=True, ...)` holds each weight as soon as it is read
from a release: the float weights never exist all at once.
"""
from __future__ import annotations

import functools
from typing import Callable

from flax import nnx

from .config import ConfigError
from .layers import Linear, QuantScales, QuantValues
from .moe import MoE


def check_holdable(cfg) -> None:
    """A ConfigError unless the model config quantises some weights."""
    if cfg.quant_matmul == "none" and cfg.quant_experts == "none":
        raise ConfigError("hold_quantized: quant_matmul and quant_experts are both none, so no weight is "
                          "quantised; set model.quant_matmul=fp8 and/or model.quant_experts=fp4|fp8")


def hold_quantized(model) -> dict[str, int]:
    """Hold `model`'s quantised weights quantised (in place); returns held_bytes(model)."""
    check_holdable(model.cfg)
    for hold in holders(model).values():
        hold()
    return held_bytes(model)


def holders(model) -> dict[int, Callable[[], None]]:
    """{id of a float weight the config quantises and that is not held yet: a call that holds
    it}: hold_quantized calls them all; model.load_pretrained(hold=True) calls each as soon as
    it has filled that weight."""
    cfg, out = model.cfg, {}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.quant == "fp8" and not node.held:
            out[id(node.w)] = node.hold_quantized
        elif isinstance(node, MoE) and cfg.quant_experts != "none" and not node.held:
            for name in ("w1", "w3", "w2"):
                out[id(getattr(node, name))] = functools.partial(node.hold_weight, name)
    return out


def held_bytes(model) -> dict[str, int]:
    """Bytes of the model's variables: quantised values, their scales, and everything else."""
    out = {"values": 0, "scales": 0, "other": 0}
    for _, var in nnx.to_flat_state(nnx.state(model)):
        x = var.get_value()
        kind = "values" if isinstance(var, QuantValues) else "scales" if isinstance(var, QuantScales) else "other"
        out[kind] += x.size * x.dtype.itemsize
    return out
