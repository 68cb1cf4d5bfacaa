"""The DeepSeek-V4 network: blocks with mHC residual streams, scanned layer stacks, MTP heads.

Legend: B batch, S sequence, N residual streams, D model dim, V vocab, E experts, L layers.

Scanning mixed layers: a layer's *kind* is (compression ratio, hash routed). The layer list is
cut greedily into segments, each a unit of 1..scan_max_period consecutive kinds repeated
`count` times; a segment with count > 1 stores each unit position's parameters stacked on a
leading `layers` axis and runs with one `nnx.scan` (one copy in the HLO whatever the count).
V4-Flash becomes [2 x (window, hash)] [1 x (CSA, hash)] [20 x ((HCA), (CSA))]: three traced
bodies for 43 layers. Every layer lands in exactly one segment (no leftover is dropped).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from .attention import Attention
from .config import ModelConfig
from .hyper import HyperConnection, HyperHead
from .layers import Linear, RMSNorm, constrain, dtype_of, normal, rope_angles
from .moe import MoE, balanced_hash_table

F32 = jnp.float32
Kind = tuple  # (ratio, hashed)


def plan_segments(kinds: list[Kind], max_period: int) -> list[tuple[int, tuple[Kind, ...], int]]:
    """Greedy cover of the layer list by (start, unit, count) segments, largest cover first."""
    segments, i = [], 0
    while i < len(kinds):
        best = (1, 1)
        for p in range(1, max_period + 1):
            unit = kinds[i:i + p]
            if len(unit) < p:
                break
            count = 1
            while kinds[i + count * p: i + (count + 1) * p] == unit:
                count += 1
            if (count >= 2 or p == 1) and p * count > best[0] * best[1]:
                best = (p, count)
        p, count = best
        segments.append((i, tuple(kinds[i:i + p]), count))
        i += p * count
    return segments


def model_segments(cfg: ModelConfig) -> list[tuple[int, tuple[Kind, ...], int]]:
    """The (start, unit, count) segments Model builds for cfg's layers; a segment runs as a
    layer loop when count > 1 and cfg.scan_unroll < count (Segment: else it is unrolled)."""
    return plan_segments([cfg.layer_kind(i) for i in range(cfg.n_layers)], cfg.scan_max_period)


@struct.dataclass
class ModelAux:
    """Extra outputs. Per-layer arrays have one row per main layer, then one per MTP block."""
    mtp_logits: tuple            # n_mtp_layers x [B, S, V]; MTP block j predicts token t + j + 2
                                 # (empty from Model.features: the loss applies the head)
    expert_counts: jax.Array     # [L, E] int32 (token, slot) pairs routed to each expert
    balance_f: jax.Array         # [L, B, E] sequence-wise balance loss terms f_i ...
    balance_p: jax.Array         # [L, B, E] ... and P_i; loss = alpha * mean_B sum_i f_i P_i
    indexer_kl: jax.Array        # [L] indexer KL summed over queries (0 on non-CSA layers) ...
    indexer_queries: jax.Array   # [L] int32 ... over this many queries (mean = kl / queries)
    dropped_tokens: jax.Array    # [L] int32 (token, slot) pairs dropped by a capacity transport


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: Kind, rngs: nnx.Rngs):
        ratio, hashed = kind
        self.attn_hc = HyperConnection(cfg, rngs)
        self.ffn_hc = HyperConnection(cfg, rngs)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed")
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed")
        self.attn = Attention(cfg, ratio, rngs)
        self.ffn = MoE(cfg, hashed, rngs)
        self.compressed = ratio > 0

    def __call__(self, x_BSND, ids_BS, positions_S, angles, seg_BS, dense_csa=False):
        x_BSND, kl, stats = self.with_attention(
            x_BSND, ids_BS, lambda attn, y: attn(y, positions_S, angles[int(self.compressed)], seg_BS,
                                                 dense_csa=dense_csa))
        stats["kl"], stats["kl_queries"] = kl
        return x_BSND, stats

    def with_attention(self, x_BSND, ids_BS, attend):
        """The block with `attend(attn, normalised input [B, S, D]) -> (output [B, S, D], extra)`
        as its attention call: __call__ passes the whole-sequence attention, the cached path
        (infer/) one that reads and writes a KV cache. Returns (x, extra, MoE stats)."""
        y, post, comb = self.attn_hc(x_BSND)
        y, extra = attend(self.attn, self.attn_norm(y))
        x_BSND = HyperConnection.merge(y, x_BSND, post, comb)
        y, post, comb = self.ffn_hc(x_BSND)
        y, stats = self.ffn(self.ffn_norm(y), ids_BS)
        return HyperConnection.merge(y, x_BSND, post, comb), extra, stats


class Segment(nnx.Module):
    """`count` repetitions of a unit of consecutive layer kinds, scanned when count > 1
    (cfg.scan_unroll repetitions per loop iteration)."""

    def __init__(self, cfg: ModelConfig, start: int, unit: tuple[Kind, ...], count: int, rngs: nnx.Rngs):
        self.start, self.period, self.count = start, len(unit), count
        self.unroll = min(cfg.scan_unroll, count)  # count: no loop at all
        self.call = _remat(cfg)
        blocks = []
        for j, kind in enumerate(unit):
            if count == 1:
                blocks.append(Block(cfg, kind, rngs))
            else:
                blocks.append(_stacked_block(cfg, kind, count, rngs))
            if kind[1]:  # hash-routed: one seeded table per layer
                layers = [start + i * self.period + j for i in range(count)]
                tables = [balanced_hash_table(cfg.vocab_size, cfg.n_routed_experts,
                                              cfg.n_activated_experts, cfg.hash_seed + l) for l in layers]
                blocks[-1].ffn.tid2eid.set_value(jnp.asarray(tables[0] if count == 1 else np.stack(tables)))
        self.blocks = nnx.List(blocks)

    def __call__(self, x, ids, positions, angles, seg, dense_csa=False):
        """Returns (x, per-layer stats stacked in layer order on a leading axis)."""
        if self.count == 1:
            outs = []
            for blk in self.blocks:
                x, st = self.call(blk, x, ids, positions, angles, seg, dense_csa)
                outs.append(st)
            return x, jax.tree.map(lambda *v: jnp.stack(v), *outs)

        @nnx.scan(in_axes=(0, nnx.Carry, None, None, None, None), out_axes=(nnx.Carry, 0),
                  unroll=self.unroll)
        def body(blocks, x, ids, positions, angles, seg):
            outs = []
            for blk in blocks:
                x, st = self.call(blk, x, ids, positions, angles, seg, dense_csa)
                outs.append(st)
            return x, jax.tree.map(lambda *v: jnp.stack(v), *outs)  # [period, ...]

        x, st = body(tuple(self.blocks), x, ids, positions, angles, seg)  # [count, period, ...]
        return x, jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), st)


def _remat(cfg: ModelConfig):
    """The block call, rematerialised per cfg.remat. Its input stream and parameters pass one
    optimisation barrier together, so in the backward its input's cotangent and its weight
    gradients leave together: the next block's backward cannot start before this block's
    weight gradients are done. Without it libtpu deferred the MTP block's expert and attention
    weight gradients past the whole layer loop's backward, keeping their inputs live there:
    v4-flash-pod on v5p-1024 compiled to 6.02 + 30.04 GiB, with the barrier 6.02 + 23.70 GiB
    (docs/benchmarks.md). Values are unchanged."""
    def call(blk, x, *args):
        graphdef, params, rest = nnx.split(blk, nnx.Param, ...)
        x, params = jax.lax.optimization_barrier((x, params))
        return nnx.merge(graphdef, params, rest)(x, *args)

    if cfg.remat == "none":
        return call
    policy = jax.checkpoint_policies.checkpoint_dots if cfg.remat == "save_matmuls" else None
    return nnx.remat(call, policy=policy, static_argnums=(6,))  # dense_csa: a Python bool


def _stacked_block(cfg: ModelConfig, kind: Kind, count: int, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, kind, r)

    return make(rngs)


class MTPBlock(nnx.Module):
    """Predicts one token further: block(e_proj(norm(embed(next ids))) + h_proj(norm(streams)))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, "embed")
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, "embed")
        self.e_proj = Linear((cfg.dim, cfg.dim), ("embed", "embed_out"), cfg, rngs, fp8=True)
        self.h_proj = Linear((cfg.dim, cfg.dim), ("embed", "embed_out"), cfg, rngs, fp8=True)
        self.block = Block(cfg, (0, False), rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed")
        self.hc_head = HyperHead(cfg, rngs)
        self.call = _remat(cfg)  # rematerialised like the main layers (a whole layer's residuals)

    def __call__(self, h_BSND, emb_BSD, ids_BS, positions, angles, seg_BS):
        x = self.e_proj(self.enorm(emb_BSD))[:, :, None, :] + self.h_proj(self.hnorm(h_BSND))
        x, stats = self.call(self.block, x.astype(h_BSND.dtype), ids_BS, positions, angles, seg_BS, False)
        return x, self.norm(self.hc_head(x)), stats


class Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = normal(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), 1.0, cfg.param_dtype)
        self.segments = nnx.List([Segment(cfg, start, unit, count, rngs) for start, unit, count in model_segments(cfg)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed")
        self.hc_head = HyperHead(cfg, rngs)
        # DeepSeek computes the logits from float32 weights and inputs whatever the model dtype
        self.head = Linear((cfg.dim, cfg.vocab_size), ("embed", "vocab"), cfg, rngs, dtype="float32")
        self.mtp = nnx.List([MTPBlock(cfg, rngs) for _ in range(cfg.n_mtp_layers)])

    def logits(self, x_BSD):
        return constrain(self.head(x_BSD).astype(F32), ("batch", "act_seq", "act_vocab"))

    def __call__(self, input_ids, *, segment_ids=None, dense_csa: bool = False):
        """input_ids int32 [B, S] -> (logits [B, S, V] float32, ModelAux).

        segment_ids int32 [B, S] (optional): document id of each token of packed sequences;
        attention, compressors and indexers never look across documents. dense_csa: CSA layers
        attend to every visible block (the indexer's dense warm-up)."""
        hs, aux = self.features(input_ids, segment_ids=segment_ids, dense_csa=dense_csa)
        return self.logits(hs[0]), aux.replace(mtp_logits=tuple(self.logits(h) for h in hs[1:]))

    def features(self, input_ids, *, segment_ids=None, dense_csa: bool = False):
        """What the head reads: ((main [B, S, D], one per MTP block), ModelAux without logits).
        The training loss applies the head itself, a vocabulary slice at a time
        (train/step.py head_ce), so that no [B, S, V] logits are kept for the backward."""
        cfg = self.cfg
        b, s = input_ids.shape
        seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        positions = jnp.arange(s)
        angles = (rope_angles(cfg, positions, False), rope_angles(cfg, positions, True))
        # gather the (vocab / FSDP sharded) table whole before the lookup: a lookup into a table
        # sharded on the batch's own mesh axes would make the partitioner replicate the result
        table = constrain(self.embed[...], (None, None))
        ids = [input_ids]  # then the tokens each MTP block reads: one further each
        for _ in self.mtp:
            ids.append(jnp.concatenate([ids[-1][:, 1:], jnp.zeros_like(ids[-1][:, :1])], axis=1))
        # one lookup for all: its backward is one scatter-add into a whole [V, D] float32 table
        # on every device (one per lookup were the largest buffers of a pod step's end)
        embs = table[jnp.stack(ids)].astype(dtype_of(cfg.dtype))
        x = jnp.broadcast_to(embs[0][:, :, None, :], (b, s, cfg.hc_mult, cfg.dim))
        x = constrain(x, ("batch", "act_seq", None, "act_embed"))
        stats = []
        for segment in self.segments:
            x, st = segment(x, input_ids, positions, angles, seg, dense_csa)
            stats.append(st)
        hs = [self.norm(self.hc_head(x))]
        for j, mtp in enumerate(self.mtp):
            x, h, st = mtp(x, embs[j + 1], ids[j + 1], positions, angles, seg)
            hs.append(h)
            stats.append(jax.tree.map(lambda v: v[None], st))
        st = jax.tree.map(lambda *v: jnp.concatenate(v), *stats)
        return tuple(hs), ModelAux((), st["counts"], st["f"], st["p"], st["kl"], st["kl_queries"], st["dropped"])


def layer_block(model: Model, layer: int) -> Block:
    """Main layer `layer` as a standalone Block (sliced out of its stack when scanned)."""
    for seg in model.segments:
        if seg.start <= layer < seg.start + seg.period * seg.count:
            i, j = divmod(layer - seg.start, seg.period)
            blk = seg.blocks[j]
            if seg.count == 1:
                return blk
            graphdef, state = nnx.split(blk)
            return nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state))
    raise IndexError(f"layer {layer} out of range (n_layers={model.cfg.n_layers})")


def update_routing_bias(model: Model, counts_LE, gamma: float) -> None:
    """Auxiliary-loss-free balancing: on every score-routed layer (MTP included; rows of
    `counts_LE` in ModelAux order), bias_i -= gamma if expert i got more than its fair share of
    (token, slot) pairs, += gamma if fewer."""
    counts = counts_LE.astype(F32)
    delta = -gamma * jnp.sign(counts - counts.mean(-1, keepdims=True))
    for seg in model.segments:
        for j, blk in enumerate(seg.blocks):
            if not hasattr(blk.ffn, "bias"):
                continue
            rows = delta[jnp.asarray([seg.start + i * seg.period + j for i in range(seg.count)])]
            blk.ffn.bias.set_value(blk.ffn.bias.get_value() + (rows[0] if seg.count == 1 else rows))
    for m, mtp in enumerate(model.mtp):
        mtp.block.ffn.bias.set_value(mtp.block.ffn.bias.get_value() + delta[model.cfg.n_layers + m])


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Model:
    """A randomly initialised model (parameters in cfg.param_dtype)."""
    return Model(cfg, rngs)


def abstract(cfg: ModelConfig) -> Model:
    """The model's structure with ShapeDtypeStruct leaves: no memory, any size."""
    return nnx.eval_shape(lambda: Model(cfg, nnx.Rngs(0)))
