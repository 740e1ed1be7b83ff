"""Question answering: transformers' output shape ({"score", "start", "end", "answer"}), the answer being the model's
greedy reply to the task prompt (T5 input for T5, chat template for chat models), its score the probability of the
generated tokens, and every input form transformers accepts."""

from __future__ import annotations

import math

import pytest
import torch
from encoders_support import t5_tokenizer

from llmasos import SamplingParams, pipeline
from llmasos.pipelines.question_answering import answer_span
from llmasos.pipelines.templates import TEMPLATES

QUESTION, CONTEXT = "Who jumps?", "The quick brown fox jumps over the lazy dog."


def test_chat_model_answer_and_score(chat_llm):
    qa = pipeline("question-answering", model=chat_llm, max_new_tokens=6)
    result = qa(question=QUESTION, context=CONTEXT)
    assert set(result) == {"score", "start", "end", "answer"}
    prompt = TEMPLATES["question-answering"].chat.format(question=QUESTION, context=CONTEXT)
    output = chat_llm.chat([{"role": "user", "content": prompt}],
                           SamplingParams(max_tokens=6, temperature=0, logprobs=0))[0].outputs[0]
    assert result["answer"] == output.text.strip()
    expected_score = math.exp(sum(lp[t] for lp, t in zip(output.logprobs, output.token_ids, strict=True)))
    assert result["score"] == pytest.approx(expected_score) and 0 < result["score"] <= 1
    if result["start"] >= 0:
        assert CONTEXT[result["start"]:result["end"]].lower() == result["answer"].lower()
    else:
        assert result["end"] == -1


def test_t5_answer_equals_transformers_greedy(t5, t5_checkpoint):
    _, reference = t5_checkpoint
    result = pipeline("question-answering", model=t5, max_new_tokens=8)({"question": QUESTION, "context": CONTEXT})
    tokenizer = t5_tokenizer()
    batch = tokenizer([f"question: {QUESTION} context: {CONTEXT}"], return_tensors="pt")
    with torch.no_grad():
        out = reference.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False,
                                 output_scores=True, return_dict_in_generate=True)
    assert result["answer"] == tokenizer.decode(out.sequences[0], skip_special_tokens=True).strip()
    logprob = sum(torch.log_softmax(scores[0], -1)[token].item()
                  for scores, token in zip(out.scores, out.sequences[0, 1:], strict=True))
    assert result["score"] == pytest.approx(math.exp(logprob), rel=1e-3)


def test_input_forms_and_shapes(chat_llm):
    qa = pipeline("question-answering", model=chat_llm, max_new_tokens=3)
    single = qa(question=QUESTION, context=CONTEXT)

    def same(results: list[dict]) -> bool:  # batched runs may differ from a lone run in the last float bits
        return all(r["answer"] == single["answer"] and r["start"] == single["start"]
                   and r["score"] == pytest.approx(single["score"], rel=1e-4) for r in results)

    assert same([qa({"question": QUESTION, "context": CONTEXT})])
    assert isinstance(qa([{"question": QUESTION, "context": CONTEXT}] * 2), list)
    assert same(qa([{"question": QUESTION, "context": CONTEXT}] * 2))
    assert same(qa(question=[QUESTION, QUESTION], context=CONTEXT))
    assert len(qa(question=[QUESTION], context=[CONTEXT])) == 1
    with pytest.raises(ValueError, match="question= and context="):
        qa(question=QUESTION)
    with pytest.raises(ValueError, match="2 questions and 3 contexts"):
        qa(question=[QUESTION] * 2, context=[CONTEXT] * 3)
    with pytest.raises(ValueError, match="dicts"):
        qa([{"question": QUESTION}])


def test_answer_span():
    assert answer_span("brown fox", CONTEXT) == (10, 19)
    assert answer_span("THE LAZY DOG", CONTEXT) == (31, 43)
    assert answer_span("a cat", CONTEXT) == (-1, -1) and answer_span("", CONTEXT) == (-1, -1)
