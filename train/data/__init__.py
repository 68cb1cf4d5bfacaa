"""Training and evaluation data: documents -> tokens + EOS -> packed rows -> batches (Grain).

  config.py    DataConfig (the `data:` section) and DataError
  sources.py   files (text, JSONL, Parquet, ArrayRecord) -> documents; the held-out split
  pipeline.py  the Grain pipeline, ProcessIterator, make_eval_batches
  state.py     the iterator's checkpoint state (JSON, tagged with the pipeline identity)

Each row packs `seq_len + 1` tokens of consecutive documents (a document may continue into the
next row) and yields, all of shape [seq_len]:
  inputs, targets   int32    row[:-1], row[1:]  (padding is the tokenizer's pad_id)
  segment_ids       int32    document of each input token, 1, 2, ... within the row; 0 = padding
  loss_mask         float32  1 where the target continues the input's document (its EOS
                             included), 0 where the target starts a new document or is padding
  doc_ids           int32    stable id of each input token's document (-1 = padding): its
                             position in data.paths' files (in data.eval_paths' for those)
A batch stacks `global_batch // process_count` rows; a short last batch (finite epochs only)
is filled with padding rows so every batch has the same shape.

Several processes: the corpus is split into `num_shards` data shards (default one per process);
process p reads shards [p*k, (p+1)*k), k = num_shards / process_count, and its rows of a global
batch are those shards' rows in shard order (`ProcessIterator`). With num_shards fixed, the
global batches do not depend on the process count, and neither does the saved position (one
state per shard), so a run may resume on another number of hosts.

Evaluation: `data.eval_fraction` holds a fraction of the documents out of training (chosen from
the document id and data.seed), or `data.eval_paths` names separate files; `make_eval_batches`
packs them into the first `data.eval_batches` global batches, the same on every call.
"""
from train.data.config import SOURCES, DataConfig, DataError
from train.data.pipeline import (ProcessIterator, make_dataset, make_eval_batches,
                                 make_iterator)
from train.data.sources import (describe_corpus, eval_documents, expand_paths, load_documents,
                                split_documents, tokenizer_for, write_arrayrecord)

__all__ = ["SOURCES", "DataConfig", "DataError", "ProcessIterator", "describe_corpus",
           "eval_documents", "expand_paths", "load_documents", "make_dataset",
           "make_eval_batches", "make_iterator", "split_documents", "tokenizer_for",
           "write_arrayrecord"]
