"""Chunking (llmasos/search/chunking.py): spans cover the text with the overlap asked for, never cut a word when a
space is near, and token windows map back to character spans; bad sizes are clear errors."""

from __future__ import annotations

import pytest

from llmasos.search.chunking import Chunking, char_spans, split, token_spans


def test_char_spans_cover_the_text_with_overlap_and_whole_words():
    text = " ".join(f"word{i}" for i in range(400))
    spans = char_spans(text, size=100, overlap=20)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (start, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert end - start <= 100
        assert next_start < end, "neighbours overlap"
        assert end - next_start <= 20 + 1
        assert text[end - 1] == " ", "a chunk ends after a whole word"
    assert "".join(text[s:e] for s, e in spans).replace(" ", "") .startswith("word0word1")


def test_char_spans_of_one_long_word_still_advance():
    spans = char_spans("x" * 250, size=100, overlap=10)
    assert spans == [(0, 100), (90, 190), (180, 250)]


def test_token_spans_are_windows_of_token_offsets():
    offsets = [(i * 3, i * 3 + 2) for i in range(10)]  # ten two-letter tokens, one space apart
    assert token_spans(offsets, size=4, overlap=1) == [(0, 11), (9, 20), (18, 29)]
    assert token_spans(offsets, size=20, overlap=5) == [(0, 29)]
    assert token_spans([], size=4, overlap=1) == []


def test_split_drops_blank_text():
    assert split("   \n  ", Chunking("chars", 10, 2)) == []
    assert split("hello", Chunking("chars", 10, 2)) == [(0, 5)]


@pytest.mark.parametrize(("options", "message"), [
    (dict(unit="words"), "tokens' or 'chars"),
    (dict(size=0), "positive integer"),
    (dict(size=10, overlap=10), "smaller than the chunk size"),
    (dict(overlap=-1), "non-negative"),
])
def test_bad_chunking_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        Chunking(**options)


def test_token_size_over_the_models_length_is_refused():
    with pytest.raises(ValueError, match="--chunk-size 254 or less"):
        Chunking("tokens", 300).resolved(max_tokens=254)
    assert Chunking().resolved(254) == Chunking("tokens", 254, 32)
    assert Chunking("chars").resolved(254) == Chunking("chars", 1000, 200)


def test_char_chunks_start_and_end_at_words():
    text = " ".join(f"w{i:03d}" for i in range(300))
    for start, end in char_spans(text, size=97, overlap=30):
        chunk = text[start:end]
        assert chunk.split()[0].startswith("w") and len(chunk.split()[0]) == 4, chunk  # a whole word first
        assert end == len(text) or text[end - 1] == " "
