"""Ahead-of-time compile of the real train step for a TPU slice, on any host.

With the PyPI package `libtpu` installed (`pip install -e '.[tpu]'`), libtpu describes the
devices of a slice (`jax.experimental.topologies`), and the jitted train step is lowered and
compiled for them here, without a TPU: the compiler's memory analysis is the per-device bytes
XLA will allocate, and its optimised HLO gives the FLOPs (plan/flops.py). With `--dump DIR`,
XLA also writes its buffer assignment and *memory-usage-report.txt: where the bytes go.
"""
from __future__ import annotations

import os
import time

from plan.flops import count_hlo_flops
from plan.hardware import Topology


def compile_step(run_cfg, layout, topo: Topology, mesh_cfg, dump: str | None = None):
    """(compiled memory analysis, FLOPs per device (plan.flops.HloFlops), seconds): the actual
    jitted train step lowered and compiled for the slice's devices by libtpu on this host;
    `dump`: a directory for XLA's dump (optimised HLO, buffer assignment, the memory-usage
    report). Raises ImportError without libtpu."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding

    from parallel import Rules, make_mesh, sharded
    from train.optim import make_optimizer, schedule
    from train.step import make_train_step

    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no host probing on a laptop
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is used: no lock file
    try:
        devices = topologies.get_topology_desc(topo.tpu_name, "tpu").devices
    except RuntimeError as e:
        raise ImportError(f"libtpu could not describe {topo.tpu_name}: {str(e).splitlines()[0]}") from e
    mesh = make_mesh(mesh_cfg, run_cfg.model, devices=devices, global_batch=run_cfg.data.global_batch)
    rules = Rules.of_run(run_cfg)
    state = layout.abstract(mesh)
    seq = jax.ShapeDtypeStruct((run_cfg.data.global_batch, run_cfg.data.seq_len), jnp.int32,
                               sharding=NamedSharding(mesh, rules.spec(("batch", None))))
    batch = dict.fromkeys(("inputs", "targets", "segment_ids", "loss_mask"), seq)
    tx = make_optimizer(run_cfg.optim, run_cfg.train.steps, layout.param_state, mesh, rules)
    step = make_train_step(layout.graphdef, tx, run_cfg, schedule(run_cfg.optim, run_cfg.train.steps),
                           platform=devices[0].platform)
    t = time.perf_counter()
    with sharded(mesh, rules, run_cfg.train.moe_transport, run_cfg.train.capacity_factor):
        out = jax.tree.map(lambda x: x.sharding, state)
        lowered = jax.jit(step, donate_argnums=0, out_shardings=(out, None)).lower(state, batch)
        options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True} if dump else None
        compiled = lowered.compile(compiler_options=options)
    return compiled.memory_analysis(), count_hlo_flops(compiled.as_text()), time.perf_counter() - t


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def compiled_total(ma) -> float:
    """Per-device bytes of a compiled step: arguments + temporaries + outputs not aliased."""
    return ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
