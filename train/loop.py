"""The training loop: run steps, call the hooks (train/hooks.py) that are due, nothing else.

The step function is jitted and asynchronous: its metrics stay on the devices (a list of
pending dicts) until a due hook needs them; then one `device_get` fetches all of them and every
hook that needs metrics sees the whole list. So the host runs ahead of the devices between
fetches, and no step's metrics are lost to the log or the bad-step check.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence


def _fetch(pending: list) -> list[dict]:
    import jax

    return jax.device_get(pending)


def run_loop(state, step_fn: Callable, batches: Iterator, hooks: Sequence, start: int, end: int,
             fetch: Callable[[list], list[dict]] = _fetch) -> tuple[Any, int, Any]:
    """Steps start+1 .. end of `step_fn(state, batch) -> (state, metrics)` over `batches`,
    calling `hooks` in order after each step. Returns (state, the last step run, the hook that
    stopped the run or None). Closes every hook, also when a step or hook raises (then a
    failing close does not hide the first error)."""
    step, stopper, pending = start, None, []
    try:
        for step in range(start + 1, end + 1):
            state, metrics = step_fn(state, next(batches))
            pending.append(metrics)
            requested = [h.stop_requested(step) for h in hooks]  # every hook, every step
            last = step == end or any(requested)
            due = [h.due(step, last) for h in hooks]
            fetched = None
            if any(d and h.needs_metrics for h, d in zip(hooks, due)):
                fetched, pending = fetch(pending), []
            for h, d in zip(hooks, due):
                if (d or (fetched is not None and h.on_fetch)) and h(step, state, fetched):
                    stopper = h
                    break
            if stopper is not None or last:
                break
    except BaseException:
        for h in hooks:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - the loop's own error is the one to report
                pass
        raise
    close_all(hooks)
    return state, step, stopper


def close_all(hooks: Sequence) -> None:
    """Close every hook; raise the first error after trying them all."""
    error = None
    for h in hooks:
        try:
            h.close()
        except Exception as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        raise error
