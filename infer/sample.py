"""Sampling a next token from logits, and `generate`: prompts in, new tokens out.

Legend: B sequences, V vocab.
temperature 0 is greedy (argmax, ties to the lower id). Otherwise the logits are divided by the
temperature, cut to the top_k largest (0 = no cut) and to the smallest set of largest tokens
whose probability reaches top_p (the most likely token always stays), then one token is drawn
per sequence with jax.random.categorical. A run is reproducible from its seed: step i draws
with jax.random.fold_in(key(seed), i).
`generate` checks its inputs first (`check_inputs`: one-line ConfigErrors, nothing built yet),
builds a cache for a context of max_len tokens (at most the model's maximum position,
`max_positions`), prefills the prompts and decodes them as one batch; `speculative=True` decodes
greedily with the MTP block's drafts (infer/speculative.py: the same tokens, fewer main-model
steps when drafts are accepted); `on_token` streams the tokens as they are produced.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ConfigError

from .cache import init_cache
from .layout import unscan
from .step import decode_logits, jit_for, prefill

F32 = jnp.float32


@partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample(logits_BV, key, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Next tokens [B] int32 from logits [B, V] (see the module docstring)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    x = logits_BV.astype(F32) / temperature
    if top_k:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p < 1.0:
        srt = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of the tokens ranked above
        cut = jnp.min(jnp.where(before < top_p, srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cut, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def max_positions(cfg) -> int:
    """The longest sequence the model is built for: YaRN's extended context original_seq_len x
    rope_factor (what model/export.py writes as HF's max_position_embeddings: 1M tokens for the
    V4 presets, 4096 for tiny), or 65536 without YaRN (original_seq_len 0; export's default)."""
    return int(cfg.original_seq_len * cfg.rope_factor) if cfg.original_seq_len else 65536


def check_inputs(cfg, prompts, max_new_tokens: int, max_len: int | None = None, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, speculative: bool = False) -> int:
    """Every check `generate` makes before building anything, each a one-line ConfigError
    naming the value; returns the context max_len (default: longest prompt + max_new_tokens)."""
    if temperature < 0:
        raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k: must be >= 0 (0 = no cut), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p: must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if speculative and temperature != 0:
        raise ConfigError(f"speculative: greedy decoding only (temperature 0), got temperature {temperature}")
    if speculative and cfg.n_mtp_layers < 1:
        raise ConfigError("speculative: the model has no MTP block (n_mtp_layers=0) to draft with")
    if len(prompts) == 0:
        raise ConfigError("prompts: give at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompts: prompt {i} is empty; every prompt needs at least one token")
    bad = sorted({int(t) for p in prompts for t in p if not 0 <= int(t) < cfg.vocab_size})
    if bad:
        raise ConfigError(f"prompts: token ids {bad[:10]} are outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    what = f"max_len {max_len}" if max_len is not None else f"longest prompt {longest} + max_new_tokens {max_new_tokens}"
    max_len = longest + max_new_tokens if max_len is None else int(max_len)
    limit = max_positions(cfg)
    if max_len > limit:
        raise ConfigError(f"max_len: a context of {max_len} tokens ({what}) exceeds the model's maximum "
                          f"position {limit} (original_seq_len x rope_factor); ask for fewer tokens")
    if longest >= max_len:
        i = next(i for i, p in enumerate(prompts) if len(p) == longest)
        raise ConfigError(f"prompts: prompt {i} has {longest} tokens but the context max_len is {max_len}: "
                          "no room for a new token; raise max_len or shorten the prompt")
    return max_len


class Outputs:
    """The tokens produced so far. Sequence b ends after limit[b] tokens (max_new_tokens, or
    what fits its context) or after a stop token (kept as its last token)."""

    def __init__(self, lengths, max_new_tokens: int, max_len: int, stop_tokens, on_token):
        self.tokens = [[] for _ in lengths]
        self.limit = np.minimum(max_new_tokens, max_len - np.asarray(lengths))
        self.done = np.zeros(len(lengths), bool)
        self.stop, self.on_token = {int(t) for t in stop_tokens}, on_token

    def emit(self, i: int, token: int) -> bool:
        """Append `token` to sequence i (if not finished); returns whether it is finished."""
        if not self.done[i]:
            self.tokens[i].append(token)
            self.done[i] = token in self.stop or len(self.tokens[i]) >= self.limit[i]
            if self.on_token is not None:
                self.on_token(i, token)
        return bool(self.done[i])


def generate(model, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_tokens=(), fp8: bool = False,
             chunk: int | None = None, page_tokens: int | None = None, max_len: int | None = None,
             speculative: bool = False, on_token=None, stats: dict | None = None) -> list[list[int]]:
    """New tokens for each prompt (lists of ids, any lengths >= 1), decoded as one batch.
    A sequence ends after max_new_tokens, when it fills the context `max_len` (the cache's size;
    default: longest prompt + max_new_tokens), or after a token in `stop_tokens` (kept as its
    last token); the others go on, the finished slot idles (position -1).
    `speculative`: greedy decoding with MTP drafts (infer/speculative.py), same tokens.
    `on_token(slot, token)` is called for every token as it is produced (streaming); `stats`
    (a dict) receives steps (main-model passes after prefill) and, with speculative, drafted /
    accepted / acceptance (accepted drafts per verified draft)."""
    cfg = model.cfg
    max_len = check_inputs(cfg, prompts, max_new_tokens, max_len, temperature=temperature, top_k=top_k,
                           top_p=top_p, speculative=speculative)
    model = unscan(model)                              # layers sliced out of their stacks once
    lengths = np.array([len(p) for p in prompts], np.int32)
    b = len(prompts)
    ids = np.zeros((b, lengths.max()), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    cache = init_cache(cfg, b, max_len, page_tokens=page_tokens, fp8=fp8)
    out = Outputs(lengths, max_new_tokens, max_len, stop_tokens, on_token)
    stats = {} if stats is None else stats
    if speculative:
        from .speculative import speculative_decode
        from .step import default_chunk

        logits, cache, hidden = prefill(model, ids, cache, lengths, chunk=chunk, hidden=True)
        steps, drafted, accepted = speculative_decode(model, cache, ids, lengths, logits, hidden, out,
                                                      chunk or default_chunk(cfg))
        stats.update(steps=steps, drafted=drafted, accepted=accepted,
                     acceptance=accepted / drafted if drafted else 0.0)
        return out.tokens
    logits, cache = prefill(model, ids, cache, lengths, chunk=chunk)
    step_fn, leaves = jit_for(decode_slots, model, donate=(1,))  # compiled once per model
    how = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    key, limit = jax.random.key(seed), jnp.asarray(out.limit, jnp.int32)
    stop = jnp.asarray(sorted(out.stop), jnp.int32).reshape(-1)
    tok = sample(logits, jax.random.fold_in(key, 0), **how)
    count = jnp.ones((b,), jnp.int32)
    cur, steps, last = (tok, jnp.asarray(lengths), finished(tok, count, limit, stop), count), 0, int(out.limit.max())
    for step in range(last):
        # the next step is queued before this step's tokens are read back: the host's work
        # (reading, streaming, stop checks) overlaps the device's; the slots' positions and
        # stops are tracked on the device too, by the same rule as `out`
        nxt = None
        if step + 1 < last:
            logits, cache = step_fn(leaves, cache, *cur[:3])
            nxt = advance(logits, *cur, limit, stop, key, step, **how)
            steps += 1
        host = np.asarray(cur[0])
        for i in np.flatnonzero(~out.done):
            out.emit(i, int(host[i]))
        if out.done.all():
            break
        cur = nxt
    stats["steps"] = steps
    return out.tokens


def finished(tok_B, count_B, limit_B, stop):
    """Which slots are done after producing tok_B, their count_B-th token (Outputs.emit's rule)."""
    return (tok_B[:, None] == stop[None, :]).any(axis=-1) | (count_B >= limit_B)


def decode_slots(model, cache, tok_B, pos_B, done_B):
    """`generate`'s decode step: the logits [B, V] of tok_B at positions pos_B (slots done_B
    idle) and the cache."""
    return decode_logits(model, cache, tok_B, jnp.where(done_B, -1, pos_B))


@partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def advance(logits_BV, tok_B, pos_B, done_B, count_B, limit_B, stop, key, step, *, temperature, top_k, top_p):
    """After decode step `step`: the next (tokens, positions, done, counts) of `generate`'s slots,
    on the device (tok_B were produced last at pos_B; count_B tokens so far). Step i draws with
    fold_in(key, i + 1) (the prefill's token with 0). Its own small program per sampling
    setting, so that the decode step compiles once per model."""
    new = sample(logits_BV, jax.random.fold_in(key, step + 1), temperature=temperature, top_k=top_k, top_p=top_p)
    new = jnp.where(done_B, tok_B, new)
    count = count_B + (~done_B).astype(jnp.int32)
    return new, pos_B + 1, done_B | finished(new, count, limit_B, stop), count
