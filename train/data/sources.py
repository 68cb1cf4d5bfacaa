"""Reading the corpus: files (or glob patterns) -> a random-access sequence of documents, the
held-out evaluation split, and the start-up summary.

Every problem with the data itself raises a one-line DataError naming the file (and line),
here in the main thread when the corpus is first read (`describe_corpus`, `load_documents`),
never later inside a Grain worker.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Sequence

import grain
import numpy as np

from train.data.config import DataConfig, DataError
from train.tokenizer import ByteTokenizer, make_tokenizer


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def expand_paths(patterns: Sequence[str], field: str = "paths") -> list[str]:
    """The files of `patterns` in order; a pattern with * ? [ expands to its matches, sorted."""
    files = []
    for p in patterns:
        if any(ch in p for ch in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"data.{field}: no file matches {p!r}")
            files += found
        elif os.path.isdir(p):
            raise DataError(f"data.{field}: {p!r} is a directory; list its files or use a glob "
                            f"such as '{p.rstrip('/')}/*'")
        elif not os.path.isfile(p):
            raise DataError(f"data.{field}: no such file {p!r}")
        else:
            files.append(p)
    return files


# --- sources: every one is a random-access sequence of documents, id = position -------------
def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _read_text(paths: Sequence[str]) -> list[str]:
    """One document per file."""
    docs = []
    for p in paths:
        try:
            with _open(p) as f:
                docs.append(f.read().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return docs


def _jsonl_text(path: str, lineno: int, raw: bytes, field: str) -> str | None:
    """The document of one JSON line (None for a blank line, which is not a document)."""
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: no field {field!r} (the line is a JSON "
                        f"{type(obj).__name__}, not an object)")
    if field not in obj:
        raise DataError(f"{where}: no field {field!r}")
    if not isinstance(obj[field], str):
        raise DataError(f"{where}: field {field!r} is not a string "
                        f"(got {type(obj[field]).__name__})")
    return obj[field]


def _read_jsonl(paths: Sequence[str], field: str) -> list[str]:
    docs = []
    for p in paths:
        with _open(p) as f:
            for lineno, raw in enumerate(f, 1):
                text = _jsonl_text(p, lineno, raw, field)
                if text is not None:
                    docs.append(text)
    return docs


def _read_parquet(paths: Sequence[str], field: str) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("data.source: 'parquet' needs pyarrow: pip install pyarrow") from None
    docs = []
    for p in paths:
        try:
            names = pq.read_schema(p).names
            if field not in names:
                raise DataError(f"{p}: no column {field!r} (columns: {', '.join(names)})")
            column = pq.read_table(p, columns=[field]).column(field).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{p}: not a readable Parquet file ({_one_line(e)})") from None
        for row, text in enumerate(column):
            if text is None:
                raise DataError(f"{p}: row {row}: column {field!r} is null")
            docs.append(str(text))
    return docs


class _TokenRecords:
    """ArrayRecord files of pre-tokenised documents, read lazily: record = little-endian int32.
    Every file's header is read here (eagerly), so a file that is not ArrayRecord fails now."""

    def __init__(self, paths: Sequence[str]):
        try:
            self._source = grain.sources.ArrayRecordDataSource(list(paths))
        except Exception:
            for p in paths:  # which one?
                try:
                    grain.sources.ArrayRecordDataSource([p])
                except Exception as e:
                    raise DataError(f"{p}: not a readable ArrayRecord file "
                                    f"({_one_line(e)})") from None
            raise

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


def load_documents(cfg: DataConfig, field: str = "paths") -> Sequence:
    """All documents of the files of `cfg.<field>` ("paths" or "eval_paths") in order: strings,
    or int32 arrays for 'arrayrecord'. A document's id is its position.

    Text sources are held in memory (fine for corpora of a few GB of text at most); large
    corpora should be pre-tokenised into ArrayRecord, which is read lazily from disk.
    """
    files = expand_paths(getattr(cfg, field), field)
    if cfg.source == "text":
        docs = _read_text(files)
    elif cfg.source == "jsonl":
        docs = _read_jsonl(files, cfg.text_field)
    elif cfg.source == "parquet":
        docs = _read_parquet(files, cfg.text_field)
    else:
        docs = _TokenRecords(files)
    if len(docs) == 0:
        raise DataError(f"data.{field}: no documents in {files}")
    return docs


def tokenizer_for(cfg: DataConfig):
    """cfg.tokenizer's tokenizer; a missing file or library is a DataError."""
    try:
        return make_tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ImportError) as e:
        raise DataError(f"data.tokenizer: {_one_line(e)}") from None


# --- held-out evaluation documents ----------------------------------------------------------
def _doc_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, document id): a bijection, so no two documents tie."""
    x = (np.uint64(seed) << np.uint64(32)) | ids.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_documents(cfg: DataConfig, num_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids) of a corpus of `num_docs` documents, both ascending.

    With eval_fraction f, the floor(f * num_docs) documents whose hash of (data.seed, id) is
    smallest are held out: the same documents on every host and for any process count."""
    ids = np.arange(num_docs, dtype=np.int64)
    if cfg.eval_fraction == 0:
        return ids, ids[:0]
    n_eval = min(math.floor(cfg.eval_fraction * num_docs + 1e-9), num_docs - 1)
    if n_eval == 0:
        raise DataError(f"data.eval_fraction: {cfg.eval_fraction} of {num_docs} documents holds "
                        f"out no document; raise it to at least {1 / num_docs:.3g} or set "
                        "data.eval_paths")
    held = np.zeros(num_docs, bool)
    held[np.argpartition(_doc_hash(ids, cfg.seed), n_eval - 1)[:n_eval]] = True
    return ids[~held], ids[held]


def eval_documents(cfg: DataConfig, docs: Sequence | None = None) -> tuple[Sequence, np.ndarray]:
    """(documents, ids of the held-out ones): data.paths' documents (`docs` if already loaded)
    and the eval_fraction split, or all documents of data.eval_paths; no ids if neither.
    An empty held-out set is a DataError (load_documents' or split_documents')."""
    if cfg.eval_paths is not None:
        eval_docs = load_documents(cfg, "eval_paths")
        return eval_docs, np.arange(len(eval_docs), dtype=np.int64)
    docs = load_documents(cfg) if docs is None else docs
    return docs, split_documents(cfg, len(docs))[1]


# --- start-up summary -----------------------------------------------------------------------
def _token_count(docs: Sequence, ids: np.ndarray, tok) -> int:
    """Tokens of the documents `ids`, an EOS each."""
    if isinstance(docs, _TokenRecords):
        lengths = (len(docs[int(i)]) for i in ids)
    elif isinstance(tok, ByteTokenizer):
        lengths = (len(docs[int(i)].encode("utf-8")) for i in ids)
    else:
        lengths = (len(tok.encode_array(docs[int(i)])) for i in ids)
    return int(sum(lengths)) + len(ids)


def describe_corpus(cfg: DataConfig, tokenizer=None) -> dict[str, Any]:
    """Training corpus size in documents and tokens (EOS included), and the held-out documents
    when evaluation is configured, for the start-up log. Reads (and so checks) every file."""
    tok = tokenizer or tokenizer_for(cfg)
    docs = load_documents(cfg)
    train_ids, _ = split_documents(cfg, len(docs))
    tokens = _token_count(docs, train_ids, tok)
    rows = -(-tokens // (cfg.seq_len + 1))
    info = {"documents": len(train_ids), "tokens": tokens, "tokens_per_epoch": tokens,
            "rows_per_epoch": rows, "batches_per_epoch": -(-rows // cfg.global_batch),
            "tokenizer": repr(tok), "vocab_size": tok.vocab_size}
    if cfg.has_eval:
        eval_docs, eval_ids = eval_documents(cfg, docs)
        info.update(eval_documents=len(eval_ids),
                    eval_tokens=_token_count(eval_docs, eval_ids, tok))
    return info
