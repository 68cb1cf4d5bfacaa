"""Analytic counts from a ModelConfig: parameters (total / active), FLOPs per token, KV-cache bytes.

These are closed-form sums over the parameter shapes the model creates; tests check that the
abstract model (nnx.eval_shape) has exactly `total_params` trainable parameters.
"""
from __future__ import annotations

from .config import ModelConfig

# MODEL1 compact KV-cache entry (FlashMLA): 448 e4m3 bytes + 64 bf16 RoPE values + 7 UE8M0
# scales + 1 pad. The lightning indexer's key cache (V3.2 format): 128 e4m3 bytes + fp32 scale.
MODEL1_ENTRY_BYTES = 448 + 64 * 2 + 7 + 1
INDEXER_ENTRY_BYTES = 128 + 4


def _attention(c: ModelConfig, ratio: int) -> int:
    hk = c.n_heads * c.head_dim
    n = (c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * hk  # query low-rank path
         + c.dim * c.head_dim + c.head_dim                            # shared K=V
         + c.o_lora_rank * hk + c.o_groups * c.o_lora_rank * c.dim   # grouped output
         + c.n_heads)                                                 # sinks
    if ratio:
        n += _compressor(c, ratio, c.head_dim)
    if ratio and c.is_csa(ratio):
        n += (_compressor(c, ratio, c.index_head_dim)
              + c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.dim * c.index_n_heads)
    return n


def _compressor(c: ModelConfig, ratio: int, width: int) -> int:
    coff = 2 if c.is_csa(ratio) else 1
    return 2 * c.dim * coff * width + ratio * coff * width + width


def _expert(c: ModelConfig) -> int:
    return 3 * c.dim * c.moe_inter_dim


def _mhc(c: ModelConfig) -> int:
    mix = (2 + c.hc_mult) * c.hc_mult
    return mix * c.hc_mult * c.dim + mix + 3


def _hc_head(c: ModelConfig) -> int:
    return c.hc_mult * c.hc_mult * c.dim + c.hc_mult + 1


def _block(c: ModelConfig, ratio: int, active: bool) -> int:
    experts = c.n_activated_experts if active else c.n_routed_experts
    moe = c.n_routed_experts * c.dim + (experts + c.n_shared_experts) * _expert(c)
    return _attention(c, ratio) + moe + 2 * c.dim + 2 * _mhc(c)


def _mtp(c: ModelConfig, active: bool) -> int:
    return _block(c, 0, active) + 2 * c.dim * c.dim + 3 * c.dim + _hc_head(c)


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Trainable parameter counts. `active` counts the top-k routed experts a token uses and
    excludes the embedding table (a lookup, not a matmul); MTP blocks are listed separately."""
    embed = head = c.vocab_size * c.dim
    top = c.dim + _hc_head(c)
    layers_total = sum(_block(c, r, False) for r in c.compress_ratios)
    layers_active = sum(_block(c, r, True) for r in c.compress_ratios)
    mtp_total = c.n_mtp_layers * _mtp(c, False)
    mtp_active = c.n_mtp_layers * _mtp(c, True)
    return {
        "total": embed + head + top + layers_total + mtp_total,
        "total_without_mtp": embed + head + top + layers_total,
        "active": head + top + layers_active,
        "mtp_total": mtp_total,
        "mtp_active": mtp_active,
        "embedding": embed,
    }


def flops_per_token(c: ModelConfig, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs per token of a training sequence of `seq_len` tokens (causal average).

    2 FLOPs per multiply-add of every active weight, plus attention scores and values against
    the window, the compressed entries (all visible ones on HCA, top-k on CSA) and the indexer
    scores; train = 3 x forward (backward costs twice the forward)."""
    dense = 2.0 * (param_counts(c)["active"] + c.n_mtp_layers * _mtp(c, True))
    attn = 0.0
    for r in tuple(c.compress_ratios) + (0,) * c.n_mtp_layers:
        visible = min(c.window_size, (seq_len + 1) / 2)
        if r:
            blocks = seq_len / r / 2  # average visible complete blocks
            visible += min(c.index_topk, blocks) if c.is_csa(r) else blocks
            if c.is_csa(r):
                attn += 2.0 * c.index_n_heads * c.index_head_dim * blocks
        attn += 2.0 * 2 * c.n_heads * c.head_dim * visible
    fwd = dense + attn
    return {"forward": fwd, "train": 3.0 * fwd, "attention_forward": attn}


def kv_cache_bytes_per_token(c: ModelConfig, seq_len: int = 1 << 20, fmt: str = "model1") -> dict[str, float]:
    """KV-cache bytes per token of context for one sequence of `seq_len` tokens, per layer type.

    `model1`: the compact FP8 format (584 bytes per entry, indexer keys 132 bytes);
    `bf16`: every entry head_dim bf16 values (indexer keys index_head_dim bf16 values).
    Window layers hold a fixed `window_size` entries; compressed layers one entry per ratio."""
    entry = MODEL1_ENTRY_BYTES if fmt == "model1" else 2 * c.head_dim
    index_entry = INDEXER_ENTRY_BYTES if fmt == "model1" else 2 * c.index_head_dim
    out = {"window": 0.0, "csa": 0.0, "hca": 0.0}
    for r in c.compress_ratios:
        window = min(c.window_size, seq_len) * entry / seq_len
        if r == 0:
            out["window"] += window
        elif c.is_csa(r):
            out["csa"] += window + (seq_len // r) * (entry + index_entry) / seq_len
        else:
            out["hca"] += window + (seq_len // r) * entry / seq_len
    out["total"] = out["window"] + out["csa"] + out["hca"]
    return out


# --- weight storage by format ---------------------------------------------------------------
STORAGES = ("bf16", "fp8", "fp8+fp4")


def weight_classes(model) -> dict[tuple, str]:
    """Every parameter's path -> "matmul" (one of DeepSeek's FP8 projections, `Linear.fp8_site`),
    "expert" (a routed expert matrix) or "other" (stays bf16/fp32 in DeepSeek's checkpoints)."""
    from flax import nnx

    from .layers import Linear
    from .moe import MoE

    special = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.fp8_site:
            special[tuple(path) + ("w",)] = "matmul"
        elif isinstance(node, MoE):
            special.update({tuple(path) + (n,): "expert" for n in ("w1", "w2", "w3")})
    return {tuple(p): special.get(tuple(p), "other")
            for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def storage_bytes(c: ModelConfig, elements: dict[tuple, float], classes: dict[tuple, str]) -> dict[str, float]:
    """Bytes of parameters with `elements[path]` elements each, stored three ways:
    bf16 (everything 2 bytes); fp8 (projections and routed experts e4m3 plus one UE8M0 byte
    per quant_block^2 tile, the rest bf16); fp8+fp4 (as fp8, routed experts e2m1 two per byte
    plus one UE8M0 byte per 1 x quant_fp4_block: DeepSeek's released format)."""
    tile = 1.0 + 1.0 / c.quant_block ** 2
    per_element = {"bf16": {"matmul": 2.0, "expert": 2.0, "other": 2.0},
                   "fp8": {"matmul": tile, "expert": tile, "other": 2.0},
                   "fp8+fp4": {"matmul": tile, "expert": 0.5 + 1.0 / c.quant_fp4_block, "other": 2.0}}
    return {s: sum(n * per_element[s][classes[p]] for p, n in elements.items()) for s in STORAGES}
