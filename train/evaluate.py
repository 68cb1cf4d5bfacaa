"""Held-out loss during training (log.eval_every): a forward-only, jitted next-token CE.

Reuses train/step.py's pure pieces (make_forward, loss_sums through it, denominators,
micro_split), so the eval CE is exactly the training `ce` term. Token-weighted over all eval
batches: eval_loss = sum of CE over every target token / number of target tokens. The
forward runs the indexer's sparse path (what inference runs), micro-batched like training.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train.distributed import compile_together
from train.step import COUNTED, denominators, make_forward, micro_split

KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


def make_eval_step(graphdef, run_cfg) -> Callable:
    """eval_step(params, rest, batch) -> (sum of next-token CE over the batch's target tokens,
    their count), both float32 scalars; jit it."""
    forward = make_forward(graphdef, run_cfg.model)
    weights = {k: float(k == "ce") for k in COUNTED}
    m = run_cfg.train.micro_batches

    def eval_step(params, rest, batch):
        denoms = denominators(batch, run_cfg.model)

        def ce(mb):
            _, (sums, _, _) = forward(params, rest, mb, denoms, weights, False)
            return sums["ce"]

        if m == 1 or batch["inputs"].shape[0] % m:
            total = ce(batch)
        else:
            total, _ = jax.lax.scan(lambda acc, mb: (acc + ce(mb), None), jnp.zeros((), jnp.float32),
                                    micro_split(batch, m))
        return total, denoms["ce"]

    return eval_step


def make_evaluator(run_cfg, batches: Sequence[dict], sharding) -> Callable:
    """evaluate(state) -> (eval_loss, eval tokens) over `batches` (this process's share of each
    eval batch, numpy, as train.data.make_eval_batches gives them), each assembled into a
    global array with the training batches' `sharding` when evaluated (nothing stays on the
    devices between evaluations). Call it inside the `parallel.sharded` context of the run."""
    from flax import nnx

    from model import abstract

    graphdef = nnx.split(abstract(run_cfg.model), nnx.Param, ...)[0]
    jitted, compiled = jax.jit(make_eval_step(graphdef, run_cfg)), []

    def evaluate(state):  # a train/state.py TrainState
        put = lambda b: {k: jax.make_array_from_process_local_data(sharding, np.asarray(b[k]))  # noqa: E731
                         for k in KEYS}
        device_batches = [put(b) for b in batches]
        if not compiled:  # every process compiles before any runs it (see compile_together)
            compiled.append(compile_together(jitted, state.params, state.rest, device_batches[0],
                                             name="eval-step"))
        sums = [compiled[0](state.params, state.rest, b) for b in device_batches]
        ce, tokens = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
        return float(ce / max(tokens, 1.0)), float(tokens)

    return evaluate
