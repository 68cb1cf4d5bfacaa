"""Hand a model to other stacks: sharded safetensors + index + config.json.

    python -m model.export RUN_DIR OUT_DIR [--format hf|deepseek] [--dtype float32|bf16|fp8]

exports the newest good checkpoint of a training run (`save` does the same for a model in
memory). Two namings, both read back by `model.load_pretrained`:
  hf        transformers' `DeepseekV4ForCausalLM`: HF names and layouts, HF's config.json. HF has
            no MTP block, so it is left out (and the config says num_nextn_predict_layers 0).
  deepseek  DeepSeek's inference code (and vLLM / SGLang, which load its checkpoints): DeepSeek's
            names, one tensor per routed expert, its inference config.json, the MTP block.
Three dtypes: float32 (exact), bf16 (every float tensor rounded to bfloat16; hash tables stay
integers), fp8 (deepseek only: DeepSeek's release format, see below).

fp8 stores what DeepSeek releases in FP8 as e4m3 [out, in] with one UE8M0 scale per 128 x 128
block (`X.scale`, F8_E8M0; edge blocks ragged), the routed experts as FP4 e2m1 codes two per
byte (low nibble first, int8 [out, in/2]) with one UE8M0 scale per 1 x 32 block, the norms,
embedding, head, router, compressor and indexer-weight projections in bf16 and the rest (mHC,
sinks, compressor position biases, routing biases) in float32. The codes are model/quant.py's
(amax floored at 1e-4 / 6 * 2^-126, scale rounded up to a power of two).

Shards are filled in name order up to `shard_bytes` each; the tensors of one block are built
from one host copy of its (stacked) parameters, so host memory is about one scanned stack plus
one shard, not the model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from . import quant
from .config import ModelConfig
from .hf import _DEEPSEEK_DEFAULTS, iter_hf_tensors
from .pretrained import _BLOCK, _EXPERTS, _MTP, _TOP, FP4_BLOCK, FP8_BLOCK

FORMATS, DTYPES = ("hf", "deepseek"), ("float32", "bf16", "fp8")
# DeepSeek-named weights released in FP8 (by name suffix; V4-Flash's index) ...
FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight",
                "attn.wo_b.weight", "indexer.wq_b.weight", "shared_experts.w1.weight",
                "shared_experts.w2.weight", "shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
# ... and in bf16 (the rest of the floats stay float32)
BF16_SUFFIXES = ("norm.weight", "embed.weight", "head.weight", "gate.weight", "wkv.weight",
                 "wgate.weight", "weights_proj.weight")


# --- configs --------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig) -> dict:
    """transformers' DeepseekV4Config content for `cfg` (no MTP: HF does not load it)."""
    hca = sorted({r for r in cfg.compress_ratios if r and not cfg.is_csa(r)})
    if len(hca) > 1:
        raise ValueError(f"format hf: HF's config has one HCA ratio, this model has {hca}")
    kinds = {0: "sliding_attention", cfg.csa_ratio: "compressed_sparse_attention"}
    kinds.update({r: "heavily_compressed_attention" for r in hca})
    out = {
        "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_head_dim, "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank, "sliding_window": cfg.window_size,
        "layer_types": [kinds[r] for r in cfg.compress_ratios],
        "compress_rates": {"compressed_sparse_attention": cfg.csa_ratio,
                           "heavily_compressed_attention": hca[0] if hca else 128},
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk, "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "max_position_embeddings": int(cfg.original_seq_len * cfg.rope_factor) if cfg.original_seq_len else 65536,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hash_layers": cfg.n_hash_layers, "scoring_func": cfg.score_func,
        "norm_topk_prob": True, "routed_scaling_factor": cfg.route_scale,
        "swiglu_limit": cfg.swiglu_limit, "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps, "rms_norm_eps": cfg.norm_eps,
        "num_nextn_predict_layers": 0, "initializer_range": cfg.init_std,
        "tie_word_embeddings": False, "hidden_act": "silu",
    }
    if cfg.original_seq_len:  # YaRN on the compressed layers
        out["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.beta_fast,
                               "beta_slow": cfg.beta_slow,
                               "original_max_position_embeddings": cfg.original_seq_len}
    return out


def deepseek_config(cfg: ModelConfig, dtype: str) -> dict:
    """DeepSeek's inference/config.json (ModelArgs) content for `cfg`."""
    out = {k: getattr(cfg, k) for k in _DEEPSEEK_DEFAULTS}
    out["compress_ratios"] = list(cfg.compress_ratios) + [0] * cfg.n_mtp_layers  # MTP layers last
    if dtype == "fp8":
        out.update(dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")
    else:
        out["dtype"] = dtype
    return out


# --- tensors --------------------------------------------------------------------------------
def _deepseek_names(tensors):
    """HF-named (name, array) -> DeepSeek-named, the fused expert tensors split per expert."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    mtp_only = {v: k for k, v in _MTP.items()}
    fused = {f for f, _ in _EXPERTS.values()}
    for name, x in tensors:
        if name in top:
            yield top[name], x
            continue
        kind, n, rest = name.split(".", 3)[1:] if name.startswith("model.") else ("mtp", *name.split(".", 2)[1:])
        prefix = f"{'layers' if kind == 'layers' else 'mtp'}.{n}."
        if rest in fused:  # gate_up [E, 2F, D] -> w1, w3 [F, D]; down [E, D, F] -> w2
            f = x.shape[1] // 2
            for w, (src, part) in _EXPERTS.items():
                if src == rest:
                    for e in range(x.shape[0]):
                        y = x[e] if src.endswith("down_proj") else x[e, part * f:(part + 1) * f]
                        yield f"{prefix}ffn.experts.{e}.{w}.weight", np.ascontiguousarray(y)
        elif kind == "mtp" and rest in mtp_only:
            yield prefix + mtp_only[rest], x
        else:
            yield prefix + block[rest], x


def _pad_to(x, block):
    pad = [(0, -n % b) for n, b in zip(x.shape, block)]
    return np.pad(x, pad) if any(p for _, p in pad) else x


def _quantized(name, x, fmt):
    """(codes as stored, UE8M0 scale bytes) of a [out, in] weight; edge blocks ragged."""
    block = FP8_BLOCK if fmt == "e4m3" else FP4_BLOCK
    codes, scales = quant.quantize(jnp.asarray(_pad_to(x.astype(np.float32), block)), fmt, block)
    codes = np.asarray(codes)[: x.shape[0], : x.shape[1]]
    scale = np.asarray(quant.ue8m0_encode(scales)).view(ml_dtypes.float8_e8m0fnu)
    if fmt == "e2m1":
        codes = np.asarray(quant.pack_e2m1(jnp.asarray(codes))).view(np.int8)
    return codes, scale


def _stored(tensors, dtype: str):
    """(name, array as stored) in the dtype policy; fp8 adds the `.scale` tensors."""
    for name, x in tensors:
        if not np.issubdtype(x.dtype, np.floating) or dtype == "float32":
            yield name, x
        elif dtype == "bf16":
            yield name, x.astype(ml_dtypes.bfloat16)
        elif ".ffn.experts." in name:
            codes, scale = _quantized(name, x, "e2m1")
            yield name, codes
            yield name[: -len(".weight")] + ".scale", scale
        elif name.endswith(FP8_SUFFIXES):
            codes, scale = _quantized(name, x, "e4m3")
            yield name, codes
            yield name[: -len(".weight")] + ".scale", scale
        elif name.endswith(BF16_SUFFIXES):
            yield name, x.astype(ml_dtypes.bfloat16)
        else:
            yield name, x.astype(np.float32)


def _write_shards(tensors, out: Path, shard_bytes: int, fmt: str) -> int:
    """Shards model-0000K-of-0000N.safetensors + model.safetensors.index.json; returns N."""
    shards, current, size = [], {}, 0
    for name, x in tensors:
        if current and size + x.nbytes > shard_bytes:  # write a shard as soon as it is full:
            shards.append(_flush(current, out, len(shards) + 1, fmt))  # host memory ~ one shard
            current, size = {}, 0
        current[name] = x
        size += x.nbytes
    if current:
        shards.append(_flush(current, out, len(shards) + 1, fmt))
    n = len(shards)
    weight_map, total = {}, 0
    for i, (tmp, names, nbytes) in enumerate(shards, 1):
        final = out / f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, final)
        weight_map.update({k: final.name for k in names})
        total += nbytes
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return n


def _flush(tensors: dict, out: Path, i: int, fmt: str):
    tmp = out / f".shard-{i:05d}.safetensors.tmp"
    # save_file copies raw buffers: a sliced (non-contiguous) array would be written scrambled
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"format": "pt" if fmt == "hf" else "deepseek"})
    return tmp, list(tensors), sum(x.nbytes for x in tensors.values())


def save(model, out_dir, fmt: str = "hf", dtype: str = "float32", shard_bytes: int = 5 << 30) -> Path:
    """Write `model` to `out_dir` (created; must not hold a checkpoint already)."""
    if fmt not in FORMATS or dtype not in DTYPES:
        raise ValueError(f"format must be one of {FORMATS} and dtype one of {DTYPES}; got {fmt!r}, {dtype!r}")
    if fmt == "hf" and dtype == "fp8":
        raise ValueError("dtype fp8 is DeepSeek's release format: use --format deepseek")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.safetensors")) or any(out.glob("*.safetensors.index.json")):
        raise FileExistsError(f"{out}: already holds a checkpoint; export into an empty directory")
    cfg = model.cfg
    config = hf_config(cfg) if fmt == "hf" else deepseek_config(cfg, dtype)
    tensors = iter_hf_tensors(model, mtp=fmt == "deepseek")
    if fmt == "deepseek":
        tensors = _deepseek_names(tensors)
    _write_shards(_stored(tensors, dtype), out, shard_bytes, fmt)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a training run's log.run_dir (its newest good checkpoint is exported)")
    ap.add_argument("out_dir")
    ap.add_argument("--format", choices=FORMATS, default="hf")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    args = ap.parse_args(argv)
    from train.setup import restore_run  # model/ does not depend on train/ except in this CLI

    try:
        model, cfg, step = restore_run(args.run_dir)
        out = save(model, args.out_dir, args.format, args.dtype, int(args.shard_gb * (1 << 30)))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"model.export: {e}", file=sys.stderr)
        return 2
    tok = cfg.data.tokenizer
    if tok and os.path.isfile(tok):  # a tokenizer.json file travels with the weights
        shutil.copy(tok, out / "tokenizer.json")
    print(f"exported step {step} of {args.run_dir} to {out} ({args.format}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
