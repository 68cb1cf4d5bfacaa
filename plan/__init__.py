"""`python -m plan --config C --topology T`: does a run fit a pod, and how fast should it go?

Everything here runs on a laptop, without accelerators:
- The train state's per-device bytes (parameters, routing tables, optimiser state, gradients):
  the abstract model and optimiser laid out by the sharding rules on an abstract mesh of the
  topology's size, exact (state.py).
- Activations: the residuals `jax.vjp` of the real loss keeps for the backward, traced
  abstractly, so `model.remat` is applied by JAX itself (activations.py; memory.py says how they
  are counted).
- Step time: model FLOPs per token (model/counts.py) x tokens per step / (devices x peak x MFU).
- With `libtpu` installed (`pip install -e '.[tpu]'`), TPU topologies are also compiled ahead
  of time: the actual train step for the topology's devices, whose compiled memory analysis is
  printed next to the estimate (`--no-compile` skips it).
- Without a `mesh:` section in the config (or with `--mesh auto`) a mesh is suggested: expert
  parallelism within a 64-chip cube, the smallest fsdp that fits, data for the rest (search.py).

Layout (each module imports only those above it):
  chips.yaml   the hardware catalogue, as data: HBM and bf16 peak per JAX device, torus dims
  hardware.py  Chip, CHIPS (loaded from chips.yaml), Topology, parse_topology
  state.py     StateLayout (the train state, abstractly), the layer loops, a checkpoint import's host bytes
  activations.py  the residuals autodiff keeps (traced abstractly): the loss's, a block's, the EP experts'
  memory.py    the estimate: Memory, its rows and phases, the EP MoE layer's backward
  search.py    which meshes can run a config; the suggested mesh; why an estimate does not fit
  flops.py     the model's FLOPs per step; hlo_flops: FLOPs of optimised HLO, loops included,
               Pallas kernels apart (count_hlo_flops); kernel_fill: the grouped matmuls' filled rows
  compile.py   the ahead-of-time libtpu compile of the train step and its memory analysis
  report.py    plan(): the printed plan
  cli.py       the command line (__main__.py runs it)
"""
from plan.cli import main
from plan.compile import compile_step, compiled_total, libtpu_available
from plan.flops import (REMAT_FLOPS, HloFlops, count_hlo_flops, flops_per_step, hlo_flops, kernel_fill,
                        model_flops_per_device, optimizer_flops)
from plan.hardware import CHIPS, Chip, GiB, MiB, PlanError, Topology, load_chips, parse_topology, torus_shape
from plan.activations import Activations, activations, residual_bytes, traced_impl
from plan.memory import FIT_FRACTION, Memory, estimate, exchange_bytes
from plan.state import StateLayout, import_host_bytes, looped_layers, looped_segments
from plan.report import plan, report_compile, report_import, report_memory, report_storage
from plan.search import MAX_EXPERT, check_mesh, suggest, why_not

__all__ = [
    "CHIPS", "FIT_FRACTION", "MAX_EXPERT", "REMAT_FLOPS", "Activations", "Chip", "GiB", "HloFlops", "Memory", "MiB",
    "PlanError", "StateLayout", "Topology", "activations", "check_mesh", "compile_step", "compiled_total",
    "count_hlo_flops", "estimate", "exchange_bytes", "flops_per_step", "hlo_flops", "import_host_bytes", "kernel_fill",
    "libtpu_available", "load_chips", "looped_layers", "looped_segments", "main",
    "model_flops_per_device", "optimizer_flops", "parse_topology", "plan", "report_compile", "report_import",
    "report_memory", "report_storage", "residual_bytes", "suggest", "torus_shape", "traced_impl", "why_not",
]
