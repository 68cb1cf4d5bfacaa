"""train/host.py: the entry points' re-execution with glibc's malloc on transparent huge pages."""
import os
import subprocess
import sys

import pytest

from train import host

HUGE = "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("mode,given,want", [
    ("always [madvise] never", "", HUGE),
    ("always [madvise] never", "glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:" + HUGE),  # others kept
    ("always [madvise] never", "glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's own choice
    ("[always] madvise never", "", ""),  # huge pages already
    ("always madvise [never]", "", ""),
    (None, "", ""),  # no such file: not Linux's THP
])
def test_tunables_add_huge_pages_where_given_on_request(tmp_path, mode, given, want):
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(mode + "\n")
    assert host.malloc_tunables({"GLIBC_TUNABLES": given}, str(path), "linux") == want
    assert host.malloc_tunables({"GLIBC_TUNABLES": given}, str(path), "darwin") == given  # not glibc


def test_reexecutes_once_with_the_tunables_added():
    """The child restarts itself (same pid, same arguments) with GLIBC_TUNABLES extended and
    runs on with the user's value kept; a process started with them runs on at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")} | {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "DEEPFLAX_BLOCK_CACHE": "0"}  # the cache: below
    code = ("import os, sys; print('start', os.getpid(), flush=True); from train.host import tune_malloc; "
            "tune_malloc(); print('run', os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:])")

    def run(env):
        out = subprocess.run([sys.executable, "-c", code, "a", "b=1"], env=env, capture_output=True, text=True,
                             check=True).stdout.split("\n")
        (ran,) = [line for line in out if line.startswith("run")]
        assert ran.endswith("['a', 'b=1']")
        return [line.split()[1] for line in out if line.startswith("start")], ran.split()

    want = host.malloc_tunables(env)
    starts, ran = run(env)
    if want != env["GLIBC_TUNABLES"]:  # Linux giving huge pages on request
        assert want == "glibc.malloc.arena_max=4:" + HUGE
        assert len(starts) == 2 and starts[0] == starts[1] == ran[1] and ran[2] == want
        starts, ran = run(env | {"GLIBC_TUNABLES": want})
    assert len(starts) == 1 and ran[2] == want


# --- the block cache (train/blockcache.c) ------------------------------------------------------
MiB = 2 ** 20
LIBC = """
import ctypes, resource, sys, time
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.free.argtypes = libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = ctypes.c_size_t
"""
PROBE = LIBC + """

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def aligned(n):
    p = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(p), 64, n) == 0
    return p.value

n = 64 << 20
p = aligned(n)
ctypes.memset(p, 7, n)
libc.free(p)
f0 = faults()
q = aligned(n - 4096)  # a block a little smaller reuses the kept one
ctypes.memset(q, 1, n - 4096)
again = faults() - f0
r = libc.malloc(n // 2)  # too small for a kept block of n (over 5/4): a block of its own
grown = libc.realloc(q, 2 * n)  # a kept block grows by a copy
kept = ctypes.string_at(grown, 8) + ctypes.string_at(grown + n - 4097, 1)
small = libc.malloc(100)  # glibc's, untouched
libc.free(small)
print(p == q, again, r not in (p, q), r % (2 << 20) == 0, libc.malloc_usable_size(grown) >= 2 * n, kept == b"\\x01" * 9)
libc.free(r)
libc.free(grown)
"""


@pytest.fixture(scope="module")
def block_cache(tmp_path_factory):
    lib = host.block_cache_library(str(tmp_path_factory.mktemp("cache")))
    if lib is None:
        pytest.skip("no C compiler: the block cache is left out (train/host.py)")
    return lib


def probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return [o == "True" if o in ("True", "False") else int(o) for o in out]


def test_block_cache_hands_a_freed_block_out_again_resident(block_cache):
    """With the library preloaded, a freed 64 MiB block comes back for the next request it fits
    (same address, its pages resident: no page faults while it is filled again), a request under
    4/5 of it gets a block of its own, realloc keeps the contents, small requests stay glibc's.
    Without it, glibc maps the block afresh and the kernel faults every page in again."""
    same, faults, other, aligned_2m, usable, kept = probe({"LD_PRELOAD": block_cache})
    assert same and other and aligned_2m and usable and kept
    assert faults < 8, faults  # 64 MiB fresh: 32 faults of 2 MiB at least
    assert probe({"LD_PRELOAD": ""})[1] >= 32  # glibc: a fresh mapping
    # kept blocks beyond the cap are unmapped on free: the next one faults again
    same, faults, *_ = probe({"LD_PRELOAD": block_cache, "DEEPFLAX_BLOCK_CACHE_MAX_BYTES": "0"})
    assert faults >= 32


def test_block_cache_lets_blocks_unused_for_its_decay_time_go(block_cache):
    """Ever-different sizes (each too large for the blocks kept before it) do not pile up: a
    block unused for longer than DEEPFLAX_BLOCK_CACHE_DECAY_S is unmapped at the next large
    request. 16 sizes of 40-100 MiB, one at a time, 0.1 s apart: with a decay of 0.05 s the
    resident memory grows by about one block; with the default 10 s all 1.1 GB stay."""
    code = LIBC + """
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
for i in range(16):
    n = (40 + 4 * i) << 20
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    time.sleep(0.1)
print(rss() - before)
"""

    def grown(decay):
        env = {**os.environ, "LD_PRELOAD": block_cache, "DEEPFLAX_BLOCK_CACHE_DECAY_S": decay}
        return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    assert grown("0.05") <= 2 * 102 * MiB
    assert grown("10") >= 1000 * MiB


def test_preload_adds_the_block_cache_unless_told_not_to():
    lib = lambda: "/c/blockcache-1.so"  # noqa: E731
    assert host.preload({}, lib) == "/c/blockcache-1.so"
    assert host.preload({"LD_PRELOAD": "/x.so"}, lib) == "/c/blockcache-1.so /x.so"  # the user's kept
    assert host.preload({"LD_PRELOAD": "/c/blockcache-1.so"}, lib) == "/c/blockcache-1.so"  # once
    assert host.preload({"DEEPFLAX_BLOCK_CACHE": "0", "LD_PRELOAD": "/x.so"}, lib) == "/x.so"
    assert host.preload({"LD_PRELOAD": "/x.so"}, lambda: None) == "/x.so"  # cannot be built


def test_reexecutes_with_the_block_cache_preloaded(tmp_path):
    """tune_malloc builds the library into $XDG_CACHE_HOME/deepflax and restarts the process
    with it in LD_PRELOAD (where a C compiler exists); the restarted process runs on."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DEEPFLAX_BLOCK_CACHE")}
    env |= {"XDG_CACHE_HOME": str(tmp_path), "GLIBC_TUNABLES": host.malloc_tunables(env)}
    code = ("import os; print('start', flush=True); from train.host import tune_malloc; tune_malloc(); "
            "print('run', os.environ.get('LD_PRELOAD', ''))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lib = host.block_cache_library(str(tmp_path / "deepflax"))
    if lib is None:
        assert out.split() == ["start", "run"]
    else:
        assert out.split() == ["start", "start", "run", lib]


def test_block_cache_left_out_without_a_compiler_or_glibc(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert host.block_cache_library(str(tmp_path / "cache")) is None
    assert os.listdir(tmp_path / "cache") == []  # no half-built library left behind
    monkeypatch.delenv("CC")
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("", ""))  # e.g. musl: no __libc_malloc
    assert host.block_cache_library(str(tmp_path / "other")) is None
