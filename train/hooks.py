"""What the training loop (train/loop.py) does besides stepping: one small class per concern.

A hook is called after a step when it is due:

    every: int            fire after each step divisible by it (0: no cadence)
    at_last: bool         also fire after the run's last step (its end, or a requested stop)
    needs_metrics: bool   firing needs the metrics of the steps: the loop fetches them from the
                          devices (one `device_get`, only on such steps: otherwise the host runs
                          ahead of the devices)
    on_fetch: bool        also fire whenever the loop fetched metrics for another hook (the log
                          records every fetch; the bad-step check sees every streak)
    due(step, last)       the cadence above; override for others (asked once per step, in order)
    stop_requested(step)  asked after every step, before `due`: True makes this step the last
    __call__(step, state, metrics) -> bool   True stops the run at once (later hooks skipped);
                          `metrics`: host dicts of every step since the last fetch, or None
    close()               after the run, also when it failed

`step` counts completed steps (the first step of a fresh run is 1). `state` is opaque here,
except to the profiler (block on it) and the checkpoint and eval hooks, which hand it on.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable


class Hook:
    every: int = 0
    at_last: bool = False
    needs_metrics: bool = False
    on_fetch: bool = False

    def due(self, step: int, last: bool) -> bool:
        return (last and self.at_last) or (self.every > 0 and step % self.every == 0)

    def stop_requested(self, step: int) -> bool:
        return False

    def __call__(self, step: int, state, metrics: list[dict] | None) -> bool:
        return False

    def close(self) -> None:
        pass


class LoggingHook(Hook):
    """The metrics record of each fetch (the newest step's metrics, tokens/s since the previous
    fetch, MFU, target tokens summed over the fetched steps) to `writer` and the progress bar."""
    at_last = needs_metrics = on_fetch = True

    def __init__(self, writer, bar, every: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float):
        self.writer, self.bar, self.every = writer, bar, every
        self.tokens_per_step, self.flops, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.last: dict | None = None  # the newest record, with its step
        self._t = time.perf_counter()

    def __call__(self, step, state, metrics):
        now = time.perf_counter()
        tok_s = self.tokens_per_step * len(metrics) / max(now - self._t, 1e-9)
        self._t = now
        record = {k: float(v) for k, v in metrics[-1].items()}
        record.update(tokens_per_s=tok_s, mfu=tok_s * self.flops / self.peak,
                      target_tokens=sum(float(m["tokens"]) for m in metrics))
        self.writer.write(step, record)
        self.bar.update(step, record["loss"], tok_s)
        self.last = {"step": step, **record}
        return False

    def close(self):
        self.bar.close()


class BadStepHook(Hook):
    """Stops the run (`tripped`, exit code 3) when `max_bad` consecutive steps had a non-finite
    loss or gradient; runs before the checkpoint hook, so nothing after them is saved."""
    needs_metrics = on_fetch = True

    def __init__(self, max_bad: int, say: Callable = print):
        self.max_bad, self.say, self.tripped = max_bad, say, False

    def __call__(self, step, state, metrics):
        streak = max(int(m["bad_streak"]) for m in metrics)
        if streak < self.max_bad:
            return False
        self.say(f"\nstopping: {streak} consecutive steps with a non-finite loss or gradient "
                 f"(train.max_bad_steps={self.max_bad}) up to step {step}; "
                 "parameters were left unchanged by them and nothing after the last good "
                 "step was checkpointed", file=sys.stderr)
        self.tripped = True
        return True


class CheckpointHook(Hook):
    """Saves the state and the data position (`data_state()`) when the Checkpointer's intervals
    ask and at the last step, unless the newest step was skipped as non-finite."""
    at_last = needs_metrics = True

    def __init__(self, ckpt, data_state: Callable[[], dict], say: Callable = print):
        self.ckpt, self.data_state, self.say = ckpt, data_state, say
        self.saved_step: int | None = None

    def due(self, step, last):
        return last or self.ckpt.due(step)  # ckpt.due may be a collective: asked once per step

    def __call__(self, step, state, metrics):
        bad = int(metrics[-1]["bad_streak"])
        if bad:
            self.say(f"\nstep {step}: not checkpointed (the last {bad} "
                     "steps were skipped as non-finite)")
        else:
            self.ckpt.save(step, state, self.data_state())
            self.saved_step = step
        return False

    def close(self):
        self.ckpt.close()


class PreemptionHook(Hook):
    """SIGTERM (train.main.Preemption, asked after every step): makes the step the last one,
    so the hooks before this one log and save it; then says what was saved and stops."""
    at_last = True

    def __init__(self, preemption, checkpoint: CheckpointHook | None, say: Callable = print):
        self.preemption, self.checkpoint, self.say = preemption, checkpoint, say

    def stop_requested(self, step):
        return self.preemption.reached(step)

    def due(self, step, last):
        return last and self.preemption.requested

    def __call__(self, step, state, metrics):
        saved = self.checkpoint is not None and self.checkpoint.saved_step == step
        what = f"checkpointed step {step}" if saved else "nothing new checkpointed"
        self.say(f"\nSIGTERM: {what}; exiting so the job can be rescheduled "
                 "(resume with the same command)")
        return True


class ProfileHook(Hook):
    """A JAX profiler trace of the steps with 0-based indices first..last (log.profile_steps)
    into `log_dir`: started before step `first` runs, stopped once step `last` has finished."""
    every = 1

    def __init__(self, log_dir: str, steps: tuple[int, int], start: int, say: Callable = print):
        self.log_dir, (self.first, self.last), self.say = log_dir, steps, say
        self.active = False
        if self.first == start:
            self._start()

    def _start(self):
        import jax

        jax.profiler.start_trace(self.log_dir)
        self.active = True

    def __call__(self, step, state, metrics):
        import jax

        if step == self.first:
            self._start()
        elif self.active and step == self.last + 1:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            self.say(f"profile trace written to {self.log_dir}")
        return False

    def close(self):
        if self.active:  # the run stopped inside the traced steps
            import jax

            jax.profiler.stop_trace()
            self.active = False


class EvalHook(Hook):
    """Held-out loss every `every` steps and at `final_step`: `evaluate(state)` -> (mean
    next-token CE over the eval tokens, token count), written as its own record
    {eval_loss, eval_ppl = exp(eval_loss), eval_tokens} at that step."""

    def __init__(self, evaluate: Callable[[Any], tuple[float, float]], writer, every: int,
                 final_step: int, say: Callable = print):
        self.evaluate, self.writer, self.every, self.final_step = evaluate, writer, every, final_step
        self.say, self.last = say, None

    def due(self, step, last):
        return step % self.every == 0 or step == self.final_step  # not on a preemption: save fast

    def __call__(self, step, state, metrics):
        loss, tokens = self.evaluate(state)
        ppl = math.inf if loss > 709 else math.exp(loss)  # exp overflows a float past 709.78
        self.last = {"eval_loss": loss, "eval_ppl": ppl, "eval_tokens": tokens}
        self.writer.write(step, self.last)
        self.say(f"\neval at step {step}: loss {loss:.4f}, perplexity {ppl:.2f} ({int(tokens)} tokens)")
        return False
