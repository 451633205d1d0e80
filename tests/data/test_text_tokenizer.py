"""The caption tokenizer: deterministic BPE training, lossless round trips, save/load with a
stable hash, and loading a plain tokenizer.json."""

from __future__ import annotations

import hashlib
import os

import pytest

from mmflow.data.text_tokenizer import (
    META_FILE,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    TextTokenizer,
)
from mmflow.stages.synth_shapes import SynthShapesParams, make_sample


@pytest.fixture(scope="module")
def captions() -> list[str]:
    p = SynthShapesParams(num_samples=300)
    return [make_sample(0, i, p)[1]["caption"] for i in range(300)]


def test_training_is_deterministic_and_bounded_by_vocab_size(captions):
    a, b = TextTokenizer.train(captions, 300), TextTokenizer.train(captions, 300)
    assert a.sha256 == b.sha256 and a.vocab_size == 300
    assert a.source == "trained on 300 captions"
    assert a.special_ids() == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert TextTokenizer.train(captions, 320).sha256 != a.sha256
    # a small corpus runs out of merges before a large vocabulary is reached
    assert 300 < TextTokenizer.train(captions, 50_000).vocab_size < 1000


def test_round_trip_is_lossless_and_merges_shorten_sequences(captions):
    tok = TextTokenizer.train(captions, 400)
    ids = tok.encode_batch(captions[:20])
    assert [tok.decode(i) for i in ids] == captions[:20]
    assert sum(map(len, ids)) < 0.5 * sum(map(len, captions[:20]))  # words became single tokens
    odd = ["", "Ünïcödé 🙂 text the corpus never saw", "  two  spaces "]
    assert [tok.decode(i) for i in tok.encode_batch(odd)] == odd  # byte-level: nothing unknown
    assert tok.encode_batch([None]) == [[]]  # a missing caption is an empty one
    assert not any(i in tok.special_ids().values() for i in ids[0])  # no specials added


def test_save_load_keeps_ids_and_hash_and_the_hash_is_the_file_bytes(captions, tmp_path):
    tok = TextTokenizer.train(captions, 350)
    meta = tok.save(str(tmp_path / "tok"))
    data = (tmp_path / "tok" / TOKENIZER_FILE).read_bytes()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() == tok.sha256
    assert meta["vocab_size"] == 350 and (tmp_path / "tok" / META_FILE).exists()
    for path in (tmp_path / "tok", tmp_path / "tok" / TOKENIZER_FILE):  # a folder or the file
        again = TextTokenizer.load(str(path))
        assert again.sha256 == tok.sha256
        assert again.encode_batch(captions[:5]) == tok.encode_batch(captions[:5])
        assert again.source == os.path.abspath(tmp_path / "tok" / TOKENIZER_FILE)


def test_any_huggingface_tokenizer_file_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.WordLevel({"a": 0, "red": 1, "[UNK]": 2}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "plain.json"))
    tok = TextTokenizer.load(str(tmp_path / "plain.json"))
    assert tok.encode_batch(["a red dog"]) == [[0, 1, 2]] and tok.vocab_size == 3
    assert tok.special_ids() == {}
