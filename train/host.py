"""Process-level settings of the host, applied by the command-line entry points.

XLA:CPU allocates each step's temporaries afresh with malloc and frees them at its end. glibc
serves blocks this large from mmap (or, from a thread's own arena, from mmap whatever exceeds
the arena's 64 MiB heaps) and unmaps them on free, so every step's temporaries are new pages
that the kernel zero-fills on first touch: 450,000 page faults a step on `small` (1.8 GB),
30,000 on `tiny`; with transparent huge pages, ~1,100 faults of 2 MiB but still ~0.2-3.7 s of
kernel time a step on `small`, alternating fast and slow steps. The cure is to keep the pages:
one arena (`glibc.malloc.arena_max=1`: every thread allocates from the main heap), no mmap for
large blocks (`mmap_max=0`), and no returning the heap's top to the kernel (`trim_threshold`):
each step then reuses the previous step's pages, with no faults and no kernel time. On top,
`glibc.malloc.hugetlb=1` backs the heap with transparent huge pages where the kernel gives them
on request (fewer TLB misses). Measured on `small`: 2.0-2.2 s -> 1.85-2.0 s a step alone, and
2.5-3.6 s -> 1.95-2.05 s alternating with HF's torch steps in one process; resident memory
5.0 -> 6.6 GB (the heap keeps its peak; it does not grow after the first steps).

glibc reads its tunables when a process starts, so `tune_malloc` starts the process again with
them set (same pid, arguments and environment otherwise). A tunable the user already set in
GLIBC_TUNABLES is kept as it is.
"""
from __future__ import annotations

import os
import sys

HEAP = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(2 ** 40)}
HUGE_PAGES = {"glibc.malloc.hugetlb": "1"}
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def malloc_tunables(environ=os.environ, thp_mode_file: str = THP_MODE, platform: str = sys.platform) -> str:
    """GLIBC_TUNABLES for this process: the user's own, plus those of HEAP (Linux) and
    HUGE_PAGES (where transparent huge pages are given on request, "[madvise]"; "[always]" gives
    them already, "[never]" not at all) that the user has not set."""
    given = environ.get("GLIBC_TUNABLES", "")
    if not platform.startswith("linux"):
        return given
    wanted = dict(HEAP)
    try:
        with open(thp_mode_file) as f:
            if "[madvise]" in f.read():
                wanted |= HUGE_PAGES
    except OSError:
        pass
    have = {t.split("=")[0] for t in given.split(":")}
    return ":".join([*filter(None, [given]), *(f"{k}={v}" for k, v in wanted.items() if k not in have)])


def tune_malloc() -> None:
    """Re-execute this Python process with malloc_tunables() where they differ from its own;
    otherwise return. Call it first thing in an entry point, before JAX allocates."""
    tunables = malloc_tunables()
    if tunables == os.environ.get("GLIBC_TUNABLES", ""):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})


if __name__ == "__main__":  # the Makefile exports these for the test suite
    print(malloc_tunables())
