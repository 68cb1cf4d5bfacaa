"""Every test sees 8 emulated CPU devices and float32 matmuls at full precision."""
import gc
import os

# The suite is compile-bound (tiny models, a few steps). LLVM's optimisation level 0: the
# backend's -O2 was ~35% of every compile. XLA:CPU's older elemental emitters instead of its
# fusion emitters: a sharded gradient of tests/sizes.py's SMALL model compiles in 6.5 s instead
# of 11 s and runs ~10% slower. XLA's HLO passes are unchanged. (The flag exists in XLA up to at
# least jaxlib 0.10; XLA aborts on an unknown flag, so it is only set where it was measured.)
_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
if __import__("jaxlib").__version__.startswith("0.10."):
    _FLAGS += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from train.distributed import rare_full_gc  # noqa: E402

rare_full_gc()  # ~12% off every trace + compile (train/distributed.py)

# One persistent compilation cache per test session, shared with the trainer subprocesses of
# tests/test_checkpoint.py (they inherit the variable): a run repeated with the same program
# (a resume, a second identical run) loads its executable instead of compiling it again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deepflax-jax-cache-")
    # removed by the process that made it (pytest's main process; xdist workers inherit it)
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
# Every program, not only those that took >= 1 s to compile: each test file starts from cleared
# in-memory caches (below), and re-compiling the small eager programs of a model's initialiser
# (~80 of them, 3.5 s for SMALL) cost more than loading them (1.5 s). 5 test files in one
# process: 148 -> 125-134 s of CPU.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# The heaviest files first (worker-seconds of a full run; docs/benchmarks.md, "Test suite"):
# `make test` hands whole files to the workers in collection order (--dist loadfile), so the
# long ones start at once and the short ones fill in at the end, instead of one worker
# finishing a long file alone while the other idles.
HEAVY_FIRST = ["test_checkpoint.py", "test_parallel.py", "test_train.py", "test_infer.py",
               "test_multihost.py", "test_plan.py", "test_quant.py", "test_muon.py", "test_model.py",
               "test_pretrained.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
    """After each test file, JAX's in-memory caches of traced and compiled programs are dropped
    and collected: a worker holds one file's programs, not those of every file it ran (a
    program needed again is read back from the session's persistent cache)."""
    yield
    jax.clear_caches()
    gc.collect()
