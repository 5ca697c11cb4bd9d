"""The title contract (fashion/text.py): the same ids everywhere, for any text a seller types."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fashion.text import TitleTokenizer, TitleTooLong, fnv1a, has_title, tokenize_all, words

TITLE = "Turtle Check Men Navy Blue Shirt"
PINNED = [16235, 13975, 9512]  # ids of "w:navy", "w:shirt", "w2:navy shirt" in 16,384 buckets


def test_tokens_are_words_then_pairs_then_character_ngrams():
    tokens = TitleTokenizer().tokens("Navy Blue")
    assert tokens[:3] == ["w:navy", "w:blue", "w2:navy blue"]
    assert "c:<na" in tokens and "c:vy>" in tokens and "c:<navy>" not in tokens  # 6 chars > char_max


def test_ids_are_the_same_in_another_process_with_another_hash_seed():
    tok = TitleTokenizer()
    code = (
        "import json, sys; from fashion.text import TitleTokenizer; "
        f"print(json.dumps(TitleTokenizer().ids({TITLE!r}).tolist()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(other.stdout) == tok.ids(TITLE).tolist()


def test_the_hash_is_pinned_so_a_change_breaks_served_models():
    # A shipped model's ids must never move: FNV-1a 64's published test vectors, and ids written down once.
    assert fnv1a("") == 0xCBF29CE484222325
    assert fnv1a("a") == 0xAF63DC4C8601EC8C
    assert TitleTokenizer(buckets=16384).ids("Navy Shirt")[:3].tolist() == PINNED


def test_unicode_is_normalised_and_case_folded():
    assert words("ＮＡＶＹ Straße — Blau/Grün") == ["navy", "strasse", "blau", "grün"]
    tok = TitleTokenizer()
    assert tok.ids("ＮＡＶＹ shirt").tolist() == tok.ids("navy SHIRT").tolist()
    assert has_title(tok.batch(["Рубашка синяя", "衬衫"])).tolist() == [True, True]


def test_an_empty_title_is_all_padding_and_reads_as_image_only():
    tok = TitleTokenizer()
    batch = tok.batch(["", None, "  ...  ", TITLE])
    assert batch.shape == (4, tok.max_tokens) and batch.dtype == np.int64
    assert has_title(batch).tolist() == [False, False, False, True]
    assert (batch[3] > 0).sum() == min(len(tok.tokens(TITLE)), tok.max_tokens)
    assert batch.min() >= 0 and batch.max() < tok.buckets


def test_an_over_long_title_is_refused_with_its_length_and_the_limit():
    tok = TitleTokenizer(max_chars=20)
    with pytest.raises(TitleTooLong, match="25 characters; at most 20"):
        tok.ids("x" * 25)
    # Training data is cut instead of refused.
    assert has_title(tokenize_all(tok, ["x" * 25])).tolist() == [True]


def test_many_tokens_are_cut_at_max_tokens():
    tok = TitleTokenizer(max_tokens=8)
    ids = tok.ids("alpha beta gamma delta epsilon zeta eta theta iota kappa")
    assert (ids > 0).all()


def test_the_tokenizer_round_trips_through_its_dict():
    tok = TitleTokenizer(buckets=4096, max_tokens=64, char_max=0)
    back = TitleTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert back == tok and back.ids(TITLE).tolist() == tok.ids(TITLE).tolist()
