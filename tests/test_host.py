"""train/host.py: the entry points' re-execution with glibc's malloc on transparent huge pages."""
import os
import subprocess
import sys

import pytest

from train import host


@pytest.mark.parametrize("mode,tunables,want", [
    ("always [madvise] never", "", True),
    ("always [madvise] never", "glibc.malloc.arena_max=2", True),  # other tunables are kept
    ("always [madvise] never", "glibc.malloc.hugetlb=0", False),  # the user's own choice
    ("[always] madvise never", "", False),  # huge pages already
    ("always madvise [never]", "", False),
    (None, "", False),  # no such file: not Linux's THP
])
def test_wanted_only_where_huge_pages_are_given_on_request(tmp_path, monkeypatch, mode, tunables, want):
    monkeypatch.setattr(sys, "platform", "linux")
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(mode + "\n")
    assert host.huge_pages_wanted({"GLIBC_TUNABLES": tunables}, str(path)) is want


def test_reexecutes_once_with_the_tunable_added():
    """The child restarts itself (same pid, same arguments) with GLIBC_TUNABLES extended, where
    this machine's kernel gives huge pages on request; elsewhere it runs on unchanged."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
    code = ("import os, sys; print('start', os.getpid(), flush=True); from train.host import use_huge_pages; "
            "use_huge_pages(); print('run', os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, "a", "b=1"], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    (run,) = [line for line in out if line.startswith("run")]
    if host.huge_pages_wanted(env):
        assert len(starts) == 2 and starts[0].split()[1] == starts[1].split()[1] == run.split()[1]
        assert run.split()[2] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    else:
        assert len(starts) == 1 and run.split()[2] == "glibc.malloc.arena_max=4"
    assert run.endswith("['a', 'b=1']")
