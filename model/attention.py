"""DeepSeek-V4 attention: shared K=V head, sliding window + compressed entries (CSA / HCA), sink.

Legend: B batch, S sequence, H heads, K head dim, Q q_lora rank, D model dim, G output groups,
O o_lora rank, T compressed entries, J candidates of one query, C window chunks, W window.
Queries: x -> Wq_a -> RMSNorm -> Wq_b -> [H, K] -> weightless RMSNorm per head -> rope (last R).
One K=V vector per token: x -> Wkv -> RMSNorm -> rope. Each query sees the last W tokens
(itself included) plus compressed entries: every complete block on HCA layers, the indexer's
top-k on CSA layers (gathered, or masked out of all blocks: model.csa_select). One float32
softmax over all candidates plus a per-head sink logit that only adds to the denominator. The
inverse rotation is applied to the last R output dims, then a block-diagonal projection per
group and a dense one back to D.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import quant
from .compressor import Compressor, visible
from .config import ModelConfig
from .indexer import Indexer, indexer_kl
from .layers import Linear, RMSNorm, apply_rope, constant, constrain, rms_normalize

F32 = jnp.float32


# csa_select "auto" masks while the blocks are at most this many times the top-k. On one H200
# (bench/gpu_train.py --profile: T / k = 4, gather) the scatter-add that is the backward of the
# gathered [B, S, k, head_dim] entries took 220 ms per CSA layer, 25% of the step, and the
# forward gather 28 ms more; by FLOP count the mask's extra logits ((T - k) / k times the
# selected ones') cost ~6 ms a layer there (not yet measured). On this project's 2-core CPU the
# two are within 2% (small, shape, tiny). Long contexts (T / k in the hundreds at 1M tokens) gather.
CSA_MASK_MAX = 16


def chosen(idx_BSk, blocks: int):
    """[B, S, blocks] booleans: True at the top-k indices (-1 = no pick)."""
    b, s, k = idx_BSk.shape
    at = jnp.where(idx_BSk >= 0, idx_BSk, blocks)  # no pick -> a spare last column
    # a scatter with B and S as batching dimensions: the partitioner splits it as the batch is
    # split (put_along_axis's explicit index arrays made it gather the indices onto every device)
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(2,),
                                           scatter_dims_to_operand_dims=(2,), operand_batching_dims=(0, 1),
                                           scatter_indices_batching_dims=(0, 1))
    out = jax.lax.scatter(jnp.zeros((b, s, blocks + 1), bool), at[..., None], jnp.ones((b, s, k), bool), dims,
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return out[..., :blocks]


def _chunk(x, w: int):
    """[B, S, ...] -> [B, C, W, ...] zero-padded to C = ceil(S / W) chunks."""
    b, s = x.shape[:2]
    n = -(-s // w)
    pad = [(0, 0), (0, n * w - s)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad).reshape(b, n, w, *x.shape[2:])


def _with_previous(x_BCW):
    """[B, C, W, ...] -> [B, C, 2W, ...]: each chunk preceded by the previous one (zeros first)."""
    pad = [(0, 0), (1, 0)] + [(0, 0)] * (x_BCW.ndim - 2)
    return jnp.concatenate([jnp.pad(x_BCW[:, :-1], pad), x_BCW], axis=2)


def window_keys(kv_BSK, seg_BS, w: int):
    """Keys of each window chunk: previous chunk + own chunk, [B, C, 2W, K], and the mask
    [B, C, W, 2W] of keys at positions (p - W, p] of the query's document, for the query at p."""
    kv = _chunk(kv_BSK, w)
    n = kv.shape[1]
    qpos = jnp.arange(n)[:, None] * w + jnp.arange(w)[None, :]            # [C, W]
    kpos = (jnp.arange(n)[:, None] - 1) * w + jnp.arange(2 * w)[None, :]  # [C, 2W]
    mask = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] > qpos[:, :, None] - w)
    mask = mask & (kpos[:, None, :] >= 0)
    seg = _chunk(seg_BS, w)                                                # [B, C, W]
    same = _with_previous(seg)[:, :, None, :] == seg[:, :, :, None]        # [B, C, W, 2W]
    return _with_previous(kv), mask[None] & same


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, rngs: nnx.Rngs):
        self.cfg, self.ratio = cfg, ratio
        h, k, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.wq_a = Linear((cfg.dim, cfg.q_lora_rank), ("embed", "q_lora"), cfg, rngs, fp8=True)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, "q_lora")
        self.wq_b = Linear((cfg.q_lora_rank, h, k), ("q_lora_in", "heads", "head_dim"), cfg, rngs, fp8=True)
        self.wkv = Linear((cfg.dim, k), ("embed", "head_dim"), cfg, rngs, fp8=True)
        self.kv_norm = RMSNorm(k, cfg.norm_eps, "head_dim")
        self.wo_a = Linear((g, h // g * k, cfg.o_lora_rank), ("o_groups", "o_group_in", "o_lora"), cfg, rngs)
        self.wo_b = Linear((g, cfg.o_lora_rank, cfg.dim), ("o_groups", "o_lora", "embed"), cfg, rngs,
                           fp8=True, in_axis=1)
        self.sink = constant((h,), ("heads",), 0.0)
        self.compressor = Compressor(cfg, ratio, k, cfg.is_csa(ratio), rngs) if ratio else None
        self.indexer = Indexer(cfg, ratio, rngs) if ratio and cfg.is_csa(ratio) else None

    def __call__(self, x_BSD, positions_S, angles_SR, seg_BS=None, *, dense_csa: bool = False):
        """Returns (output [B, S, D], (indexer KL summed over queries, number of those queries)),
        both 0 on non-CSA layers.
        `seg_BS`: document id of every token (packed sequences); None = one document."""
        cfg = self.cfg
        q, kv, qr = self.project(x_BSD, angles_SR)
        s = x_BSD.shape[1]
        if seg_BS is None:
            seg_BS = jnp.zeros(x_BSD.shape[:2], jnp.int32)
        # what every query reads (the sequence's keys) and what is per query (chunkable)
        keys, wmask = window_keys(kv, seg_BS, cfg.window_size)
        shared = {"sink": self.sink[...]}
        per_q = {"q": q, "pos": positions_S, "seg": seg_BS}
        if self.compressor is not None and s >= self.ratio:
            ckv, shared["block_seg"] = self.compressor(x_BSD, angles_SR, seg_BS)   # [B, T, K], [B, T]
            shared["ckv"] = self.kv_quant(ckv.astype(q.dtype))
            if self.indexer is not None:
                shared["index_keys"] = self.indexer.keys(x_BSD, angles_SR, seg_BS)[0]
                per_q["index_q"], per_q["index_w"] = self.indexer.queries(x_BSD, qr, angles_SR)
        o, kl = self._attend_in_chunks(per_q, {"keys": keys, "mask": wmask}, shared, dense_csa)
        return self.output(o, angles_SR), kl

    # --- the per-token halves, shared with the cached (decoding) path in infer/ -------------
    def project(self, x_BSD, angles_SR):
        """(queries [B, S, H, K] normalised and rotated, K=V entries [B, S, K] rotated (and
        kv_quant-ed), query latent [B, S, Q]) of every token: everything attention computes
        per token before it looks at other tokens."""
        cfg = self.cfg
        qr = self.q_norm(self.wq_a(x_BSD))
        q = constrain(self.wq_b(qr, "bsq,qhk->bshk"), ("batch", "act_seq", "act_heads", None))
        q = rms_normalize(q, cfg.norm_eps).astype(x_BSD.dtype)
        q = apply_rope(q, angles_SR)
        kv = self.kv_quant(apply_rope(self.kv_norm(self.wkv(x_BSD)), angles_SR))
        return q, kv, qr

    def output(self, o_BSHK, angles_SR):
        """Attention output [B, S, D] from the per-head mix of values: inverse rotation of the
        last R dims, block-diagonal projection per group, dense projection back to D."""
        o = apply_rope(o_BSHK, angles_SR, inverse=True)
        og = o.reshape(*o.shape[:2], self.cfg.o_groups, -1)
        y = self.wo_a(og, "bsgi,gio->bsgo")
        return constrain(self.wo_b(y, "bsgo,god->bsd"), ("batch", "act_seq", "act_embed"))

    def attend_cached(self, q_BSHK, sources):
        """Attention of S queries over explicitly given candidates (the cached path: the
        caller gathered them from a KV cache). `sources` is a list of (kv, mask): kv [B, J, K]
        shared by the S queries or [B, S, J, K] per query, mask [B, S, J] True where the query
        may attend. One float32 softmax over every source's candidates plus the sink, exactly
        as `_attend`; returns [B, S, H, K] in q's dtype."""
        scale = self.cfg.head_dim ** -0.5
        logits = []
        for kv, mask in sources:
            spec = "bshk,bjk->bshj" if kv.ndim == 3 else "bshk,bsjk->bshj"
            lg = jnp.einsum(spec, q_BSHK, kv, preferred_element_type=F32) * scale
            logits.append(jnp.where(mask[:, :, None, :], lg, -jnp.inf))
        logits = jnp.concatenate(logits, axis=-1)
        sink = self.sink[...].astype(F32)[None, None, :, None]
        m = jnp.maximum(jnp.max(logits, -1, keepdims=True), sink)
        e = jnp.exp(logits - m)
        probs = e / (jnp.sum(e, -1, keepdims=True) + jnp.exp(sink - m))
        o, start = 0.0, 0
        for kv, _ in sources:
            p = probs[..., start:start + kv.shape[-2]].astype(kv.dtype)
            start += kv.shape[-2]
            spec = "bshj,bjk->bshk" if kv.ndim == 3 else "bshj,bsjk->bshk"
            o = o + jnp.einsum(spec, p, kv, preferred_element_type=F32)
        return o.astype(q_BSHK.dtype)

    def kv_quant(self, kv):
        """KV entries as DeepSeek stores them: the non-rope dims in e4m3 (quant_kv = fp8)."""
        cfg = self.cfg
        if cfg.quant_kv == "none":
            return kv
        r = cfg.rope_head_dim
        nope = quant.qdq(kv[..., :-r], "e4m3", cfg.quant_kv_block)
        return jnp.concatenate([nope, kv[..., -r:]], axis=-1)

    def _attend_in_chunks(self, per_q, window, shared, dense_csa):
        """`_attend` over chunks of cfg.attn_query_chunk queries, one at a time (lax.map), each
        rematerialised in the backward pass: the [S, H, candidates] logits and the gathered
        top-k entries exist for one chunk at a time. Whole sequence when the chunk is 0, not
        smaller than S, or does not divide S."""
        n, s = self.cfg.attn_query_chunk, per_q["q"].shape[1]
        if not n or n >= s or s % n:
            return self._attend(per_q, window, shared, dense_csa)
        chunks, per_window = s // n, n // self.cfg.window_size

        def split(a, axis, size):  # [..., chunks * size, ...] -> [chunks, ..., size, ...]
            return jnp.moveaxis(a.reshape(*a.shape[:axis], chunks, size, *a.shape[axis + 1:]), axis, 0)

        xs = ({k: split(v, 0 if k == "pos" else 1, n) for k, v in per_q.items()},
              {k: split(v, 1, per_window) for k, v in window.items()})
        body = jax.checkpoint(lambda a: self._attend(a[0], a[1], shared, dense_csa))
        o, (kl, count) = jax.lax.map(body, xs)
        o = jnp.moveaxis(o, 0, 1)
        return o.reshape(o.shape[0], s, *o.shape[3:]), (jnp.sum(kl), jnp.sum(count))

    def _attend(self, per_q, window, shared, dense_csa):
        """Attention output [B, S', H, K] (q's dtype) of the queries in `per_q` (S' of them, a
        whole number of window chunks unless S' = S) and their indexer KL terms."""
        cfg = self.cfg
        q, w = per_q["q"], cfg.window_size
        b, s = q.shape[:2]
        scale = cfg.head_dim ** -0.5
        # sliding window, chunked: each chunk of W queries sees its own and the previous chunk
        keys, wmask = window["keys"], window["mask"]
        logits_w = jnp.einsum("bcqhk,bcjk->bcqhj", _chunk(q, w), keys, preferred_element_type=F32) * scale
        logits_w = jnp.where(wmask[:, :, :, None, :], logits_w, -jnp.inf)
        logits_w = logits_w.reshape(b, -1, *logits_w.shape[3:])[:, :s]  # [B, S, H, 2W]

        comp, kl = None, (jnp.zeros((), F32), jnp.zeros((), jnp.int32))
        if "ckv" in shared:
            comp = self._compressed(per_q, shared, scale, dense_csa)
            logits = jnp.concatenate([logits_w, comp["logits"]], axis=-1)
        else:
            logits = logits_w
        sink = shared["sink"].astype(F32)[None, None, :, None]
        m = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, -1, keepdims=True), sink))
        e = jnp.exp(logits - m)
        probs = e / (jnp.sum(e, -1, keepdims=True) + jnp.exp(sink - m))
        nw = logits_w.shape[-1]
        pw = _chunk(probs[..., :nw], w).astype(keys.dtype)
        o = jnp.einsum("bcqhj,bcjk->bcqhk", pw, keys, preferred_element_type=F32)
        o = o.reshape(b, -1, *o.shape[3:])[:, :s]
        if comp is not None:
            pc = probs[..., nw:]
            o = o + comp["combine"](pc.astype(keys.dtype))
            if self.indexer is not None:
                kl = indexer_kl(comp["index_scores"], pc, comp["mask"])
        return o.astype(q.dtype), kl

    def select_by_mask(self, blocks: int, k: int) -> bool:
        """Whether a CSA query reads its k of `blocks` entries through a mask over all of them
        (model.csa_select)."""
        mode = self.cfg.csa_select
        return blocks <= CSA_MASK_MAX * k if mode == "auto" else mode == "mask"

    def _compressed(self, per_q, shared, scale, dense_csa):
        """Logits [B, S, H, J] of the compressed candidates, a combine function for their
        probabilities, and on CSA layers the index scores / mask the KL loss compares."""
        q, ckv = per_q["q"], shared["ckv"]
        vis = visible(per_q["pos"], per_q["seg"], shared["block_seg"], self.ratio)   # [B, S, T]
        out = {}
        if self.indexer is not None:
            scores = self.indexer.score(per_q["index_q"], per_q["index_w"], shared["index_keys"], vis)
        if self.indexer is None or dense_csa:
            mask = vis                                                        # [B, S, T]
        else:
            idx = self.indexer.select(scores)                                 # [B, S, k]
            mask = chosen(idx, ckv.shape[1]) if self.select_by_mask(ckv.shape[1], idx.shape[-1]) else None
        if mask is not None:
            logits = jnp.einsum("bshk,btk->bsht", q, ckv, preferred_element_type=F32) * scale
            out["logits"] = jnp.where(mask[:, :, None, :], logits, -jnp.inf)
            out["combine"] = lambda p: jnp.einsum("bshj,bjk->bshk", p, ckv, preferred_element_type=F32)
            if self.indexer is not None:
                out["index_scores"], out["mask"] = scores, mask
            return out
        valid = idx >= 0
        safe = jnp.maximum(idx, 0)
        picked = jax.vmap(lambda c, i: c[i])(ckv, safe)                       # [B, S, k, K]
        logits = jnp.einsum("bshk,bsjk->bshj", q, picked, preferred_element_type=F32) * scale
        out["logits"] = jnp.where(valid[:, :, None, :], logits, -jnp.inf)
        out["combine"] = lambda p: jnp.einsum("bshj,bsjk->bshk", p, picked, preferred_element_type=F32)
        out["index_scores"] = jnp.take_along_axis(scores, safe, axis=-1)
        out["mask"] = valid
        return out
