"""The title contract: how a listing's title becomes the model's second input, torch-free.

A title ("Turtle Check Men Navy Blue Shirt") is cut into tokens — its words, its word pairs and the
character n-grams of each word (``<navy>`` → ``<na``, ``nav``, ``avy``, ``vy>``, …: they survive typos,
plurals and words glued together) — and every token is hashed into one of ``buckets`` ids. No vocabulary
is fitted: a word never seen in training still gets ids (its n-grams are shared with words that were), the
tokenizer's whole state is the few numbers of ``TitleTokenizer``, and the trainer, the export, the gateway
and the bulk tagger compute the very same ids from them (``metadata.json`` carries ``to_dict()``).

The model input is ``(N, max_tokens)`` int64 ids, ``0`` = padding; an empty title is all zeros, which the
model reads as "no title" (image only). The hash is FNV-1a over UTF-8, not Python's ``hash`` (which is
salted per process).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fashion.errors import UserError

PAD = 0
INPUT_NAME = "title"  # the exported graph's second input
MAX_TITLE_CHARS = 300  # a longer title is refused (the gateway answers 400 title_too_long)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)  # letters and digits of any script
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


class TitleError(UserError, ValueError):
    """A title cannot be used (too long, not text); the message says what is accepted."""

    code = "invalid_title"


class TitleTooLong(TitleError):
    code = "title_too_long"


def fnv1a(token: str) -> int:
    """64-bit FNV-1a of the token's UTF-8 bytes: stable across processes, machines and languages."""
    h = _FNV_OFFSET
    for byte in token.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return h


def words(title: str) -> list[str]:
    """NFKC-normalised, case-folded words (runs of letters and digits)."""
    return _WORD.findall(unicodedata.normalize("NFKC", title).casefold())


@dataclass(frozen=True)
class TitleTokenizer:
    """Hashed word, word-pair and character n-gram ids of a title; the whole state is these fields."""

    buckets: int = 16384
    max_tokens: int = 96
    word_ngrams: int = 2  # 1: words only; 2: words and adjacent pairs
    char_min: int = 3  # character n-grams of each word with boundary marks, lengths char_min..char_max
    char_max: int = 5  # 0 turns character n-grams off
    max_chars: int = MAX_TITLE_CHARS

    def __post_init__(self) -> None:
        if self.buckets < 2:
            raise TitleError(f"buckets must be at least 2, got {self.buckets}")
        if self.max_tokens < 1 or self.word_ngrams < 1 or self.max_chars < 1:
            raise TitleError("max_tokens, word_ngrams and max_chars must be positive")
        if self.char_max and not 1 <= self.char_min <= self.char_max:
            raise TitleError(
                f"char n-gram lengths must satisfy 1 <= min <= max, got {self.char_min}..{self.char_max}"
            )

    def check(self, title: str) -> str:
        """``title`` as it will be used; ``TitleTooLong`` past ``max_chars`` characters."""
        if not isinstance(title, str):
            raise TitleError(f"a title must be text, got {type(title).__name__}")
        if len(title) > self.max_chars:
            raise TitleTooLong(
                f"the title has {len(title)} characters; at most {self.max_chars} are accepted"
            )
        return title

    def tokens(self, title: str) -> list[str]:
        """Distinct tokens in a fixed order: words, then word pairs, then character n-grams."""
        ws = words(self.check(title))
        out = [f"w:{w}" for w in ws]
        for n in range(2, self.word_ngrams + 1):
            out += [f"w{n}:" + " ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)]
        if self.char_max:
            for w in ws:
                marked = f"<{w}>"
                for n in range(self.char_min, self.char_max + 1):
                    out += [f"c:{marked[i : i + n]}" for i in range(len(marked) - n + 1)]
        return list(dict.fromkeys(out))

    def ids(self, title: str) -> np.ndarray:
        """``(max_tokens,)`` int64 ids in 1..buckets-1, zero-padded; all zeros for an empty title."""
        out = np.zeros(self.max_tokens, dtype=np.int64)
        hashed = [1 + fnv1a(t) % (self.buckets - 1) for t in self.tokens(title)[: self.max_tokens]]
        out[: len(hashed)] = hashed
        return out

    def batch(self, titles: Iterable[str | None]) -> np.ndarray:
        """``(N, max_tokens)`` ids; ``None`` or ``""`` is an image-only row (all zeros)."""
        rows = [self.ids(t) if t else np.zeros(self.max_tokens, np.int64) for t in titles]
        return np.stack(rows) if rows else np.zeros((0, self.max_tokens), np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hashed-ngrams", "hash": "fnv1a-64", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TitleTokenizer:
        kind = d.get("kind", "hashed-ngrams")
        if kind != "hashed-ngrams" or d.get("hash", "fnv1a-64") != "fnv1a-64":
            raise TitleError(
                f"unknown title tokenizer {kind!r} / {d.get('hash')!r}; this code reads hashed-ngrams"
            )
        names = ("buckets", "max_tokens", "word_ngrams", "char_min", "char_max", "max_chars")
        return cls(**{k: int(d[k]) for k in names if k in d})


def has_title(ids: np.ndarray) -> np.ndarray:
    """Which rows of a ``(N, max_tokens)`` id batch carry a title."""
    return (np.asarray(ids) != PAD).any(axis=1)


def tokenize_all(tokenizer: TitleTokenizer, titles: Sequence[str | None]) -> np.ndarray:
    """``tokenizer.batch`` for a dataset; titles longer than the limit are cut, not refused (training
    data is not a request)."""
    return tokenizer.batch((t or "")[: tokenizer.max_chars] for t in titles)
