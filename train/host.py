"""Process-level settings of the host, applied by the command-line entry points.

XLA:CPU allocates each step's temporaries afresh and frees them at its end: one block of the
step's whole temporary size (1.8 GB on `small`; 700 MiB per emulated device at fsdp=8),
allocated by a thread of XLA's pool. glibc serves a block this large from mmap (a thread's own
arena only grows in 64 MiB heaps) and unmaps it on free, so every step's temporaries are new
pages that the kernel zero-fills on first touch: 1.9 s of kernel CPU time in a 2.7 s `small`
step on this project's 2-core machine (docs/benchmarks.md).

Two remedies, applied before JAX starts by re-executing the process (same pid, arguments and
environment otherwise; glibc reads both when a process starts):
- the block cache (`train/blockcache.c`, LD_PRELOAD): allocations of at least 32 MiB are kept
  mapped when freed and handed out again for the next request they fit, so a step reuses the
  previous step's resident pages: `small` 2.7 -> 1.7-1.9 s a step, kernel time 1.9 s -> under
  0.07 s; 6.4 -> 4.1-4.6 s at fsdp=8. Compiled once per source version with the system's C compiler
  (`$CC` or cc) into ~/.cache/deepflax (`$XDG_CACHE_HOME`); without a compiler it is left out.
  A block unused for 10 s is unmapped (`DEEPFLAX_BLOCK_CACHE_DECAY_S`), so sizes that do not
  recur are not kept. `DEEPFLAX_BLOCK_CACHE=0` turns it off; `DEEPFLAX_BLOCK_CACHE_MIN` (bytes)
  and `DEEPFLAX_BLOCK_CACHE_MAX_BYTES` (unused blocks kept, default half of physical memory)
  tune it.
- `glibc.malloc.hugetlb=1` (GLIBC_TUNABLES): glibc's own large blocks on transparent huge pages
  where the kernel gives them on request (2 MiB faults instead of 4 KiB ones; the block cache
  asks for them itself). A tunable the user already set in GLIBC_TUNABLES is kept as it is.

Tried before the block cache: a single arena that keeps its pages
(`glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2**40`): it also
removes the zeroing, but one arena shared by every thread halves `tiny`'s speed (90 -> 167 ms a
step), and `small` on 8 emulated devices ran out of 24 GB with it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile

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


BLOCK_CACHE_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blockcache.c")
BLOCK_CACHE_NAME = "blockcache-"  # the built library's file name: this, the source's digest, .so


def block_cache_preloaded(environ=os.environ) -> bool:
    """Whether LD_PRELOAD holds the block cache's library."""
    return BLOCK_CACHE_NAME in environ.get("LD_PRELOAD", "")


def block_cache_library(cache_dir: str | None = None, source: str = BLOCK_CACHE_SOURCE) -> str | None:
    """The path of the block cache's shared library (train/blockcache.c), compiled on first use
    into `cache_dir` (default ~/.cache/deepflax) under a name holding the source's digest; None
    where it cannot be built (no C compiler, not Linux with glibc). Concurrent processes each
    compile to a temporary file and rename it into place."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None  # it calls glibc's own __libc_malloc & co.
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deepflax")
    lib = os.path.join(cache_dir, f"{BLOCK_CACHE_NAME}{digest}.so")
    if os.path.exists(lib):
        return lib
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
        os.close(fd)
        cmd = [os.environ.get("CC") or "cc", "-O2", "-shared", "-fPIC", "-o", tmp, source, "-lpthread", "-ldl"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
        os.replace(tmp, lib)
        return lib
    except OSError:  # no compiler, or the cache directory is not writable
        return None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def preload(environ=os.environ, library=block_cache_library) -> str:
    """LD_PRELOAD for this process: the user's own, plus the block cache's library unless
    DEEPFLAX_BLOCK_CACHE=0, it is there already or it cannot be built."""
    given = environ.get("LD_PRELOAD", "")
    if environ.get("DEEPFLAX_BLOCK_CACHE", "1") == "0" or block_cache_preloaded(environ):
        return given
    lib = library()
    if lib is None:
        return given
    return f"{lib} {given}" if given else lib


def tune_malloc() -> None:
    """Re-execute this Python process with malloc_tunables() and preload() where they differ
    from its own; otherwise return. Call it first thing in an entry point, before JAX allocates."""
    want = {"GLIBC_TUNABLES": malloc_tunables(), "LD_PRELOAD": preload()}
    if all(v == os.environ.get(k, "") for k, v in want.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **want})
