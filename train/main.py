"""`python -m train --config configs/tiny.yaml [key=value ...] [--profile]`: the training job.

Order matters: the run configuration is read and validated in plain Python first (a bad value
fails in one line, before JAX starts); then the device count is fixed, the mesh is built and
validated, the model is initialised directly into its shards, and the jitted step (donated
state, pinned output shardings) runs over the Grain pipeline in train/loop.py, which calls the
hooks of train/hooks.py (logging, bad-step stop, evaluation, checkpoints, preemption, profile).
A run directory with checkpoints resumes from the newest good one (train/checkpoint.py);
several processes join through train/distributed.py (--coordinator / --num-processes /
--process-id, or detected).

Exit codes: 0 done, or preempted by SIGTERM and saved; 2 a configuration error or a checkpoint
of another model; 3 train.max_bad_steps consecutive non-finite steps; 4 a checkpoint that could
not be written or no usable checkpoint; 5 the processes of a job could not form or disagree.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml", help="run configuration YAML")
    ap.add_argument("--profile", action="store_true", help="write a JAX profiler trace of log.profile_steps")
    ap.add_argument("--coordinator", help="HOST:PORT of process 0, for an explicit multi-process launch")
    ap.add_argument("--num-processes", type=int, help="processes in the job (explicit launch)")
    ap.add_argument("--process-id", type=int, help="this process's index (explicit launch)")
    ap.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for every process to join")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from model.config import ConfigError
    from train.config import load_run_config
    from train.distributed import rare_full_gc

    rare_full_gc()

    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from train.distributed import DistributedError, check_same_config, detect, initialize
    from train.config import format_config

    import jax

    if cfg.train.devices and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        # CPU emulation: never probe accelerator plugins (libtpu, CUDA) that may be installed
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cfg.train.devices)  # per process
    from train.checkpoint import CheckpointError, ModelMismatch

    errors = ((ConfigError, "config error", 2), (ModelMismatch, "checkpoint error", 2),
              (CheckpointError, "checkpoint error", 4), (DistributedError, "distributed error", 5))
    try:
        launch = detect(args.coordinator, args.num_processes, args.process_id)
        print(f"distributed runtime: {launch.describe()}", file=sys.stderr)
        initialize(launch, args.init_timeout)
        check_same_config(format_config(cfg))
        return run(cfg, profile=args.profile)
    except tuple(t for t, _, _ in errors) as e:
        label, code = next((label, code) for t, label, code in errors if isinstance(e, t))
        print(f"\n{label}: {e}", file=sys.stderr)
        return code


def fault_nan_steps() -> tuple[int, ...]:
    """DEEPFLAX_FAULT_NAN_STEPS="3,7-9": step indices (0-based, as the state counts them) whose
    batch gets a NaN loss weight, so that their loss and gradients are NaN (fault injection for
    the bad-step tests; empty in normal runs). Injected into the data, not the compiled step:
    the program is the one a normal run compiles."""
    out = []
    for part in filter(None, os.environ.get("DEEPFLAX_FAULT_NAN_STEPS", "").split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


class Preemption:
    """SIGTERM (the preemption notice of TPU VMs, GKE and SLURM) -> save, flush, exit 0.

    One process: a signal handler sets a flag. Several: JAX's distributed runtime catches the
    signal on whichever host gets it and its preemption sync manager picks the same step for
    every process (`reached_preemption_sync_point`, asked after every step)."""

    def __init__(self):
        import signal

        import jax

        self.requested, self._multi = False, jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        import signal

        if not self._multi:
            signal.signal(signal.SIGTERM, self._previous)


def _silent(*args, **kwargs):
    """The printer of processes other than 0 (only process 0 prints)."""


def run(cfg, profile: bool = False, max_steps: int | None = None) -> int:
    """Train per `cfg`, resuming from its newest good checkpoint; returns 0 (done, or preempted
    and saved) or 3 (train.max_bad_steps consecutive bad steps). Raises ConfigError,
    CheckpointError (ModelMismatch) or DistributedError, which `main` turns into exit codes
    2, 4 (2) and 5. `max_steps` stops early (tests)."""
    preemption = Preemption()
    try:
        return _run(cfg, profile, max_steps, preemption)
    finally:
        preemption.close()


def eval_batches(cfg) -> list:
    """This process's held-out batches for log.eval_every (none when it is 0); a ConfigError,
    before any compile, when evaluation is on but the data has no held-out part."""
    if not cfg.log.eval_every:
        return []
    import jax

    from model.config import ConfigError
    from train.data import make_eval_batches

    batches = make_eval_batches(cfg.data, jax.process_index(), jax.process_count())
    if not batches:
        raise ConfigError(f"log.eval_every: evaluating every {cfg.log.eval_every} steps needs "
                          "held-out data; set data.eval_fraction / data.eval_paths, or "
                          "log.eval_every=0")
    return batches


def _batches(it, sharding, examples, start, nan_steps=()):
    """The process-local batches of `it` as global arrays on the mesh; with an `examples`
    writer, the tokens of each document id in each step's batch (the data audit log); a NaN
    loss weight in the batches of `nan_steps` (fault_nan_steps)."""
    import jax
    import numpy as np

    step = start
    while True:
        batch = next(it)
        step += 1
        if step - 1 in nan_steps:
            batch = dict(batch, loss_mask=np.asarray(batch["loss_mask"]).copy())
            batch["loss_mask"].flat[0] = np.nan
        if examples is not None:
            doc_ids = batch["doc_ids"]
            ids, counts = np.unique(doc_ids[doc_ids >= 0], return_counts=True)
            examples.write(step, {"tokens": dict(zip(map(str, ids.tolist()), counts.tolist()))})
        yield {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
               for k in ("inputs", "targets", "segment_ids", "loss_mask")}


def _run(cfg, profile, max_steps, preemption) -> int:
    import jax

    from parallel import sharded
    from train.distributed import compile_together
    from train.hooks import BadStepHook
    from train.loop import run_loop

    main_process = jax.process_index() == 0  # only process 0 prints and writes logs
    say = print if main_process else _silent
    mesh, rules, held_out = _prepare(cfg, main_process, say)
    ckpt = None
    if cfg.checkpoint.enabled:  # before any compile: an unusable directory fails at once
        from train.checkpoint import Checkpointer

        ckpt = Checkpointer(_ckpt_dir(cfg), cfg.checkpoint, cfg.to_dict(), log=say)
    start, state, state_shardings, step_fn, it = _initial_state(cfg, mesh, rules, ckpt, say)
    steps = cfg.train.steps if max_steps is None else min(max_steps, cfg.train.steps)
    if start >= steps:
        say(f"nothing to do: checkpoint step {start} >= {steps} steps "
            "(raise train.steps, or use another log.run_dir / checkpoint.dir)")
        ckpt and ckpt.close()
        return 0

    batch_sharding = jax.sharding.NamedSharding(mesh, rules.spec(("batch", None)))
    writer, examples = _writers(cfg, start, main_process)
    try:
        with sharded(mesh, rules, cfg.train.moe_transport, cfg.train.capacity_factor):
            nan_steps = fault_nan_steps()
            if nan_steps:
                say(f"fault injection: NaN loss weights at steps {list(nan_steps)}")
            batches = _batches(it, batch_sharding, examples, start, nan_steps)
            first = next(batches)
            jstep = compile_together(
                jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, None)),
                state, first, name="train-step")
            hooks, log = _hooks(cfg, profile, start, steps, ckpt, it, held_out, batch_sharding,
                                preemption, writer, main_process, say)
            _, _, stopper = run_loop(state, jstep, itertools.chain([first], batches), hooks,
                                     start, steps)
    finally:
        writer.close()
        examples and examples.close()
    if isinstance(stopper, BadStepHook):
        return 3
    if not preemption.requested:
        say(f"done: {steps} steps, final loss {log.last['loss']:.4f}; metrics in {cfg.log.run_dir}")
    return 0


def _prepare(cfg, main_process: bool, say):
    """(mesh, rules, held-out batches): the resolved config printed and saved, the checks that
    need the devices or the data, all before any compile."""
    import jax

    from parallel import Rules, describe, make_mesh
    from train.config import format_config, save_resolved
    from train.data import describe_corpus

    say(format_config(cfg))
    if main_process:
        say(f"resolved config saved to {save_resolved(cfg, cfg.log.run_dir)}")
    mesh = make_mesh(cfg.mesh, cfg.model, global_batch=cfg.data.global_batch)
    corpus = describe_corpus(cfg.data)
    if corpus["vocab_size"] > cfg.model.vocab_size:
        from model.config import ConfigError

        raise ConfigError(f"data.tokenizer: its {corpus['vocab_size']} ids do not fit "
                          f"model.vocab_size={cfg.model.vocab_size}")
    say(f"mesh {describe(mesh)} on {len(jax.devices())} {jax.devices()[0].platform} devices; corpus {corpus}")
    return mesh, Rules.of_run(cfg), eval_batches(cfg)


def _initial_state(cfg, mesh, rules, ckpt, say):
    """(start step, state, its shardings, the step function, this process's data iterator): a
    fresh state (or train.init_from's parameters) at step 0, or the newest good checkpoint's
    state with the iterator at its position."""
    import jax

    from train.data import ProcessIterator
    from train.setup import setup

    fresh = not (ckpt and ckpt.steps())
    state, shardings, step_fn = setup(cfg, mesh, rules,  # resuming: only the target
                                      pretrained=bool(cfg.train.init_from) and fresh, abstract=not fresh)
    if cfg.train.init_from and fresh:
        say(f"parameters from {cfg.train.init_from}")
    it = ProcessIterator(cfg.data, jax.process_index(), jax.process_count())
    if fresh:
        return 0, state, shardings, step_fn, it
    start, state, data_state = ckpt.restore_latest(state)
    it.set_state(data_state)
    say(f"resumed from step {start} in {_ckpt_dir(cfg)}")
    return start, state, shardings, step_fn, it


def _ckpt_dir(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.log.run_dir, "checkpoints")


def _writers(cfg, start: int, main_process: bool):
    """(the metrics writer: metrics.jsonl + TensorBoard, the examples.jsonl writer or None);
    NullWriters on processes other than 0."""
    from train.metrics import FanOut, JsonlWriter, NullWriter, TensorBoardWriter

    if not main_process:
        return NullWriter(), None
    run_dir = cfg.log.run_dir
    writers = [JsonlWriter(os.path.join(run_dir, "metrics.jsonl"), resume_step=start)]
    if cfg.log.tensorboard:
        writers.append(TensorBoardWriter(os.path.join(run_dir, "tb")))
    examples = JsonlWriter(os.path.join(run_dir, "examples.jsonl"), resume_step=start) \
        if cfg.log.example_ids else None
    return FanOut(*writers), examples


def _hooks(cfg, profile, start, steps, ckpt, it, held_out, batch_sharding, preemption, writer,
           main_process, say) -> tuple[list, object]:
    """(the run's hooks, its LoggingHook). In the order they act on a step: log it, stop on
    bad steps, evaluate, save, answer a preemption, profile."""
    import jax

    from model.counts import flops_per_token
    from train.distributed import global_data_state
    from train.hooks import (BadStepHook, CheckpointHook, EvalHook, LoggingHook, PreemptionHook,
                             ProfileHook)
    from train.metrics import Progress

    log = LoggingHook(writer, Progress(steps, start, enabled=main_process), cfg.log.log_every,
                      tokens_per_step=cfg.data.global_batch * cfg.data.seq_len,
                      flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len)["train"],
                      peak_flops=cfg.log.peak_flops * len(jax.devices()))
    hooks = [log, BadStepHook(cfg.train.max_bad_steps, say)]
    if held_out:
        from train.evaluate import make_evaluator

        evaluate = make_evaluator(cfg, held_out, batch_sharding)
        hooks.append(EvalHook(evaluate, writer, cfg.log.eval_every, steps, say))
    save = None
    if ckpt is not None:
        save = CheckpointHook(ckpt, lambda: global_data_state(it.get_state()), say)
        hooks.append(save)
    hooks.append(PreemptionHook(preemption, save, say))
    if profile:
        prof = tuple(cfg.log.profile_steps or (3, 5))
        hooks.append(ProfileHook(os.path.join(cfg.log.run_dir, "profile"), prof, start, say))
    return hooks, log
