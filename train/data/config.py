"""DataConfig: where the documents come from and how they become batches, validated at
construction (the `data:` section of a run config; train/config.py reads its fields from here).

DataError is the error of the data itself (a missing file, a malformed line, an empty held-out
set): a ConfigError, so the trainer reports it as one line and exits with code 2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from model.config import ConfigError, check

SOURCES = ("text", "jsonl", "parquet", "arrayrecord")


class DataError(ConfigError):
    """The data cannot be read as configured; the message names the file (and line) or field."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "jsonl"
    paths: tuple[str, ...] = ("data/shakespeare.jsonl",)  # files or glob patterns
    text_field: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 128
    global_batch: int = 16
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None = repeat forever
    worker_count: int = 0  # 0 = read in this process
    worker_buffer_size: int = 2
    num_shards: int | None = None  # data shards; None = one per process (fix it to change hosts)
    # held-out evaluation data: a fraction of `paths`' documents, or separate files (not both)
    eval_fraction: float = 0.0
    eval_paths: tuple[str, ...] | None = None
    eval_batches: int = 4  # global batches one evaluation reads

    def __post_init__(self):
        for name in ("paths", "eval_paths"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        if _is_number(self.eval_fraction):
            object.__setattr__(self, "eval_fraction", float(self.eval_fraction))
        _validate(self)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    @property
    def has_eval(self) -> bool:
        """Whether evaluation data is configured (eval_fraction > 0 or eval_paths)."""
        return self.eval_fraction > 0 or self.eval_paths is not None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _paths_ok(paths) -> bool:
    return len(paths) > 0 and all(isinstance(p, str) and p for p in paths)


def _validate(c: DataConfig) -> None:
    def chk(cond: bool, name: str, msg: str) -> None:
        check(cond, f"data.{name}", msg)

    chk(c.source in SOURCES, "source", f"must be one of {SOURCES}, got {c.source!r}")
    chk(_paths_ok(c.paths), "paths", f"must be a non-empty list of file paths, got {c.paths!r}")
    chk(isinstance(c.text_field, str) and bool(c.text_field), "text_field",
        f"must be a non-empty string, got {c.text_field!r}")
    chk(isinstance(c.tokenizer, str) and bool(c.tokenizer), "tokenizer",
        f"must be 'byte' or a path to tokenizer.json, got {c.tokenizer!r}")
    for name in ("seq_len", "global_batch", "worker_buffer_size", "eval_batches"):
        v = getattr(c, name)
        chk(_is_int(v) and v > 0, name, f"must be a positive integer, got {v!r}")
    chk(isinstance(c.shuffle, bool), "shuffle", f"must be true or false, got {c.shuffle!r}")
    chk(_is_int(c.seed) and 0 <= c.seed < 2**32, "seed",
        f"must be an integer in [0, 2**32), got {c.seed!r}")
    chk(c.num_epochs is None or (_is_int(c.num_epochs) and c.num_epochs > 0), "num_epochs",
        f"must be a positive integer or null (repeat forever), got {c.num_epochs!r}")
    chk(_is_int(c.worker_count) and c.worker_count >= 0, "worker_count",
        f"must be an integer >= 0 (0 = no worker processes), got {c.worker_count!r}")
    chk(c.num_shards is None or (_is_int(c.num_shards) and c.num_shards > 0
                                 and c.global_batch % c.num_shards == 0), "num_shards",
        f"must be null or a positive divisor of global_batch={c.global_batch}, "
        f"got {c.num_shards!r}")
    chk(_is_number(c.eval_fraction) and 0 <= c.eval_fraction < 1, "eval_fraction",
        f"must be a number in [0, 1) (0 = no held-out documents), got {c.eval_fraction!r}")
    chk(c.eval_paths is None or _paths_ok(c.eval_paths), "eval_paths",
        f"must be null or a non-empty list of file paths, got {c.eval_paths!r}")
    if c.eval_fraction > 0 and c.eval_paths is not None:
        raise DataError("data.eval_fraction, data.eval_paths: set one or the other, not both "
                        "(eval_fraction holds out part of data.paths; eval_paths reads other "
                        "files)")
