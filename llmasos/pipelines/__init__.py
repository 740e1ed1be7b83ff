"""Task pipelines with transformers-compatible inputs and outputs, on the LLMasOS engine.

>>> from llmasos import pipeline
>>> gen = pipeline("text-generation", model="qwen2.5:0.5b-instruct")
>>> gen("Once upon a time", max_new_tokens=20)            # [{"generated_text": "Once upon a time..."}]
>>> pipeline("translation", model="t5-small", src_lang="en", tgt_lang="fr")("Hello")  # [{"translation_text": ...}]
>>> pipeline("embeddings", model="path/to/all-MiniLM-L6-v2")(["a", "b"])              # [[...384 floats], [...]]

Tasks: text-generation, text2text-generation, chat, translation (and translation_XX_to_YY), summarization,
question-answering (extractive for *ForQuestionAnswering checkpoints, generative otherwise), embeddings (alias
feature-extraction), text-classification (alias sentiment-analysis), zero-shot-classification, fill-mask. See
docs/pipelines.md."""

from __future__ import annotations

import re
from typing import Any

from llmasos.pipelines.base import ENCODER, GENERATION_OPTIONS, Pipeline, load_backend
from llmasos.pipelines.embeddings import EmbeddingsPipeline
from llmasos.pipelines.extractive_qa import ExtractiveQuestionAnsweringPipeline, QuestionAnsweringModel
from llmasos.pipelines.question_answering import QuestionAnsweringPipeline
from llmasos.pipelines.seq2seq import Seq2SeqLM
from llmasos.pipelines.task_models import (
    FillMaskPipeline,
    MaskedLM,
    TaskModelPipeline,
    TextClassificationPipeline,
    ZeroShotClassificationPipeline,
    checkpoint_architectures,
)
from llmasos.pipelines.text2text import SummarizationPipeline, TranslationPipeline
from llmasos.pipelines.text_generation import ChatPipeline, Text2TextGenerationPipeline, TextGenerationPipeline
from llmasos.spec import ModelSpec

TASKS: dict[str, type[Pipeline]] = {
    "text-generation": TextGenerationPipeline,
    "text2text-generation": Text2TextGenerationPipeline,
    "chat": ChatPipeline,
    "translation": TranslationPipeline,
    "summarization": SummarizationPipeline,
    "question-answering": QuestionAnsweringPipeline,
    "embeddings": EmbeddingsPipeline,
    "text-classification": TextClassificationPipeline,
    "fill-mask": FillMaskPipeline,
    "zero-shot-classification": ZeroShotClassificationPipeline,
}
TASK_ALIASES = {"sentiment-analysis": "text-classification", "feature-extraction": "embeddings",
                "sentence-embeddings": "embeddings", "conversational": "chat"}


def pipeline(task: str, model: Any = None, *, dtype: str = "auto", device: str = "cpu", **options: Any) -> Pipeline:
    """A callable for `task` on `model`: a library name, a checkpoint directory, or an already loaded LLM,
    Seq2SeqLM or Embedder (without a model: the bundled default model). `options` are the task's options and
    generation options (max_new_tokens, do_sample, ...), used as defaults for every call."""
    match = re.fullmatch(r"translation_([A-Za-z]+)_to_([A-Za-z]+)", task)
    if match:
        options.setdefault("src_lang", match.group(1))
        options.setdefault("tgt_lang", match.group(2))
        task = "translation"
    task = TASK_ALIASES.get(task, task)
    cls = TASKS.get(task)
    if cls is QuestionAnsweringPipeline and is_extractive_qa(model):
        cls = ExtractiveQuestionAnsweringPipeline  # an encoder with a span head: answers are extracted, not written
    if cls is None:
        raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join([*TASKS, *TASK_ALIASES])}, "
                         "translation_XX_to_YY")
    if issubclass(cls, TaskModelPipeline):
        unknown = sorted(set(options) - cls.task_options)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for the {task} pipeline; it accepts: "
                             f"{', '.join(sorted(cls.task_options))}")
        return cls(cls.load_backend(model, dtype=dtype, device=device), **options)
    allowed = cls.task_options | (frozenset() if ENCODER in cls.kinds else GENERATION_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:  # before minutes of loading
        raise ValueError(f"unknown option {unknown[0]!r} for the {task} pipeline; it accepts: "
                         f"{', '.join(sorted(allowed))}")
    return cls(load_backend(model, dtype=dtype, device=device), **options)


def is_extractive_qa(model: Any) -> bool:
    """A loaded QuestionAnsweringModel, or a checkpoint whose config.json names a *ForQuestionAnswering class."""
    if isinstance(model, QuestionAnsweringModel):
        return True
    if model is None or not isinstance(model, (str, ModelSpec)) and not hasattr(model, "__fspath__"):
        return False
    return any(name.endswith("ForQuestionAnswering") for name in checkpoint_architectures(model))


__all__ = ["ChatPipeline", "EmbeddingsPipeline", "ExtractiveQuestionAnsweringPipeline", "FillMaskPipeline",
           "MaskedLM", "Pipeline", "QuestionAnsweringModel", "QuestionAnsweringPipeline", "Seq2SeqLM",
           "SummarizationPipeline", "TASKS", "Text2TextGenerationPipeline", "TextClassificationPipeline",
           "TextGenerationPipeline", "TranslationPipeline", "ZeroShotClassificationPipeline", "pipeline"]
