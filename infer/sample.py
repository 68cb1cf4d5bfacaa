"""Sampling a next token from logits, and `generate`: prompts in, new tokens out.

Legend: B sequences, V vocab.
temperature 0 is greedy (argmax, ties to the lower id). Otherwise the logits are divided by the
temperature, cut to the top_k largest (0 = no cut) and to the smallest set of largest tokens
whose probability reaches top_p (the most likely token always stays), then one token is drawn
per sequence with jax.random.categorical. A run is reproducible from its seed: step i draws
with jax.random.fold_in(key(seed), i).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ConfigError

from .cache import init_cache
from .step import decode_jit, prefill

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


def _check(temperature, top_k, top_p, max_new_tokens):
    if temperature < 0:
        raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k: must be >= 0 (0 = no cut), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p: must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")


def generate(model, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_tokens=(), fp8: bool = False,
             chunk: int | None = None, page_tokens: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (lists of ids, any lengths >= 1), decoded as one batch.
    A sequence ends after max_new_tokens or after a token in `stop_tokens` (kept as its last
    token); the others go on, the finished slot idles (position -1)."""
    _check(temperature, top_k, top_p, max_new_tokens)
    cfg = model.cfg
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ConfigError("prompts: give at least one prompt, each of at least one token")
    bad = sorted({int(t) for p in prompts for t in p if not 0 <= int(t) < cfg.vocab_size})
    if bad:
        raise ConfigError(f"prompts: token ids {bad[:10]} are outside the vocabulary [0, {cfg.vocab_size})")
    b = len(prompts)
    ids = np.zeros((b, lengths.max()), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    cache = init_cache(cfg, b, int(lengths.max()) + max_new_tokens, page_tokens=page_tokens, fp8=fp8)
    logits, cache = prefill(model, ids, cache, lengths, chunk=chunk)
    graphdef, state = nnx.split(model)
    key, stop = jax.random.key(seed), set(int(t) for t in stop_tokens)
    out, done, pos = [[] for _ in range(b)], np.zeros(b, bool), lengths.copy()
    for step in range(max_new_tokens):
        tok = np.asarray(sample(logits, jax.random.fold_in(key, step), temperature=float(temperature),
                                top_k=int(top_k), top_p=float(top_p)))
        for i in np.flatnonzero(~done):
            out[i].append(int(tok[i]))
            done[i] = int(tok[i]) in stop or len(out[i]) == max_new_tokens
        if done.all():
            break
        positions = np.where(done, -1, pos).astype(np.int32)
        logits, cache = decode_jit(graphdef, state, cache, jnp.asarray(tok), jnp.asarray(positions))
        pos += 1
    return out
