"""Extractive "question-answering" for `*ForQuestionAnswering` checkpoints (BERT): the answer is the span of the
context with the best start x end probability, `{"score", "start", "end", "answer"}`, computed as transformers'
QuestionAnsweringPipeline (v4) does: the question and context tokenized together, a long context cut into windows
of `max_seq_len` tokens overlapping by `doc_stride`, start and end softmaxed over the context tokens of each window,
spans up to `max_answer_len` tokens, character offsets aligned to whole words."""

from __future__ import annotations

from typing import Any

import torch

from llmasos.models.heads import QUESTION_ANSWERING
from llmasos.pipelines.question_answering import QuestionAnsweringPipeline
from llmasos.pipelines.task_models import TaskHeadModel, TaskModelPipeline


class QuestionAnsweringModel(TaskHeadModel):
    """A Bert/RobertaForQuestionAnswering checkpoint and its tokenizer: start and end logits of one window."""

    head = QUESTION_ANSWERING
    needs = "an encoder with a question-answering head (BertForQuestionAnswering, RobertaForQuestionAnswering)"

    @property
    def max_length(self) -> int:
        return self.model.encoder_model.max_length

    @torch.no_grad()
    def logits(self, input_ids: list[int], token_type_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        ids = torch.tensor([input_ids], device=device)
        start, end = self.model(ids, torch.ones_like(ids), torch.tensor([token_type_ids], device=device))
        return start[0].double().cpu(), end[0].double().cpu()  # (length,) each


def best_spans(start: torch.Tensor, end: torch.Tensor, context: torch.Tensor, top_k: int,
               max_answer_len: int) -> tuple[list[tuple[int, int, float]], float]:
    """The top_k (start, end, score) spans of one window, and the null score (both at the first token).
    `context` (length,) bool marks tokens an answer may use (the first token as well, as transformers keeps it)."""
    start = torch.where(context, start, torch.tensor(-10000.0, dtype=start.dtype)).softmax(-1)
    end = torch.where(context, end, torch.tensor(-10000.0, dtype=end.dtype)).softmax(-1)
    null_score = float(start[0] * end[0])
    start[0] = end[0] = 0.0
    scores = torch.tril(torch.triu(start[:, None] * end[None, :]), max_answer_len - 1)  # (length, length)
    flat = scores.flatten()
    order = torch.argsort(-flat, stable=True)[:top_k] if top_k > 1 else flat.argmax().reshape(1)
    spans = []
    length = scores.shape[1]
    for index in order.tolist():
        s, e = divmod(index, length)
        if context[s] and context[e]:
            spans.append((s, e, float(scores[s, e])))
    return spans, null_score


class ExtractiveQuestionAnsweringPipeline(TaskModelPipeline):
    """`qa(question="Who?", context="...")` (or the input forms of the generative pipeline) -> one dict, or a list
    of `top_k` dicts. Options: top_k (1), doc_stride (min(128, max_seq_len // 2)), max_answer_len (15), max_seq_len
    (min(384, the model's)), max_question_len (64), handle_impossible_answer (False), align_to_words (True)."""

    task = "question-answering"
    task_options = frozenset({"top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len",
                              "handle_impossible_answer", "align_to_words"})

    @classmethod
    def load_backend(cls, model: Any, dtype: str = "auto", device: str = "cpu") -> Any:
        if isinstance(model, QuestionAnsweringModel):
            return model
        return QuestionAnsweringModel.load(model, dtype="float32" if dtype == "auto" else dtype, device=device)

    def __call__(self, inputs: dict | list[dict] | None = None, *, question: str | list[str] | None = None,
                 context: str | list[str] | None = None, **options: Any) -> dict | list:
        options = self.merged(options)
        pairs, single = QuestionAnsweringPipeline._pairs(inputs, question, context)
        results = [self._answer(q, c, options) for q, c in pairs]
        return results[0] if single else results

    def _windows(self, question: str, context: str, max_seq_len: int, doc_stride: int) -> list:
        backend = self.model.tokenizer.backend
        previous = backend.truncation
        backend.enable_truncation(max_seq_len, stride=doc_stride, strategy="only_second")
        try:
            encoding = backend.encode(question, context, add_special_tokens=True)
        except Exception as exc:  # the question alone leaves no room for the context
            raise ValueError(f"the question is too long for max_seq_len {max_seq_len}: {exc}") from None
        finally:
            if previous is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**previous)
        return [encoding, *encoding.overflowing]

    def _answer(self, question: str, context: str, options: dict[str, Any]) -> dict | list:
        top_k = options.get("top_k", 1)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        max_answer_len = options.get("max_answer_len", 15)
        if max_answer_len < 1:
            raise ValueError(f"max_answer_len must be >= 1, got {max_answer_len}")
        max_seq_len = options.get("max_seq_len") or min(self.model.max_length, 384)
        doc_stride = options.get("doc_stride") or min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise ValueError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")
        handle_impossible = options.get("handle_impossible_answer", False)
        align_to_words = options.get("align_to_words", True)
        cls_id = self.model.tokenizer.token_to_id(self.model.tokenizer.special_tokens.get("cls_token") or "[CLS]")
        answers: list[dict] = []
        min_null_score = 1000000.0
        for window in self._windows(question, context, max_seq_len, doc_stride):
            ids = list(window.ids)
            context_mask = torch.tensor([sequence == 1 for sequence in window.sequence_ids])
            if cls_id is not None:
                context_mask |= torch.tensor([token == cls_id for token in ids])
            start, end = self.model.logits(ids, list(window.type_ids))
            spans, null_score = best_spans(start, end, context_mask, top_k, max_answer_len)
            min_null_score = min(min_null_score, null_score)
            for s, e, score in spans:
                char_start, char_end = self._chars(window, s, e, align_to_words)
                answers.append({"score": score, "start": char_start, "end": char_end,
                                "answer": context[char_start:char_end]})
        if handle_impossible:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers

    @staticmethod
    def _chars(window: Any, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
        if align_to_words:
            start_word, end_word = window.token_to_word(s), window.token_to_word(e)
            if start_word is not None and end_word is not None:
                start_chars = window.word_to_chars(start_word, 1)
                end_chars = window.word_to_chars(end_word, 1)
                if start_chars is not None and end_chars is not None:
                    return start_chars[0], end_chars[1]
        return window.offsets[s][0], window.offsets[e][1]
