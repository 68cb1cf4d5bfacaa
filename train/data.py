"""Training data: documents -> shuffled per epoch -> tokens + EOS -> packed rows -> batches.

Built from Grain's own checkpointable stages (shuffle/repeat on a random-access MapDataset,
ConcatThenSplit packing, batching, multiprocess prefetch), so an iterator's position is a small
JSON value and restoring it replays the exact batches an uninterrupted run would have produced.

Each row packs `seq_len + 1` tokens of consecutive documents (a document may continue into the
next row) and yields, all of shape [seq_len]:
  inputs, targets   int32    row[:-1], row[1:]  (padding is the tokenizer's pad_id)
  segment_ids       int32    document of each input token, 1, 2, ... within the row; 0 = padding
  loss_mask         float32  1 where the target continues the input's document (its EOS
                             included), 0 where the target starts a new document or is padding
  doc_ids           int32    stable id of each input token's document (-1 = padding)
A batch stacks `global_batch // process_count` rows; a short last batch (finite epochs only)
is filled with padding rows so every batch has the same shape.

Several processes: the corpus is split into `num_shards` data shards (default one per process);
process p reads shards [p*k, (p+1)*k), k = num_shards / process_count, and its rows of a global
batch are those shards' rows in shard order (`ProcessIterator`). With num_shards fixed, the
global batches do not depend on the process count, and neither does the saved position (one
state per shard), so a run may resume on another number of hosts.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from model.config import ConfigError
from train.tokenizer import ByteTokenizer, make_tokenizer

SOURCES = ("text", "jsonl", "parquet", "arrayrecord")
_STATE_VERSION = 1


@dataclass(frozen=True)
class DataConfig:
    source: str = "jsonl"
    paths: tuple[str, ...] = ("data/shakespeare.jsonl",)
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

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        _validate(self)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)


def _check(cond: bool, fld: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"data.{fld}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(c: DataConfig) -> None:
    _check(c.source in SOURCES, "source", f"must be one of {SOURCES}, got {c.source!r}")
    _check(len(c.paths) > 0 and all(isinstance(p, str) and p for p in c.paths), "paths",
           f"must be a non-empty list of file paths, got {c.paths!r}")
    _check(isinstance(c.text_field, str) and bool(c.text_field), "text_field",
           f"must be a non-empty string, got {c.text_field!r}")
    _check(isinstance(c.tokenizer, str) and bool(c.tokenizer), "tokenizer",
           f"must be 'byte' or a path to tokenizer.json, got {c.tokenizer!r}")
    for name in ("seq_len", "global_batch", "worker_buffer_size"):
        v = getattr(c, name)
        _check(_is_int(v) and v > 0, name, f"must be a positive integer, got {v!r}")
    _check(isinstance(c.shuffle, bool), "shuffle", f"must be true or false, got {c.shuffle!r}")
    _check(_is_int(c.seed) and 0 <= c.seed < 2**32, "seed",
           f"must be an integer in [0, 2**32), got {c.seed!r}")
    _check(c.num_epochs is None or (_is_int(c.num_epochs) and c.num_epochs > 0), "num_epochs",
           f"must be a positive integer or null (repeat forever), got {c.num_epochs!r}")
    _check(_is_int(c.worker_count) and c.worker_count >= 0, "worker_count",
           f"must be an integer >= 0 (0 = no worker processes), got {c.worker_count!r}")
    _check(c.num_shards is None or (_is_int(c.num_shards) and c.num_shards > 0
                                    and c.global_batch % c.num_shards == 0), "num_shards",
           f"must be null or a positive divisor of global_batch={c.global_batch}, got {c.num_shards!r}")


# --- sources: every one is a random-access sequence of documents, id = position -------------
def _read_text(paths: Sequence[str]) -> list[str]:
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            docs.append(f.read())
    return docs


def _read_jsonl(paths: Sequence[str], field: str) -> list[str]:
    """Blank lines are skipped (they are not documents); bad lines fail with path:line."""
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[field]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{p}:{lineno}: expected a JSON object with a string "
                                     f"{field!r} field ({type(e).__name__}: {e})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{p}:{lineno}: field {field!r} is not a string")
                docs.append(text)
    return docs


def _read_parquet(paths: Sequence[str], field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("data.source 'parquet' needs pyarrow: pip install pyarrow") from e
    docs = []
    for p in paths:
        table = pq.read_table(p, columns=[field])
        docs.extend(str(t) for t in table.column(field).to_pylist())
    return docs


class _TokenRecords:
    """ArrayRecord files of pre-tokenised documents, read lazily: record = little-endian int32."""

    def __init__(self, paths: Sequence[str]):
        self._source = grain.sources.ArrayRecordDataSource(list(paths))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self._source[i], dtype="<i4").astype(np.int32)


def write_arrayrecord(path: str, sequences) -> None:
    """Write token sequences as ArrayRecord records (little-endian int32), one per document."""
    from array_record.python.array_record_module import ArrayRecordWriter

    # group_size:1 keeps random access cheap: reading one record never decodes its neighbours.
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    try:
        for seq in sequences:
            writer.write(np.asarray(seq, dtype="<i4").tobytes())
    finally:
        writer.close()


def load_documents(cfg: DataConfig) -> Sequence:
    """All documents of all paths in order: strings, or int32 arrays for 'arrayrecord'.

    Text sources are held in memory (fine for corpora of a few GB of text at most); large
    corpora should be pre-tokenised into ArrayRecord, which is read lazily from disk.
    """
    for p in cfg.paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"data.paths: no such file {p!r}")
    if cfg.source == "text":
        return _read_text(cfg.paths)
    if cfg.source == "jsonl":
        return _read_jsonl(cfg.paths, cfg.text_field)
    if cfg.source == "parquet":
        return _read_parquet(cfg.paths, cfg.text_field)
    return _TokenRecords(cfg.paths)


# --- per-element stages (classes, not lambdas: worker processes must unpickle them) ---------
class _Tokenize(grain.transforms.MapWithIndex):
    """Document -> its tokens + EOS, each token tagged with the document's stable id.

    Grain indexes epoch e of a repeated dataset as e * num_docs + i, hence the modulo."""

    def __init__(self, tokenizer, num_docs: int):
        self._tok = tokenizer
        self._num_docs = num_docs

    def map_with_index(self, index: int, doc) -> dict[str, np.ndarray]:
        ids = doc if isinstance(doc, np.ndarray) else self._tok.encode_array(doc)
        tokens = np.empty(len(ids) + 1, dtype=np.int32)
        tokens[:-1] = ids
        tokens[-1] = self._tok.eos_id
        doc_id = index % self._num_docs
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
    """Random-access stages: this shard's documents, reshuffled per epoch, tokenised + EOS."""
    docs = load_documents(cfg)
    if len(docs) == 0:
        raise ValueError(f"data.paths: no documents in {list(cfg.paths)}")
    ds = grain.MapDataset.source(docs).map_with_index(_Tokenize(tok, len(docs)))
    ds = ds[shard.shard_index::shard.shard_count]
    if len(ds) == 0:
        raise ValueError(f"data.paths: shard {shard.shard_index} of {shard.shard_count} has "
                         "no documents; use more documents than data-loading processes")
    if cfg.shuffle:
        ds = ds.shuffle(seed=_epoch_seed(cfg.seed))
    return ds.repeat(cfg.num_epochs)


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
    """The Grain dataset of batches for one process (see module docstring for the format)."""
    shard = _shard(shard_index, shard_count)
    if cfg.global_batch % shard.shard_count:
        raise ConfigError(f"data.global_batch: {cfg.global_batch} is not divisible by the "
                          f"{shard.shard_count} data-loading processes")
    tok = tokenizer or make_tokenizer(cfg.tokenizer)
    docs = _token_documents(cfg, tok, shard).to_iter_dataset()
    ds = _packed_batches(docs, cfg, tok, cfg.global_batch // shard.shard_count)
    if cfg.worker_count > 0:
        # Workers each pack a strided share of the documents: with more than one worker the
        # batches differ from in-process ones (still deterministic); with one they are equal.
        _accept_absl_defaults()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return _JsonStateIterDataset(ds, _identity(cfg, shard))


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
        return {"num_shards": self.num_shards, "shards": {str(i): it.get_state() for i, it in self._its.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("num_shards") != self.num_shards:
            raise ValueError(f"data iterator state has {state.get('num_shards')} shards, this run "
                             f"{self.num_shards}; set data.num_shards={state.get('num_shards')} to resume it")
        for i, it in self._its.items():
            it.set_state(state["shards"][str(i)])


# --- JSON state -----------------------------------------------------------------------------
def _identity(cfg: DataConfig, shard) -> dict[str, Any]:
    """What a saved position is only valid for: restoring under anything else would silently
    feed different data, so set_state refuses it."""
    keys = ("source", "paths", "text_field", "tokenizer", "seq_len", "global_batch", "shuffle",
            "seed", "num_epochs", "worker_count")
    ident = {k: getattr(cfg, k) for k in keys}
    ident["paths"] = list(cfg.paths)
    ident.update(shard_index=shard.shard_index, shard_count=shard.shard_count)
    return ident


def _from_json(obj):
    """Undo what JSON changed in Grain's states: packing compares its slices against a tuple,
    and interleave keys its pending shard states by int."""
    if isinstance(obj, dict):
        out = {k: _from_json(v) for k, v in obj.items()}
        if isinstance(out.get("remainder_slices"), dict):
            out["remainder_slices"] = {n: tuple(v) for n, v in out["remainder_slices"].items()}
        if isinstance(out.get("future_states"), dict):
            out["future_states"] = {int(i): v for i, v in out["future_states"].items()}
        return out
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


class _JsonStateIterator(grain.DatasetIterator):
    """Passes batches through; its state is plain JSON plus the pipeline identity to check."""

    def __init__(self, parent: grain.DatasetIterator, identity: dict[str, Any]):
        super().__init__(parent)
        self._identity = identity

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        pipeline = json.loads(json.dumps(self._parent.get_state()))
        return {"version": _STATE_VERSION, "data": self._identity, "pipeline": pipeline}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} is not "
                             f"{_STATE_VERSION}; it was saved by another version of train/data.py")
        saved = state.get("data", {})
        diff = sorted(k for k in set(saved) | set(self._identity)
                      if saved.get(k) != self._identity.get(k))
        if diff:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} now {self._identity.get(k)!r}"
                                for k in diff)
            raise ValueError(f"data iterator state belongs to another pipeline ({details})")
        self._parent.set_state(_from_json(state["pipeline"]))


class _JsonStateIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, identity: dict[str, Any]):
        super().__init__(parent)
        self._identity = identity

    def __iter__(self) -> _JsonStateIterator:
        return _JsonStateIterator(self._parent.__iter__(), self._identity)


# --- start-up summary -----------------------------------------------------------------------
def describe_corpus(cfg: DataConfig, tokenizer=None) -> dict[str, Any]:
    """Corpus size in documents and tokens (EOS included), for the start-up log."""
    tok = tokenizer or make_tokenizer(cfg.tokenizer)
    docs = load_documents(cfg)
    if cfg.source == "arrayrecord":
        lengths = [len(docs[i]) for i in range(len(docs))]
    elif isinstance(tok, ByteTokenizer):
        lengths = [len(d.encode("utf-8")) for d in docs]
    else:
        lengths = [len(tok.encode_array(d)) for d in docs]
    tokens = int(sum(lengths)) + len(lengths)
    rows = -(-tokens // (cfg.seq_len + 1))
    return {"documents": len(lengths), "tokens": tokens, "tokens_per_epoch": tokens,
            "rows_per_epoch": rows, "batches_per_epoch": -(-rows // cfg.global_batch),
            "tokenizer": repr(tok), "vocab_size": tok.vocab_size}
