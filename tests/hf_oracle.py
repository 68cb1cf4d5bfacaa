"""Numerical oracle for tests: Hugging Face ``transformers.DeepseekV4ForCausalLM``.

This module is used ONLY by tests.  It builds a tiny DeepSeek-V4 model with the
reference PyTorch implementation shipped in ``transformers`` (float32, eager
attention, eager experts, CPU), fills every checkpoint tensor with seeded random
values, and exposes helpers to run it and to capture the inputs/outputs of
individual submodules, so the JAX/Flax implementation can be compared against
it end to end (``hf_logits``) or one component at a time (``capture``).

Public helpers
--------------
* ``hf_config(**overrides) -> dict``    tiny config.json content (model_type "deepseek_v4")
* ``build_hf_model(cfg, seed=0) -> (model, tensors)``
      ``tensors`` maps HF state_dict names to numpy arrays (float32; int32 for
      ``tid2eid``), i.e. exactly what a converted checkpoint would carry.
* ``hf_logits(model, input_ids) -> np.ndarray [B, S, vocab]``
* ``capture(model, input_ids, module_names) -> {name: {"inputs": ..., "outputs": ...}}``

Tiny-config layout (defaults of ``hf_config``)
----------------------------------------------
layers 0..4: layer_types = [sliding, CSA(ratio 4), HCA(ratio 8), CSA(ratio 4), sliding]
             mlp_layer_types = [hash_moe, hash_moe, moe, moe, moe]
D=64 hidden, H=4 heads, head_dim=32 (rope dim 16 = trailing slice), q_lora=24,
o_groups=2, o_lora=16, E=8 routed experts (top-2), 1 shared expert, moe_inter=16,
indexer 8 heads x 16 dim, hc_mult=4, vocab=96.

HF state_dict names and shapes for this tiny config (printed from the real
model; ``L`` = any layer, ``C`` = CSA layer (1, 3), ``X`` = HCA layer (2))::

    model.embed_tokens.weight                                  (96, 64)
    model.norm.weight                                          (64,)
    model.hc_head.hc_fn                                        (4, 256)
    model.hc_head.hc_base                                      (4,)
    model.hc_head.hc_scale                                     (1,)
    lm_head.weight                                             (96, 64)
    model.layers.L.input_layernorm.weight                      (64,)
    model.layers.L.post_attention_layernorm.weight             (64,)
    model.layers.L.attn_hc.fn                                  (24, 256)
    model.layers.L.attn_hc.base                                (24,)
    model.layers.L.attn_hc.scale                               (3,)
    model.layers.L.ffn_hc.{fn,base,scale}                      same as attn_hc
    model.layers.L.self_attn.sinks                             (4,)
    model.layers.L.self_attn.q_a_proj.weight                   (24, 64)
    model.layers.L.self_attn.q_a_norm.weight                   (24,)
    model.layers.L.self_attn.q_b_proj.weight                   (128, 24)
    model.layers.L.self_attn.kv_proj.weight                    (32, 64)
    model.layers.L.self_attn.kv_norm.weight                    (32,)
    model.layers.L.self_attn.o_a_proj.weight                   (32, 64)   # [o_groups*o_lora, H*hd/o_groups]
    model.layers.L.self_attn.o_b_proj.weight                   (64, 32)
    model.layers.C.self_attn.compressor.kv_proj.weight         (64, 64)   # 2*head_dim (Ca | Cb)
    model.layers.C.self_attn.compressor.gate_proj.weight       (64, 64)
    model.layers.C.self_attn.compressor.position_bias          (4, 64)    # [ratio, 2*head_dim]
    model.layers.C.self_attn.compressor.kv_norm.weight         (32,)
    model.layers.C.self_attn.compressor.indexer.kv_proj.weight       (32, 64)  # 2*index_head_dim
    model.layers.C.self_attn.compressor.indexer.gate_proj.weight     (32, 64)
    model.layers.C.self_attn.compressor.indexer.position_bias        (4, 32)
    model.layers.C.self_attn.compressor.indexer.kv_norm.weight       (16,)
    model.layers.C.self_attn.compressor.indexer.q_b_proj.weight      (128, 24) # index_heads*index_hd
    model.layers.C.self_attn.compressor.indexer.scorer.weights_proj.weight (8, 64)
    model.layers.X.self_attn.compressor.kv_proj.weight         (32, 64)   # head_dim (no overlap)
    model.layers.X.self_attn.compressor.gate_proj.weight       (32, 64)
    model.layers.X.self_attn.compressor.position_bias          (8, 32)    # [ratio, head_dim]
    model.layers.X.self_attn.compressor.kv_norm.weight         (32,)
    model.layers.L.mlp.gate.weight                             (8, 64)
    model.layers.{0,1}.mlp.gate.tid2eid                        (96, 2)    # hash layers (int)
    model.layers.{2,3,4}.mlp.gate.e_score_correction_bias      (8,)       # top-k layers
    model.layers.L.mlp.experts.gate_up_proj                    (8, 32, 64) # [E, 2*inter (gate|up), D]
    model.layers.L.mlp.experts.down_proj                       (8, 64, 16) # [E, D, inter]
    model.layers.L.mlp.shared_experts.gate_proj.weight         (16, 64)
    model.layers.L.mlp.shared_experts.up_proj.weight           (16, 64)
    model.layers.L.mlp.shared_experts.down_proj.weight         (64, 16)

All Linear weights are torch layout [out_features, in_features].
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np
import torch

# Rope "compress" layers: YaRN with these parameters; DeepseekV4Config folds the
# legacy ``rope_scaling`` dict into ``rope_parameters["compress"]`` and forces
# ``attention_factor = 1.0`` for yarn (no mscale on cos/sin, like the reference).
_DEFAULT_ROPE_SCALING = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
}

_RATIO_TO_LAYER_TYPE = {
    0: "sliding_attention",
    4: "compressed_sparse_attention",
    8: "heavily_compressed_attention",
}


def hf_config(**overrides: Any) -> dict:
    """Tiny DeepSeek-V4 config.json content for CPU tests.

    Per-layer compression ratios [0, 4, 8, 4, 0] are expressed as ``layer_types``
    + ``compress_rates`` (HF's legacy ``compress_ratios`` key only understands
    0/4/128).  Any keyword replaces the default of the same name.
    """
    compress_ratios = [0, 4, 8, 4, 0]
    cfg = {
        "model_type": "deepseek_v4",
        "architectures": ["DeepseekV4ForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 64,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "qk_rope_head_dim": 16,  # -> partial_rotary_factor = 16 / 32
        "q_lora_rank": 24,
        "o_groups": 2,
        "o_lora_rank": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "num_hash_layers": 2,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "sliding_window": 8,
        "index_n_heads": 8,
        "index_head_dim": 16,
        "index_topk": 3,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_scaling": dict(_DEFAULT_ROPE_SCALING),
        "layer_types": [_RATIO_TO_LAYER_TYPE[r] for r in compress_ratios],
        "compress_rates": {
            "compressed_sparse_attention": 4,
            "heavily_compressed_attention": 8,
        },
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg.update(copy.deepcopy(overrides))
    return cfg


def _make_hf_config(config_dict: dict):
    from transformers import DeepseekV4Config

    d = copy.deepcopy(config_dict)
    d.pop("model_type", None)
    d.pop("architectures", None)
    return DeepseekV4Config(**d)


# ---------------------------------------------------------------------------
# Random parameter filling
# ---------------------------------------------------------------------------


def _hash_table(gen: torch.Generator, vocab: int, n_experts: int, top_k: int) -> torch.Tensor:
    """[vocab, top_k] table; each row has top_k distinct experts; balanced usage.

    A random permutation of all experts is cut into consecutive rows of top_k
    (refreshing the permutation whenever it runs out), so every row's entries
    are distinct and every expert is used equally often up to one permutation.
    """
    rows = []
    perm: list[int] = []
    for _ in range(vocab):
        if len(perm) < top_k:
            perm = torch.randperm(n_experts, generator=gen).tolist()
        rows.append(perm[:top_k])
        perm = perm[top_k:]
    return torch.tensor(rows, dtype=torch.long)


def _value_for(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Seeded random value for one float parameter/buffer, by its state_dict name."""

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=gen, dtype=torch.float32)

    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""

    if name == "model.embed_tokens.weight":
        return normal(1.0)
    if name == "lm_head.weight":
        return normal(0.1)
    if leaf == "sinks":
        return normal(0.5)
    if leaf == "position_bias":
        return normal(0.5)
    if leaf == "e_score_correction_bias":
        return normal(0.1)
    if leaf in ("gate_up_proj", "down_proj") and parent == "experts":
        return normal(0.1)
    # mHC (attn_hc / ffn_hc) and the final hc_head
    if leaf in ("fn", "hc_fn"):
        return normal(0.05)
    if leaf in ("base", "hc_base"):
        return normal(0.3)
    if leaf in ("scale", "hc_scale"):
        return normal(0.1, mean=1.0)
    # RMSNorm weights (input/post-attn layernorms, q_a_norm, kv_norm, final norm)
    if leaf == "weight" and (parent.endswith("norm") or parent.endswith("layernorm")):
        return normal(0.1, mean=1.0)
    # Every remaining ``.weight`` is an nn.Linear (incl. the grouped o_a_proj and
    # the router gate weight).
    if leaf == "weight":
        return normal(0.1)
    raise KeyError(f"hf_oracle: no random-init rule for state_dict entry {name!r} {tuple(shape)}")


def build_hf_model(config_dict: dict, seed: int = 0):
    """Build HF ``DeepseekV4ForCausalLM`` (float32, eval, eager) with seeded random weights.

    Returns ``(model, tensors)`` where ``tensors`` maps every persistent
    state_dict name to a numpy array (float32; ``tid2eid`` as int32).

    Skipped (non-persistent, not in a checkpoint, derived from the config):
      ``*.rotary_emb.{main,compress}_inv_freq`` and
      ``*.rotary_emb.{main,compress}_original_inv_freq`` (model-level rotary and
      the per-compressor / per-indexer rotary copies).  They are registered with
      persistent=False, so they never appear in ``model.state_dict()`` at all;
      the explicit filter below is only a guard.
    """
    from transformers import DeepseekV4ForCausalLM

    config = _make_hf_config(config_dict)
    torch.manual_seed(seed)  # deterministic default init (all overwritten anyway)
    model = DeepseekV4ForCausalLM._from_config(
        config,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    model = model.to(torch.float32).eval()

    gen = torch.Generator().manual_seed(seed)
    top_k = config.num_experts_per_tok
    n_experts = config.n_routed_experts

    tensors: dict[str, np.ndarray] = {}
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state.keys()):
            if "inv_freq" in name:
                continue
            t = state[name]  # shares storage with the live parameter / buffer
            if name.endswith("tid2eid"):
                new = _hash_table(gen, t.shape[0], n_experts, top_k).to(t.dtype)
                t.copy_(new)
                tensors[name] = new.numpy().astype(np.int32)
                continue
            new = _value_for(name, t.shape, gen)
            t.copy_(new.to(t.dtype))
            tensors[name] = t.detach().to(torch.float32).numpy().copy()

    # Sanity: everything we wrote is what the model now holds.
    live = model.state_dict()
    for name, arr in tensors.items():
        assert np.array_equal(live[name].detach().cpu().numpy().astype(arr.dtype), arr), name
    return model, tensors


# ---------------------------------------------------------------------------
# Running the oracle
# ---------------------------------------------------------------------------


def _ids_tensor(input_ids) -> torch.Tensor:
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {ids.shape}")
    return torch.from_numpy(ids.astype(np.int64))


def hf_logits(model, input_ids) -> np.ndarray:
    """Full-sequence logits [B, S, vocab] (float32), no KV cache."""
    with torch.no_grad():
        out = model(input_ids=_ids_tensor(input_ids), use_cache=False)
    return out.logits.detach().to(torch.float32).cpu().numpy()


def _to_numpy(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        return t.numpy().copy()
    if isinstance(x, tuple):
        return tuple(_to_numpy(v) for v in x)
    if isinstance(x, list):
        return [_to_numpy(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    return x  # ints, floats, strings, Cache objects (None without cache) ...


def capture(model, input_ids, module_names: Iterable[str]) -> dict:
    """One forward (no cache) with hooks on the named submodules.

    Returns ``{name: {"inputs": tuple, "kwargs": dict, "outputs": any}}`` with
    tensors converted to numpy (tuples kept as tuples, None kept as None).
    ``inputs`` are the positional arguments, ``kwargs`` the keyword arguments
    the module was called with (e.g. decoder layers / attention receive most of
    theirs as keywords).  If a module runs more than once per forward, the
    entry holds a list of such records instead.
    """
    module_names = list(module_names)
    modules = dict(model.named_modules())
    records: dict[str, list] = {n: [] for n in module_names}
    handles = []

    def make_hook(name):
        def hook(mod, args, kwargs, output):
            records[name].append(
                {
                    "inputs": _to_numpy(tuple(args)),
                    "kwargs": _to_numpy(dict(kwargs)),
                    "outputs": _to_numpy(output),
                }
            )

        return hook

    try:
        for name in module_names:
            if name not in modules:
                raise KeyError(f"hf_oracle.capture: no submodule named {name!r}")
            handles.append(modules[name].register_forward_hook(make_hook(name), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=_ids_tensor(input_ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    return {n: (r[0] if len(r) == 1 else r) for n, r in records.items()}
