"""Mixture of experts: fp32 router (sqrt-softplus), selection bias, hash routing, shared expert.

Legend: B batch, S sequence, N tokens (B*S), D model dim, E routed experts, F expert hidden,
k experts per token.
Scores s = score_func(x . W) in float32. Score-routed layers pick top-k of s + bias (the bias
only selects); hash-routed layers take k experts from a frozen token -> experts table. Gate
weights are the unbiased scores of the chosen experts, normalised to sum 1 (not for softmax
scoring), times route_scale. Experts are SwiGLU with a clamp (up in [-L, L], gate <= L),
computed in float32 on the gate / up products rounded to the compute dtype (DeepSeek's
reference: `w1(x).float()`); the gate weight multiplies before the down projection, whose
output is in the compute dtype too (the combine adds in float32). A token's
contribution from every selected slot is added, even if a table repeats an expert.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import quant
from .config import ModelConfig
from .gmm import choose_impl, grouped_matmul, grouped_matmuls
from .layers import (HashTable, Linear, QuantScales, QuantValues, RoutingBias, constrain, dtype_of,
                     hooks, normal, top_k)

F32 = jnp.float32


def balanced_hash_table(vocab: int, n_experts: int, k: int, seed: int) -> np.ndarray:
    """A seeded token -> k distinct experts table with every expert used equally often.

    Tokens come in groups of E: a group gets a random permutation `base` of the experts and
    k distinct random offsets o_j, and token i of the group takes experts (base_i + o_j) mod E.
    Each column of a full group is a permutation, so every expert gets exactly k slots per
    group; distinct offsets keep a row's experts distinct; fresh offsets per group vary the
    expert sets across groups."""
    rng = np.random.default_rng(seed)
    groups = -(-vocab // n_experts)
    base = np.concatenate([rng.permutation(n_experts) for _ in range(groups)])[:vocab]
    offsets = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(groups)])
    return ((base[:, None] + offsets[np.arange(vocab) // n_experts]) % n_experts).astype(np.int32)


def score(logits, func: str):
    if func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    if func == "sigmoid":
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


def swiglu(h_gate, h_up, limit: float):
    """silu(min(gate, limit)) * clip(up, -limit, limit) in float32 (limit 0: no clamp)."""
    return _swiglu(h_gate, h_up, float(limit))


# Its own backward keeps the two inputs only, in their own dtype (bfloat16 products: half the
# bytes of their float32 upcasts, which it recomputes), and writes both gradients in one pass:
# through autodiff XLA:CPU ran the clamp, the sigmoid and the product as separate passes over
# the [rows, F] hidden units (jax.nn.silu's residuals). Clamped entries get gradient 0 (the
# boundary itself passes, as torch.clamp).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _swiglu(g, u, limit: float):
    g, u = g.astype(F32), u.astype(F32)
    if limit > 0:
        g, u = jnp.minimum(g, limit), jnp.clip(u, -limit, limit)
    return g * jax.nn.sigmoid(g) * u


def _swiglu_bwd(limit, res, d):
    g_in, u_in = res
    g, u = g_in.astype(F32), u_in.astype(F32)
    gc, uc = (jnp.minimum(g, limit), jnp.clip(u, -limit, limit)) if limit > 0 else (g, u)
    s = jax.nn.sigmoid(gc)
    d_g, d_u = d * uc * s * (1 + gc * (1 - s)), d * gc * s
    if limit > 0:
        d_g, d_u = jnp.where(g <= limit, d_g, 0.0), jnp.where(jnp.abs(u) <= limit, d_u, 0.0)
    return d_g.astype(g_in.dtype), d_u.astype(u_in.dtype)


_swiglu.defvjp(lambda g, u, limit: (_swiglu(g, u, limit), (g, u)), _swiglu_bwd)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, hashed: bool, rngs: nnx.Rngs, layer_seed: int = 0):
        self.cfg, self.hashed = cfg, hashed
        e, d, f = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.gate = Linear((d, e), ("embed", "experts_router"), cfg, rngs, dtype="float32")
        if hashed:
            table = balanced_hash_table(cfg.vocab_size, e, cfg.n_activated_experts, cfg.hash_seed + layer_seed)
            self.tid2eid = HashTable(jnp.asarray(table), out_sharding=("vocab", "topk"), eager_sharding=False)
        else:
            self.bias = RoutingBias(jnp.zeros((e,), F32), out_sharding=("experts_router",), eager_sharding=False)
        std, pd = cfg.init_std, cfg.param_dtype
        self.w1 = normal(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pd)
        self.w3 = normal(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pd)
        self.w2 = normal(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, pd)
        self.held = False  # True: w1/w3/w2 are held quantised (hold_weight), as *_q / *_s
        fs = f * cfg.n_shared_experts
        self.shared_w1 = Linear((d, fs), ("embed", "mlp"), cfg, rngs, fp8=True)
        self.shared_w3 = Linear((d, fs), ("embed", "mlp"), cfg, rngs, fp8=True)
        self.shared_w2 = Linear((fs, d), ("mlp", "embed"), cfg, rngs, fp8=True)

    def expert_weights(self):
        """(w1, w3, w2) as the routed experts' matmuls see them: fake-quantised per
        quant_experts (fp4: 1 x quant_fp4_block along each matrix's input; fp8: 2-D blocks)."""
        if self.held:
            return tuple(self._held_weight(n) for n in ("w1", "w3", "w2"))
        ws = (self.w1[...], self.w3[...], self.w2[...])
        if self.cfg.quant_experts == "none":
            return ws
        fmt, block = self._expert_blocks()  # blocks on each expert's [in, out] (the last two axes)
        return tuple(quant.qdq(w, fmt, block) for w in ws)

    def _expert_blocks(self):
        cfg = self.cfg
        return ("e2m1", (cfg.quant_fp4_block, 1)) if cfg.quant_experts == "fp4" else \
            ("e4m3", (cfg.quant_block, cfg.quant_block))

    def _held_weight(self, name):
        fmt, block = self._expert_blocks()
        values, scales = getattr(self, name + "_q")[...], getattr(self, name + "_s")[...]
        if fmt == "e2m1":
            values = quant.unpack_e2m1(values)
        return quant.dequantize(values, quant.ue8m0_decode(scales), fmt, block)

    def hold_weight(self, name: str):
        """Replace one of the routed experts' float weights (w1 / w3 / w2) by what its matmuls
        see: fp4 as e2m1 codes packed two per byte (along the output axis) plus one UE8M0 byte
        per 1 x quant_fp4_block (DeepSeek's release format), or fp8 as e4m3 plus one byte per
        tile (model.storage.hold_quantized; a checkpoint import holds each matrix as soon as
        it is read). Inference only; expert_weights() is unchanged to the bit once all three
        are held (`held`)."""
        if self.cfg.quant_experts == "none":
            raise ValueError("hold_quantized: the routed experts are not quantised (quant_experts=none)")
        fmt, block = self._expert_blocks()
        var = getattr(self, name)
        values, scales = quant.held_blocks(var[...], fmt, block)
        setattr(self, name + "_q", QuantValues(values, **var.get_metadata()))
        setattr(self, name + "_s", QuantScales(scales, **var.get_metadata()))
        delattr(self, name)
        self.held = all(hasattr(self, n + "_q") for n in ("w1", "w3", "w2"))

    def expert_input(self, x):
        """Activations entering a routed expert matmul: e4m3 (1 x quant_block) when the experts
        are quantised (DeepSeek's FP8-activation x FP4-weight GEMMs)."""
        cfg = self.cfg
        return x if cfg.quant_experts == "none" else quant.qdq(x, "e4m3", cfg.quant_block)

    def route(self, x_ND, ids_N):
        """(expert ids [N, k], gate weights [N, k] fp32, scores [N, E] fp32)."""
        cfg = self.cfg
        s = score(self.gate(x_ND.astype(F32)), cfg.score_func)
        if self.hashed:
            idx = self.tid2eid[...][ids_N]
        else:
            _, idx = top_k(s + self.bias[...], cfg.n_activated_experts)
        wts = jnp.take_along_axis(s, idx, axis=-1)
        if cfg.score_func != "softmax":
            wts = wts / jnp.sum(wts, axis=-1, keepdims=True)
        return idx, wts * cfg.route_scale, s

    def __call__(self, x_BSD, ids_BS):
        """Returns (output [B, S, D], stats) with stats = dict(counts [E] tokens per expert,
        f [B, E] and p [B, E] of the sequence-wise balance loss sum_i f_i * P_i, dropped:
        (token, slot) pairs an expert-parallel transport had no room for)."""
        cfg = self.cfg
        b, s, d = x_BSD.shape
        x = x_BSD.reshape(b * s, d)
        idx, wts, scores = self.route(x, ids_BS.reshape(-1))
        stats = self._stats(idx, scores, b, s)
        experts = hooks().experts
        if experts is not None:
            y, stats["dropped"] = experts(self, x_BSD, idx.reshape(b, s, -1), wts.reshape(b, s, -1))
            return constrain(y.astype(x_BSD.dtype), ("batch", "act_seq", "act_embed")), stats
        experts = self._dense if cfg.moe_impl == "dense" else self._grouped
        y = experts(x, idx, wts) + self.shared(x)
        stats["dropped"] = jnp.zeros((), jnp.int32)
        return y.astype(x_BSD.dtype).reshape(b, s, d), stats

    def shared(self, x_ND):
        """The shared expert (same clamped SwiGLU), float32 result."""
        h = swiglu(self.shared_w1(x_ND), self.shared_w3(x_ND), self.cfg.swiglu_limit)
        return self.shared_w2(h.astype(x_ND.dtype)).astype(F32)

    def _stats(self, idx_Nk, scores_NE, b, s):
        e, k = self.cfg.n_routed_experts, self.cfg.n_activated_experts
        onehot = jax.nn.one_hot(idx_Nk, e, dtype=F32).sum(1).reshape(b, s, e)  # slots per expert
        f = onehot.sum(1) * (e / (k * s))
        p = (scores_NE / jnp.sum(scores_NE, -1, keepdims=True)).reshape(b, s, e).mean(1)
        return {"counts": onehot.sum((0, 1)).astype(jnp.int32), "f": f, "p": p}

    def _grouped(self, x_ND, idx_Nk, wts_Nk):
        """Sort the N*k (token, slot) pairs by expert and run grouped matmuls (model/gmm.py)."""
        cfg = self.cfg
        n, k = idx_Nk.shape
        flat = idx_Nk.reshape(-1)
        order = jnp.argsort(flat)
        token = order // k
        sizes = jnp.bincount(flat, length=cfg.n_routed_experts).astype(jnp.int32)
        dt = dtype_of(cfg.dtype)
        w1, w3, w2 = (w.astype(dt) for w in self.expert_weights())
        xs = self.expert_input(x_ND).astype(dt)[token]  # per-row rounding: gather after the cast
        impl = choose_impl(cfg.moe_impl)
        h = swiglu(*grouped_matmuls(xs, (w1, w3), sizes, impl, dt), cfg.swiglu_limit)
        h = self.expert_input(h * wts_Nk.reshape(-1)[order][:, None]).astype(dt)
        out = grouped_matmul(h, w2, sizes, impl, dt)
        return jnp.zeros((n, x_ND.shape[1]), F32).at[token].add(out)

    def _dense(self, x_ND, idx_Nk, wts_Nk):
        """Reference: every expert on every token, combined with a one-hot gate matrix."""
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        w1, w3, w2 = (w.astype(dt) for w in self.expert_weights())
        x = self.expert_input(x_ND).astype(dt)
        gates = jnp.einsum("nk,nke->ne", wts_Nk, jax.nn.one_hot(idx_Nk, cfg.n_routed_experts, dtype=F32))
        h = swiglu(jnp.einsum("nd,edf->nef", x, w1), jnp.einsum("nd,edf->nef", x, w3), cfg.swiglu_limit)
        h = self.expert_input(h * gates[..., None]).astype(dt)
        return jnp.einsum("nef,efd->nd", h, w2, preferred_element_type=F32)
