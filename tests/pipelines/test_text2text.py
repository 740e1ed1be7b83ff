"""Translation and summarization: a T5 saved by transformers translates to exactly transformers' greedy output (with
the prefix from its task_specific_params, or the T5 default); decoder-only models get the task prompt through their
chat template, or as a plain completion; shapes and errors follow transformers."""

from __future__ import annotations

import pytest
import torch
from encoders_support import t5_tokenizer

from llmasos import SamplingParams, pipeline
from llmasos.pipelines.templates import TEMPLATES, language_code, language_name

TEXTS = ["To be, or not to be, that is the question", "The quick brown fox jumps over the lazy dog"]


def transformers_greedy(reference, inputs: list[str], max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
    tokenizer = t5_tokenizer()
    batch = tokenizer(inputs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = reference.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 do_sample=False, use_cache=False)
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def test_t5_translation_equals_transformers_greedy(t5, t5_checkpoint):
    _, reference = t5_checkpoint
    translate = pipeline("translation", model=t5, src_lang="en", tgt_lang="fr", max_new_tokens=16)
    expected = transformers_greedy(reference, ["translate English to French: " + t for t in TEXTS], 16)
    assert translate(TEXTS[0]) == [{"translation_text": expected[0]}]
    assert translate(TEXTS) == [{"translation_text": text} for text in expected]
    assert pipeline("translation_en_to_fr", model=t5, max_new_tokens=16)(TEXTS) == translate(TEXTS)


def test_t5_task_defaults_and_fallback_prefix(t5, t5_checkpoint):
    _, reference = t5_checkpoint
    # task_specific_params: max_length 12 for en->fr; no entry for en->de, so T5's own wording is used.
    default_length = pipeline("translation_en_to_fr", model=t5)(TEXTS[0])
    assert default_length == [{"translation_text": transformers_greedy(
        reference, ["translate English to French: " + TEXTS[0]], 12)[0]}]
    german = pipeline("translation", model=t5, src_lang="English", tgt_lang="de", max_new_tokens=8)(TEXTS[1])
    assert german == [{"translation_text": transformers_greedy(
        reference, ["translate English to German: " + TEXTS[1]], 8)[0]}]


def test_t5_summarization_equals_transformers_greedy(t5, t5_checkpoint):
    _, reference = t5_checkpoint
    summarize = pipeline("summarization", model=t5)  # max_length 10, min_length 3 from task_specific_params
    expected = transformers_greedy(reference, ["summarize: " + t for t in TEXTS], 10, min_new_tokens=3)
    assert summarize(TEXTS) == [{"summary_text": text} for text in expected]


def test_chat_model_gets_the_task_prompt_through_its_template(chat_llm):
    translate = pipeline("translation", model=chat_llm, src_lang="de", tgt_lang="en", max_new_tokens=6)
    prompt = TEMPLATES["translation"].chat.format(text=TEXTS[0], src_lang="German", tgt_lang="English")
    expected = chat_llm.chat([{"role": "user", "content": prompt}], SamplingParams(max_tokens=6, temperature=0))
    assert translate(TEXTS[0]) == [{"translation_text": expected[0].text.strip()}]
    custom = translate(TEXTS[0], prompt_template="{text} => {tgt_lang}", system_prompt="Be brief.")
    expected = chat_llm.chat([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": TEXTS[0] + " => English"}],
                             SamplingParams(max_tokens=6, temperature=0))
    assert custom == [{"translation_text": expected[0].text.strip()}]


def test_base_model_gets_a_plain_prompt_cut_at_the_stop(base_llm, chat_llm):
    summarize = pipeline("summarization", model=base_llm, max_new_tokens=8)
    prompt = TEMPLATES["summarization"].plain.format(text=TEXTS[1])
    expected = base_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, stop=["\n\n"]))[0].text
    assert summarize(TEXTS[1]) == [{"summary_text": expected.strip()}]
    plain = pipeline("summarization", model=chat_llm, max_new_tokens=8, use_chat_template=False)
    expected = chat_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, stop=["\n\n"]))[0].text
    assert plain(TEXTS[1]) == [{"summary_text": expected.strip()}]


def test_output_shapes(chat_llm):
    summarize = pipeline("summarization", model=chat_llm, max_new_tokens=3)
    assert len(summarize(TEXTS)) == 2 and all(set(entry) == {"summary_text"} for entry in summarize(TEXTS))
    several = summarize(TEXTS, do_sample=True, num_return_sequences=2, seed=0)
    assert [len(entries) for entries in several] == [2, 2]
    assert len(summarize(TEXTS[0], do_sample=True, num_return_sequences=3, seed=0)) == 3


def test_errors_name_the_fix(chat_llm, base_llm):
    with pytest.raises(ValueError, match="src_lang and tgt_lang"):
        pipeline("translation", model=chat_llm)("Hallo")
    with pytest.raises(ValueError, match=r"\{nope\} is unknown"):
        pipeline("summarization", model=chat_llm, prompt_template="{nope}")("x")
    with pytest.raises(ValueError, match="no chat template"):
        pipeline("summarization", model=base_llm, use_chat_template=True)("x")
    with pytest.raises(ValueError, match="unknown option 'beams'"):
        pipeline("summarization", model=chat_llm, beams=4)


def test_language_names():
    assert [language_name(x) for x in ("en", "fr_XX", "deu_Latn", "Romanian", "Klingon")] == [
        "English", "French", "German", "Romanian", "Klingon"]
    assert language_code("French") == "fr" and language_code("xx") is None


def test_t5_translation_of_an_instructed_text_without_languages(t5, t5_checkpoint):
    """As transformers' translation pipeline with T5: the text already says what to do, and goes in as it is."""
    _, reference = t5_checkpoint
    instructed = "translate English to German: " + TEXTS[0]
    expected = transformers_greedy(reference, [instructed], 10)
    assert pipeline("translation", model=t5, max_new_tokens=10)(instructed) == [{"translation_text": expected[0]}]
    with pytest.raises(ValueError, match="src_lang and tgt_lang"):
        pipeline("translation", model=t5, src_lang="en")(instructed)
