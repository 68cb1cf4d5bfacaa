"""Tokenizers for the data pipeline: raw UTF-8 bytes by default, a local HF tokenizer.json otherwise.

Both expose one small interface (`encode`, `encode_array`, `decode`, `pad_id`, `eos_id`,
`vocab_size`) so the pipeline never branches on the kind. The byte tokenizer needs no files and
no downloads, which keeps tests and the shipped corpus self-contained; checking that
`vocab_size` fits the model's embedding table is the caller's job (the model may be larger).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

# Special tokens looked up in a Hugging Face vocabulary, most common spellings first.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>",
                   "<｜end▁of▁sentence｜>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<｜▁pad▁｜>")


class ByteTokenizer:
    """Token ids 0..255 are the UTF-8 bytes of the text; 256 is padding, 257 ends a document.

    Any text round-trips exactly, so it is the safe default for tests and tiny models.
    """

    pad_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """int32 ids without a Python list in between: the pipeline's hot path."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Specials are dropped and broken UTF-8 (a split multi-byte char) becomes U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A local Hugging Face `tokenizer.json`, read by the optional `tokenizers` library.

    EOS and padding reuse the vocabulary's own special tokens when it has them, so a model
    fine-tuned from a checkpoint keeps its conventions; otherwise they get fresh ids just past
    the vocabulary (and `vocab_size` grows to include them).
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "HFTokenizer needs the `tokenizers` library: pip install tokenizers") from e
        self.path = str(path)
        self._tok = Tokenizer.from_file(self.path)
        base = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(_EOS_CANDIDATES)
        if self.eos_id is None:
            self.eos_id, base = base, base + 1
        self.pad_id = self._find(_PAD_CANDIDATES)
        if self.pad_id is None:
            self.pad_id, base = base, base + 1
        self.vocab_size = base
        self._known = self._tok.get_vocab_size(with_added_tokens=True)

    def _find(self, names: Sequence[str]) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Drops padding, EOS and the ids appended past the vocabulary before decoding."""
        specials = {self.pad_id, self.eos_id}
        keep = [int(i) for i in ids if int(i) not in specials and 0 <= int(i) < self._known]
        return self._tok.decode(keep, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def make_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """"byte" -> ByteTokenizer; anything else is a tokenizer.json (or a folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = spec
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer {spec!r}: no such file {path!r}; use 'byte' or the path of a Hugging "
            "Face tokenizer.json")
    return HFTokenizer(path)
