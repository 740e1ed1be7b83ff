"""Multiple-choice accuracy equals a reference computed from transformers' logits on the same model and data."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import CORPUS, family_config, hf_tokenizer, make_checkpoint

from llmasos import LLM
from llmasos.eval import multiple_choice
from llmasos.eval.data import read_jsonl

from .references import reference_loglikelihood

EVALS = Path(__file__).resolve().parents[2] / "evals"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    reference = make_checkpoint(directory, family_config("qwen2"))
    return directory, reference


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM.load(checkpoint[0], dtype="float32")


def reference_totals(reference, examples, max_length: int = 10**9) -> list[list[float]]:
    tokenizer = hf_tokenizer()
    return [[reference_loglikelihood(reference, tokenizer, ex["prompt"], c, max_length) for c in ex["choices"]]
            for ex in examples]


def reference_accuracy(totals: list[list[float]], examples) -> tuple[float, float]:
    chosen = [max(range(len(t)), key=t.__getitem__) for t in totals]
    chosen_norm = [max(range(len(t)), key=lambda i, t=t, ex=ex: t[i] / len(ex["choices"][i]))
                   for t, ex in zip(totals, examples, strict=True)]
    accuracy = sum(c == ex["answer"] for c, ex in zip(chosen, examples, strict=True)) / len(examples)
    accuracy_norm = sum(c == ex["answer"] for c, ex in zip(chosen_norm, examples, strict=True)) / len(examples)
    return accuracy, accuracy_norm


def test_accuracy_equals_transformers_reference(checkpoint, llm):
    _, reference = checkpoint
    examples = read_jsonl(EVALS / "tiny_mc.jsonl")
    # Make the answers the reference model's own picks for half the examples, so accuracy is not trivially 0 or 1.
    expected_totals = reference_totals(reference, examples)
    for index, example in enumerate(examples):
        best = max(range(len(expected_totals[index])), key=expected_totals[index].__getitem__)
        example["answer"] = best if index % 2 == 0 else (best + 1) % len(example["choices"])
    accuracy, accuracy_norm = reference_accuracy(expected_totals, examples)
    result = multiple_choice(llm, examples)
    assert result.loglikelihoods == [pytest.approx(t, abs=1e-3) for t in expected_totals]
    assert result.accuracy == accuracy == 0.5
    assert result.accuracy_norm == accuracy_norm
    assert result.num_examples == len(examples)


def test_long_prompts_are_cut_from_the_left_and_trailing_spaces_move_to_the_choice(checkpoint):
    directory, reference = checkpoint
    examples = [{"prompt": CORPUS + " Question: which is it?\nAnswer:", "choices": [" the question", " 0123"],
                 "answer": 0},
                {"prompt": CORPUS * 2 + " So:", "choices": [" fortune", " the lazy dog; operating systems"],
                 "answer": 1},
                # Trailing whitespace of the prompt moves onto the choice before tokenizing (lm-eval's split).
                {"prompt": "The quick brown fox jumps over the ", "choices": ["lazy dog", "sea of troubles"],
                 "answer": 0}]
    llm = LLM.load(directory, dtype="float32", max_model_len=48)
    expected_totals = reference_totals(reference, examples, max_length=48)
    accuracy, accuracy_norm = reference_accuracy(expected_totals, examples)
    result = multiple_choice(llm, examples)
    assert result.loglikelihoods == [pytest.approx(t, abs=1e-3) for t in expected_totals]
    assert (result.accuracy, result.accuracy_norm) == (accuracy, accuracy_norm)


@pytest.mark.parametrize(("example", "message"), [
    ({"prompt": "Q:", "choices": [" a", " b"], "answer": 2}, r'"answer" must be the index of the right choice, 0 to 1'),
    ({"prompt": "Q:", "choices": [" a"], "answer": 0}, '"choices" must be a list of two or more'),
    ({"choices": [" a", " b"], "answer": 0}, 'expected a string field "prompt"'),
    ({"prompt": "Q:", "choices": [" a", " b"], "answer": True}, '"answer" must be the index'),
])
def test_malformed_examples_name_the_line(llm, example, message):
    with pytest.raises(ValueError, match=message) as error:
        multiple_choice(llm, [dict(example, _line=7)], source="mc.jsonl")
    assert "mc.jsonl, line 7" in str(error.value)
