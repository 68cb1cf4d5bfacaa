"""The environment of a `python -m train` subprocess in the tests."""
import os


def trainer_env(**extra: str) -> dict:
    """This process's environment for a trainer subprocess: the session's compilation cache
    (tests/conftest.py) keeping every entry, so a repeated program (a resume, a second identical
    run) is loaded instead of compiled; LLVM -O0 like the suite (~20% less compile time); but not
    the suite's forced device count, since the trainer sets its own (train.devices)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "XLA_FLAGS": " ".join(flags), **extra}
