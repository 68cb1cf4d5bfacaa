"""Cached attention: prefill (a prompt in chunks) and decode (one token per slot) of DeepSeek-V4.

Legend: B batch slots, S new tokens per slot (1 when decoding, the chunk when prefilling),
H heads, K head dim, W window, R ratio, O compressor width, T cache entries per sequence,
k top-k, D model dim, N residual streams, V vocab.

A layer's attention on the cached path (everything else in a block is per token and runs as the
training forward does, through Block.with_attention):
1. q, K=V, query latent of the new tokens (Attention.project).
2. Window: decode writes the token into its ring row and attends to the whole ring (rows whose
   position is < 0 masked); prefill attends to the ring (the W tokens before the chunk) plus the
   chunk's own tokens, then moves the chunk's last W tokens into the ring.
3. Compressed layers: the compressor's partial state absorbs the new tokens; each block that
   completes is pooled (Compressor.pool) into an entry and written to the page of its block;
   then every entry of the sequence is read back and block t is visible iff t < (p + 1) // R,
   as in the training forward. HCA attends to all visible entries; CSA scores every visible
   index key (Indexer.score) and attends to the top-k (Indexer.select: the same jax.lax.top_k
   over entries in block order, so ties break to the lower block exactly as in prefill).
4. One softmax over window + compressed candidates with the sink (Attention.attend_cached).
Prefill chunks start at multiples of the chunk, itself a multiple of every ratio, so blocks never
straddle chunks; a prompt's incomplete last block stays in the partial state for decoding.
Several tokens per slot with deferred writes (speculative decoding's verify step): verify.py.
Steps run fastest on a model whose layers are not stacked (infer.layout.unscan); decode steps
compute routed experts by gathering them (infer/experts.py) when that reads less.
"""
from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
from flax import nnx

from model.indexer import Indexer
from model.layers import dtype_of, rope_angles
from model.transformer import layer_block

from .cache import Cache, entry_store, key_store, read_entries, window_store, write_entries
from .experts import for_decoding

F32 = jnp.float32


def _angles(cfg, pos_BS, compressed: bool, decode: bool):
    """Rotary angles of the new tokens: [B, 1, R/2] when decoding (apply_rope broadcasts
    them over heads correctly only because S = 1), [S, R/2] when prefilling (every slot's
    chunk covers the same positions)."""
    return rope_angles(cfg, pos_BS if decode else pos_BS[0], compressed)


# --- the compressor's partial blocks ---------------------------------------------------------
def _pool(comp, cfg, prev_kv, prev_sc, cur_kv, cur_sc, t):
    """Entries [M, K'] of M blocks (block index t [M]) from their slots [M, R, O] and, with
    overlap, the previous block's (its first-half channels; -inf for block 0: no predecessor)."""
    if comp.overlap:
        w = comp.width
        prev_sc = jnp.where((t == 0)[:, None, None], -jnp.inf, prev_sc)
        kv = jnp.concatenate([prev_kv[..., :w], cur_kv[..., w:]], axis=1)   # [M, 2R, K']
        sc = jnp.concatenate([prev_sc[..., :w], cur_sc[..., w:]], axis=1)
    else:
        kv, sc = cur_kv, cur_sc
    return comp.pool(kv[None], sc[None], rope_angles(cfg, t * comp.ratio, True))[0]


def _compress_decode(comp, cfg, state, x_B1D, pos_B, valid_B):
    """One token per slot into the current block; the block is pooled when the token is its
    last. Returns (entries [B, 1, K'], block index [B, 1], written? [B, 1], new state)."""
    r = comp.ratio
    kv, gate = comp.project(x_B1D)                                        # [B, 1, O]
    slot = pos_B % r
    score = gate[:, 0] + comp.ape[...][slot]
    put = (valid_B[:, None] & (jnp.arange(r)[None, :] == slot[:, None]))[..., None]   # [B, R, 1]
    cur_kv = jnp.where(put, kv, state["kv"][:, 1])
    cur_sc = jnp.where(put, score[:, None], state["score"][:, 1])
    t = pos_B // r
    entry = _pool(comp, cfg, state["kv"][:, 0], state["score"][:, 0], cur_kv, cur_sc, t)
    done = valid_B & (slot == r - 1)
    keep = done[:, None, None]
    new = {"kv": jnp.stack([jnp.where(keep, cur_kv, state["kv"][:, 0]), cur_kv], axis=1),
           "score": jnp.stack([jnp.where(keep, cur_sc, state["score"][:, 0]), cur_sc], axis=1)}
    return entry[:, None], t[:, None], done[:, None], new


def _compress_prefill(comp, cfg, state, x_BSD, start, lengths_B):
    """A chunk of S tokens starting at `start` (a multiple of R): its S / R blocks, complete
    where all their tokens are in the prompt. The new state keeps the block holding the next
    token (current) and the one before (previous). Returns as _compress_decode, [B, S / R]."""
    r, b, s = comp.ratio, x_BSD.shape[0], x_BSD.shape[1]
    nb = s // r
    kv, gate = comp.project(x_BSD)
    kv = kv.reshape(b, nb, r, -1)
    score = gate.reshape(b, nb, r, -1) + comp.ape[...]                    # as Compressor.__call__
    t = start // r + jnp.arange(nb)
    ext_kv = jnp.concatenate([state["kv"][:, :1], kv, jnp.zeros_like(kv[:, :1])], axis=1)
    ext_sc = jnp.concatenate([state["score"][:, :1], score, jnp.zeros_like(score[:, :1])], axis=1)
    flat = lambda a: a.reshape(b * nb, r, -1)
    entries = _pool(comp, cfg, flat(ext_kv[:, :nb]), flat(ext_sc[:, :nb]), flat(kv), flat(score),
                    jnp.tile(t, b)).reshape(b, nb, -1)
    done = (t[None, :] + 1) * r <= lengths_B[:, None]
    # after the chunk the next token is at min(L, start + S): its block is ext index local + 1
    local = jnp.clip(jnp.minimum(lengths_B, start + s) // r - start // r, 0, nb)
    pick = lambda a: jnp.take_along_axis(a, (local[:, None] + jnp.arange(2))[:, :, None, None], axis=1)
    busy = (lengths_B > start)[:, None, None, None]
    new = {"kv": jnp.where(busy, pick(ext_kv), state["kv"]),
           "score": jnp.where(busy, pick(ext_sc), state["score"])}
    return entries, jnp.broadcast_to(t, (b, nb)), done, new


# --- one layer's attention -----------------------------------------------------------------------
def _window(attn, spec, ring, kv_BSK, pos_BS, valid_BS, start):
    """(window source (keys, mask), new ring)."""
    store, w = window_store(spec), spec.cfg.window_size
    b, s = pos_BS.shape
    rows = jnp.arange(w)
    if start is None:   # decode: write first, then the ring holds exactly the window
        p = jnp.maximum(pos_BS[:, 0], 0)
        ring = store.write(ring, jnp.where(valid_BS[:, 0], jnp.arange(b), b), p % w, kv_BSK[:, 0])
        kpos = p[:, None] - (p[:, None] - rows[None, :]) % w             # [B, W]
        return (store.read(ring), (kpos >= 0)[:, None, :]), ring
    # prefill: ring rows hold the W positions before the chunk (negative = none yet)
    kpos = jnp.concatenate([start - 1 - (start - 1 - rows) % w, pos_BS[0]])      # [W + S]
    q = pos_BS[0][:, None]
    mask = (kpos[None, :] <= q) & (kpos[None, :] > q - w) & (kpos[None, :] >= 0)
    keys = jnp.concatenate([store.read(ring), store.roundtrip(kv_BSK)], axis=1)
    # row i then holds the last position < min(L, start + S) congruent to i, if in this chunk
    last = jnp.sum(valid_BS, axis=1) + start - 1                             # [B]
    target = last[:, None] - (last[:, None] - rows[None, :]) % w            # [B, W]
    ok = target >= start
    src = jnp.take_along_axis(kv_BSK, jnp.clip(target - start, 0, s - 1)[..., None], axis=1)
    page = jnp.where(ok, jnp.arange(b)[:, None], b).reshape(-1)
    ring = store.write(ring, page, jnp.tile(rows, b), src.reshape(b * w, -1))
    return (keys, jnp.broadcast_to(mask, (b, s, w + s))), ring


def attention(attn, x_BSD, lc, table, spec, pos_BS, valid_BS, start, lengths_B):
    """The cached attention of one layer: (output [B, S, D], new layer cache). `start` is None
    when decoding (S = 1), else the prefill chunk's first position (lengths_B: prompt lengths)."""
    cfg, decode = spec.cfg, start is None
    ratio = attn.ratio
    angles = _angles(cfg, pos_BS, ratio > 0, decode)
    q, kv, qr = attn.project(x_BSD, angles)
    lc = dict(lc)
    src, lc["win"] = _window(attn, spec, lc["win"], kv, pos_BS, valid_BS, start)
    sources = [src]
    if ratio:
        p = jnp.maximum(pos_BS, 0)
        vis = jnp.arange(spec.max_pages * spec.entries(ratio))[None, None, :] < ((p + 1) // ratio)[..., None]

        def compress(comp, state):
            if decode:
                return _compress_decode(comp, cfg, state, x_BSD, p[:, 0], valid_BS[:, 0])
            return _compress_prefill(comp, cfg, state, x_BSD, start, lengths_B)

        entries, t, ok, lc["comp"] = compress(attn.compressor, lc["comp"])
        store = entry_store(spec, ratio)
        lc["ckv"] = write_entries(store, lc["ckv"], table, t, ok, attn.kv_quant(entries.astype(q.dtype)),
                                  spec.num_pages)
        ckv = read_entries(store, lc["ckv"], table)                          # [B, T, K]
        if attn.indexer is None:                                             # HCA: every visible entry
            sources.append((ckv, vis))
        else:                                                                # CSA: the indexer's top-k
            ix = attn.indexer
            ikeys, t, ok, lc["icomp"] = compress(ix.compressor, lc["icomp"])
            kstore = key_store(spec, ratio)
            lc["ikeys"] = write_entries(kstore, lc["ikeys"], table, t, ok, ix.quant_keys(ikeys),
                                        spec.num_pages)
            iq, iw = ix.queries(x_BSD, qr, angles)
            scores = Indexer.score(iq, iw, read_entries(kstore, lc["ikeys"], table), vis)
            idx = ix.select(scores)                                          # [B, S, k]
            picked = jax.vmap(lambda c, i: c[i])(ckv, jnp.maximum(idx, 0))   # [B, S, k, K]
            sources.append((picked, idx >= 0))
    o = attn.attend_cached(q, sources)
    return attn.output(o, angles), lc


# --- the whole model --------------------------------------------------------------------------
def embed_streams(model, ids_BS):
    """The N residual streams [B, S, N, D] a block stack starts from: each token's embedding."""
    cfg = model.cfg
    emb = model.embed[...][ids_BS].astype(dtype_of(cfg.dtype))
    return jnp.broadcast_to(emb[:, :, None, :], (*ids_BS.shape, cfg.hc_mult, cfg.dim))


def take_last(last_BV, logits_BCV, lengths, start: int):
    """last_BV with each row whose prompt ends in this chunk (of logits_BCV, from position
    `start`; lengths numpy) replaced by the logits of that prompt's last token."""
    import numpy as np

    b, c = logits_BCV.shape[:2]
    i = lengths - 1 - start
    here = jnp.asarray((i >= 0) & (i < c))
    return jnp.where(here[:, None], logits_BCV[jnp.arange(b), jnp.asarray(np.clip(i, 0, c - 1))], last_BV)


def forward_cached(model, cache: Cache, ids_BS, pos_BS, valid_BS, start=None, lengths_B=None):
    """(logits [B, S, V] of the new tokens, the updated cache (see `attention`), the last
    layer's residual streams [B, S, N, D]: what the MTP block reads)."""
    spec = cache.spec
    x = embed_streams(model, ids_BS)
    layers = []
    for i, lc in enumerate(cache.layers):
        attend = lambda attn, y, lc=lc: attention(attn, y, lc, cache.table, spec, pos_BS, valid_BS,
                                                  start, lengths_B)
        x, lc, _ = layer_block(model, i).with_attention(x, ids_BS, attend)
        layers.append(lc)
    logits = model.logits(model.norm(model.hc_head(x)))
    return logits, cache.replace(layers=tuple(layers)), x


# --- jitted steps, bound to one model structure -----------------------------------------------
@lru_cache(maxsize=64)
def _jitted(fn, graphdef, treedef, static, donate):
    def call(leaves, *args):
        return fn(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *args, **dict(static))
    return jax.jit(call, donate_argnums=donate)


def jit_for(fn, model, donate=(), **static):
    """(step, leaves): `fn(model, *args, **static)` jitted for models of this structure, called as
    step(leaves, *args) with the model's arrays as a flat list (`donate` indexes that call).
    The jitted function is remembered per (fn, graph, static values), so equal models share it.
    The model's structure is bound rather than passed: as a static argument jax.jit would hash
    the graphdef on every call (0.9 ms for `tiny`, more than its decode step at batch 1), and
    flattening the nnx State's Variables would cost another 0.2-0.4 ms a call."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return _jitted(fn, graphdef, treedef, tuple(sorted(static.items())), tuple(donate)), leaves


def decode_logits(model, cache, tokens_B, positions_B):
    """One decode step (see `decode_step`): (logits [B, V], cache)."""
    pos = positions_B.astype(jnp.int32)[:, None]
    with for_decoding(model.cfg, pos.shape[0]):
        logits, cache, _ = forward_cached(model, cache, tokens_B.astype(jnp.int32)[:, None], pos, pos >= 0)
    return logits[:, 0], cache


def _prefill(model, cache, ids_BS, start, lengths_B):
    b, s = ids_BS.shape
    pos = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    return forward_cached(model, cache, ids_BS, pos, pos < lengths_B[:, None], start, lengths_B)


# --- public entry points --------------------------------------------------------------------
def default_chunk(cfg) -> int:
    """Prefill chunk: the page size rule (a multiple of every ratio, >= 64 tokens)."""
    from .cache import default_page_tokens
    return default_page_tokens(cfg)


def decode_step(model, cache: Cache, tokens_B, positions_B):
    """One new token per slot: token tokens_B[b] at position positions_B[b] (-1: slot idle,
    nothing written). Slots may be at different positions, each < cache.spec.max_len (not
    checked inside the jitted step), with every earlier position already processed. Returns
    (logits [B, V] float32, cache); the cache passed in is donated (do not use it again)."""
    step, leaves = jit_for(decode_logits, model, donate=(1,))
    return step(leaves, cache, jnp.asarray(tokens_B, jnp.int32), jnp.asarray(positions_B, jnp.int32))


def prefill(model, ids_BS, cache: Cache, lengths_B=None, *, chunk: int | None = None,
            all_logits: bool = False, hidden: bool = False):
    """Process prompts from position 0: row b of ids_BS (left-aligned, padded) holds a prompt of
    lengths_B[b] tokens (default: the whole row; 0 leaves the slot untouched, so one slot can
    start a new sequence while the others are mid-decode). Chunks of `chunk` tokens (a multiple
    of every compression ratio) bound the attention logits to chunk x (window + chunk + entries).
    Returns (logits of each prompt's last token [B, V], or of every position [B, S, V] with
    all_logits, cache), and with `hidden` a third item: the last layer's residual streams of
    every position [B, S, N, D] (the MTP block's input); the cache passed in is donated."""
    import numpy as np

    from model.config import ConfigError

    cfg, spec = model.cfg, cache.spec
    chunk = chunk or default_chunk(cfg)
    bad = [r for r in cfg.compress_ratios if r and chunk % r]
    if bad:
        raise ConfigError(f"chunk: {chunk} is not a multiple of the compression ratio {bad[0]}")
    ids = np.asarray(ids_BS, np.int32)
    b, s = ids.shape
    lengths = np.full((b,), s, np.int32) if lengths_B is None else np.asarray(lengths_B, np.int32)
    if b != spec.batch or lengths.shape != (b,) or lengths.max() > min(s, spec.max_len) or lengths.min() < 0:
        raise ConfigError(f"prefill: ids {ids.shape} / lengths {lengths.tolist()} do not fit a cache of "
                          f"{spec.batch} slots and max_len {spec.max_len}")
    n = -(-s // chunk)
    ids = np.pad(ids, ((0, 0), (0, n * chunk - s)))
    step, leaves = jit_for(_prefill, model, donate=(1,))
    lengths_j = jnp.asarray(lengths)
    outs, hs, last = [], [], jnp.zeros((b, cfg.vocab_size), F32)
    for c in range(n):
        if not (lengths > c * chunk).any():
            break
        logits, cache, h = step(leaves, cache, jnp.asarray(ids[:, c * chunk:(c + 1) * chunk]), jnp.int32(c * chunk),
                                lengths_j)
        last = take_last(last, logits, lengths, c * chunk)
        if all_logits:
            outs.append(logits)
        if hidden:
            hs.append(h)
    out = (jnp.concatenate(outs, axis=1)[:, :s] if all_logits else last, cache)
    return out + (jnp.concatenate(hs, axis=1)[:, :s],) if hidden else out
