"""One command on every host: start JAX's distributed runtime, and the checks only a job of
several processes needs.

Modes, first match wins (`detect` is pure, so it is tested without a cluster):
  explicit   --coordinator HOST:PORT --num-processes N --process-id I, or the environment
             variables DEEPFLAX_COORDINATOR / DEEPFLAX_NUM_PROCESSES / DEEPFLAX_PROCESS_ID
  slurm      inside an allocation with more than one task (SLURM_JOB_ID, SLURM_NTASKS > 1):
             JAX reads the coordinator and ranks from SLURM's variables
  cloud-tpu  a Cloud TPU VM slice of several hosts, GKE TPU pods included (TPU_WORKER_HOSTNAMES
             lists more than one host, or a multi-slice MEGASCALE_COORDINATOR_ADDRESS): JAX asks
             the TPU metadata for the rest
  single     anything else: one process, no runtime to start
On CPU the collectives between processes use gloo.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Mapping

ENV = {"coordinator": "DEEPFLAX_COORDINATOR", "num_processes": "DEEPFLAX_NUM_PROCESSES",
       "process_id": "DEEPFLAX_PROCESS_ID"}


class DistributedError(RuntimeError):
    """The job could not form, or its processes disagree."""


@dataclass(frozen=True)
class Launch:
    mode: str  # explicit | slurm | cloud-tpu | single
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def describe(self) -> str:
        if self.mode == "explicit":
            return (f"explicit: process {self.process_id} of {self.num_processes}, "
                    f"coordinator {self.coordinator}")
        return {"slurm": "SLURM (ranks and coordinator from the allocation)",
                "cloud-tpu": "Cloud TPU (hosts from the TPU metadata)",
                "single": "single process"}[self.mode]


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, env: Mapping[str, str] | None = None) -> Launch:
    """Which way this process joins its job; flags take precedence over DEEPFLAX_* variables."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV["coordinator"])
    num_processes = num_processes if num_processes is not None else _int(env, ENV["num_processes"])
    process_id = process_id if process_id is not None else _int(env, ENV["process_id"])
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given):
        if not all(given):
            missing = [f"--{k.replace('_', '-')}" for k, g in zip(ENV, given) if not g]
            raise DistributedError(f"explicit launch needs --coordinator, --num-processes and "
                                   f"--process-id (or {', '.join(ENV.values())}); missing {missing}")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} is not in [0, {num_processes})")
        return Launch("explicit", coordinator, num_processes, process_id)
    if env.get("SLURM_JOB_ID") and (_int(env, "SLURM_NTASKS") or 1) > 1:
        return Launch("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch("cloud-tpu")
    return Launch("single")


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{key}={value!r} is not an integer") from None


def initialize(launch: Launch, timeout_s: int = 300) -> None:
    """Start the runtime (a no-op for a single process). A process that cannot reach the
    coordinator, or a job whose other processes never join, fails after `timeout_s` with the
    coordinator's address in the message."""
    if launch.mode == "single":
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if launch.mode == "explicit":
        kwargs = dict(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                      process_id=launch.process_id)
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except Exception as e:  # noqa: BLE001 - the runtime raises several types
        where = launch.coordinator or "(from the cluster environment)"
        raise DistributedError(
            f"could not form the job within {timeout_s} s ({launch.describe()}); coordinator "
            f"{where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. "
            "Check that every process started, with the same --num-processes, and that the "
            "coordinator's port is reachable from every host") from e


def rare_full_gc() -> None:
    """Python's full (generation 2) garbage collections made rare, for a process that traces and
    compiles: tracing and lowering allocate millions of objects, and under the default
    thresholds every few of the collections they trigger walks every object the process holds
    (JAX, Flax, Orbax, the traced program). Young generations are collected as before, so
    short-lived cycles still go. Measured: a sharded gradient of tests/sizes.py's SMALL model
    traced, lowered and compiled in 12-15% less time; the suite and the trainer use it."""
    import gc

    gc.set_threshold(100_000, 50, 1000)


def compile_together(jitted, *args, name: str, timeout_s: int = 3600):
    """`jitted` compiled for `args` (`jitted.lower(*args).compile()`), returned once every
    process has compiled it. Compile times differ between processes (one finds the program in
    the persistent compilation cache, another compiles it for minutes), and the first
    collective of a step on CPU waits only 30 s for gloo's peers: so the processes meet at a
    coordination-service barrier, which waits up to `timeout_s`, before any of them runs it."""
    import jax

    compiled = jitted.lower(*args).compile()
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.sync_global_processes(f"deepflax-compiled-{name}", timeout=timeout_s)
    return compiled


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(text: str) -> None:
    """Every process must run the same resolved configuration: compare digests across
    processes (`allgather_json`) and name the processes that differ from process 0."""
    import jax

    digest = config_digest(text)
    every = allgather_json(digest)
    differ = [i for i, d in enumerate(every) if d != every[0]]
    if differ:
        raise DistributedError(
            f"the processes run different configurations: processes {differ} differ from process 0 "
            f"(this is process {jax.process_index()}, config digest {digest}); start every host with "
            "the same --config file and overrides (compare RUN_DIR/config.yaml)")


def allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (two small all-gathers)."""
    import json

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(every[i, :sizes[i]])) for i in range(len(sizes))]


def global_data_state(local: dict) -> dict:
    """Merge the processes' data iterator states (each covers its own shards) into one."""
    states = allgather_json(local)
    return {"num_shards": local["num_shards"],
            "shards": {k: v for s in states for k, v in s["shards"].items()}}
