"""Data pipeline: tokenizers, sources, packing, epochs, sharding, checkpointed resume, workers.

Every test builds its own tiny corpus in tmp_path, so the expected tokens are known by hand.
"""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from model.config import ConfigError
from train.data import (DataConfig, describe_corpus, load_documents, make_iterator,
                        write_arrayrecord)
from train.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

BYTE = ByteTokenizer()
PAD, EOS = BYTE.pad_id, BYTE.eos_id
KEYS = ("inputs", "targets", "segment_ids", "loss_mask", "doc_ids")


# --- helpers ----------------------------------------------------------------------------------
def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def _cfg(tmp_path, docs, **kw):
    kw = {"seq_len": 8, "global_batch": 2, "num_epochs": 1, **kw}
    return DataConfig(source="jsonl", paths=(_jsonl(tmp_path / "docs.jsonl", docs),), **kw)


def _random_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghij klmnop\n") + ["é", "ß", "✓"]
    return ["".join(rng.choice(alphabet, size=int(rng.integers(1, 40)))) for _ in range(n)]


def _all(cfg, **kw):
    it = make_iterator(cfg, **kw)
    batches = list(it)
    it.close()
    return batches


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def _stream(batches):
    """Rows back into the packed stream: (token, document id) of every non-padding position.

    Inputs cover all but a row's last token; that one is targets[-1], and its document is the
    input's when the loss mask says it continues it, else the next row's first document (test
    documents are never empty, so a document starting there always continues)."""
    rows = [{k: b[k][i] for k in KEYS} for b in batches for i in range(len(b["inputs"]))]
    toks, docs = [], []
    for r, nxt in zip(rows, rows[1:] + [None]):
        if r["loss_mask"][-1]:
            last = r["doc_ids"][-1]
        elif r["targets"][-1] == PAD:
            last = -1
        else:
            last = nxt["doc_ids"][0]
        toks += list(r["inputs"]) + [r["targets"][-1]]
        docs += list(r["doc_ids"]) + [last]
    toks, docs = np.array(toks), np.array(docs)
    return toks[docs >= 0], docs[docs >= 0]


def _check_each_doc_once(docs, toks, ids, expect_ids):
    assert set(np.unique(ids)) == set(expect_ids)
    for d in expect_ids:
        where = np.flatnonzero(ids == d)
        assert np.all(np.diff(where) == 1), f"document {d} is not contiguous"
        assert list(toks[where]) == BYTE.encode(docs[d]) + [EOS]


# --- tokenizers -------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    text = "Hamlet: ‘To be’ — naïve café ✓ 🙂\n"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids + [EOS, PAD]) == text
    assert BYTE.encode_array(text).dtype == np.int32 and list(BYTE.encode_array(text)) == ids
    assert BYTE.decode(BYTE.encode("é")[:1]) == "\ufffd"  # half a character does not raise
    assert (BYTE.pad_id, BYTE.eos_id, BYTE.vocab_size) == (256, 257, 258)


def test_make_tokenizer(tmp_path):
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        make_tokenizer(missing)


def test_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="optional `tokenizers` not installed")

    def save(vocab, name):
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        (tmp_path / name).mkdir()
        tok.save(str(tmp_path / name / "tokenizer.json"))
        return str(tmp_path / name)

    with_eos = make_tokenizer(save({"[UNK]": 0, "to": 1, "be": 2, "</s>": 3}, "a"))
    assert isinstance(with_eos, HFTokenizer)
    assert (with_eos.eos_id, with_eos.pad_id, with_eos.vocab_size) == (3, 4, 5)
    assert with_eos.encode("to be or") == [1, 2, 0]
    assert with_eos.decode([1, 2, 3, 4]) == "to be"
    bare = make_tokenizer(save({"[UNK]": 0, "to": 1}, "b") + "/tokenizer.json")
    assert (bare.eos_id, bare.pad_id, bare.vocab_size) == (2, 3, 4)


# --- sources ----------------------------------------------------------------------------------
def test_jsonl_source_ids_follow_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["first", "second"])
    (tmp_path / "b.jsonl").write_text('{"body": "third"}\n\n{"body": "fourth ✓"}\n')
    cfg = DataConfig(paths=(a,), seq_len=4, global_batch=1, num_epochs=1, shuffle=False)
    assert load_documents(cfg) == ["first", "second"]
    two = cfg.replace(paths=(a, str(tmp_path / "b.jsonl")))
    with pytest.raises(ValueError, match=r"b\.jsonl:1: .*'text'"):
        load_documents(two)
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth ✓"}\n')
    docs = load_documents(two)
    assert docs == ["first", "second", "third", "fourth ✓"]
    toks, ids = _stream(_all(two))
    _check_each_doc_once(docs, toks, ids, range(4))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents(cfg.replace(paths=(str(tmp_path / "missing.jsonl"),)))


def test_text_source_one_document_per_file(tmp_path):
    (tmp_path / "x.txt").write_text("to be,\nor not")
    (tmp_path / "y.txt").write_text("that is ✓")
    cfg = DataConfig(source="text", paths=(str(tmp_path / "x.txt"), str(tmp_path / "y.txt")),
                     seq_len=5, global_batch=2, num_epochs=1)
    docs = load_documents(cfg)
    assert docs == ["to be,\nor not", "that is ✓"]
    toks, ids = _stream(_all(cfg))
    _check_each_doc_once(docs, toks, ids, range(2))


def test_arrayrecord_source_pretokenised(tmp_path):
    seqs = [[5, 6, 7], [300, 1, 2, 3, 4, 5, 6], [9]]
    write_arrayrecord(tmp_path / "a.arrayrecord", seqs[:2])
    write_arrayrecord(tmp_path / "b.arrayrecord", seqs[2:])
    cfg = DataConfig(source="arrayrecord", seq_len=4, global_batch=2, num_epochs=1,
                     paths=(str(tmp_path / "a.arrayrecord"), str(tmp_path / "b.arrayrecord")))
    docs = load_documents(cfg)
    assert len(docs) == 3 and [list(docs[i]) for i in range(3)] == seqs
    assert docs[0].dtype == np.int32
    toks, ids = _stream(_all(cfg))
    for d, seq in enumerate(seqs):
        assert list(toks[ids == d]) == seq + [EOS]
    assert describe_corpus(cfg)["tokens"] == 11 + 3


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="optional pyarrow not installed: parquet untested")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta ✓"], "x": [1, 2]}), tmp_path / "d.parquet")
    cfg = DataConfig(source="parquet", paths=(str(tmp_path / "d.parquet"),), num_epochs=1)
    assert load_documents(cfg) == ["alpha", "beta ✓"]


# --- packing ----------------------------------------------------------------------------------
def test_packing_hand_example(tmp_path):
    # stream: a b E c d e E f E -> rows of 5: [a b E c d] [e E f E pad]
    cfg = _cfg(tmp_path, ["ab", "cde", "f"], seq_len=4, shuffle=False)
    batches = _all(cfg)
    assert len(batches) == 1
    b = batches[0]
    a, bb, c, d, e, f = (ord(ch) for ch in "abcdef")
    np.testing.assert_array_equal(b["inputs"], [[a, bb, EOS, c], [e, EOS, f, EOS]])
    np.testing.assert_array_equal(b["targets"], [[bb, EOS, c, d], [EOS, f, EOS, PAD]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2], [1, 1, 2, 2]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 0, 1], [1, 0, 1, 0]])
    np.testing.assert_array_equal(b["doc_ids"], [[0, 0, 0, 1], [1, 1, 2, 2]])


def test_packing_invariants(tmp_path):
    docs = _random_docs(40)
    cfg = _cfg(tmp_path, docs, seq_len=16, global_batch=4)
    batches = _all(cfg)
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "inputs": ((4, 16), "int32"), "targets": ((4, 16), "int32"),
            "segment_ids": ((4, 16), "int32"), "loss_mask": ((4, 16), "float32"),
            "doc_ids": ((4, 16), "int32")}
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        seg = b["segment_ids"]
        real = seg > 0
        assert np.all(seg[real[:, 0], 0] == 1)  # numbering restarts at 1 in every row
        assert np.all(np.isin(np.diff(seg[:, :]) * real[:, 1:], (0, 1)))
        assert np.all((b["doc_ids"] == -1) == ~real) and np.all((b["inputs"] == PAD) == ~real)
        # the target starts a new document exactly when the input is an EOS
        np.testing.assert_array_equal(b["loss_mask"], (b["inputs"] != EOS) & real)
    assert np.any(batches[-1]["segment_ids"] == 0)  # the end of the data is padded
    toks, ids = _stream(batches)
    _check_each_doc_once(docs, toks, ids, range(len(docs)))


# --- order, epochs, shards --------------------------------------------------------------------
def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    cfg = _cfg(tmp_path, _random_docs(30), num_epochs=None)
    first = _take(make_iterator(cfg), 6)
    assert _same(first, _take(make_iterator(cfg), 6))
    other = _take(make_iterator(cfg.replace(seed=1)), 6)
    assert not _same(first, other)
    in_order = _take(make_iterator(cfg.replace(shuffle=False)), 1)[0]
    assert in_order["doc_ids"][0, 0] == 0 and first[0]["doc_ids"][0, 0] != 0


def test_every_document_once_per_epoch(tmp_path):
    docs = _random_docs(25, seed=3)
    cfg = _cfg(tmp_path, docs, seq_len=12, global_batch=4)
    toks, ids = _stream(_all(cfg))
    _check_each_doc_once(docs, toks, ids, range(len(docs)))
    toks2, ids2 = _stream(_all(cfg.replace(num_epochs=2)))
    half = len(ids2) // 2  # same number of tokens in each epoch
    _check_each_doc_once(docs, toks2[:half], ids2[:half], range(len(docs)))
    _check_each_doc_once(docs, toks2[half:], ids2[half:], range(len(docs)))
    assert not np.array_equal(ids2[:half], ids2[half:])  # each epoch is reshuffled


def test_two_shards_disjoint_and_complete(tmp_path):
    docs = _random_docs(21, seed=5)
    cfg = _cfg(tmp_path, docs, seq_len=12, global_batch=4)
    seen = []
    for shard in (0, 1):
        batches = _all(cfg, shard_index=shard, shard_count=2)
        assert batches[0]["inputs"].shape == (2, 12)  # global_batch / 2 rows per process
        toks, ids = _stream(batches)
        seen.append(set(np.unique(ids)))
        _check_each_doc_once(docs, toks, ids, seen[-1])
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(docs)))
    with pytest.raises(ConfigError, match="^data.global_batch: "):
        make_iterator(cfg.replace(global_batch=3), shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index and shard_count"):
        make_iterator(cfg, shard_index=0)


# --- checkpointing ----------------------------------------------------------------------------
def test_resume_from_state_is_bitwise(tmp_path):
    cfg = _cfg(tmp_path, _random_docs(12) + ["x" * 100], seq_len=8, num_epochs=None)
    it = make_iterator(cfg)
    _take(it, 3)
    saved = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    resumed = make_iterator(cfg)
    resumed.set_state(saved)
    assert _same(expected, _take(resumed, 4))
    assert len(json.dumps(saved)) < 2000  # a position, not data
    with pytest.raises(ValueError, match="seed: saved 0 now 7"):
        make_iterator(cfg.replace(seed=7)).set_state(saved)


def test_workers_give_the_same_batches(tmp_path):
    cfg = _cfg(tmp_path, _random_docs(30), num_epochs=None)
    expected = _take(make_iterator(cfg), 5)
    it = make_iterator(cfg.replace(worker_count=1))
    try:
        got = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        got += _take(it, 2)
    finally:
        it.close()
    assert _same(expected, got)
    resumed = make_iterator(cfg.replace(worker_count=1))
    try:
        resumed.set_state(state)
        assert _same(expected[3:], _take(resumed, 2))
    finally:
        resumed.close()


# --- config and summary -----------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"source": "csv"}, "data.source: must be one of ('text', 'jsonl', 'parquet', 'arrayrecord')"),
    ({"paths": ()}, "data.paths: must be a non-empty list of file paths"),
    ({"text_field": ""}, "data.text_field: must be a non-empty string"),
    ({"tokenizer": ""}, "data.tokenizer: must be 'byte' or a path to tokenizer.json"),
    ({"seq_len": 0}, "data.seq_len: must be a positive integer, got 0"),
    ({"global_batch": -2}, "data.global_batch: must be a positive integer, got -2"),
    ({"worker_buffer_size": 0}, "data.worker_buffer_size: must be a positive integer, got 0"),
    ({"shuffle": "yes"}, "data.shuffle: must be true or false"),
    ({"seed": -1}, "data.seed: must be an integer in [0, 2**32)"),
    ({"num_epochs": 0}, "data.num_epochs: must be a positive integer or null"),
    ({"worker_count": -1}, "data.worker_count: must be an integer >= 0"),
])
def test_config_validation(change, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        DataConfig(**change)


def test_describe_corpus(tmp_path):
    cfg = _cfg(tmp_path, ["ab", "cdé"], seq_len=2, global_batch=2)
    info = describe_corpus(cfg)
    assert (info["documents"], info["tokens"], info["tokens_per_epoch"]) == (2, 8, 8)
    assert (info["rows_per_epoch"], info["batches_per_epoch"]) == (3, 2)
    corpus = str(Path(__file__).resolve().parents[1] / "data" / "shakespeare.jsonl")
    start = time.perf_counter()
    shipped = describe_corpus(DataConfig(paths=(corpus,)))
    assert time.perf_counter() - start < 2.0
    assert shipped["documents"] == 209 and shipped["tokens"] > 1_000_000
