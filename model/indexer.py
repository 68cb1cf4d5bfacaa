"""Lightning indexer of CSA layers: picks, per query, the top-k compressed blocks to attend to.

Legend: B batch, S sequence, T compressed entries, H index heads, K index head dim, Q q_lora,
k top-k.
Score I[s, t] = sum_h w[s, h] * ReLU(q[s, h] . K[t]), w = x @ W_w * K^-0.5 * H^-0.5, with the
index keys K from the indexer's own overlapping compressor and queries from the query latent,
both rotated (YaRN rope). Invisible blocks (incomplete, or of another packed document) score
-inf and, if chosen because fewer than k are visible, come back as index -1.
With quant_indexer = fp4, q and K are rotated by a Hadamard transform and fake-quantised to
e2m1 (blocks of quant_fp4_block) before scoring, as DeepSeek's inference code does; without
it the rotation is skipped (it is orthogonal: float scores are the same).
The input is detached: the language-model loss never trains the indexer; its own KL loss does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import quant
from .compressor import Compressor, visible
from .config import ModelConfig
from .layers import Linear, apply_rope, top_k


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, rngs: nnx.Rngs):
        self.ratio, self.topk = ratio, cfg.index_topk
        self.fp4_block = cfg.quant_fp4_block if cfg.quant_indexer == "fp4" else None
        h, k = cfg.index_n_heads, cfg.index_head_dim
        self.compressor = Compressor(cfg, ratio, k, overlap=True, rngs=rngs)
        self.wq_b = Linear((cfg.q_lora_rank, h, k), ("q_lora_in", "index_heads", "index_head_dim"), cfg, rngs,
                           fp8=True)
        self.weights_proj = Linear((cfg.dim, h), ("embed", "index_heads"), cfg, rngs)
        self.weight_scale = (k ** -0.5) * (h ** -0.5)

    def keys(self, x_BSD, angles_SR, seg_BS):
        """(index keys [B, T, K] of the complete blocks, document id of each block [B, T])."""
        keys_BTK, block_seg = self.compressor(jax.lax.stop_gradient(x_BSD), angles_SR, seg_BS)
        return self.quant_keys(keys_BTK), block_seg

    def quant_keys(self, keys_BTK):
        """Pooled index keys as the scores see them: Hadamard-rotated fp4 with quant_indexer
        (also applied by the cached path to each entry it pools)."""
        if self.fp4_block:
            keys_BTK = quant.qdq(quant.hadamard(keys_BTK), "e2m1", self.fp4_block)
        return keys_BTK

    def queries(self, x_BSD, qr_BSQ, angles_SR):
        """(index queries [B, S, H, K], per-head weights [B, S, H] float32) of every token."""
        x, qr = jax.lax.stop_gradient(x_BSD), jax.lax.stop_gradient(qr_BSQ)
        q_BSHK = apply_rope(self.wq_b(qr, "bsq,qhk->bshk"), angles_SR)
        if self.fp4_block:
            q_BSHK = quant.qdq(quant.hadamard(q_BSHK), "e2m1", self.fp4_block)
        return q_BSHK, self.weights_proj(x).astype(jnp.float32) * self.weight_scale

    @staticmethod
    def score(q_BSHK, w_BSH, keys_BTK, visible_BST):
        """Index scores [B, S, T] in float32, -inf where the block is not visible."""
        logits = jnp.einsum("bshk,btk->bsht", q_BSHK.astype(jnp.float32), keys_BTK)
        scores = jnp.einsum("bsht,bsh->bst", jax.nn.relu(logits), w_BSH)
        return jnp.where(visible_BST, scores, -jnp.inf)

    def scores(self, x_BSD, qr_BSQ, angles_SR, positions_S, seg_BS):
        """Index scores [B, S, T] of every query against every block (float32, -inf where not
        visible): `score` of `queries` against `keys`."""
        keys, block_seg = self.keys(x_BSD, angles_SR, seg_BS)
        q, w = self.queries(x_BSD, qr_BSQ, angles_SR)
        return self.score(q, w, keys, visible(positions_S, seg_BS, block_seg, self.ratio))

    def select(self, scores_BST):
        """Top-k block indices [B, S, k'] with k' = min(topk, T); -1 marks invisible picks
        (visible blocks have finite scores, so a -inf pick is an invisible one)."""
        k = min(self.topk, scores_BST.shape[-1])
        vals, idx = top_k(scores_BST, k)
        return jnp.where(vals > -jnp.inf, idx, -1)


def indexer_kl(index_scores_BSJ, attn_probs_BSHJ, mask_BSJ):
    """(sum over queries of KL(p || softmax(I)), number of queries that see at least one entry).

    p is the main attention's probability mass on each candidate entry summed over heads and
    L1-normalised over the candidates in `mask` (all visible blocks in the dense warm-up, the
    selected top-k afterwards); p is a constant target (no gradient into the main model)."""
    p = jnp.sum(jax.lax.stop_gradient(attn_probs_BSHJ), axis=2)
    p = jnp.where(mask_BSJ, p, 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    logq = jax.nn.log_softmax(jnp.where(mask_BSJ, index_scores_BSJ, -1e30), axis=-1)
    terms = jnp.where(mask_BSJ & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0)
    per_query = jnp.sum(terms, axis=-1)
    valid = jnp.any(mask_BSJ, axis=-1)
    return jnp.sum(jnp.where(valid, per_query, 0.0)), jnp.sum(valid).astype(jnp.int32)
