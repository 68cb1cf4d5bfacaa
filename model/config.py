"""ModelConfig: every architectural number of a DeepSeek-V4 model, validated at construction.

One behaviour, one field: nothing in the model branches on a preset name. The presets below
reproduce the published configurations (spec/deepseek-v4.md); `configs/*.yaml` are their twins.
Analytic counts (parameters, FLOPs, KV-cache bytes) live in model/counts.py.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
MOE_IMPLS = ("auto", "dense", "ragged", "tiled", "batched", "blocked", "megablox", "tokamax")  # model/gmm.py implements them
CSA_SELECTS = ("auto", "gather", "mask")  # model/attention.py: how a CSA query reads its top-k blocks
REMATS = ("none", "full", "save_matmuls")
QUANT_CHOICES = {"quant_matmul": ("none", "fp8"), "quant_matmul_impl": ("simulate", "native"),
                 "quant_experts": ("none", "fp8", "fp4"),
                 "quant_kv": ("none", "fp8"), "quant_indexer": ("none", "fp4")}
DTYPES = ("float32", "bfloat16", "float16")


# Fields that say how a run computes, not what the network is: a checkpoint made with other
# values loads unchanged (train.init_from, model.load_pretrained's overrides).
RUN_FIELDS = ("dtype", "param_dtype", "remat", "scan_max_period", "scan_unroll", "moe_impl", "attn_query_chunk",
              "head_chunks", "csa_select",
              "quant_matmul", "quant_matmul_impl", "quant_experts", "quant_kv", "quant_indexer", "quant_block",
              "quant_fp4_block", "quant_kv_block", "init_std", "hash_seed")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


def check(cond: bool, name: str, msg: str) -> None:
    """ConfigError("name: msg") unless `cond`: every config check reads `check(ok, field, why)`."""
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def check_keys(keys, valid, prefix: str = "", what: str = "unknown key") -> None:
    """The first key not in `valid` raises one line naming it and the closest valid key (a typo
    is the usual cause), or listing the valid keys when none is close."""
    for key in keys:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), sorted(map(str, valid)), n=1)
        hint = (f"did you mean {prefix + close[0]!r}?" if close
                else f"valid keys: {', '.join(sorted(map(str, valid)))}")
        raise ConfigError(f"{prefix}{key}: {what}; {hint}")


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    # attention: low-rank query, one shared K=V head, grouped low-rank output
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    # queries attended at a time (0 = all): bounds the per-query logits and gathered top-k
    # entries to one chunk, recomputed per chunk in the backward; a multiple of window_size
    attn_query_chunk: int = 0
    # the training loss computes the head's float32 logits this many vocabulary slices at a time
    # and recomputes them in the backward: no [B, S, V] logits are kept (divides vocab_size)
    head_chunks: int = 1
    # per-layer compression ratio: 0 = sliding window only, csa_ratio = CSA, anything else = HCA
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4,)
    # the ratio whose layers use overlapping blocks and the lightning indexer (CSA)
    csa_ratio: int = 4
    # lightning indexer (CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # how a CSA query reads its top-k blocks (the same result either way): "gather" copies them
    # out ([B, S, k, head_dim], a scatter-add in the backward), "mask" masks every block's
    # logits to the top-k (T / k times the logit FLOPs, plain matmuls); "auto": mask while the
    # blocks are at most CSA_MASK_MAX times the top-k
    csa_select: str = "auto"
    # rotary embedding; YaRN applies on layers with a compressor only
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # mixture of experts (every layer)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    hash_seed: int = 0
    # routed experts' grouped matmul: auto (per platform), dense (reference), ragged, tiled, megablox
    moe_impl: str = "auto"
    # mHC hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    # multi-token prediction blocks (window-only attention, score routing)
    n_mtp_layers: int = 1
    # numerics: parameters are stored in param_dtype; matmuls run in dtype (router, mHC,
    # compressor pooling and softmaxes always run in float32)
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.02
    # layers per scan unit are found automatically; this caps the repeating period searched
    scan_max_period: int = 4
    # layers a scanned segment runs per loop iteration (lax.scan's unroll); a segment repeated
    # at most this many times runs as straight-line code. The parameters stay stacked either
    # way. 1 keeps one loop body per segment (compile time independent of depth: the pods);
    # on CPU, tiny's 2-repeat segment unrolled steps 2-8% faster (README, "Scanning")
    scan_unroll: int = 1
    # rematerialisation of each block in the backward pass: none, full (keep only the block
    # inputs), save_matmuls (keep matmul outputs, recompute the rest)
    remat: str = "none"
    # quantisation-aware training (model/quant.py): the forward pass rounds to DeepSeek's
    # formats, the backward pass is straight-through, master weights stay in param_dtype.
    # matmul fp8: activations (1 x quant_block) and weights (quant_block^2) of the query, KV,
    # output (wo_b), shared-expert, indexer-query and MTP projections (not wo_a, compressors,
    # indexer weights_proj, router, head, mHC);
    # experts: routed expert weights in fp8 (quant_block^2) or fp4 (1 x quant_fp4_block along
    # their input), their activations fp8;
    # kv: the non-rope dims of every window and compressed KV entry, e4m3 in 1 x quant_kv_block;
    # indexer: Hadamard-rotated index queries and keys in fp4 (1 x quant_fp4_block)
    quant_matmul: str = "none"
    # how the fp8 matmuls compute: "simulate" multiplies the fake-quantised operands in `dtype`;
    # "native" multiplies the e4m3 values themselves (model.quant.fp8_einsum), for backends with
    # FP8 matmuls; equal to the simulation up to the order of float32 sums
    quant_matmul_impl: str = "simulate"
    quant_experts: str = "none"
    quant_kv: str = "none"
    quant_indexer: str = "none"
    quant_block: int = 128
    quant_fp4_block: int = 32
    quant_kv_block: int = 64

    def __post_init__(self):
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        _validate(self)

    # --- derived facts -------------------------------------------------------------------
    def layer_kind(self, i: int) -> tuple[int, bool]:
        """(compression ratio, hash routed) of main layer i; MTP layers are (0, False)."""
        if i >= self.n_layers:
            return (0, False)
        return (self.compress_ratios[i], i < self.n_hash_layers)

    def is_csa(self, ratio: int) -> bool:
        return ratio == self.csa_ratio

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping (YAML content); unknown keys fail with the closest valid one."""
        d = dict(d)
        base = {}
        if "preset" in d:
            name = d.pop("preset")
            if name not in PRESETS:
                raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
            base = PRESETS[name].to_dict()
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, what="not a ModelConfig field")
        return cls(**{**base, **d})


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                 "o_lora_rank", "window_size", "n_routed_experts", "n_activated_experts",
                 "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "csa_ratio", "index_n_heads",
                 "index_head_dim", "index_topk"):
        check(isinstance(getattr(c, name), int) and getattr(c, name) > 0, name,
              f"must be a positive integer, got {getattr(c, name)!r}")
    for name in ("n_hash_layers", "n_mtp_layers", "n_shared_experts"):
        check(getattr(c, name) >= 0, name, f"must be >= 0, got {getattr(c, name)}")
    check(len(c.compress_ratios) == c.n_layers, "compress_ratios",
          f"has {len(c.compress_ratios)} entries but n_layers is {c.n_layers}; give one ratio per layer")
    check(all(r >= 0 for r in c.compress_ratios), "compress_ratios", "ratios must be >= 0")
    check(c.n_heads % c.o_groups == 0, "o_groups",
          f"n_heads={c.n_heads} is not divisible by o_groups={c.o_groups}")
    check(0 < c.rope_head_dim <= c.head_dim and c.rope_head_dim % 2 == 0, "rope_head_dim",
          f"must be even and in (0, head_dim={c.head_dim}], got {c.rope_head_dim}")
    check(0 < c.rope_head_dim <= c.index_head_dim, "rope_head_dim",
          f"must not exceed index_head_dim={c.index_head_dim}")
    check(c.n_activated_experts <= c.n_routed_experts, "n_activated_experts",
          f"top-k {c.n_activated_experts} is larger than n_routed_experts={c.n_routed_experts}")
    check(c.n_hash_layers <= c.n_layers, "n_hash_layers",
          f"{c.n_hash_layers} hash-routed layers but only n_layers={c.n_layers}")
    check(c.score_func in SCORE_FUNCS, "score_func", f"must be one of {SCORE_FUNCS}, got {c.score_func!r}")
    check(c.moe_impl in MOE_IMPLS, "moe_impl", f"must be one of {MOE_IMPLS}, got {c.moe_impl!r}")
    check(c.csa_select in CSA_SELECTS, "csa_select", f"must be one of {CSA_SELECTS}, got {c.csa_select!r}")
    check(c.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {c.dtype!r}")
    check(c.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}, got {c.param_dtype!r}")
    check(c.swiglu_limit >= 0, "swiglu_limit", "must be >= 0 (0 disables the clamp)")
    check(c.route_scale > 0, "route_scale", "must be > 0")
    check(c.scan_max_period >= 1, "scan_max_period", "must be >= 1")
    check(c.scan_unroll >= 1, "scan_unroll", "must be >= 1")
    check(c.remat in REMATS, "remat", f"must be one of {REMATS}, got {c.remat!r}")
    check(c.head_chunks > 0 and c.vocab_size % c.head_chunks == 0, "head_chunks",
          f"must divide vocab_size={c.vocab_size}, got {c.head_chunks}")
    check(c.attn_query_chunk >= 0 and c.attn_query_chunk % c.window_size == 0, "attn_query_chunk",
          f"must be 0 or a multiple of window_size={c.window_size}, got {c.attn_query_chunk}")
    for name, choices in QUANT_CHOICES.items():
        check(getattr(c, name) in choices, name, f"must be one of {choices}, got {getattr(c, name)!r}")
    for block, axes in _quant_axes(c).items():
        for axis, size in axes:
            check(size % getattr(c, block) == 0, block,
                  f"{getattr(c, block)} does not divide {axis} = {size}; pick a block that divides it")


def _quant_axes(c: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """The axes each enabled quantisation block tiles (fp8 weight blocks tile input and output)."""
    axes = {"quant_block": [], "quant_fp4_block": [], "quant_kv_block": []}
    if c.quant_matmul == "fp8":
        axes["quant_block"] += [("dim", c.dim), ("q_lora_rank", c.q_lora_rank),
                                ("n_heads * head_dim", c.n_heads * c.head_dim), ("head_dim", c.head_dim),
                                ("o_lora_rank", c.o_lora_rank),
                                ("moe_inter_dim * n_shared_experts", c.moe_inter_dim * c.n_shared_experts),
                                ("index_n_heads * index_head_dim", c.index_n_heads * c.index_head_dim)]
    if c.quant_experts != "none":
        axes["quant_block"] += [("dim", c.dim), ("moe_inter_dim", c.moe_inter_dim)]
    if c.quant_experts == "fp4":
        axes["quant_fp4_block"] += [("dim", c.dim), ("moe_inter_dim", c.moe_inter_dim)]
    if c.quant_indexer == "fp4":
        axes["quant_fp4_block"] += [("index_head_dim", c.index_head_dim)]
        check(c.index_head_dim & (c.index_head_dim - 1) == 0, "index_head_dim",
              f"{c.index_head_dim} must be a power of two for the indexer's Hadamard rotation (quant_indexer)")
    if c.quant_kv == "fp8":
        axes["quant_kv_block"] += [("head_dim - rope_head_dim", c.head_dim - c.rope_head_dim)]
    for name in axes:
        check(isinstance(getattr(c, name), int) and getattr(c, name) > 0, name,
              f"must be a positive integer, got {getattr(c, name)!r}")
    return axes


# --- presets ----------------------------------------------------------------------------
_SHARED_V4 = dict(rope_head_dim=64, head_dim=512, window_size=128, vocab_size=129280,
                  index_n_heads=64, index_head_dim=128, n_hash_layers=3, n_mtp_layers=1,
                  # DeepSeek's training and released precision
                  quant_matmul="fp8", quant_experts="fp4", quant_kv="fp8", quant_indexer="fp4")

PRESETS: dict[str, ModelConfig] = {
    # Fits a laptop CPU: every component active (window, CSA with a selective indexer, HCA,
    # hash and score routing, MTP) at widths that run a training step in seconds.
    "tiny": ModelConfig(
        vocab_size=512, dim=64, n_layers=6, n_heads=4, head_dim=32, rope_head_dim=16,
        q_lora_rank=32, o_groups=2, o_lora_rank=16, window_size=16,
        compress_ratios=(0, 4, 16, 4, 16, 4), index_n_heads=4, index_head_dim=32, index_topk=4,
        original_seq_len=256, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=32,
        n_hash_layers=2, route_scale=1.5, n_mtp_layers=1, dtype="float32",
    ),
    # ~100M parameters for throughput benchmarks on a CPU (bench/train_speed.py).
    "small": ModelConfig(
        vocab_size=512, dim=512, n_layers=8, n_heads=8, head_dim=64, rope_head_dim=32,
        q_lora_rank=128, o_groups=4, o_lora_rank=128, window_size=64,
        compress_ratios=(0, 4, 32, 4, 32, 4, 32, 4), index_n_heads=8, index_head_dim=64,
        index_topk=16, original_seq_len=1024, n_routed_experts=32, n_activated_experts=4,
        moe_inter_dim=256, n_hash_layers=2, route_scale=1.5, n_mtp_layers=1, dtype="float32",
    ),
    "v4-flash": ModelConfig(**_SHARED_V4, dim=4096, n_layers=43, n_heads=64, q_lora_rank=1024,
                            o_groups=8, o_lora_rank=1024,
                            compress_ratios=(0, 0) + (4, 128) * 20 + (4,), index_topk=512,
                            n_routed_experts=256, n_activated_experts=6, moe_inter_dim=2048,
                            route_scale=1.5),
    "v4-pro": ModelConfig(**_SHARED_V4, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536,
                          o_groups=16, o_lora_rank=1024,
                          compress_ratios=(128, 128) + (4, 128) * 29 + (4,), index_topk=1024,
                          n_routed_experts=384, n_activated_experts=6, moe_inter_dim=3072,
                          route_scale=2.5),
    # The seed article's 1T model: V4 architecture, widths between Flash and Pro.
    # 0.999T without MTP (1.016T with), 33B active.
    "v4-1t": ModelConfig(**_SHARED_V4, dim=6144, n_layers=61, n_heads=96, q_lora_rank=1536,
                         o_groups=12, o_lora_rank=1024,
                         compress_ratios=(128, 128) + (4, 128) * 29 + (4,), index_topk=1024,
                         n_routed_experts=384, n_activated_experts=6, moe_inter_dim=2272,
                         route_scale=2.5, quant_block=32),  # 2272 is not a multiple of 128
}


def load_yaml(path) -> ModelConfig:
    """A ModelConfig from a YAML file of fields (optionally `preset: NAME` plus overrides)."""
    import yaml

    with open(path) as f:
        content = yaml.safe_load(f) or {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of ModelConfig fields")
    return ModelConfig.from_dict(content)


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
