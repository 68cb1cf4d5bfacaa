"""The decoding caches of a DeepSeek-V4 model: what every layer keeps between steps.

Legend: B batch slots, P pages, E entries per page, K entry width, W window, R ratio,
O compressor projection width (K, or 2K with overlap), M entries written at once.

Per main layer (a dict of arrays):
- "win": the window ring of the last W K=V vectors of every slot; position p lives in row p % W,
  so the ring never moves data and the positions of its rows follow from the query's position.
- compressed layers (ratio R > 0): "ckv", a pool of pages of compressed entries shared by all
  slots; entry t of a sequence (block t, tokens [tR, tR + R)) is entry t % E of page
  table[slot, t // E], E = page_tokens // R. Pages are in token units for every layer (one block
  table serves all layers), so page_tokens must be a multiple of every ratio.
  "comp", the compressor's partial state per slot: values and scores (gate + ape) of the slots of
  two blocks, [B, 2, R, O]: index 1 the current (incomplete) block, index 0 the previous complete
  block, whose first-half channels the next CSA entry pools (overlap). A block becomes an entry
  only when its last token arrives.
- CSA layers also: "ikeys", the indexer's key pool (same pages), and "icomp" its compressor state.

Storage: float (model dtype; index keys float32 as the training forward scores them) or FP8
(`spec.fp8`): window and compressed entries as DeepSeek's MODEL1 pages (infer/kvformat.py: 448
e4m3 NoPE dims with UE8M0 scales + 64 bf16 RoPE dims, 584 bytes an entry), index keys as e4m3
with one float32 scale per entry (K + 4 bytes). FP8 entries are dequantised on read.
Every store writes with scatter mode="drop": a write aimed at page P (past the pool) vanishes,
which is how inactive slots, padding and unallocated pages write nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from model.config import ConfigError, ModelConfig
from model.layers import dtype_of

from . import kvformat

F32 = jnp.float32


@dataclass(frozen=True)
class CacheSpec:
    """Static shape of a cache (hashable: it is part of the jitted functions' cache key)."""
    cfg: ModelConfig
    batch: int            # decoding slots
    max_len: int          # longest sequence a slot may hold
    page_tokens: int      # tokens covered by one page (any layer)
    num_pages: int        # pages in each layer's pool
    fp8: bool = False     # MODEL1 FP8 storage

    @property
    def max_pages(self) -> int:
        return -(-self.max_len // self.page_tokens)

    def entries(self, ratio: int) -> int:
        """Entries per page of a layer with this compression ratio."""
        return self.page_tokens // ratio


@struct.dataclass
class Cache:
    layers: tuple            # one dict per main layer (see the module docstring)
    table: jax.Array         # [B, max_pages] int32 page of each slot's page_tokens span; -1 none
    spec: CacheSpec = struct.field(pytree_node=False)


# --- stores: how entries of one kind are kept in pages ------------------------------------
class FloatStore:
    """Entries [P, E, K] in `dtype`, exact."""

    def __init__(self, width: int, entries: int, dtype):
        self.width, self.e, self.dtype = width, entries, dtype

    def init(self, n):
        return jnp.zeros((n, self.e, self.width), self.dtype)

    def read(self, arr):
        return arr

    def write(self, arr, page_M, off_M, x_MK):
        return arr.at[page_M, off_M].set(x_MK.astype(self.dtype), mode="drop")

    def roundtrip(self, x):
        """x as a read of it after a write would return it."""
        return x.astype(self.dtype)


class Model1Store:
    """512-dim entries as MODEL1 pages, uint8 [P, page_bytes(E)]; read back in `dtype`."""

    def __init__(self, entries: int, dtype):
        self.e, self.dtype = entries, dtype
        self.nbytes = kvformat.page_bytes(entries)

    def init(self, n):
        return jnp.zeros((n, self.nbytes), jnp.uint8)

    def read(self, arr):
        return kvformat.dequantize_model1(arr, self.e).astype(self.dtype)

    def write(self, arr, page_M, off_M, x_MK):
        # each entry quantised as a one-token page: its 576 row bytes, then its 8 scale bytes,
        # scattered to where a page of E tokens keeps token `off` (planar layout)
        one = kvformat.quantize_model1(x_MK.astype(jnp.bfloat16)[:, None, :])     # [M, 1152]
        row, last = kvformat.ROW_BYTES, kvformat.MODEL1_ENTRY_BYTES
        cols = jnp.concatenate([off_M[:, None] * row + jnp.arange(row),
                                self.e * row + off_M[:, None] * kvformat.SCALE_BYTES
                                + jnp.arange(kvformat.SCALE_BYTES)], axis=1)       # [M, 584]
        return arr.at[page_M[:, None], cols].set(one[:, :last], mode="drop")

    def roundtrip(self, x):
        shape = x.shape
        one = kvformat.quantize_model1(x.reshape(-1, 1, shape[-1]).astype(jnp.bfloat16))
        return kvformat.dequantize_model1(one, 1).reshape(shape).astype(self.dtype)


class Fp8KeyStore:
    """Index keys as (e4m3 codes [P, E, K], float32 scale [P, E] = amax * float32(1 / 448));
    read back in float32."""

    def __init__(self, width: int, entries: int):
        self.width, self.e = width, entries

    def init(self, n):
        return (jnp.zeros((n, self.e, self.width), jnp.float8_e4m3fn), jnp.zeros((n, self.e), F32))

    def read(self, arr):
        codes, scale = arr
        return codes.astype(F32) * scale[..., None]

    def write(self, arr, page_M, off_M, x_MK):
        x = x_MK.astype(F32)
        scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), 1e-30) * F32(1 / 448)
        codes = (x / scale[:, None]).astype(jnp.float8_e4m3fn)
        return (arr[0].at[page_M, off_M].set(codes, mode="drop"),
                arr[1].at[page_M, off_M].set(scale, mode="drop"))

    def roundtrip(self, x):
        x = x.astype(F32)
        scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-30) * F32(1 / 448)
        return (x / scale).astype(jnp.float8_e4m3fn).astype(F32) * scale


def window_store(spec: CacheSpec):
    """The window ring of every slot: one page of W tokens per slot."""
    cfg = spec.cfg
    if spec.fp8:
        return Model1Store(cfg.window_size, dtype_of(cfg.dtype))
    return FloatStore(cfg.head_dim, cfg.window_size, dtype_of(cfg.dtype))


def entry_store(spec: CacheSpec, ratio: int):
    cfg = spec.cfg
    if spec.fp8:
        return Model1Store(spec.entries(ratio), dtype_of(cfg.dtype))
    return FloatStore(cfg.head_dim, spec.entries(ratio), dtype_of(cfg.dtype))


def key_store(spec: CacheSpec, ratio: int):
    cfg = spec.cfg
    if spec.fp8:
        return Fp8KeyStore(cfg.index_head_dim, spec.entries(ratio))
    return FloatStore(cfg.index_head_dim, spec.entries(ratio), F32)


# --- building a cache ------------------------------------------------------------------------
def default_page_tokens(cfg: ModelConfig) -> int:
    """The smallest multiple of every compression ratio that is at least 64 tokens."""
    step = math.lcm(1, *[r for r in cfg.compress_ratios if r])
    return step * -(-64 // step)


def check_spec(spec: CacheSpec) -> None:
    cfg = spec.cfg
    for name in ("batch", "max_len", "page_tokens", "num_pages"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) <= 0:
            raise ConfigError(f"{name}: must be a positive integer, got {getattr(spec, name)!r}")
    bad = [r for r in cfg.compress_ratios if r and spec.page_tokens % r]
    if bad:
        raise ConfigError(f"page_tokens: {spec.page_tokens} is not a multiple of the compression "
                          f"ratio {bad[0]}; pick a multiple of every ratio (e.g. {default_page_tokens(cfg)})")
    if spec.fp8 and (cfg.head_dim, cfg.rope_head_dim) != (kvformat.DIM, kvformat.D_ROPE):
        raise ConfigError(f"fp8: the MODEL1 cache stores {kvformat.DIM}-dim entries with "
                          f"{kvformat.D_ROPE} rope dims; this model has head_dim={cfg.head_dim}, "
                          f"rope_head_dim={cfg.rope_head_dim} (use the float cache)")


def _compressor_state(batch: int, ratio: int, width: int):
    # previous block's scores start at -inf: block 0 has no predecessor (weight 0)
    return {"kv": jnp.zeros((batch, 2, ratio, width), F32),
            "score": jnp.zeros((batch, 2, ratio, width), F32).at[:, 0].set(-jnp.inf)}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, page_tokens: int | None = None,
               num_pages: int | None = None, fp8: bool = False, paged: bool = False) -> Cache:
    """An empty cache of `batch` slots for sequences of up to `max_len` tokens.

    Not `paged` (default): every slot owns max_pages consecutive pages (num_pages defaults to
    batch * max_pages). `paged`: the block table starts empty (-1) and a PageAllocator
    (infer/pages.py) hands out pages of the shared pool as sequences grow."""
    page_tokens = page_tokens or default_page_tokens(cfg)
    spec = CacheSpec(cfg, batch, max_len, page_tokens, 1, fp8)
    num_pages = num_pages or batch * spec.max_pages
    spec = CacheSpec(cfg, batch, max_len, page_tokens, num_pages, fp8)
    check_spec(spec)
    layers = []
    for r in cfg.compress_ratios:
        lc = {"win": window_store(spec).init(batch)}
        if r:
            overlap = cfg.is_csa(r)
            lc["ckv"] = entry_store(spec, r).init(num_pages)
            lc["comp"] = _compressor_state(batch, r, (2 if overlap else 1) * cfg.head_dim)
            if overlap:
                lc["ikeys"] = key_store(spec, r).init(num_pages)
                lc["icomp"] = _compressor_state(batch, r, 2 * cfg.index_head_dim)
        layers.append(lc)
    if paged:
        table = jnp.full((batch, spec.max_pages), -1, jnp.int32)
    else:
        if num_pages < batch * spec.max_pages:
            raise ConfigError(f"num_pages: {num_pages} < batch * max_pages = {batch * spec.max_pages}; "
                              "an unpaged cache gives every slot its own pages (or use paged=True)")
        table = jnp.arange(batch * spec.max_pages, dtype=jnp.int32).reshape(batch, spec.max_pages)
    return Cache(tuple(layers), table, spec)


# --- reading and writing pages -----------------------------------------------------------------
def read_entries(store, arr, table_BN):
    """Every entry slot of every page of each sequence, [B, N * E, K] (entry t at index t);
    unallocated pages (-1) read page 0, which the caller masks (t is not yet visible)."""
    b, n = table_BN.shape
    pages = jnp.maximum(table_BN, 0).reshape(-1)
    x = store.read(jax.tree.map(lambda a: a[pages], arr))
    return x.reshape(b, n * store.e, *x.shape[2:])


def write_entries(store, arr, table_BN, t_BM, ok_BM, x_BMK, num_pages: int):
    """Write entry t_BM[b, m] of sequence b where ok_BM (others are dropped)."""
    n = table_BN.shape[1]
    idx = jnp.clip(t_BM // store.e, 0, n - 1)
    page = jnp.take_along_axis(table_BN, idx, axis=1)
    page = jnp.where(ok_BM & (page >= 0) & (t_BM // store.e < n), page, num_pages)
    return store.write(arr, page.reshape(-1), (t_BM % store.e).reshape(-1),
                       x_BMK.reshape(-1, x_BMK.shape[-1]))
