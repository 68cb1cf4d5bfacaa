"""The Grain pipeline: document ids -> shuffled per epoch -> tokens + EOS -> packed rows -> batches.

Built from Grain's own checkpointable stages (shuffle/repeat on a random-access MapDataset,
ConcatThenSplit packing, batching, multiprocess prefetch), so an iterator's position is a small
JSON value and restoring it replays the exact batches an uninterrupted run would have produced.
The batch format is in train/data/__init__.py.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from model.config import ConfigError
from train.data.config import DataConfig, DataError
from train.data.sources import eval_documents, load_documents, split_documents, tokenizer_for
from train.data.state import JsonStateIterDataset, identity


# --- per-element stages (classes, not lambdas: worker processes must unpickle them) ---------
class _Tokenize(grain.transforms.Map):
    """Document id -> the document's tokens + EOS, each token tagged with that id."""

    def __init__(self, docs: Sequence, tokenizer):
        self._docs = docs
        self._tok = tokenizer

    def map(self, doc_id) -> dict[str, np.ndarray]:
        doc = self._docs[int(doc_id)]
        ids = doc if isinstance(doc, np.ndarray) else self._tok.encode_array(doc)
        tokens = np.empty(len(ids) + 1, dtype=np.int32)
        tokens[:-1] = ids
        tokens[-1] = self._tok.eos_id
        return {"tokens": tokens, "doc_ids": np.full(len(tokens), doc_id, dtype=np.int32)}


class _ToRow(grain.transforms.Map):
    """A packed row of seq_len + 1 tokens -> the model's shifted inputs/targets and masks."""

    def __init__(self, pad_id: int):
        self._pad_id = pad_id

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = packed["tokens_segment_ids"].astype(np.int32)
        tokens = np.where(seg > 0, packed["tokens"], self._pad_id).astype(np.int32)
        docs = np.where(seg > 0, packed["doc_ids"], -1).astype(np.int32)
        same_doc = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
        return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg[:-1],
                "loss_mask": same_doc.astype(np.float32), "doc_ids": docs[:-1]}


def _pad_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"inputs": np.full(seq_len, pad_id, np.int32),
            "targets": np.full(seq_len, pad_id, np.int32),
            "segment_ids": np.zeros(seq_len, np.int32),
            "loss_mask": np.zeros(seq_len, np.float32),
            "doc_ids": np.full(seq_len, -1, np.int32)}


def _stack_and_pad(rows: Sequence[dict], *, batch_size: int, pad_row: dict) -> dict:
    """Stack rows; a short last batch gets padding rows so batch shapes never change (no
    recompilation) and no real row is dropped."""
    rows = list(rows) + [pad_row] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in pad_row}


# --- the pipeline ---------------------------------------------------------------------------
def _shard(shard_index: int | None, shard_count: int | None) -> grain.sharding.ShardOptions:
    if shard_index is None and shard_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=False)
    if shard_index is None or shard_count is None:
        raise ValueError("pass both shard_index and shard_count, or neither")
    return grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count)


def _epoch_seed(seed: int) -> int:
    """Grain shuffles epoch e with (seed + e); hashing the seed first keeps nearby seeds (0, 1)
    from sharing permutations one epoch apart."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _accept_absl_defaults() -> None:
    """Grain 0.2.18 reads an absl flag when it starts worker processes; in a program that never
    ran absl.app that read fails (UnparsedFlagAccessError), so accept the flag defaults unless
    something already parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _token_documents(cfg: DataConfig, tok, shard) -> grain.MapDataset:
    """Random-access stages: this shard's training documents (the held-out ones removed),
    reshuffled per epoch, tokenised + EOS."""
    docs = load_documents(cfg)
    train_ids, _ = split_documents(cfg, len(docs))
    ds = grain.MapDataset.source(train_ids)[shard.shard_index::shard.shard_count]
    if len(ds) == 0:
        raise DataError(f"data.paths: shard {shard.shard_index} of {shard.shard_count} has "
                        "no documents; use more documents than data shards")
    if cfg.shuffle:
        ds = ds.shuffle(seed=_epoch_seed(cfg.seed))
    return ds.repeat(cfg.num_epochs).map(_Tokenize(docs, tok))


def _packed_batches(docs: grain.IterDataset, cfg: DataConfig, tok,
                    rows: int) -> grain.IterDataset:
    """Sequential stages: concatenate-then-split into rows, shift into inputs/targets, batch."""
    width = cfg.seq_len + 1
    ds = ConcatThenSplitIterDataset(docs, length_struct={"tokens": width, "doc_ids": width})
    ds = ds.map(_ToRow(tok.pad_id))
    pad = _pad_row(cfg.seq_len, tok.pad_id)
    return ds.batch(rows, batch_fn=functools.partial(_stack_and_pad, batch_size=rows,
                                                     pad_row=pad))


def make_dataset(cfg: DataConfig, *, shard_index: int | None = None,
                 shard_count: int | None = None, tokenizer=None) -> grain.IterDataset:
    """The Grain dataset of training batches for one data shard (default: this JAX process)."""
    shard = _shard(shard_index, shard_count)
    if cfg.global_batch % shard.shard_count:
        raise ConfigError(f"data.global_batch: {cfg.global_batch} is not divisible by the "
                          f"{shard.shard_count} data-loading processes")
    tok = tokenizer or tokenizer_for(cfg)
    docs = _token_documents(cfg, tok, shard).to_iter_dataset()
    ds = _packed_batches(docs, cfg, tok, cfg.global_batch // shard.shard_count)
    if cfg.worker_count > 0:
        # Workers each pack a strided share of the documents: with more than one worker the
        # batches differ from in-process ones (still deterministic); with one they are equal.
        _accept_absl_defaults()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return JsonStateIterDataset(ds, identity(cfg, shard.shard_index, shard.shard_count))


def make_iterator(cfg: DataConfig, *, shard_index: int | None = None,
                  shard_count: int | None = None) -> grain.DatasetIterator:
    """An iterator of batches whose get_state()/set_state() resume bitwise (JSON state)."""
    return iter(make_dataset(cfg, shard_index=shard_index, shard_count=shard_count))


class ProcessIterator:
    """This process's rows of each global batch: its data shards' batches concatenated in shard
    order. State: {"num_shards": S, "shards": {"i": shard state}} for the shards it reads; a
    merge of every process's state restores under any process count that divides S."""

    def __init__(self, cfg: DataConfig, process_index: int = 0, process_count: int = 1):
        self.num_shards = cfg.num_shards or process_count
        if self.num_shards % process_count:
            raise ConfigError(f"data.num_shards: {self.num_shards} shards cannot be split evenly "
                              f"over {process_count} processes")
        k = self.num_shards // process_count
        self._its = {i: make_iterator(cfg, shard_index=i, shard_count=self.num_shards)
                     for i in range(process_index * k, (process_index + 1) * k)}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._its.values()]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"num_shards": self.num_shards,
                "shards": {str(i): it.get_state() for i, it in self._its.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("num_shards") != self.num_shards:
            raise DataError(f"data iterator state has {state.get('num_shards')} shards, this run "
                            f"{self.num_shards}; set data.num_shards={state.get('num_shards')} "
                            "to resume it")
        for i, it in self._its.items():
            it.set_state(state["shards"][str(i)])

    def close(self) -> None:
        for it in self._its.values():
            it.close()


# --- held-out evaluation batches ------------------------------------------------------------
def make_eval_batches(cfg: DataConfig, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """This process's rows of the first `data.eval_batches` global batches of the held-out
    documents (data.eval_fraction of data.paths, or data.eval_paths), or [] when neither is set.

    The held-out documents are packed in id order like training rows (no shuffling, one pass),
    so every call and every process count give the same global batches; process p gets rows
    [p*B/P, (p+1)*B/P) of each, the shape of its ProcessIterator batches. Fewer batches when
    the documents run out first; a short last batch is filled with padding rows (loss_mask 0).
    """
    if not cfg.has_eval:
        return []
    if cfg.global_batch % process_count:
        raise ConfigError(f"data.global_batch: {cfg.global_batch} is not divisible by the "
                          f"{process_count} data-loading processes")
    tok = tokenizer_for(cfg)
    docs, ids = eval_documents(cfg)  # never empty: that is a DataError
    ds = grain.MapDataset.source(ids).map(_Tokenize(docs, tok)).to_iter_dataset()
    it = iter(_packed_batches(ds, cfg, tok, cfg.global_batch))
    rows = cfg.global_batch // process_count
    mine = slice(process_index * rows, (process_index + 1) * rows)
    out = []
    for batch in it:
        out.append({k: np.ascontiguousarray(v[mine]) for k, v in batch.items()})
        if len(out) == cfg.eval_batches:
            break
    it.close()
    return out
