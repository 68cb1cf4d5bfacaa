"""Speculative greedy decoding with the MTP block: the MTP block drafts, the main model verifies.

Legend: B batch slots, S tokens per slot, N residual streams, D model dim, V vocab.

The MTP block (model/transformer.py, MTPBlock) is trained to predict token t + 2 from the main
model's last residual streams at t and the embedding of token t + 1. Decoding gives it its own
window ring (it is a window-only block: it attends to its own K=V of the last W positions),
holding every position whose next token is known. With several MTP blocks only the first drafts.

One step, for a slot whose cache holds positions < p, with token `tok` at p (produced, not yet
in the cache) and the draft d for p + 1:
1. the main model runs [tok, d] at [p, p + 1] in one pass (infer/verify.py: nothing is written
   while it computes) and gives the greedy tokens g0 (for p + 1) and g1 (for p + 2);
2. d is accepted iff d == g0: then g0 and g1 are produced and positions p, p + 1 committed;
   otherwise g0 alone, and only position p is committed: verify.commit never writes the
   rejected token, so the cache is exactly what plain decoding leaves (nothing to roll back);
3. the MTP block runs at p (streams at p, embedding of g0) and, if accepted, at p + 1 (streams
   at p + 1, embedding of g1), its ring keeping those positions; its argmax at the last one is
   the next draft.
Every produced token is the main model's argmax given the tokens before it: the draft only
decides how many tokens a step yields (1 or 2), so the output is plain greedy decoding's.
Greedy (temperature 0) only.

The prompt: prefill returns the main streams of every prompt position; the MTP block is then
prefilled over positions [0, L) (position t reads prompt token t + 1; L - 1 reads the first
generated token), and its prediction at L - 1 is the first draft.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .cache import Cache, window_store
from .experts import for_decoding
from .step import attention, jit_for, take_last
from .verify import attention_multi, commit, commit_layer, forward_multi

F32 = jnp.float32


def _mtp(model, h_BSND, ids_BS, attend):
    """MTP logits [B, S, V] at positions whose next token is ids_BS, and the attention's extra
    output (`attend` as in Block.with_attention): the training forward's MTP block, cached."""
    mtp = model.mtp[0]
    emb = model.embed[...][ids_BS].astype(h_BSND.dtype)
    x = mtp.e_proj(mtp.enorm(emb))[:, :, None, :] + mtp.h_proj(mtp.hnorm(h_BSND))
    x, extra, _ = mtp.block.with_attention(x.astype(h_BSND.dtype), ids_BS, attend)
    return model.logits(mtp.norm(mtp.hc_head(x))), extra


def mtp_ring(cache: Cache) -> Cache:
    """An empty window ring for the MTP block, stored as the main cache's window rings."""
    b = cache.spec.batch
    return Cache(({"win": window_store(cache.spec).init(b)},), jnp.zeros((b, 1), jnp.int32), cache.spec)


def _mtp_prefill(model, ring, h_BSND, ids_BS, start, lengths_B):
    b, s = ids_BS.shape
    pos = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = pos < lengths_B[:, None]

    def attend(attn, y):
        return attention(attn, y, ring.layers[0], ring.table, ring.spec, pos, valid, start, lengths_B)

    logits, lc = _mtp(model, h_BSND, ids_BS, attend)
    return logits, ring.replace(layers=(lc,))


def spec_step(model, cache, ring, tok_B, draft_B, pos_B):
    """One verify-and-draft step (module docstring): (greedy tokens [B, 2], accepted? [B],
    next drafts [B], cache, MTP ring); slots with pos_B = -1 idle."""
    b = tok_B.shape[0]
    valid = pos_B >= 0
    pos = jnp.where(valid[:, None], pos_B[:, None] + jnp.arange(2, dtype=jnp.int32), -1)
    with for_decoding(model.cfg, 2 * b):
        logits, h, pending = forward_multi(model, cache, jnp.stack([tok_B, draft_B], axis=1), pos)
    g = jnp.argmax(logits, axis=-1).astype(jnp.int32)                       # ties: lower id
    accept = valid & (g[:, 0] == draft_B)
    keep = jnp.where(valid, 1 + accept.astype(jnp.int32), 0)
    cache = commit(cache, pending, pos, keep)
    mpos = jnp.where(jnp.arange(2)[None, :] < keep[:, None], pos, -1)
    lc = ring.layers[0]

    def attend(attn, y):
        return attention_multi(attn, y, lc, ring.table, ring.spec, mpos, mpos >= 0)

    with for_decoding(model.cfg, 2 * b):
        mlogits, pend = _mtp(model, h, g, attend)
    ring = ring.replace(layers=(commit_layer(lc, pend, ring.table, ring.spec, mpos, keep),))
    draft = jnp.argmax(mlogits[jnp.arange(b), jnp.maximum(keep - 1, 0)], axis=-1).astype(jnp.int32)
    return g, accept, draft, cache, ring


def mtp_prefill(model, ring: Cache, hidden_BSND, ids_BS, lengths_B, first_B, chunk: int):
    """The MTP ring filled for prompt positions [0, L) (see the module docstring) and the first
    drafts [B] (for position L + 1)."""
    ids = np.asarray(ids_BS, np.int32)
    b, s = ids.shape
    lengths = np.asarray(lengths_B, np.int32)
    nxt = np.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    nxt[np.arange(b), lengths - 1] = np.asarray(first_B)
    n = -(-s // chunk)
    nxt = np.pad(nxt, ((0, 0), (0, n * chunk - s)))
    hidden = jnp.pad(hidden_BSND, ((0, 0), (0, n * chunk - hidden_BSND.shape[1]), (0, 0), (0, 0)))
    last = jnp.zeros((b, model.cfg.vocab_size), F32)
    step, leaves = jit_for(_mtp_prefill, model, donate=(1,))
    for c in range(n):
        if not (lengths > c * chunk).any():
            break
        cut = slice(c * chunk, (c + 1) * chunk)
        logits, ring = step(leaves, ring, hidden[:, cut], jnp.asarray(nxt[:, cut]), jnp.int32(c * chunk),
                            jnp.asarray(lengths))
        last = take_last(last, logits, lengths, c * chunk)
    return ring, jnp.argmax(last, axis=-1).astype(jnp.int32)


def speculative_decode(model, cache: Cache, ids_BS, lengths_B, logits_BV, hidden_BSND, out, chunk: int):
    """Greedy decoding after prefill (its last logits and streams) with MTP drafts. `out`
    receives the tokens (`out.emit(slot, token) -> finished?`, `out.done` [B] bool).
    Returns (steps: main-model passes, drafts verified, drafts accepted)."""
    tok = np.asarray(jnp.argmax(logits_BV, axis=-1)).astype(np.int32)
    for i in range(len(tok)):
        out.emit(i, int(tok[i]))
    ring, draft = mtp_prefill(model, mtp_ring(cache), hidden_BSND, ids_BS, lengths_B, tok, chunk)
    pos = np.asarray(lengths_B, np.int32).copy()
    steps = drafted = accepted = 0
    step, leaves = jit_for(spec_step, model, donate=(1, 2))
    while not out.done.all():
        positions = np.where(out.done, -1, pos).astype(np.int32)
        g, acc, draft, cache, ring = step(leaves, cache, ring, jnp.asarray(tok), draft, jnp.asarray(positions))
        g, acc, steps = np.asarray(g), np.asarray(acc), steps + 1
        for i in np.flatnonzero(positions >= 0):
            drafted, accepted = drafted + 1, accepted + int(acc[i])
            new = g[i, : 1 + int(acc[i])]
            for t in new:
                if out.emit(i, int(t)):
                    break
            pos[i] += len(new)
            tok[i] = new[-1]
    return steps, drafted, accepted
