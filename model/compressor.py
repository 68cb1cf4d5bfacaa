"""Gated pooling compressor: one KV entry per block of `ratio` tokens (CSA ratio 4, HCA 128).

Legend: B batch, S sequence, T compressed entries (= S // ratio), C ratio (slots per block),
W entry width, D model dim.
Per token, float32 projections give a value and a gate; entry t is the per-channel
softmax(gate + positional bias)-weighted sum of its block's values. With overlap (CSA), the
projections are twice as wide and entry t pools 2C slots: the previous block's first-half
channels and the current block's second-half channels (block 0 has no predecessor: weight 0).
The entry is RMS-normalised and rotated at the position of its block's first token.
Only complete blocks exist. Packed documents never mix: a block pools only the tokens of the
document its last token belongs to, and a query sees a block only if the block is complete
(index < (t + 1) // ratio) and its last token is in the query's document (`visible`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .layers import Linear, RMSNorm, apply_rope, constant


def visible_blocks(positions_S, ratio: int):
    """Number of complete blocks a query at each position may see: (t + 1) // ratio."""
    return (positions_S + 1) // ratio


def visible(positions_S, seg_BS, block_seg_BT, ratio: int):
    """[B, S, T] mask: block t is complete for the query and ends in the query's document."""
    t = block_seg_BT.shape[1]
    done = jnp.arange(t)[None, :] < visible_blocks(positions_S, ratio)[:, None]       # [S, T]
    return done[None] & (block_seg_BT[:, None, :] == seg_BS[:, :, None])


class Compressor(nnx.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, width: int, overlap: bool, rngs: nnx.Rngs):
        self.ratio, self.width, self.overlap = ratio, width, overlap
        out = (2 if overlap else 1) * width
        self.wkv = Linear((cfg.dim, out), ("embed", "compress_out"), cfg, rngs, dtype="float32")
        self.wgate = Linear((cfg.dim, out), ("embed", "compress_out"), cfg, rngs, dtype="float32")
        self.ape = constant((ratio, out), ("compress_slot", "compress_out"), 0.0)
        self.norm = RMSNorm(width, cfg.norm_eps, "compress_width")

    def __call__(self, x_BSD, angles_SR, seg_BS):
        """(compressed entries [B, T, W] float32, document id of each block's last token [B, T])
        for the T = S // ratio complete blocks; `angles_SR` are the rotary angles of every
        position (entry t uses position t * ratio); `seg_BS` the document id of every token."""
        b, s, _ = x_BSD.shape
        c, w = self.ratio, self.width
        t = s // c
        x = x_BSD[:, : t * c].astype(jnp.float32)
        kv = self.wkv(x).reshape(b, t, c, -1)
        score = self.wgate(x).reshape(b, t, c, -1) + self.ape[...]
        seg = seg_BS[:, : t * c].reshape(b, t, c)
        block_seg = seg[:, :, -1]
        score = jnp.where((seg == block_seg[..., None])[..., None], score, -jnp.inf)
        if self.overlap:
            prev_kv = jnp.pad(kv[:, :-1, :, :w], ((0, 0), (1, 0), (0, 0), (0, 0)))
            prev_score = jnp.pad(score[:, :-1, :, :w], ((0, 0), (1, 0), (0, 0), (0, 0)),
                                 constant_values=-jnp.inf)
            prev_seg = jnp.pad(seg[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1)
            prev_score = jnp.where((prev_seg == block_seg[..., None])[..., None], prev_score, -jnp.inf)
            kv = jnp.concatenate([prev_kv, kv[..., w:]], axis=2)            # [B, T, 2C, W]
            score = jnp.concatenate([prev_score, score[..., w:]], axis=2)
        pooled = jnp.sum(kv * jax.nn.softmax(score, axis=2), axis=2)         # [B, T, W]
        return apply_rope(self.norm(pooled), angles_SR[::c][:t]), block_seg

    # --- the pieces, shared with the cached (decoding) path in infer/ ---------------------
    def project(self, x_BSD):
        """Per-token values and gates [B, S, O] in float32 (O = width, twice that with
        overlap), as __call__ computes them; the slot's positional bias `ape[slot]` is not
        yet added to the gates."""
        x = x_BSD.astype(jnp.float32)
        return self.wkv(x), self.wgate(x)

    def pool(self, kv_BTCW, score_BTCW, angles_TR):
        """Entries [B, T, W] of T blocks from their slots' values and scores (gate + ape, -inf
        for slots that do not count; with overlap, the 2C slots already assembled): the
        per-channel softmax-weighted sum, RMS-normalised, rotated by `angles_TR` (the angles
        of each block's first token); the same operations as the end of __call__."""
        pooled = jnp.sum(kv_BTCW * jax.nn.softmax(score_BTCW, axis=2), axis=2)   # [B, T, W]
        return apply_rope(self.norm(pooled), angles_TR)
