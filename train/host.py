"""Process-level settings of the host, applied by the command-line entry points.

XLA:CPU allocates each step's temporaries afresh and frees them at its end: one block of the
step's whole temporary size (1.8 GB on `small`), allocated by a thread of XLA's pool. glibc
serves a block this large from mmap (a thread's own arena only grows in 64 MiB heaps) and
unmaps it on free, so every step's temporaries are new pages that the kernel zero-fills on
first touch: 450,000 page faults a step on `small`, 30,000 on `tiny`. `glibc.malloc.hugetlb=1`
backs them with transparent huge pages where the kernel gives them on request: ~1,100 faults of
2 MiB a step, steps 15-30% faster (docs/benchmarks.md). glibc reads its tunables when a process
starts, so `tune_malloc` starts the process again with it set (same pid, arguments and
environment otherwise); a tunable the user already set in GLIBC_TUNABLES is kept as it is.

The zeroing remains: 0.2-0.9 s of kernel time a step on `small` alone on this VM, up to 3.7 s
while torch trains beside it (in the same process or another). A single arena that keeps its
pages (`glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2**40`,
so that the pool thread allocates from the main heap) removes it: `small` 2.0-2.2 -> 1.85-2.0 s
a step alone, 2.5-3.6 -> 1.95-2.05 s beside torch. It is not applied: one arena shared by every
thread halves `tiny`'s speed (90 -> 167 ms a step), and `small` on 8 emulated devices ran out of
24 GB with it, at 11.8 GB without (docs/benchmarks.md).
"""
from __future__ import annotations

import os
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def malloc_tunables(environ=os.environ, thp_mode_file: str = THP_MODE, platform: str = sys.platform) -> str:
    """GLIBC_TUNABLES for this process: the user's own, plus HUGE_PAGES unless the user has set
    it, on Linux whose transparent huge pages are given on request ("[madvise]"; "[always]" gives
    them already, "[never]" not at all)."""
    given = environ.get("GLIBC_TUNABLES", "")
    key = HUGE_PAGES.split("=")[0]
    if not platform.startswith("linux") or key in {t.split("=")[0] for t in given.split(":")}:
        return given
    try:
        with open(thp_mode_file) as f:
            if "[madvise]" not in f.read():
                return given
    except OSError:
        return given
    return f"{given}:{HUGE_PAGES}" if given else HUGE_PAGES


def tune_malloc() -> None:
    """Re-execute this Python process with malloc_tunables() where they differ from its own;
    otherwise return. Call it first thing in an entry point, before JAX allocates."""
    tunables = malloc_tunables()
    if tunables == os.environ.get("GLIBC_TUNABLES", ""):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
