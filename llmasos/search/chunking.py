"""Splitting documents into overlapping chunks, counted in the embedder's tokens or in characters. Each chunk is a
substring of its document, with its character offset, so that a hit can say where in the source it came from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Unit = Literal["tokens", "chars"]
DEFAULT_CHAR_SIZE, DEFAULT_CHAR_OVERLAP = 1000, 200
DEFAULT_TOKEN_OVERLAP = 32
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunking:
    """Chunks of `size` units, each starting `size - overlap` units after the one before. `size` None: as many
    tokens as the embedding model reads (tokens), or DEFAULT_CHAR_SIZE (chars)."""

    unit: Unit = "tokens"
    size: int | None = None
    overlap: int | None = None

    def __post_init__(self) -> None:
        if self.unit not in ("tokens", "chars"):
            raise ValueError(f"chunk unit must be 'tokens' or 'chars', got {self.unit!r}")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"chunk size must be a positive integer, got {self.size!r}")
        if self.overlap is not None and (not isinstance(self.overlap, int) or self.overlap < 0):
            raise ValueError(f"chunk overlap must be a non-negative integer, got {self.overlap!r}")
        if self.size is not None and self.overlap is not None and self.overlap >= self.size:
            raise ValueError(f"chunk overlap ({self.overlap}) must be smaller than the chunk size ({self.size})")

    def resolved(self, max_tokens: int) -> Chunking:
        """Sizes filled in; a token size over what the model reads (`max_tokens`) is an error, since the model would
        silently cut those chunks short."""
        if self.unit == "chars":
            size = self.size or DEFAULT_CHAR_SIZE
            overlap = self.overlap if self.overlap is not None else min(DEFAULT_CHAR_OVERLAP, size // 4)
        else:
            if self.size is not None and self.size > max_tokens:
                raise ValueError(f"chunk size {self.size} tokens is more than the embedding model reads "
                                 f"({max_tokens} tokens besides its special tokens): choose --chunk-size "
                                 f"{max_tokens} or less")
            size = self.size or max_tokens
            overlap = self.overlap if self.overlap is not None else min(DEFAULT_TOKEN_OVERLAP, size // 4)
        return Chunking(self.unit, size, overlap)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "size": self.size, "overlap": self.overlap}


def char_spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) character spans; a span that would cut a word ends at the last whitespace in its second half, and
    the next one starts at the first word boundary of the overlap (where the overlap holds one)."""
    spans, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(" ", start + size // 2, end), text.rfind("\n", start + size // 2, end))
            end = cut + 1 if cut > 0 else end
        spans.append((start, end))
        if end >= len(text):
            break
        following = max(end - overlap, start + 1)
        if not text[following - 1].isspace():  # start the next chunk at a word, inside the overlap if it holds one
            space = _WHITESPACE.search(text, following, end)
            following = space.end() if space is not None else following
        start = max(following, start + 1)
    return spans


def token_spans(offsets: list[tuple[int, int]], size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) character spans of windows of `size` tokens (their character offsets), `overlap` shared."""
    if not offsets:
        return []
    spans, step = [], size - overlap
    for first in range(0, len(offsets), step):
        last = min(first + size, len(offsets)) - 1
        spans.append((offsets[first][0], offsets[last][1]))
        if last == len(offsets) - 1:
            break
    return spans


def split(text: str, chunking: Chunking, tokenizer=None) -> list[tuple[int, int]]:
    """Spans of `text` per the resolved `chunking`; `tokenizer` (a `tokenizers.Tokenizer` without truncation) for
    token units. Blank spans are dropped; a text of nothing but whitespace gives none."""
    assert chunking.size is not None and chunking.overlap is not None, "resolve the chunking first"
    if chunking.unit == "chars":
        spans = char_spans(text, chunking.size, chunking.overlap)
    else:
        offsets = [span for span in tokenizer.encode(text, add_special_tokens=False).offsets if span[1] > span[0]]
        spans = token_spans(offsets, chunking.size, chunking.overlap)
    return [(start, end) for start, end in spans if text[start:end].strip()]
