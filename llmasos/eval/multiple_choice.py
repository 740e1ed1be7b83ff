"""Multiple-choice accuracy by log-likelihood: the chosen answer is the choice whose tokens, after the prompt, have
the highest summed log-probability (accuracy), or the highest per character of the choice (length-normalised, as
lm-evaluation-harness's acc_norm).

Tokens are split as lm-evaluation-harness does: the continuation is encode(prompt + choice) after the first
len(encode(prompt)) tokens, with the prompt's trailing whitespace moved to the choice. Examples are
{"prompt": str, "choices": [str, ...], "answer": index}; the choice is appended to the prompt as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llmasos.eval.backends import ScoringBackend, as_backend
from llmasos.eval.data import check_multiple_choice
from llmasos.eval.perplexity import Progress


@dataclass
class MultipleChoiceResult:
    accuracy: float
    accuracy_norm: float
    num_examples: int
    predictions: list[int] = field(repr=False)
    predictions_norm: list[int] = field(repr=False)
    loglikelihoods: list[list[float]] = field(repr=False)

    def metrics(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "accuracy_norm": self.accuracy_norm, "num_examples": self.num_examples}


def split_context(prompt: str, choice: str) -> tuple[str, str]:
    """Move the prompt's trailing whitespace onto the choice: "Answer: " + "Paris" becomes "Answer:" + " Paris"."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + choice


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda index: (values[index], -index))


def _choice_loglikelihoods(backend: ScoringBackend, prompt: str, choices: list[str], context_length: int | None,
                           where: str) -> list[float]:
    context, _ = split_context(prompt, "")
    continuations = [split_context(prompt, choice)[1] for choice in choices]
    context_ids = backend.tokenize(context)
    if context_ids is None:  # the backend cannot tokenize: count the context's tokens from its own echo
        scored = backend.score_texts([context] + [context + c for c in continuations])
        num_context, sequences = len(scored[0]), scored[1:]
        starts = [num_context] * len(choices)
    else:
        num_context = len(context_ids)
    if num_context == 0:
        raise ValueError(f"{where}: the prompt is empty and the tokenizer adds no BOS token, so the first token of a "
                         "choice cannot be scored; give a prompt")
    if context_ids is not None:
        inputs, starts = [], []
        for continuation in continuations:
            ids = backend.tokenize(context + continuation)
            cut = max(0, len(ids) - context_length) if context_length else 0
            if cut >= num_context:
                raise ValueError(f"{where}: a choice of {len(ids) - num_context} tokens does not fit in the context "
                                 f"of {context_length} tokens after its prompt; shorten the choice")
            inputs.append(ids[cut:])
            starts.append(num_context - cut)
        sequences = backend.score(inputs)
    totals = []
    for choice, logprobs, start in zip(choices, sequences, starts, strict=True):
        if len(logprobs) <= start:
            raise ValueError(f"{where}: choice {choice!r} adds no tokens after the prompt")
        totals.append(math.fsum(logprobs[start:]))
    return totals


def multiple_choice(model, examples: list[dict[str, Any]], *, progress: Progress | None = None,
                    source: str = "example") -> MultipleChoiceResult:
    """Accuracy of `model` (an LLM, a checkpoint path or a ScoringBackend) on multiple-choice `examples`."""
    backend = as_backend(model)
    if not examples:
        raise ValueError("multiple choice needs at least one example")
    check_multiple_choice(source, examples)
    context_length = backend.context_length()
    predictions, predictions_norm, loglikelihoods = [], [], []
    correct = correct_norm = 0
    if progress:
        progress(0, len(examples))
    for index, example in enumerate(examples):
        where = f"{source}, line {example.get('_line', index + 1)}"
        choices = list(example["choices"])
        totals = _choice_loglikelihoods(backend, example["prompt"], choices, context_length, where)
        chosen = _argmax(totals)
        chosen_norm = _argmax([total / len(choice) for total, choice in zip(totals, choices, strict=True)])
        correct += chosen == example["answer"]
        correct_norm += chosen_norm == example["answer"]
        predictions.append(chosen)
        predictions_norm.append(chosen_norm)
        loglikelihoods.append(totals)
        if progress:
            progress(index + 1, len(examples))
    count = len(examples)
    return MultipleChoiceResult(accuracy=correct / count, accuracy_norm=correct_norm / count, num_examples=count,
                                predictions=predictions, predictions_norm=predictions_norm,
                                loglikelihoods=loglikelihoods)
