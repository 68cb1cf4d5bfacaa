"""DeepSeek-V4 checkpoint interop: config files -> ModelConfig, HF-named tensors -> an NNX model.

Two config spellings are understood: Hugging Face's `config.json` (`model_type`, `hidden_size`,
`num_hidden_layers`, ...) and DeepSeek's own `inference/config.json` (`dim`, `n_layers`,
`n_heads`, ...: the fields of DeepSeek's `ModelArgs`). Every key must be known: a key that
would change the architecture and is not understood raises ConfigError instead of silently
falling back to a default.

HF stores Linear weights [out, in]; ours are [in, out] (heads / groups / experts split out).
HF checkpoints carry no MTP block (transformers drops `mtp.*`); if a tensor dict has
`mtp.{j}.` names (decoder-layer names plus e_proj, h_proj, enorm, hnorm, norm, hc_head.*),
they fill MTP block j, and then every MTP name must be present.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from .config import ConfigError, ModelConfig

_LAYER_TYPE_RATIO_KEYS = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}

# Keys of either spelling that change nothing in the network: storage / quantisation formats
# (the run config chooses QAT formats), serving limits, token ids, bookkeeping, training knobs
# of transformers that our loss does not read. They are accepted and ignored.
IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "expert_dtype",
    "scale_fmt", "scale_dtype", "max_batch_size", "max_seq_len", "max_position_embeddings",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
)
# Keys accepted only with the value this architecture has (anything else would change it).
FIXED_KEYS = {
    "num_key_value_heads": (1, "DeepSeek-V4 uses one shared K=V head"),
    "norm_topk_prob": (True, "only normalised top-k gate weights are supported"),
    "tie_word_embeddings": (False, "the output head is separate from the embedding"),
    "attention_bias": (False, "projections have no bias"),
    "mlp_bias": (False, "experts have no bias"),
    "hidden_act": ("silu", "experts use SwiGLU"),
    "topk_method": ("noaux_tc", "routing is bias-adjusted top-k without auxiliary loss"),
}
# HF config.json keys that config_from_hf reads.
_HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "partial_rotary_factor", "q_lora_rank", "o_groups", "o_lora_rank",
    "sliding_window", "layer_types", "compress_rates", "compress_rate_csa", "compress_rate_hca",
    "compress_ratios", "index_n_heads", "index_head_dim", "index_topk", "rope_theta",
    "compress_rope_theta", "rope_scaling", "rope_parameters", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_layer_types",
    "num_hash_layers", "scoring_func", "routed_scaling_factor", "swiglu_limit", "hc_mult",
    "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "num_nextn_predict_layers", "initializer_range",
)
# DeepSeek inference/config.json keys (DeepSeek's ModelArgs fields) with ModelArgs' defaults,
# i.e. what DeepSeek's inference code builds when the file leaves a key out. Each key is the
# ModelConfig field of the same name (compress_ratios also lists the MTP layers, see below).
_DEEPSEEK_DEFAULTS = dict(
    vocab_size=129280, dim=4096, moe_inter_dim=4096, n_layers=7, n_hash_layers=0, n_mtp_layers=1,
    n_heads=64, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
    score_func="sqrtsoftplus", route_scale=1.0, swiglu_limit=0.0, q_lora_rank=1024, head_dim=512,
    rope_head_dim=64, norm_eps=1e-6, o_groups=8, o_lora_rank=1024, window_size=128,
    compress_ratios=(0, 0, 4, 128, 4, 128, 4, 0), compress_rope_theta=40000.0,
    original_seq_len=0, rope_theta=10000.0, rope_factor=40.0, beta_fast=32.0, beta_slow=1.0,
    index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4, hc_sinkhorn_iters=20,
    hc_eps=1e-6,
)
_HF_MARKERS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")
_DEEPSEEK_MARKERS = ("dim", "n_layers", "n_heads", "moe_inter_dim")


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from the content of a DeepSeek-V4 config file: Hugging Face's `config.json`
    (`layer_types` + `compress_rates`, or per-layer `compress_ratios`) or DeepSeek's
    `inference/config.json`. `overrides` are ModelConfig fields applied last (run choices such
    as dtype, or a shortened model)."""
    hf_keys = [k for k in _HF_MARKERS if k in hf]
    ds_keys = [k for k in _DEEPSEEK_MARKERS if k in hf]
    if hf_keys and ds_keys:
        raise ConfigError(f"config: mixes Hugging Face keys {hf_keys} with DeepSeek inference keys "
                          f"{ds_keys}; give one file's content unchanged")
    if not hf_keys and not ds_keys:
        raise ConfigError(f"config: neither a Hugging Face config.json (needs one of {list(_HF_MARKERS)}) "
                          f"nor a DeepSeek inference/config.json (needs one of {list(_DEEPSEEK_MARKERS)})")
    known = _HF_KEYS if hf_keys else tuple(_DEEPSEEK_DEFAULTS)
    _check_keys(hf, known, "Hugging Face config.json" if hf_keys else "DeepSeek inference/config.json")
    fields = _fields_from_hf(hf) if hf_keys else _fields_from_deepseek(hf)
    _check_mtp_ratios(fields.pop("_mtp_ratios"), fields["n_layers"],
                      overrides.get("n_mtp_layers", fields["n_mtp_layers"]))
    fields.update(overrides)
    return ModelConfig(**_coerce(fields))


def _check_keys(d: Mapping[str, Any], known: tuple[str, ...], spelling: str) -> None:
    """Unknown keys raise (all of them named); fixed keys must have the architecture's value."""
    unknown = sorted(k for k in d if k not in known and k not in IGNORED_KEYS and k not in FIXED_KEYS)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not understood as a {spelling} key; it may change "
                          f"the architecture, so it is not ignored (remove it or map it in model/hf.py)")
    for key, (value, why) in FIXED_KEYS.items():
        if key in d and d[key] != value:
            raise ConfigError(f"{key}: must be {value!r} ({why}); got {d[key]!r}")


def _coerce(fields: dict) -> dict:
    """JSON numbers to the field's type (10000 -> 10000.0 where ModelConfig holds a float)."""
    floats = {f.name for f in dataclasses.fields(ModelConfig) if isinstance(f.default, float)}
    return {k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in fields.items()}


def _check_mtp_ratios(rest: list[int], n_layers: int, n_mtp: int) -> None:
    """compress_ratios entries past n_layers belong to the MTP layers, which are window-only."""
    bad = [r for r in rest[:n_mtp] if r]
    if bad:
        raise ConfigError(f"compress_ratios: the entries after the {n_layers} main layers describe the "
                          f"MTP layer(s) and must be 0 (MTP blocks attend through the window only); "
                          f"got {rest[:n_mtp]}")


def _fields_from_deepseek(d: Mapping[str, Any]) -> dict:
    """DeepSeek's ModelArgs spelling: the names are ours; compress_ratios lists MTP layers last;
    ratio 4 layers overlap their blocks and carry the indexer (csa_ratio 4)."""
    fields = {**_DEEPSEEK_DEFAULTS, **d}
    fields = {k: v for k, v in fields.items() if k in _DEEPSEEK_DEFAULTS}
    ratios = [int(r) for r in fields["compress_ratios"]]
    n = fields["n_layers"]
    fields.update(compress_ratios=tuple(ratios[:n]), _mtp_ratios=ratios[n:], csa_ratio=4)
    return fields


def _fields_from_hf(hf: Mapping[str, Any]) -> dict:
    """Hugging Face spelling, with transformers' defaults (V4-Flash) for keys left out."""
    n = hf.get("num_hidden_layers", 43)
    rates = dict(_LAYER_TYPE_RATIO_KEYS)
    rates.update(hf.get("compress_rates") or {})
    for key, name in (("compress_rate_csa", "compressed_sparse_attention"),
                      ("compress_rate_hca", "heavily_compressed_attention")):
        if key in hf:
            rates[name] = hf[key]
    rest: list[int] = []
    if hf.get("layer_types") is not None:
        ratios = [0 if t == "sliding_attention" else rates[t] for t in hf["layer_types"]]
    elif hf.get("compress_ratios") is not None:
        ratios = [int(r) for r in hf["compress_ratios"]]
        ratios, rest = ratios[:n], ratios[n:]  # DeepSeek lists the MTP layer(s) last
    else:  # transformers' default schedule: 2 HCA, then CSA / HCA alternating
        ratios = [rates["heavily_compressed_attention"]] * min(n, 2) + [
            rates["compressed_sparse_attention"] if i % 2 else rates["heavily_compressed_attention"]
            for i in range(max(n - 2, 0))]
    if hf.get("mlp_layer_types") is not None:
        kinds = list(hf["mlp_layer_types"])
        n_hash = kinds.count("hash_moe")
        if kinds[:n_hash] != ["hash_moe"] * n_hash:
            raise ConfigError("mlp_layer_types: hash_moe layers must come first")
    else:
        n_hash = hf.get("num_hash_layers", 3)
    head_dim = hf.get("head_dim", 512)
    rope_dim = hf.get("qk_rope_head_dim") or int(head_dim * hf.get("partial_rotary_factor", 64 / 512))
    # YaRN (compressed layers only): rope_parameters {"main", "compress"} (transformers' own
    # form), a flat rope_parameters dict, or the legacy rope_scaling
    rp = dict(hf.get("rope_parameters") or {})
    if isinstance(rp.get("compress"), dict):
        yarn, main = dict(rp["compress"]), dict(rp.get("main") or {})
    else:
        rp.pop("rope_theta", None)  # transformers replaces it by compress_rope_theta
        yarn, main = {**dict(hf.get("rope_scaling") or {}), **rp}, {}
    is_yarn = yarn.get("rope_type", yarn.get("type")) == "yarn"
    return dict(
        vocab_size=hf.get("vocab_size", 129280), dim=hf.get("hidden_size", 4096), n_layers=n,
        n_heads=hf.get("num_attention_heads", 64), head_dim=head_dim, rope_head_dim=rope_dim,
        q_lora_rank=hf.get("q_lora_rank", 1024), o_groups=hf.get("o_groups", 8),
        o_lora_rank=hf.get("o_lora_rank", 1024), window_size=hf.get("sliding_window", 128),
        compress_ratios=tuple(ratios), csa_ratio=rates["compressed_sparse_attention"],
        index_n_heads=hf.get("index_n_heads", 64), index_head_dim=hf.get("index_head_dim", 128),
        index_topk=hf.get("index_topk", 512),
        rope_theta=float(main.get("rope_theta", hf.get("rope_theta", 10000.0))),
        compress_rope_theta=float(yarn.get("rope_theta", hf.get("compress_rope_theta", 160000.0))),
        rope_factor=float(yarn.get("factor", 16.0)),
        original_seq_len=int(yarn.get("original_max_position_embeddings", 65536)) if is_yarn else 0,
        beta_fast=float(yarn.get("beta_fast", 32)), beta_slow=float(yarn.get("beta_slow", 1)),
        n_routed_experts=hf.get("n_routed_experts", 256), n_shared_experts=hf.get("n_shared_experts", 1),
        n_activated_experts=hf.get("num_experts_per_tok", 6),
        moe_inter_dim=hf.get("moe_intermediate_size", 2048), n_hash_layers=n_hash,
        score_func=hf.get("scoring_func", "sqrtsoftplus"),
        route_scale=float(hf.get("routed_scaling_factor", 1.5)),
        swiglu_limit=float(hf.get("swiglu_limit", 10.0)), hc_mult=hf.get("hc_mult", 4),
        hc_sinkhorn_iters=hf.get("hc_sinkhorn_iters", 20), hc_eps=float(hf.get("hc_eps", 1e-6)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        n_mtp_layers=hf.get("num_nextn_predict_layers", 1),
        init_std=float(hf.get("initializer_range", 0.02)), _mtp_ratios=rest,
    )


# --- weights ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor maps onto our parameter(s): calling it turns the HF tensor [out, in]
    into ours (a tuple of arrays for a fused HF tensor with several targets), `to_hf` turns
    ours back (one argument per target). Pure reshapes / transposes: exact both ways."""
    to_ours: Callable
    to_hf: Callable

    def __call__(self, x):
        return self.to_ours(x)


SAME = Layout(lambda x: x, lambda x: x)
T = Layout(lambda x: x.T, lambda x: x.T)
EXPERT_T = Layout(lambda x: x.transpose(0, 2, 1), lambda x: x.transpose(0, 2, 1))  # [E, out, in]


def _heads(*tail):
    """[H*K, in] <-> [in, H, K]."""
    return Layout(lambda x: x.T.reshape(x.shape[1], *tail), lambda y: y.reshape(y.shape[0], -1).T)


def _layer_rules(cfg: ModelConfig, ratio: int, hashed: bool) -> dict[str, tuple[str, Callable]]:
    """HF name suffix inside a decoder layer -> (attribute path in our Block, transform)."""
    h, k, g, o = cfg.n_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    f = cfg.moe_inter_dim
    rules = {
        "input_layernorm.weight": ("attn_norm.weight", SAME),
        "post_attention_layernorm.weight": ("ffn_norm.weight", SAME),
        "self_attn.q_a_proj.weight": ("attn.wq_a.w", T),
        "self_attn.q_a_norm.weight": ("attn.q_norm.weight", SAME),
        "self_attn.q_b_proj.weight": ("attn.wq_b.w", _heads(h, k)),
        "self_attn.kv_proj.weight": ("attn.wkv.w", T),
        "self_attn.kv_norm.weight": ("attn.kv_norm.weight", SAME),
        # [G*O, in] <-> [G, in, O] and [D, G*O] <-> [G, O, D]
        "self_attn.o_a_proj.weight": ("attn.wo_a.w", Layout(lambda x: x.reshape(g, o, -1).transpose(0, 2, 1),
                                                            lambda y: y.transpose(0, 2, 1).reshape(g * o, -1))),
        "self_attn.o_b_proj.weight": ("attn.wo_b.w", Layout(lambda x: x.T.reshape(g, o, -1),
                                                            lambda y: y.reshape(g * o, -1).T)),
        "self_attn.sinks": ("attn.sink", SAME),
        "mlp.gate.weight": ("ffn.gate.w", T),
        # [E, 2F, D] (gate rows, then up rows) <-> w1, w3 [E, D, F]
        "mlp.experts.gate_up_proj": ("ffn.w1|ffn.w3", Layout(
            lambda x: (x[:, :f].transpose(0, 2, 1), x[:, f:].transpose(0, 2, 1)),
            lambda w1, w3: np.concatenate([w1.transpose(0, 2, 1), w3.transpose(0, 2, 1)], axis=1))),
        "mlp.experts.down_proj": ("ffn.w2", EXPERT_T),
        "mlp.shared_experts.gate_proj.weight": ("ffn.shared_w1.w", T),
        "mlp.shared_experts.up_proj.weight": ("ffn.shared_w3.w", T),
        "mlp.shared_experts.down_proj.weight": ("ffn.shared_w2.w", T),
    }
    for hc in ("attn_hc", "ffn_hc"):
        rules[f"{hc}.fn"] = (f"{hc}.fn", T)
        rules[f"{hc}.base"] = (f"{hc}.base", SAME)
        rules[f"{hc}.scale"] = (f"{hc}.scale", SAME)
    rules["mlp.gate.tid2eid" if hashed else "mlp.gate.e_score_correction_bias"] = (
        "ffn.tid2eid" if hashed else "ffn.bias", SAME)
    if ratio:
        comp = {"kv_proj.weight": ("wkv.w", T), "gate_proj.weight": ("wgate.w", T),
                "position_bias": ("ape", SAME), "kv_norm.weight": ("norm.weight", SAME)}
        for name, (path, fn) in comp.items():
            rules[f"self_attn.compressor.{name}"] = (f"attn.compressor.{path}", fn)
        if cfg.is_csa(ratio):
            for name, (path, fn) in comp.items():
                rules[f"self_attn.compressor.indexer.{name}"] = (f"attn.indexer.compressor.{path}", fn)
            rules["self_attn.compressor.indexer.q_b_proj.weight"] = (
                "attn.indexer.wq_b.w", _heads(cfg.index_n_heads, cfg.index_head_dim))
            rules["self_attn.compressor.indexer.scorer.weights_proj.weight"] = ("attn.indexer.weights_proj.w", T)
    return rules


def _hc_head_rules(prefix: str, target: str) -> dict:
    return {f"{prefix}hc_fn": (f"{target}.fn", T), f"{prefix}hc_base": (f"{target}.base", SAME),
            f"{prefix}hc_scale": (f"{target}.scale", SAME)}


def _targets(model) -> dict[str, tuple[Any, int | None, str, Callable]]:
    """Every expected HF name -> (module, stack index or None, attribute path, transform)."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": (model, None, "embed", SAME),
           "model.norm.weight": (model, None, "norm.weight", SAME),
           "lm_head.weight": (model, None, "head.w", T)}
    for name, (path, fn) in _hc_head_rules("model.hc_head.", "hc_head").items():
        out[name] = (model, None, path, fn)
    for seg in model.segments:
        for j, blk in enumerate(seg.blocks):
            for i in range(seg.count):
                layer = seg.start + i * seg.period + j
                rules = _layer_rules(cfg, *cfg.layer_kind(layer))
                for suffix, (path, fn) in rules.items():
                    out[f"model.layers.{layer}.{suffix}"] = (blk, i if seg.count > 1 else None, path, fn)
    return out


def _mtp_targets(model) -> dict:
    out = {}
    for j, mtp in enumerate(model.mtp):
        p = f"mtp.{j}."
        for suffix, (path, fn) in _layer_rules(model.cfg, 0, False).items():
            # a merged target ("ffn.w1|ffn.w3") gets the prefix on each of its paths
            out[p + suffix] = (mtp, None, "|".join("block." + q for q in path.split("|")), fn)
        for name in ("e_proj", "h_proj"):
            out[f"{p}{name}.weight"] = (mtp, None, f"{name}.w", T)
        for name in ("enorm", "hnorm", "norm"):
            out[f"{p}{name}.weight"] = (mtp, None, f"{name}.weight", SAME)
        for name, (path, fn) in _hc_head_rules(p + "hc_head.", "hc_head").items():
            out[name] = (mtp, None, path, fn)
    return out


def _resolve(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def iter_hf_tensors(model, mtp: bool = False):
    """The inverse of load_hf_weights, one tensor at a time: (HF name, numpy array in HF's
    layout and the parameter's dtype) for every parameter of `model`; with `mtp`, the MTP
    blocks too (`mtp.J.` names, which transformers does not load). A scanned stack is copied to
    the host once and dropped when its segment is done."""
    targets = _targets(model)
    if mtp:
        targets.update(_mtp_targets(model))
    host: dict[int, np.ndarray] = {}
    current = None
    for name, (module, index, path, layout) in targets.items():
        if module is not current:  # the next block (or the top level): drop the last one's copies
            host.clear()
            current = module
        parts = []
        for p in path.split("|"):
            var = _resolve(module, p)
            if id(var) not in host:
                host[id(var)] = np.asarray(var.get_value())
            parts.append(host[id(var)] if index is None else host[id(var)][index])
        yield name, np.ascontiguousarray(layout.to_hf(*parts))


def hf_tensors(model, mtp: bool = False) -> dict[str, np.ndarray]:
    """`iter_hf_tensors` as a dict."""
    return dict(iter_hf_tensors(model, mtp))


def load_hf_weights(model, tensors: Mapping[str, np.ndarray]) -> None:
    """Fill `model` in place from HF parameter names. Unknown or missing names raise, listing
    them; a shape mismatch names the parameter and both shapes."""
    targets = _targets(model)
    if any(name.startswith("mtp.") for name in tensors):
        targets.update(_mtp_targets(model))
    unknown = sorted(set(tensors) - set(targets))
    missing = sorted(set(targets) - set(tensors))
    if unknown or missing:
        raise KeyError(f"load_hf_weights: unknown names {unknown[:20]}{' ...' if len(unknown) > 20 else ''}; "
                       f"missing names {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    pending: dict[int, tuple[Any, np.ndarray]] = {}
    for name, (module, index, path, fn) in targets.items():
        values = fn(np.asarray(tensors[name]))
        paths = path.split("|")
        values = values if len(paths) > 1 else (values,)
        for p, v in zip(paths, values):
            var = _resolve(module, p)
            if id(var) not in pending:
                pending[id(var)] = (var, np.array(var.get_value()))
            arr = pending[id(var)][1]
            want = arr.shape if index is None else arr.shape[1:]
            if tuple(v.shape) != tuple(want):
                raise ValueError(f"load_hf_weights: {name} has shape {tuple(v.shape)} (after layout "
                                 f"change) but {p} expects {tuple(want)}")
            if index is None:
                arr[...] = v
            else:
                arr[index] = v
    for var, arr in pending.values():
        var.set_value(jnp.asarray(arr, dtype=arr.dtype))

