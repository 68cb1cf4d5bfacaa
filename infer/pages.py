"""Host-side page allocation for a paged cache (init_cache(..., paged=True)).

Every layer's compressed-entry and index-key pools are cut into pages of `page_tokens` tokens
(page_tokens // ratio entries of a layer with that ratio); the block table row of a slot lists
the pages that hold its tokens [0, page_tokens), [page_tokens, 2 page_tokens), ... Sequences of
different lengths thus share one pool: a sequence takes a page only when it reaches it, and a
finished sequence gives its pages back for the next one. The window ring and the compressor's
partial blocks are per slot (fixed size) and need no pages.
"""
from __future__ import annotations

from collections import deque

import jax.numpy as jnp
import numpy as np

from model.config import ConfigError

from .cache import Cache, CacheSpec


class PoolExhausted(RuntimeError):
    """No free page is left for a sequence that needs one."""


class PageAllocator:
    def __init__(self, spec: CacheSpec):
        self.spec = spec
        self.free = deque(range(spec.num_pages))      # lowest page first, released pages last
        self.table = np.full((spec.batch, spec.max_pages), -1, np.int32)

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Make sure `slot` has pages for its tokens [0, n_tokens)."""
        need = -(-n_tokens // self.spec.page_tokens)
        if need > self.spec.max_pages:
            raise ConfigError(f"n_tokens: {n_tokens} exceeds the cache's max_len {self.spec.max_len}")
        for i in range(need):
            if self.table[slot, i] < 0:
                if not self.free:
                    raise PoolExhausted(f"slot {slot} needs a page for token {i * self.spec.page_tokens} "
                                        f"but all {self.spec.num_pages} pages are in use")
                self.table[slot, i] = self.free.popleft()

    def release(self, slot: int) -> list[int]:
        """Give back every page of `slot` (its sequence ended); returns them."""
        pages = [int(p) for p in self.table[slot] if p >= 0]
        self.free.extend(pages)
        self.table[slot] = -1
        return pages

    def pages(self, slot: int) -> list[int]:
        return [int(p) for p in self.table[slot] if p >= 0]

    def apply(self, cache: Cache) -> Cache:
        """The cache with this allocator's block table (call after reserve / release)."""
        return cache.replace(table=jnp.asarray(self.table))
