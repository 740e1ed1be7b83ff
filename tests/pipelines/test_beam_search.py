"""Beam search for T5 (llmasos/pipelines/beam_search.py) against transformers' generate(num_beams=...) on a tiny
random T5: the same sequences, for early_stopping True / False / "never", length penalties, min lengths, several
returned beams, batches of prompts of different lengths, and through the translation and summarization pipelines."""

from __future__ import annotations

import pytest
import torch
from encoders_support import t5_tokenizer

from llmasos import SamplingParams, pipeline
from llmasos.pipelines.beam_search import BeamSettings

TEXTS = ["To be, or not to be, that is the question", "The quick brown fox jumps over the lazy dog",
         "héllo wörld"]


def transformers_beams(reference, inputs: list[str], num_return_sequences: int = 1, **options) -> list[list[int]]:
    tokenizer = t5_tokenizer()
    batch = tokenizer(inputs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = reference.generate(**batch, do_sample=False, num_return_sequences=num_return_sequences,
                                 use_cache=False, **options)  # (transformers 5.24: T5 beam search with a cache fails)
    rows = []
    for row in out.tolist():
        row = row[1:]  # the decoder start token
        if 1 in row:  # the first EOS ends it; transformers fills after it with EOS (its pad id 0 being falsy)
            row = row[:row.index(1) + 1]
        while row and row[-1] == 0:  # or with padding
            row.pop()
        rows.append(row)
    return rows


def ours(t5, inputs: list[str], max_new_tokens: int, min_new_tokens: int = 0, num_return_sequences: int = 1,
         **beam_options) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_new_tokens, min_tokens=min_new_tokens, temperature=0,
                            n=num_return_sequences)
    outputs = t5.generate(list(inputs), params, beams=BeamSettings(**beam_options))
    return [completion.token_ids for output in outputs for completion in output.outputs]


@pytest.mark.parametrize("options", [
    dict(num_beams=4, early_stopping=False),
    dict(num_beams=4, early_stopping=True),
    dict(num_beams=4, early_stopping="never", length_penalty=1.0),
    dict(num_beams=3, early_stopping=False, length_penalty=0.5),
    dict(num_beams=4, early_stopping=False, length_penalty=2.0),
    dict(num_beams=2, early_stopping=True, length_penalty=-1.0),
])
def test_beam_search_equals_transformers(t5, t5_checkpoint, options):
    _, reference = t5_checkpoint
    expected = transformers_beams(reference, TEXTS, max_new_tokens=12, **options)
    assert ours(t5, TEXTS, 12, **options) == expected
    assert ours(t5, TEXTS[:1], 12, **options) == expected[:1]  # alone as in a batch


def test_beam_search_min_length_and_several_sequences(t5, t5_checkpoint):
    _, reference = t5_checkpoint
    expected = transformers_beams(reference, TEXTS, num_return_sequences=3, max_new_tokens=10, min_new_tokens=6,
                                  num_beams=4, early_stopping=True)
    assert ours(t5, TEXTS, 10, 6, num_return_sequences=3, num_beams=4, early_stopping=True) == expected
    assert all(len(tokens) >= 6 for tokens in expected)


def test_pipelines_take_beam_options(t5, t5_checkpoint):
    _, reference = t5_checkpoint
    tokenizer = t5_tokenizer()
    translate = pipeline("translation_en_to_fr", model=t5, max_new_tokens=12)
    expected = transformers_beams(reference, ["translate English to French: " + TEXTS[0]], max_new_tokens=12,
                                  num_beams=4, length_penalty=0.6, early_stopping=True)
    result = translate(TEXTS[0], num_beams=4, length_penalty=0.6, early_stopping=True)
    assert result == [{"translation_text": tokenizer.decode(expected[0], skip_special_tokens=True).strip()}]
    summarize = pipeline("summarization", model=t5, num_beams=4)
    expected = transformers_beams(reference, ["summarize: " + TEXTS[1]], max_new_tokens=10, min_new_tokens=3,
                                  num_beams=4)
    assert summarize(TEXTS[1]) == [{"summary_text": tokenizer.decode(expected[0], skip_special_tokens=True).strip()}]
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        translate(TEXTS[0], num_beams=0)


def test_beam_search_is_for_seq2seq_models(chat_checkpoint):
    directory, _ = chat_checkpoint
    with pytest.raises(ValueError, match="beam search is implemented for encoder-decoder"):
        pipeline("summarization", model=directory, max_new_tokens=4)("some text", num_beams=2)
