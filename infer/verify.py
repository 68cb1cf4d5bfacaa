"""Several new tokens per slot in one step, written to the cache only where they are accepted.

Legend: B batch slots, S new tokens per slot (consecutive positions), H heads, K head dim,
W window, T cache entries per sequence, k top-k, D model dim, N residual streams, V vocab.

Speculative decoding (infer/speculative.py) runs the main model over [token, draft] and learns
only afterwards how many of the S tokens to keep. So this path never writes while it computes:
each layer attends to the cache as it was plus the S new tokens, and hands back its writes as
*pending*; `commit` then applies the writes of each slot's first keep_B[b] tokens. The cache
is thereby exactly what keep_B[b] plain decode steps (infer/step.py) would have left: the window
rows, compressed entries, index keys and compressor partial blocks of rejected tokens never
reach it (nothing to roll back).

A layer's attention over S tokens (everything else in a block is per token):
1. q, K=V, query latent per token: the S tokens of a slot sit at different positions, so the
   projections run on [B * S, 1] rows with one rotary angle each (as a decode step does).
2. Window: candidates are the ring as it was (row i holding the last position before the step
   congruent to i) plus the S new K=V vectors, each masked to the query's window (p - W, p].
3. Compressed layers: the S tokens go through the compressor's partial state one at a time
   (infer/step.py's decode rule, keeping the state after each); the entries read back from the
   pages get the entries of blocks completed in this step laid over them (stored-then-read
   values: the store's round trip), and query i sees block t iff t < (p_i + 1) // R.
4. One softmax over window + compressed candidates with the sink (Attention.attend_cached).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.indexer import Indexer
from model.layers import rope_angles
from model.transformer import layer_block

from .cache import Cache, entry_store, key_store, read_entries, window_store, write_entries
from .step import _compress_decode, embed_streams


def _rows(f, b, s):
    """f applied to [B * S, 1, ...] rows of [B, S, ...] arrays, results back to [B, S, ...]."""
    def call(*args):
        out = f(*(a.reshape(b * s, 1, *a.shape[2:]) for a in args))
        return jax.tree.map(lambda y: y.reshape(b, s, *y.shape[2:]), out)
    return call


def _overlay(entries_BTK, t_BS, ok_BS, x_BSK):
    """Entries as read back after writing x at block t where ok (others dropped)."""
    b, n = entries_BTK.shape[:2]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], t_BS.shape)
    return entries_BTK.at[rows, jnp.where(ok_BS, t_BS, n)].set(x_BSK.astype(entries_BTK.dtype), mode="drop")


def _compress(comp, cfg, state, x_BSD, p_BS, valid_BS):
    """The S tokens through the partial state in order: entries [B, S, K'], block [B, S],
    completed? [B, S], and the states before and after each token, stacked [S + 1, ...]."""
    states, outs = [state], []
    for i in range(x_BSD.shape[1]):
        *out, state = _compress_decode(comp, cfg, state, x_BSD[:, i:i + 1], p_BS[:, i], valid_BS[:, i])
        outs.append(out)
        states.append(state)
    entries, t, ok = (jnp.concatenate(v, axis=1) for v in zip(*outs))
    return entries, t, ok, jax.tree.map(lambda *v: jnp.stack(v), *states)


def attention_multi(attn, x_BSD, lc, table, spec, pos_BS, valid_BS):
    """(output [B, S, D], pending writes) of one layer for S tokens per slot at pos_BS
    (consecutive; -1 where the slot is idle). `lc` is read, never written."""
    cfg, ratio = spec.cfg, attn.ratio
    b, s = pos_BS.shape
    p = jnp.maximum(pos_BS, 0)
    angles = rope_angles(cfg, p, ratio > 0)                                   # [B, S, R/2]
    q, kv, qr = _rows(attn.project, b, s)(x_BSD, angles)
    # window: the ring as it was, then the new tokens
    store, w = window_store(spec), cfg.window_size
    first = (p[:, :1] - 1)
    kpos = jnp.concatenate([first - (first - jnp.arange(w)[None, :]) % w, pos_BS], axis=1)  # [B, W + S]
    qp = pos_BS[:, :, None]
    mask = (kpos[:, None, :] <= qp) & (kpos[:, None, :] > qp - w) & (kpos[:, None, :] >= 0)
    keys = jnp.concatenate([store.read(lc["win"]), store.roundtrip(kv)], axis=1)
    sources, pending = [(keys, mask)], {"win": kv}
    if ratio:
        vis = jnp.arange(spec.max_pages * spec.entries(ratio))[None, None, :] < ((p + 1) // ratio)[..., None]
        entries, t, ok, pending["comp"] = _compress(attn.compressor, cfg, lc["comp"], x_BSD, p, valid_BS)
        entries = attn.kv_quant(entries.astype(q.dtype))
        pending["ckv"], pending["ratio"] = (t, ok, entries), ratio
        estore = entry_store(spec, ratio)
        ckv = _overlay(read_entries(estore, lc["ckv"], table), t, ok, estore.roundtrip(entries))
        if attn.indexer is None:                                             # HCA
            sources.append((ckv, vis))
        else:                                                                # CSA
            ix = attn.indexer
            ikeys, t, ok, pending["icomp"] = _compress(ix.compressor, cfg, lc["icomp"], x_BSD, p, valid_BS)
            ikeys = ix.quant_keys(ikeys)
            pending["ikeys"] = (t, ok, ikeys)
            kstore = key_store(spec, ratio)
            keys_T = _overlay(read_entries(kstore, lc["ikeys"], table), t, ok, kstore.roundtrip(ikeys))
            iq, iw = _rows(ix.queries, b, s)(x_BSD, qr, angles)
            idx = ix.select(Indexer.score(iq, iw, keys_T, vis))              # [B, S, k]
            picked = jax.vmap(lambda c, i: c[i])(ckv, jnp.maximum(idx, 0))   # [B, S, k, K]
            sources.append((picked, idx >= 0))
    o = attn.attend_cached(q, sources)
    return _rows(attn.output, b, s)(o, angles), pending


def commit_layer(lc, pending, table, spec, pos_BS, keep_B):
    """The layer cache `lc` with the pending writes of each slot's first keep_B[b] tokens."""
    b, s = pos_BS.shape
    kept = (jnp.arange(s)[None, :] < keep_B[:, None]) & (pos_BS >= 0)        # [B, S]
    lc = dict(lc)
    page = jnp.where(kept, jnp.arange(b)[:, None], b).reshape(-1)
    row = (jnp.maximum(pos_BS, 0) % spec.cfg.window_size).reshape(-1)
    lc["win"] = window_store(spec).write(lc["win"], page, row, pending["win"].reshape(b * s, -1))
    ratio = pending.get("ratio", 0)
    for name, comp, store in (("ckv", "comp", entry_store), ("ikeys", "icomp", key_store)):
        if name in pending:
            t, ok, x = pending[name]
            lc[name] = write_entries(store(spec, ratio), lc[name], table, t, ok & kept, x, spec.num_pages)
            # the partial state after each slot's last kept token (index 0: before the step)
            lc[comp] = jax.tree.map(lambda v: v[keep_B, jnp.arange(b)], pending[comp])
    return lc


def forward_multi(model, cache: Cache, ids_BS, pos_BS):
    """(logits [B, S, V], last hidden streams [B, S, N, D], pending writes per layer) of S
    tokens per slot at positions pos_BS (pos_B + [0, S), or -1 for an idle slot)."""
    spec = cache.spec
    valid = pos_BS >= 0
    x = embed_streams(model, ids_BS)
    pending = []
    for i, lc in enumerate(cache.layers):
        def attend(attn, y, lc=lc):
            return attention_multi(attn, y, lc, cache.table, spec, pos_BS, valid)

        x, pend, _ = layer_block(model, i).with_attention(x, ids_BS, attend)
        pending.append(pend)
    return model.logits(model.norm(model.hc_head(x))), x, tuple(pending)


def commit(cache: Cache, pending, pos_BS, keep_B) -> Cache:
    """The cache with the pending writes (forward_multi's) of each slot's first keep_B tokens."""
    layers = tuple(commit_layer(lc, p, cache.table, cache.spec, pos_BS, keep_B)
                   for lc, p in zip(cache.layers, pending))
    return cache.replace(layers=layers)
