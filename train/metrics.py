"""Where a run's numbers go: one writer interface, and the terminal progress bar.

A writer has `write(step, record)` (a flat dict of numbers) and `close()`. `JsonlWriter` writes
RUN_DIR/metrics.jsonl (and examples.jsonl), `TensorBoardWriter` event files through
tensorboardX, `NullWriter` stands in on processes other than 0, `FanOut` sends a record to
several. `Progress` is a tqdm bar on stderr whose ETA leaves out the first (compiling) step.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Protocol


class Writer(Protocol):
    def write(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


class NullWriter:
    """Writes nothing: the writers of processes other than 0 (only process 0 logs)."""

    def write(self, step: int, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class FanOut:
    """One writer that writes each record to all of `writers` and closes them all."""

    def __init__(self, *writers: Writer):
        self.writers = writers

    def write(self, step: int, record: dict) -> None:
        for w in self.writers:
            w.write(step, record)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class JsonlWriter:
    """One JSON object per line, `{"step": step, **record}`. `resume_step=None` starts the file
    afresh (a new run); a step number keeps the records up to that step (a run resumed from its
    checkpoint rewrites what came after, and a line torn by a crash is dropped)."""

    def __init__(self, path: str, resume_step: int | None = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if record.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        self._f = open(path, "w")
        self._f.writelines(kept)
        self._f.flush()

    def write(self, step: int, record: dict) -> None:
        self._f.write(json.dumps({"step": step, **record}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Scalars into `<logdir>/events.out.tfevents.*` through tensorboardX (a new file per run,
    so a resumed run adds one). Non-finite values and non-numbers are left out."""

    def __init__(self, logdir: str, flush_secs: int = 10):
        from tensorboardX import SummaryWriter

        self._w = SummaryWriter(logdir, flush_secs=flush_secs)

    def write(self, step: int, record: dict) -> None:
        for tag, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._w.add_scalar(tag, float(v), step)

    def close(self) -> None:
        self._w.close()


class Progress:
    """`step 120/300 |#####     | 01:02, loss 3.2100, 5.2k tok/s, ETA 1:23` (tqdm, on stderr).

    tqdm's own rate would count the first update, which includes the compile; the ETA here is
    the remaining steps at the rate measured since the first update (unknown until the second)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, file=None):
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, initial=start, file=file or sys.stderr, disable=not enabled,
                        mininterval=0, dynamic_ncols=True,
                        bar_format="step {n_fmt}/{total_fmt} |{bar:24}| {elapsed}{postfix}")
        self._first: tuple[float, int] | None = None  # (time, step) of the first update

    def eta(self, step: int, now: float) -> float | None:
        """Seconds left at the rate since the first update; None before a second one."""
        if self._first is None or step <= self._first[1]:
            return None
        t0, s0 = self._first
        return (self.total - step) * (now - t0) / (step - s0)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, step)
        eta = self.eta(step, now)
        left = "?" if eta is None else self.bar.format_interval(eta)
        self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s / 1000:.1f}k tok/s, ETA {left}",
                                 refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
