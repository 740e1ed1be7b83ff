"""The text-generation and chat pipelines: outputs equal transformers' own text-generation pipeline (greedy) on the
same tiny random checkpoint, in every input and output shape, and transformers' options map onto SamplingParams."""

from __future__ import annotations

import pytest

from llmasos import SamplingParams, pipeline
from llmasos.errors import ModelLoadError, TemplateError
from llmasos.pipelines.base import sampling_params

PROMPTS = ["To be, or not to be", "The quick brown fox"]
CONVERSATION = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def reference_pipeline(chat_checkpoint):
    import transformers

    directory, reference = chat_checkpoint
    return transformers.pipeline("text-generation", model=reference,
                                 tokenizer=transformers.AutoTokenizer.from_pretrained(directory))


@pytest.fixture(scope="module")
def gen(chat_llm):
    return pipeline("text-generation", model=chat_llm)


@pytest.mark.parametrize("options", [{}, {"return_full_text": False}, {"return_tensors": True}])
def test_prompts_match_transformers(gen, reference_pipeline, options):
    for prompt in PROMPTS:
        assert gen(prompt, max_new_tokens=12, **options) == reference_pipeline(prompt, max_new_tokens=12,
                                                                               do_sample=False, **options)
    assert gen(PROMPTS, max_new_tokens=6, **options) == reference_pipeline(PROMPTS, max_new_tokens=6,
                                                                           do_sample=False, **options)


@pytest.mark.parametrize("return_full_text", [True, False])
def test_conversations_match_transformers(gen, reference_pipeline, return_full_text):
    ours = gen(CONVERSATION, max_new_tokens=8, return_full_text=return_full_text)
    assert ours == reference_pipeline(CONVERSATION, max_new_tokens=8, do_sample=False,
                                      return_full_text=return_full_text)
    if return_full_text:
        assert ours[0]["generated_text"][-1]["role"] == "assistant"


def test_output_is_the_engines_greedy_generation(gen, chat_llm):
    expected = chat_llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0))[0].text
    assert gen(PROMPTS[0], max_new_tokens=10) == [{"generated_text": PROMPTS[0] + expected}]


def test_sampling_returns_n_seeded_sequences(gen):
    first = gen(PROMPTS[0], max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=11)
    assert len(first) == 3 and all(entry["generated_text"].startswith(PROMPTS[0]) for entry in first)
    assert first == gen(PROMPTS[0], max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=11)
    nested = gen(PROMPTS, max_new_tokens=4, do_sample=True, num_return_sequences=2, seed=1)
    assert [len(entries) for entries in nested] == [2, 2]


def test_transformers_options_map_onto_sampling_params(chat_llm):
    greedy = sampling_params(chat_llm, {"do_sample": False, "temperature": 0.7, "max_new_tokens": 5})
    assert greedy.temperature == 0 and greedy.max_tokens == 5
    sampled = sampling_params(chat_llm, {"do_sample": True, "top_p": 0.9, "num_return_sequences": 2, "seed": 3})
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.n, sampled.seed) == (1.0, 0.9, 50, 2, 3)
    assert sampling_params(chat_llm, {"do_sample": True, "top_k": 0}).top_k == -1
    assert sampling_params(chat_llm, {"max_length": 12}, prompt_length=5).max_tokens == 7
    assert sampling_params(chat_llm, {}, prompt_length=250).max_tokens == 6  # the default stops at the context end
    assert sampling_params(chat_llm, {"min_new_tokens": 3, "stop_strings": ["x"]}).stop_strings == ["x"]
    with pytest.raises(ValueError, match="shorter than the prompt"):
        sampling_params(chat_llm, {"max_length": 3}, prompt_length=5)


def test_max_length_counts_the_prompt(gen, chat_llm):
    prompt_length = len(chat_llm.tokenizer.encode(PROMPTS[0]))
    ids = gen(PROMPTS[0], max_length=prompt_length + 4, return_tensors=True)[0]["generated_token_ids"]
    assert len(ids) <= prompt_length + 4


def test_chat_pipeline_returns_the_assistant_message(chat_llm, reference_pipeline):
    chat = pipeline("chat", model=chat_llm, max_new_tokens=8)
    message = chat(CONVERSATION)
    expected = reference_pipeline(CONVERSATION, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
    assert message == expected
    assert chat([CONVERSATION, CONVERSATION + [message, {"role": "user", "content": "and?"}]])[0] == message
    several = chat(CONVERSATION, do_sample=True, num_return_sequences=2, seed=0)
    assert len(several) == 2 and all(m["role"] == "assistant" for m in several)


def test_chat_needs_a_chat_template_and_a_conversation(base_llm, chat_llm):
    with pytest.raises(TemplateError):
        pipeline("chat", model=base_llm)(CONVERSATION)
    with pytest.raises(ValueError, match="conversation"):
        pipeline("chat", model=chat_llm)("not a conversation")


@pytest.mark.parametrize("bad", [None, 5, b"bytes"])
def test_an_input_that_is_not_text_is_a_clear_error(t5, bad):
    """Was TypeError: 'NoneType' object is not iterable."""
    with pytest.raises(ValueError, match=f"text-generation takes a string, a conversation or a list of them, not "
                                         f"{type(bad).__name__}"):
        pipeline("text-generation", model=t5)(bad)


def test_seq2seq_text_generation_is_text2text(t5):
    gen = pipeline("text-generation", model=t5, max_new_tokens=6)
    expected = t5.generate("hello", SamplingParams(max_tokens=6, temperature=0))[0].text
    assert gen("hello") == [{"generated_text": expected}]
    assert pipeline("text2text-generation", model=t5)("hello", max_new_tokens=6) == [{"generated_text": expected}]
    with pytest.raises(ValueError, match="decoder-only chat model"):
        gen(CONVERSATION)
    # docs/pipelines.md and transformers: a list of texts gives a flat list (one dict per text) when n is 1; it was
    # text-generation's list of lists.
    text2text = pipeline("text2text-generation", model=t5, max_new_tokens=6)
    assert text2text(["hello", "world"]) == [*text2text("hello"), *text2text("world")]
    several = text2text(["hello", "world"], num_return_sequences=2, do_sample=True, seed=0)
    assert [len(entries) for entries in several] == [2, 2]
    with pytest.raises(ModelLoadError, match="chat pipeline cannot run a seq2seq model; it runs decoder models"):
        pipeline("chat", model=t5)
