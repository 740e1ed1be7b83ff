"""The "question-answering" pipeline: a question and a context in, `{"answer", "score", "start", "end"}` out.

The answer is generated (greedy by default), not extracted: `score` is the probability of the generated tokens,
`start`/`end` are the character span of the answer in the context, or -1 when the answer is not a span of it."""

from __future__ import annotations

import math
from typing import Any

from llmasos.pipelines.text2text import PromptedTaskPipeline


def answer_span(answer: str, context: str) -> tuple[int, int]:
    """Character offsets of `answer` in `context` (exact first, then ignoring case), or (-1, -1)."""
    if not answer:
        return -1, -1
    start = context.find(answer)
    if start < 0:
        start = context.lower().find(answer.lower())
    return (start, start + len(answer)) if start >= 0 else (-1, -1)


class QuestionAnsweringPipeline(PromptedTaskPipeline):
    """`qa(question="Who?", context="...")`, `qa({"question": ..., "context": ...})`, a list of such dicts, or
    lists of questions and contexts (one context is shared by all questions). One question gives a dict, several a
    list of dicts."""

    task = "question-answering"
    template_name = "question-answering"
    default_max_new_tokens = 64

    def __call__(self, inputs: dict | list[dict] | None = None, *, question: str | list[str] | None = None,
                 context: str | list[str] | None = None, **options: Any) -> dict | list[dict]:
        pairs, single = self._pairs(inputs, question, context)
        outputs = self.generate([{"question": q, "context": c} for q, c in pairs], self.merged(options), logprobs=0)
        results = []
        for (_, context_text), output in zip(pairs, outputs, strict=True):
            completion = output.outputs[0]
            answer = completion.text.strip()
            logprob = sum(entry.get(token, 0.0) for entry, token in zip(completion.logprobs or [],
                                                                          completion.token_ids, strict=False))
            start, end = answer_span(answer, context_text)
            results.append({"score": math.exp(logprob), "start": start, "end": end, "answer": answer})
        return results[0] if single else results

    @staticmethod
    def _pairs(inputs, question, context) -> tuple[list[tuple[str, str]], bool]:
        if inputs is not None:
            if question is not None or context is not None:
                raise ValueError("give either an input dict (or list of them) or question= and context=, not both")
            single = isinstance(inputs, dict)
            items = [inputs] if single else list(inputs)
            if not all(isinstance(i, dict) and isinstance(i.get("question"), str) and isinstance(i.get("context"), str)
                       for i in items):
                raise ValueError("question-answering inputs must be {'question': str, 'context': str} dicts")
            return [(i["question"], i["context"]) for i in items], single
        if question is None or context is None:
            raise ValueError("question-answering needs question= and context=")
        single = isinstance(question, str) and isinstance(context, str)
        questions = [question] if isinstance(question, str) else list(question)
        contexts = [context] if isinstance(context, str) else list(context)
        if len(contexts) == 1:
            contexts = contexts * len(questions)
        if len(contexts) != len(questions):
            raise ValueError(f"got {len(questions)} questions and {len(contexts)} contexts; give one context or one "
                             "per question")
        return list(zip(questions, contexts, strict=True)), single
