"""Perplexity in process equals the HF perplexity guide's sliding-window computation on transformers' logits."""

from __future__ import annotations

import math

import pytest
from support import CORPUS, family_config, hf_tokenizer, make_checkpoint

from llmasos import LLM
from llmasos.eval import perplexity
from llmasos.eval.perplexity import windows

from .references import reference_nll

SHORT = "To be, or not to be, that is the question."
LONG = CORPUS * 2  # a few hundred tokens: many windows at a 64-token context


@pytest.fixture(scope="module", params=[("llama", True), ("gpt2", False)], ids=["llama-bos", "gpt2-no-bos"])
def model(request, tmp_path_factory):
    family, add_bos = request.param
    directory = tmp_path_factory.mktemp(family)
    reference = make_checkpoint(directory, family_config(family), add_bos=add_bos)
    return LLM.load(directory, dtype="float32"), reference, hf_tokenizer(add_bos)


@pytest.mark.parametrize(("texts", "context_length", "stride"), [
    ([SHORT], None, None),  # fits: one window over the model's context, every token after the first scored
    ([LONG], 64, 24),
    ([LONG], 64, 63),  # windows that overlap by a single token
    ([SHORT, LONG, "héllo wörld 日本語 🙂"], 48, 16),  # several texts, multi-byte characters
])
def test_perplexity_equals_transformers(model, texts, context_length, stride):
    llm, reference, tokenizer = model
    result = perplexity(llm, texts, context_length=context_length, stride=stride)
    max_length = context_length or llm.engine.max_model_len
    nll, num_tokens = reference_nll(reference, tokenizer, texts, max_length, stride or max_length // 2)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result.num_tokens == num_tokens
    assert result.num_bytes == num_bytes
    assert result.perplexity == pytest.approx(math.exp(nll / num_tokens), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-4)
    assert result.num_texts == len(texts)
    # Every token but each text's first is scored exactly once.
    assert num_tokens == sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)


def test_a_text_shorter_than_the_context_is_one_window(model):
    llm, _, tokenizer = model
    result = perplexity(llm, SHORT, context_length=64, stride=8)
    assert result.num_windows == 1
    assert result.num_tokens == len(tokenizer(SHORT)["input_ids"]) - 1


def test_window_spans_cover_each_token_once():
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(3, 8, 4) == [(0, 3, 1)]
    for num_tokens, context_length, stride in [(100, 16, 5), (17, 16, 15), (16, 16, 1), (1000, 64, 32)]:
        scored = [p for begin, end, first in windows(num_tokens, context_length, stride) for p in range(first, end)]
        assert scored == list(range(1, num_tokens))
        assert all(end - begin <= context_length and first > begin
                   for begin, end, first in windows(num_tokens, context_length, stride))


def test_bad_settings_are_clear_errors(model):
    llm, _, _ = model
    with pytest.raises(ValueError, match="stride must be from 1 to context length - 1"):
        perplexity(llm, SHORT, context_length=32, stride=32)
    with pytest.raises(ValueError, match="exceeds the model's 512 tokens"):
        perplexity(llm, SHORT, context_length=4096)
    with pytest.raises(ValueError, match="non-empty texts"):
        perplexity(llm, [""])
