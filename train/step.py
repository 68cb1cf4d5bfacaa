"""Loss and the jitted train step: CE + MTP + balance + indexer KL + z-loss, bias update.

Legend: B batch, S sequence, V vocab, L layers (main then MTP), E experts, M micro-batches.
Every term is a *sum* divided by a denominator fixed by the whole batch (tokens, sequences,
queries), so M micro-batches accumulate to exactly the gradient of one big batch.
The train state is train/state.py's TrainState; `rest` holds the routing biases and hash
tables (never seen by the optimiser). The routing-bias update runs
inside the step, after the optimiser, from the step's per-expert token counts.

Bad steps: when the loss or the gradient norm is not finite, the step keeps params, rest and
opt exactly (multiplying by zero would keep NaN, and `optax.apply_if_finite` gives up after a
fixed count); `step` still advances (the batch is consumed), `bad` counts consecutive bad steps
and `skipped` all of them. The loop stops the run when `bad` reaches train.max_bad_steps. How
the old state is kept depends on the compiler (`keep_on_bad_step`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.config import ModelConfig
from model.layers import constrain
from model.transformer import update_routing_bias

F32 = jnp.float32
COUNTED = ("ce", "mtp", "z", "balance", "kl")


def token_ce(logits, targets):
    """Per-token cross-entropy and log-partition, float32."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0], lse


def _slices(w_DV, chunks: int):
    """[chunks, D, V / chunks] and each slice's first vocabulary id."""
    d, v = w_DV.shape
    return jnp.moveaxis(w_DV.reshape(d, chunks, v // chunks), 1, 0), jnp.arange(chunks) * (v // chunks)


def _slice_logits(h_BSD, w_DC):
    return constrain(jnp.einsum("bsd,dc->bsc", h_BSD.astype(F32), w_DC.astype(F32)), ("batch", "act_seq", "act_vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def head_ce(h_BSD, w_DV, targets_BS, chunks: int):
    """token_ce of the float32 logits h @ w, computed `chunks` vocabulary slices at a time (a
    running log-sum-exp) and recomputed slice by slice in the backward: the [B, S, V] logits
    are never kept, and each slice of the weight's gradient is made once, whole."""
    return _head_ce_fwd(h_BSD, w_DV, targets_BS, chunks)[0]


def _head_ce_fwd(h_BSD, w_DV, targets_BS, chunks):
    def body(carry, xs):
        top, total, picked = carry
        w_DC, first = xs
        logits = _slice_logits(h_BSD, w_DC)
        new_top = jnp.maximum(top, jnp.max(logits, -1))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[..., None]), -1)
        local = targets_BS - first
        inside = (local >= 0) & (local < logits.shape[-1])
        here = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0]
        return (new_top, total, picked + jnp.where(inside, here, 0.0)), None

    zeros = jnp.zeros(targets_BS.shape, F32)
    (top, total, picked), _ = jax.lax.scan(body, (zeros - jnp.inf, zeros, zeros), _slices(w_DV, chunks))
    lse = top + jnp.log(total)
    return (lse - picked, lse), (h_BSD, w_DV, targets_BS, lse)


def _head_ce_bwd(chunks, res, cts):
    h_BSD, w_DV, targets_BS, lse = res
    d_ce, d_lse = cts

    def body(d_h, xs):
        w_DC, first = xs
        logits = _slice_logits(h_BSD, w_DC)
        own = jax.nn.one_hot(targets_BS - first, logits.shape[-1], dtype=F32)  # 0 outside the slice
        g = jnp.exp(logits - lse[..., None]) * (d_ce + d_lse)[..., None] - own * d_ce[..., None]
        d_h = d_h + jnp.einsum("bsc,dc->bsd", g, w_DC.astype(F32))
        return d_h, jnp.einsum("bsd,bsc->dc", h_BSD.astype(F32), g)

    d_h, d_w = jax.lax.scan(body, jnp.zeros(h_BSD.shape, F32), _slices(w_DV, chunks))
    d_w = jnp.moveaxis(d_w, 0, 1).reshape(w_DV.shape)
    return d_h.astype(h_BSD.dtype), d_w.astype(w_DV.dtype), None


head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)


def mtp_mask(mask_BS, depth: int):
    """MTP block j predicts token t + j + 2: valid if every step t .. t+j+1 stays in the document."""
    m = mask_BS
    for i in range(1, depth + 2):
        m = m * jnp.pad(mask_BS[:, i:], ((0, 0), (0, i)))
    return m


def shifted(targets_BS, k: int):
    return jnp.pad(targets_BS[:, k:], ((0, 0), (0, k)))


def head_targets(targets_BS, n_heads: int):
    """What each head predicts: the next token, then MTP block j the token j + 2 ahead."""
    return [targets_BS] + [shifted(targets_BS, j + 1) for j in range(n_heads - 1)]


def loss_sums(heads, aux, batch, model_cfg: ModelConfig):
    """Unnormalised sums of every loss term over one (micro-)batch. heads: (ce, lse) [B, S] of
    the main head, then of each MTP block, against head_targets (token_ce or head_ce)."""
    mask = batch["loss_mask"].astype(F32)
    (ce, lse), mtp = heads[0], heads[1:]
    out = {"ce": jnp.sum(ce * mask), "z": jnp.sum(jnp.square(lse) * mask)}
    out["mtp"] = jnp.zeros((), F32)
    for j, (ce_j, _) in enumerate(mtp):
        out["mtp"] += jnp.sum(ce_j * mtp_mask(mask, j)) / max(len(mtp), 1)
    scored = jnp.asarray([i >= model_cfg.n_hash_layers or i >= model_cfg.n_layers
                          for i in range(aux.balance_f.shape[0])], F32)
    per_layer = jnp.sum(aux.balance_f * aux.balance_p, axis=(1, 2))       # summed over sequences
    out["balance"] = jnp.sum(per_layer * scored) / jnp.maximum(jnp.sum(scored), 1.0)
    out["kl"] = jnp.sum(aux.indexer_kl)
    return out


def denominators(batch, model_cfg: ModelConfig):
    """Whole-batch normalisers: target tokens (per MTP depth too), sequences, query positions
    (the KL loss averages over all queries, 0 for queries with no candidate yet)."""
    mask = batch["loss_mask"].astype(F32)
    b, s = mask.shape
    return {"ce": jnp.sum(mask), "z": jnp.sum(mask),
            "mtp": jnp.mean(jnp.stack([jnp.sum(mtp_mask(mask, j)) for j in range(max(model_cfg.n_mtp_layers, 1))])),
            "balance": jnp.asarray(b, F32), "kl": jnp.asarray(b * s, F32)}


def total_loss(sums, denoms, weights):
    terms = {k: sums[k] / jnp.maximum(denoms[k], 1.0) for k in COUNTED}
    loss = sum(weights[k] * terms[k] for k in COUNTED)
    return loss, terms


def loss_weights(loss_cfg, step, steps: int):
    late = step >= int(loss_cfg.mtp_late_fraction * steps)
    return {"ce": 1.0, "mtp": jnp.where(late, loss_cfg.mtp_weight_late, loss_cfg.mtp_weight),
            "z": loss_cfg.z_loss, "balance": loss_cfg.balance_alpha, "kl": loss_cfg.indexer_weight}


def micro_split(batch, m: int):
    """[B, ...] -> [M, B/M, ...] taking every M-th row, so each device keeps a share of every
    micro-batch (a contiguous split would leave devices idle)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)


def make_forward(graphdef, model_cfg: ModelConfig):
    """forward(params, rest, micro-batch, denoms, weights, dense) -> (loss, (sums, expert
    counts, dropped)): the function every gradient of the step is taken of."""
    def forward(params, rest, mb, denoms, weights, dense):
        model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
        hs, aux = model.features(mb["inputs"], segment_ids=mb["segment_ids"], dense_csa=dense)
        w = model.head.weight()
        heads = [head_ce(h, w, t, model_cfg.head_chunks) for h, t in zip(hs, head_targets(mb["targets"], len(hs)))]
        sums = loss_sums(heads, aux, mb, model_cfg)
        loss, _ = total_loss(sums, denoms, weights)
        return loss, (sums, aux.expert_counts, jnp.sum(aux.dropped_tokens))

    return forward


def make_grad_fn(graphdef, run_cfg):
    """grads(params, rest, batch, step) -> (grads, sums, denoms, weights, expert counts, dropped),
    accumulated over train.micro_batches micro-batches."""
    model_cfg, loss_cfg, train_cfg = run_cfg.model, run_cfg.loss, run_cfg.train
    grad_fn = jax.grad(make_forward(graphdef, model_cfg), has_aux=True)

    def grads(params, rest, batch, step):
        denoms = denominators(batch, model_cfg)
        weights = loss_weights(loss_cfg, step, train_cfg.steps)

        def run(mb):  # the indexer's dense warm-up is a second branch, traced only when asked for
            if loss_cfg.indexer_dense_steps == 0:
                return grad_fn(params, rest, mb, denoms, weights, False)
            return jax.lax.cond(step < loss_cfg.indexer_dense_steps,
                                lambda: grad_fn(params, rest, mb, denoms, weights, True),
                                lambda: grad_fn(params, rest, mb, denoms, weights, False))

        if train_cfg.micro_batches == 1:
            g, out = run(batch)
        else:
            micro = micro_split(batch, train_cfg.micro_batches)

            def body(acc, mb):
                return jax.tree.map(jnp.add, acc, run(mb)), None

            # zeros + the first micro-batch's values are those values exactly: one traced and
            # compiled copy of the gradient (the scan's body), not a second one before the scan
            shapes = jax.eval_shape(run, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (g, out), _ = jax.lax.scan(body, zeros, micro)
        sums, counts, dropped = out
        return g, sums, denoms, weights, counts, dropped

    return grads


def keep_on_bad_step(ok, apply, old, platform: str):
    """apply(None) where `ok`, else `old` (a pytree of the same structure), in the form that
    costs least where the step is compiled. Off CPU a select on every leaf (measured on TPU;
    GPU assumed alike, not measured): the new state is computed in place of the donated old
    one; a `lax.cond` there made its outputs buffers of their own (libtpu, 8 looped v4-flash
    layers on v5p-1024: +2.79 GiB of temporaries, 12.88 against 10.09 GiB). On CPU the cond: a
    bad step skips the optimiser, and XLA:CPU's select took a parameter-sized buffer and a pass
    more (`small`, 1 device: +470 MiB, +6.5% step time)."""
    if platform == "cpu":
        return jax.lax.cond(ok, apply, lambda _: old, None)
    return jax.tree.map(lambda new, was: jnp.where(ok, new, was), apply(None), old)


def make_train_step(graphdef, tx: optax.GradientTransformation, run_cfg, lr_schedule=None,
                    platform: str | None = None):
    """step(state, batch) -> (state, metrics); jit it with donated state. A step whose loss or
    gradient norm is not finite changes nothing but the step and bad-step counters.
    `platform`: of the devices it will run on (default: JAX's backend; the planner compiles
    for TPU devices from a CPU host)."""
    grad_fn = make_grad_fn(graphdef, run_cfg)
    gamma = run_cfg.loss.bias_gamma
    platform = platform or jax.default_backend()

    def step(state, batch):
        params, rest = state.params, state.rest
        grads, sums, denoms, weights, counts, dropped = grad_fn(params, rest, batch, state.step)
        loss, terms = total_loss(sums, denoms, weights)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt = tx.update(grads, state.opt, params)
            new_params = optax.apply_updates(params, updates)
            model = nnx.merge(graphdef, nnx.State(new_params), nnx.State(rest))
            update_routing_bias(model, counts, gamma)
            return {"params": new_params, "rest": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))), "opt": opt}

        kept = keep_on_bad_step(ok, apply, {"params": params, "rest": rest, "opt": state.opt}, platform)
        bad = jnp.where(ok, 0, state.bad + 1)
        load = counts.astype(F32)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm,
                   "tokens": denoms["ce"], "dropped_tokens": dropped,
                   "lr": lr_schedule(state.step) if lr_schedule else jnp.zeros((), F32),
                   "expert_load_max_over_mean": jnp.max(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)),
                   "bad_streak": bad, "skipped_steps": state.skipped + (~ok)}
        return state.replace(step=state.step + 1, **kept, bad=bad, skipped=metrics["skipped_steps"]), metrics

    return step
