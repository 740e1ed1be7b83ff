"""Generation evaluations: build each example's prompt (template, few-shot examples, chat), generate, then score.

Examples are {"prompt" or "messages", "reference"}; with a template such as "Question: {question}\\nAnswer:", the
prompt is the template filled with the example's fields. Few-shot examples go first, as
prompt + " " + reference + "\\n\\n" (lm-evaluation-harness's delimiters), or as user/assistant turns in chat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmasos.errors import EvalDataError
from llmasos.eval.backends import GenerationParams, Prompt, as_backend
from llmasos.eval.data import check_generation
from llmasos.eval.metrics import METRICS, compute
from llmasos.eval.perplexity import Progress

_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, example: dict[str, Any], where: str = "example") -> str:
    """`template` with each {field} replaced by the example's value ({{ and }} are literal braces)."""

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name not in example:
            fields = ", ".join(sorted(k for k in example if not k.startswith("_")))
            raise EvalDataError(f"{where}: the template needs field {name!r}, which the line lacks (it has {fields})")
        value = example[name]
        return value if isinstance(value, str) else str(value)

    return _FIELD.sub(replace, template)


def first_reference(example: dict[str, Any]) -> str:
    reference = example["reference"]
    return reference if isinstance(reference, str) else reference[0]


@dataclass
class PromptFormat:
    """How an example becomes a prompt."""

    template: str | None = None
    few_shot: list[dict[str, Any]] = field(default_factory=list)
    chat: bool = False  # send plain prompts as a user message through the chat template
    system: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"

    def text(self, example: dict[str, Any], where: str = "example") -> str:
        if self.template is not None:
            return fill_template(self.template, example, where)
        if not isinstance(example.get("prompt"), str):
            raise EvalDataError(f'{where}: expected a string field "prompt" (or "messages", or pass a template)')
        return example["prompt"]

    def _turns(self, example: dict[str, Any], where: str) -> list[dict]:
        if "messages" in example:
            return [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
        return [{"role": "user", "content": self.text(example, where)}]

    def build(self, example: dict[str, Any], where: str = "example") -> Prompt:
        """Plain text, or a list of chat messages when the example has "messages" or `chat` is set."""
        if not self.chat and "messages" not in example:
            shots = "".join(self.text(shot, "few-shot example") + self.target_delimiter + first_reference(shot)
                            + self.fewshot_delimiter for shot in self.few_shot)
            return shots + self.text(example, where)
        messages: list[dict] = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system})
        for shot in self.few_shot:
            messages += [m for m in self._turns(shot, "few-shot example") if m["role"] != "system"]
            messages.append({"role": "assistant", "content": first_reference(shot)})
        turns = self._turns(example, where)
        if self.system is not None:
            turns = [m for m in turns if m["role"] != "system"]
        elif turns and turns[0]["role"] == "system":
            messages.insert(0, turns.pop(0))
        return messages + turns


@dataclass
class GenerationResult:
    metrics: dict[str, float]
    num_examples: int
    predictions: list[str] = field(repr=False)
    references: list[list[str]] = field(repr=False)
    prompts: list[Prompt] = field(repr=False)


def generate_and_score(model, examples: list[dict[str, Any]], metrics: str | list[str], *,
                       prompt_format: PromptFormat | None = None, params: GenerationParams | None = None,
                       batch_size: int = 32, progress: Progress | None = None,
                       source: str = "example") -> GenerationResult:
    """Generate for every example with `model` (an LLM, a checkpoint path or a ScoringBackend), then score the
    stripped outputs against the references with each of `metrics` (bleu, chrf, rouge, exact_match, f1)."""
    backend = as_backend(model)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("name at least one metric: bleu, chrf, rouge, exact_match or f1")
    for metric in metrics:  # checked before generating, which is the slow part
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not examples:
        raise ValueError("generation needs at least one example")
    prompt_format = prompt_format or PromptFormat()
    params = params or GenerationParams()
    check_generation(source, examples, prompt_format.template)
    check_generation("few-shot examples", prompt_format.few_shot, prompt_format.template)
    prompts = [prompt_format.build(example, f"{source}, line {example.get('_line', index + 1)}")
               for index, example in enumerate(examples)]
    predictions: list[str] = []
    if progress:
        progress(0, len(prompts))
    for start in range(0, len(prompts), batch_size):
        predictions += [text.strip() for text in backend.generate(prompts[start:start + batch_size], params)]
        if progress:
            progress(len(predictions), len(prompts))
    references = [[r] if isinstance(r, str) else list(r) for r in (example["reference"] for example in examples)]
    scores: dict[str, float] = {}
    for metric in metrics:
        scores.update(compute(metric, predictions, references))
    return GenerationResult(metrics=scores, num_examples=len(examples), predictions=predictions,
                            references=references, prompts=prompts)
