"""`python -m train --config configs/tiny.yaml [key=value ...] [--profile]`: the training job.

Order matters: the run configuration is read and validated in plain Python first (a bad value
fails in one line, before JAX starts); then the device count is fixed, the mesh is built and
validated, the model is initialised directly into its shards, and the jitted step (donated
state, pinned output shardings) runs over the Grain pipeline.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml", help="run configuration YAML")
    ap.add_argument("--profile", action="store_true", help="write a JAX profiler trace of log.profile_steps")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from model.config import ConfigError
    from train.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import jax

    if cfg.train.devices and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        jax.config.update("jax_num_cpu_devices", cfg.train.devices)
    try:
        return run(cfg, profile=args.profile)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def setup(cfg, mesh, rules):
    """(train state on `mesh`, its shardings, the un-jitted step function) for a RunConfig:
    the model initialised into its shards, the optimiser state beside it."""
    from flax import nnx

    from parallel import create_sharded
    from train.optim import make_optimizer, schedule
    from train.step import init_state, make_train_step, place_state

    model = create_sharded(cfg.model, mesh, rules, seed=cfg.train.seed)
    tx = make_optimizer(cfg.optim, cfg.train.steps, nnx.state(model, nnx.Param))
    graphdef, state = init_state(model, tx)
    state, shardings = place_state(state, mesh)
    return state, shardings, make_train_step(graphdef, tx, cfg, schedule(cfg.optim, cfg.train.steps))


def run(cfg, profile: bool = False, max_steps: int | None = None) -> int:
    """Train per `cfg`; returns the process exit code. `max_steps` stops early (tests)."""
    import jax
    import numpy as np

    from model.counts import flops_per_token
    from parallel import Rules, describe, make_mesh, sharded
    from train.config import format_config, save_resolved
    from train.data import describe_corpus, make_iterator
    from train.metrics import EventWriter, JsonlWriter, Progress

    model_cfg = cfg.model
    run_dir = cfg.log.run_dir
    print(format_config(cfg))
    print(f"resolved config saved to {save_resolved(cfg, run_dir)}")
    mesh = make_mesh(cfg.mesh, model_cfg, global_batch=cfg.data.global_batch)
    rules = Rules(cfg.rules)
    corpus = describe_corpus(cfg.data)
    if corpus["vocab_size"] > model_cfg.vocab_size:
        from model.config import ConfigError

        raise ConfigError(f"data.tokenizer: its {corpus['vocab_size']} ids do not fit "
                          f"model.vocab_size={model_cfg.vocab_size}")
    print(f"mesh {describe(mesh)} on {len(jax.devices())} {jax.devices()[0].platform} devices; corpus {corpus}")

    state, state_shardings, step_fn = setup(cfg, mesh, rules)
    batch_sharding = jax.sharding.NamedSharding(mesh, rules.spec(("batch", None)))
    flops = flops_per_token(model_cfg, cfg.data.seq_len)["train"]
    peak = cfg.log.peak_flops * len(jax.devices())

    it = make_iterator(cfg.data)
    jsonl = JsonlWriter(os.path.join(run_dir, "metrics.jsonl"))
    tb = EventWriter(os.path.join(run_dir, "tb")) if cfg.log.tensorboard else None
    steps = cfg.train.steps if max_steps is None else min(max_steps, cfg.train.steps)
    bar = Progress(steps)
    prof = tuple(cfg.log.profile_steps or (3, 5)) if profile else None
    with sharded(mesh, rules, cfg.train.moe_transport, cfg.train.capacity_factor):
        jstep = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, None))
        t_last, tokens_since, pending = time.perf_counter(), 0.0, []
        for step in range(steps):
            if prof and step == prof[0]:
                jax.profiler.start_trace(os.path.join(run_dir, "profile"))
            batch = next(it)
            local = {k: np.asarray(batch[k]) for k in ("inputs", "targets", "segment_ids", "loss_mask")}
            gbatch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
            state, metrics = jstep(state, gbatch)
            pending.append(metrics)
            if prof and step == prof[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                print(f"profile trace written to {os.path.join(run_dir, 'profile')}")
            if (step + 1) % cfg.log.log_every and step + 1 != steps:
                continue
            fetched = jax.device_get(pending)
            now = time.perf_counter()
            tokens_since = sum(float(m["tokens"]) for m in fetched)
            tok_s = cfg.data.global_batch * cfg.data.seq_len * len(fetched) / (now - t_last)
            t_last, pending = now, []
            record = {k: float(v) for k, v in fetched[-1].items()}
            record.update(step=step + 1, tokens_per_s=tok_s, mfu=tok_s * flops / peak,
                          target_tokens=tokens_since)
            jsonl.write(record)
            if tb:
                tb.scalars(step + 1, record)
            bar.update(step + 1, record["loss"], tok_s)
            if not np.isfinite(record["loss"]):
                print(f"\nloss is not finite at step {step + 1}; stopping", file=sys.stderr)
                return 1
    bar.close()
    jsonl.close()
    if tb:
        tb.close()
    print(f"done: {steps} steps, final loss {record['loss']:.4f}; metrics in {run_dir}")
    return 0
