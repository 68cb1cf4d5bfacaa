"""train/host.py: the entry points' re-execution with glibc malloc tunables that keep its pages."""
import os
import subprocess
import sys

import pytest

from train import host

HEAP = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


@pytest.mark.parametrize("mode,given,want", [
    ("always [madvise] never", "", HEAP + ":glibc.malloc.hugetlb=1"),
    ("always [madvise] never", "glibc.malloc.arena_max=2",  # the user's own values are kept
     "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.hugetlb=1"),
    ("always [madvise] never", "glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0:" + HEAP),
    ("always [madvise] never", "glibc.rtld.optional_static_tls=512", "glibc.rtld.optional_static_tls=512:" + HEAP
     + ":glibc.malloc.hugetlb=1"),
    ("[always] madvise never", "", HEAP),  # huge pages already
    ("always madvise [never]", "", HEAP),
    (None, "", HEAP),  # no such file: not Linux's THP
])
def test_tunables_add_what_the_user_has_not_set(tmp_path, mode, given, want):
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(mode + "\n")
    assert host.malloc_tunables({"GLIBC_TUNABLES": given}, str(path), "linux") == want
    assert host.malloc_tunables({"GLIBC_TUNABLES": given}, str(path), "darwin") == given  # not glibc


def test_reexecutes_once_with_the_tunables_added():
    """The child restarts itself (same pid, same arguments) with GLIBC_TUNABLES extended and
    runs on with the user's value kept; a process started with them all runs on at once."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
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
    if sys.platform.startswith("linux"):
        assert want.startswith("glibc.malloc.arena_max=4:glibc.malloc.mmap_max=0")
        assert len(starts) == 2 and starts[0] == starts[1] == ran[1] and ran[2] == want
        starts, ran = run(env | {"GLIBC_TUNABLES": want})
    assert len(starts) == 1 and ran[2] == want
