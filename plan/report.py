"""The plan as printed: model, batch, topology, mesh, the per-device memory table, the weights'
storage bytes, the step time at an assumed MFU, and (TPU, with libtpu) the compiled figures
next to the estimate."""
from __future__ import annotations

import dataclasses
import time

from plan.compile import compile_step, compiled_total, libtpu_available
from plan.flops import REMAT_FLOPS, flops_per_step, kernel_fill, model_flops_per_device
from plan.hardware import Chip, GiB, MiB, Topology
from plan.activations import activations
from plan.memory import FIT_FRACTION, Memory, estimate
from plan.state import StateLayout, import_host_bytes
from plan.search import check_mesh, suggest, why_not


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def _mesh_text(sizes) -> str:
    return " x ".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "1 device"


def plan(run_cfg, topo: Topology, mesh_cfg=None, mfu: float = 0.4, compile_: bool | None = None,
         out=print, dump: str | None = None) -> int:
    """Print the plan; returns 0 when the run fits, 1 when it does not (or cannot run)."""
    from model.config import ConfigError
    from model.counts import param_counts
    from parallel import Rules

    t0 = time.perf_counter()
    cfg, chip = run_cfg.model, topo.chip
    counts = param_counts(cfg)
    out(f"model: {counts['total'] / 1e9:.1f}B parameters ({counts['active'] / 1e9:.1f}B active), "
        f"params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}, optimiser {run_cfg.optim.name}")
    out(f"batch: {run_cfg.data.global_batch} x {run_cfg.data.seq_len} tokens, "
        f"{run_cfg.train.micro_batches} micro-batch(es)")
    out(f"topology: {topo.describe()}")
    if mesh_cfg is not None:  # a requested mesh is checked before anything is traced
        try:
            sizes = mesh_cfg.resolve(topo.devices)
        except ConfigError as e:
            out(f"mesh: the requested mesh cannot run here: {e}")
            return 1
        problem = check_mesh(run_cfg, sizes)
        if problem:
            out(f"mesh: {_mesh_text(sizes)} cannot run this config: {problem}")
            return 1
    layout = StateLayout(run_cfg, Rules.of_run(run_cfg))
    act = activations(run_cfg, layout, topo.platform)
    budget, other = FIT_FRACTION * chip.hbm, None
    if mesh_cfg is None:
        sizes, mem = suggest(run_cfg, layout, act, topo.devices, chip.hbm)
        if sizes is None and mem is None:
            out("mesh: no mesh of these devices divides the batch and the model; change data.global_batch")
            return 1
        if sizes is None:
            sizes, mem = mem
            out(f"mesh: none fits; the closest is {_mesh_text(sizes)} (tensor=1 unless the batch is too "
                "small, expert <= 64, smallest fsdp that fits, data for the rest)")
        else:
            out(f"mesh: {_mesh_text(sizes)} (suggested: tensor=1 unless the batch is too small, "
                "expert <= 64, smallest fsdp that fits, data for the rest)")
    else:
        mem = estimate(run_cfg, layout, act, sizes)
        out(f"mesh: {_mesh_text(sizes)} (requested)")
        if mem.total > budget:
            other = suggest(run_cfg, layout, act, topo.devices, chip.hbm)[0]

    def reestimate(micro: int) -> Memory:
        return estimate(dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, micro_batches=micro)),
                        layout, act, sizes)

    fits = report_memory(run_cfg, mem, chip, out, reestimate)
    report_storage(run_cfg, layout, sizes, out)
    report_import(layout, sizes, topo, out)
    if not fits and other:
        out(f"  a mesh that fits: {_mesh_text(other)} (--mesh auto)")
    if sizes["tensor"] > 1:
        out("  (activations sharded over tensor are counted whole: an upper bound)")
    flops = flops_per_step(run_cfg)
    step_s = flops / (topo.devices * chip.peak * mfu)
    tokens = run_cfg.data.global_batch * run_cfg.data.seq_len
    out(f"compute: {flops:.3g} model FLOP per step ({flops / topo.devices:.3g} per device); at {mfu:.0%} MFU "
        f"{step_s:.2f} s per step, {tokens / step_s:,.0f} tokens/s"
        + (" (remat recomputes the forward: +1/3 hardware FLOPs)" if cfg.remat != "none" else ""))
    out(f"analytic plan in {time.perf_counter() - t0:.1f} s")
    if compile_ is None:
        compile_ = bool(topo.shape) and libtpu_available()
    if compile_ and not topo.shape:
        out("compile: ahead-of-time compilation needs a TPU topology (libtpu); skipped for GPUs")
    elif compile_:
        fits = report_compile(run_cfg, layout, topo, sizes, mem, out, dump) and fits
    return 0 if fits else 1


def report_memory(run_cfg, mem: Memory, chip: Chip, out, reestimate) -> bool:
    """The per-device table; True when the estimate fits in FIT_FRACTION of HBM.
    `reestimate(micro_batches)`: the estimate with that many micro-batches."""
    unit, name = (GiB, "GiB") if mem.total >= GiB else (MiB, "MiB")
    out(f"per device{'':44}{name}")
    for row, value in mem.rows(run_cfg):
        out(f"  {row:<46}{value / unit:8.2f}")
    fits = mem.total <= FIT_FRACTION * chip.hbm
    out(f"  {'total (estimate)':<46}{mem.total / unit:8.2f}  of {chip.hbm / GiB:.1f} GiB HBM "
        f"({mem.total / chip.hbm:.0%}): {'fits' if fits else 'DOES NOT FIT'}")
    if mem.platform == "tpu":
        out(f"  (total = the arguments + the largest phase of the backward, the {mem.peak_phase}; phases: "
            + ", ".join(f"{k} {v / unit:.2f}" for k, v in mem.phases.items()) + " + libtpu's copy)")
    else:
        out("  (total = the arguments + every row: one H200 compile held them all at once)")
    if not fits:
        for line in why_not(run_cfg, mem, chip.hbm, reestimate):
            out(f"  {line}")
    return fits


def report_storage(run_cfg, layout, sizes, out) -> None:
    """The weights' bytes as DeepSeek stores them (serving, checkpoints), whole and per device."""
    from model.counts import STORAGES, storage_bytes
    from parallel.mesh import abstract_mesh

    cfg, classes = run_cfg.model, layout.weight_classes
    whole = storage_bytes(cfg, layout.param_elements(), classes)
    local = storage_bytes(cfg, layout.param_elements(abstract_mesh(sizes)), classes)
    out("weights stored as  " + " | ".join(f"{s} {whole[s] / GiB:,.1f} GiB ({local[s] / GiB:.2f} per device)"
                                           for s in STORAGES))


def report_import(layout, sizes, topo: Topology, out) -> None:
    """Host memory per process to start from a released checkpoint (train.init_from)."""
    from parallel.mesh import abstract_mesh

    n = topo.devices_per_host
    shard, source = import_host_bytes(layout.param_state, layout.rules, abstract_mesh(sizes), n)
    out(f"train.init_from / model.load_pretrained: host memory per process about {_size(n * shard + source)} "
        f"({n} local devices x largest parameter shard {_size(shard)} + largest checkpoint tensor in "
        f"float32 {_size(source)})")


def report_compile(run_cfg, layout, topo: Topology, sizes, mem: Memory, out, dump: str | None = None) -> bool:
    """Compile for the slice and print the compiler's memory and FLOPs next to the estimate;
    True when it fits in HBM with 10% to spare (or when libtpu is missing: nothing to say)."""
    from parallel.mesh import AXES, MeshConfig

    out(f"compiling the train step for {topo.tpu_name} ({topo.devices} devices) with libtpu ...")
    t = time.perf_counter()
    try:
        ma, flops, secs = compile_step(run_cfg, layout, topo, MeshConfig(**{a: sizes[a] for a in AXES}), dump)
    except ImportError as e:
        out(f"compile: skipped ({e})")
        return True
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory verdict is a JaxRuntimeError
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        out(f"compiled in {time.perf_counter() - t:.1f} s: DOES NOT FIT: {str(e).splitlines()[0]}")
        return False
    compiled = compiled_total(ma)
    out(f"compiled in {secs:.1f} s; per device: arguments {_size(ma.argument_size_in_bytes)} "
        f"(estimate {_size(mem.arguments)}), outputs "
        f"{_size(ma.output_size_in_bytes)} (aliased {_size(ma.alias_size_in_bytes)}), temporaries "
        f"{_size(ma.temp_size_in_bytes)} (estimate {_size(mem.temporaries)}), "
        f"code {_size(ma.generated_code_size_in_bytes)}")
    hbm = topo.chip.hbm
    fits = compiled <= FIT_FRACTION * hbm
    out(f"compiled total {_size(compiled)} of {hbm / GiB:.1f} GiB ({compiled / hbm:.0%}): "
        f"{'fits' if fits else 'DOES NOT FIT'} (with {1 - FIT_FRACTION:.0%} of HBM to spare)")
    gap = mem.total / compiled - 1
    out(f"estimate {_size(mem.total)} is {abs(gap):.0%} {'above' if gap > 0 else 'below'} the compiled total; "
        "trust the compiled figure (the buffers XLA will allocate), the estimate says what they are")
    train, optim = model_flops_per_device(run_cfg, layout, topo.devices)
    model = train + optim
    out(f"FLOPs per device: compiled {flops.total:.3g} (its matmuls, loops x trip counts: dots {flops.dots:.3g}, "
        f"Pallas kernels {flops.kernels:.3g} at their stated cost) vs model {model:.3g} (forward + backward x "
        f"{REMAT_FLOPS[run_cfg.model.remat]:.3g} remat {train:.3g} + Muon Newton-Schulz {optim:.3g}): "
        f"ratio {flops.total / model:.2f}"
        + (f"; {flops.unknown} loop(s) of unknown trip count counted once" if flops.unknown else ""))
    fill = kernel_fill(run_cfg, sizes)
    if flops.kernels and fill < 1:
        done = flops.dots + fill * flops.kernels
        out(f"  the grouped-matmul kernels state FLOPs for their whole receive buffer; their grid follows the "
            f"group sizes, and a balanced routing fills {fill:.0%} of it (capacity factor "
            f"{run_cfg.train.capacity_factor}): {done:.3g} FLOPs done, ratio {done / model:.2f}")
    if dump:
        out(f"XLA dump (optimised HLO, buffer assignment, *memory-usage-report.txt) in {dump}")
    return fits
