"""The caption tokenizer: byte-level BPE (GPT-2's scheme) from the HF ``tokenizers`` library,
trained on a dataset's captions or loaded from any ``tokenizer.json``.

A saved tokenizer is a folder::

    tokenizer.json        the library's own file: tokenizers.Tokenizer.from_file() reads it
    text_tokenizer.json   meta: sha256, vocab_size, special token ids, where it came from

The hash is the sha256 of the canonical serialisation (``Tokenizer.to_str()``), which is
exactly the bytes of ``tokenizer.json``, so a table that records it can be checked
against any copy of the file. Byte-level BPE has no unknown token: every caption
encodes. Special tokens are reserved (ids 0-2 for a trained one) but never added by
:meth:`TextTokenizer.encode_batch`: sequence layout is the consumer's business.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "text_tokenizer.json"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")


@dataclass(frozen=True)
class TextTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    source: str  # "trained on N captions" or the file it was loaded from

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, min_frequency: int = 2
    ) -> TextTokenizer:
        """Byte-level BPE with at most ``vocab_size`` entries (fewer when the captions run out
        of pairs seen ``min_frequency`` times). Deterministic for the same captions in the same order."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknowns
            show_progress=False,
        )
        count = 0

        def counted():
            nonlocal count
            for c in captions:
                count += 1
                yield c

        tok.train_from_iterator(counted(), trainer)
        return cls(tok, f"trained on {count} captions")

    @classmethod
    def load(cls, path: str) -> TextTokenizer:
        """A ``tokenizer.json`` file, or a folder holding one (as :meth:`save` writes)."""
        from tokenizers import Tokenizer

        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        return cls(Tokenizer.from_file(file), os.path.abspath(file))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def special_ids(self) -> dict[str, int]:
        ids = {t: self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        return {t: i for t, i in ids.items() if i is not None}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [
            e.ids
            for e in self.tokenizer.encode_batch([t or "" for t in texts], add_special_tokens=False)
        ]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def meta(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_ids(),
            "source": self.source,
            "format": "huggingface-tokenizers",
        }

    def save(self, folder: str) -> dict[str, Any]:
        """Write the folder; returns the meta (with the hash)."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(self.tokenizer.to_str())
        meta = self.meta()
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        return meta
