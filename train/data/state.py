"""Iterator checkpoint state: Grain's own position of a pipeline, as plain JSON, tagged with the
pipeline it belongs to.

Why not Grain's public checkpointing alone (checked against grain 0.2.18, the pinned version):
`DatasetIterator.get_state()/set_state()` is the public API and is what we use; Grain's own
savers (`DatasetIterator.save/load`, `grain.checkpoint.CheckpointHandler`, and Orbax's
`grain.checkpoint.CheckpointSave/CheckpointRestore`) are nothing more than
`json.dumps(get_state())` and `set_state(json.loads(...))`, one file per process
(`process_<i>-of-<n>.json`, so a run could not resume on another number of hosts). That JSON
round trip breaks one stage we use: the packing iterator's state (`ConcatThenSplitIterDataset`,
`_CtsState`) holds `remainder_slices: {feature: (start, stop)}`, and its `has_remainder`
compares each pair with the tuple sentinel `(-1, -1)`. JSON turns the pairs into lists,
`[-1, -1] != (-1, -1)`, so a position saved with no partly-packed document pending restores as
if one were pending and replays the wrong rows (tests/test_data.py: the resume tests).
`_restore_tuples` therefore turns the values of the private key `remainder_slices` back into
tuples; it is the only private key this module touches. (Interleave's `future_states`, which
mp_prefetch's state also carries, has int keys that JSON turns into strings, but it is only
ever non-empty after `set_shard_states`, elastic re-sharding, which this pipeline never calls.)

The wrapper adds the pipeline identity: a position is only meaningful for the same documents,
order and packing, so restoring it under another config fails with the fields that differ
instead of silently feeding other data.
"""
from __future__ import annotations

import json
from typing import Any

import grain

from train.data.config import DataConfig, DataError

STATE_VERSION = 1
_IDENTITY_KEYS = ("source", "paths", "text_field", "tokenizer", "seq_len", "global_batch",
                  "shuffle", "seed", "num_epochs", "worker_count", "eval_fraction")
# fields added to the identity after STATE_VERSION 1 was first written: a saved state without
# one was made with the field's default
_ADDED_LATER = {"eval_fraction": 0.0}


def identity(cfg: DataConfig, shard_index: int, shard_count: int) -> dict[str, Any]:
    """What a saved position is only valid for (eval_fraction: held-out documents are not
    trained on; eval_paths and eval_batches do not change the training stream)."""
    ident = {k: getattr(cfg, k) for k in _IDENTITY_KEYS}
    ident["paths"] = list(cfg.paths)
    ident.update(shard_index=shard_index, shard_count=shard_count)
    return ident


def _restore_tuples(obj):
    """Undo what JSON changed in Grain's state: see the module docstring."""
    if isinstance(obj, dict):
        out = {k: _restore_tuples(v) for k, v in obj.items()}
        if isinstance(out.get("remainder_slices"), dict):
            out["remainder_slices"] = {n: tuple(v) for n, v in out["remainder_slices"].items()}
        return out
    if isinstance(obj, list):
        return [_restore_tuples(v) for v in obj]
    return obj


class JsonStateIterator(grain.DatasetIterator):
    """Passes batches through; its state is plain JSON (what Orbax's JsonSave writes, and equal
    to the state read back) plus the pipeline identity to check."""

    def __init__(self, parent: grain.DatasetIterator, ident: dict[str, Any]):
        super().__init__(parent)
        self._identity = ident

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        pipeline = json.loads(json.dumps(self._parent.get_state()))
        return {"version": STATE_VERSION, "data": self._identity, "pipeline": pipeline}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')!r} is not "
                            f"{STATE_VERSION}; it was saved by another version of train/data")
        saved = {**_ADDED_LATER, **state.get("data", {})}
        diff = sorted(k for k in set(saved) | set(self._identity)
                      if saved.get(k) != self._identity.get(k))
        if diff:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} now {self._identity.get(k)!r}"
                                for k in diff)
            raise DataError(f"data iterator state belongs to another pipeline ({details})")
        self._parent.set_state(_restore_tuples(state["pipeline"]))


class JsonStateIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, ident: dict[str, Any]):
        super().__init__(parent)
        self._identity = ident

    def __iter__(self) -> JsonStateIterator:
        return JsonStateIterator(self._parent.__iter__(), self._identity)
