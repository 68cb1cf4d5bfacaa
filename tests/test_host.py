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
    if want != env["GLIBC_TUNABLES"]:  # Linux giving huge pages on request
        assert want == "glibc.malloc.arena_max=4:" + HUGE
        assert len(starts) == 2 and starts[0] == starts[1] == ran[1] and ran[2] == want
        starts, ran = run(env | {"GLIBC_TUNABLES": want})
    assert len(starts) == 1 and ran[2] == want
