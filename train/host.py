"""Process-level settings of the host, applied by the command-line entry points.

XLA:CPU allocates each step's temporaries afresh with malloc; buffers this large come from
mmap, so every step touches new 4 KiB pages and the kernel zero-fills each one on its first
touch: 450,000 page faults a step on `small` (1.8 GB), 30,000 on `tiny`. glibc (>= 2.35) can
back its allocations with transparent huge pages (the `glibc.malloc.hugetlb=1` tunable), 2 MiB
per fault: measured ~300 faults a step and steps 15-30% faster (docs/benchmarks.md). glibc
reads its tunables when a process starts, so `use_huge_pages` starts the process again with
the tunable set (same pid, arguments and environment otherwise).
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_wanted(environ=os.environ, thp_mode_file: str = THP_MODE) -> bool:
    """True where re-executing with the tunable helps: Linux whose transparent huge pages are
    given on request ("[madvise]"; "[always]" gives them already, "[never]" not at all), and no
    `glibc.malloc.hugetlb` already chosen in GLIBC_TUNABLES (a user's own value is kept)."""
    if not sys.platform.startswith("linux") or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        with open(thp_mode_file) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def use_huge_pages() -> None:
    """Re-execute this Python process with glibc's malloc on transparent huge pages, when
    huge_pages_wanted(); otherwise return. Call it first thing in an entry point."""
    if not huge_pages_wanted():
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), f"{TUNABLE}=1") if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
