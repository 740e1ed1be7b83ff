"""LLMasOS: an operating system for large language models — get, run, serve, train and evaluate them."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names, imported on first use so that `import llmasos` (and the CLI's start) stays fast.
_EXPORTS = {
    "LLM": "llmasos.llm",
    "SamplingParams": "llmasos.sampling_params",
    "StructuredOutputsParams": "llmasos.sampling_params",
    "StructuredOutputError": "llmasos.engine.validation",
    "RequestOutput": "llmasos.outputs",
    "CompletionOutput": "llmasos.outputs",
    "Tokenizer": "llmasos.tokenizer",
    "LLMasOSError": "llmasos.errors",
    "ModelLoadError": "llmasos.errors",
    "AsyncLLM": "llmasos.engine.async_llm",
    "LLMServing": "llmasos.server.serving",
    "Client": "llmasos.client",
    "AsyncClient": "llmasos.client",
    "LLMTrainer": "llmasos.train.trainer",
    "TrainingArguments": "llmasos.train.arguments",
    "pipeline": "llmasos.pipelines",
    "SemanticIndex": "llmasos.search",
}

if TYPE_CHECKING:
    from llmasos.client import AsyncClient, Client
    from llmasos.engine.async_llm import AsyncLLM
    from llmasos.engine.validation import StructuredOutputError
    from llmasos.errors import LLMasOSError, ModelLoadError
    from llmasos.llm import LLM
    from llmasos.outputs import CompletionOutput, RequestOutput
    from llmasos.pipelines import pipeline
    from llmasos.sampling_params import SamplingParams, StructuredOutputsParams
    from llmasos.search import SemanticIndex
    from llmasos.server.serving import LLMServing
    from llmasos.tokenizer import Tokenizer
    from llmasos.train.arguments import TrainingArguments
    from llmasos.train.trainer import LLMTrainer


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmasos' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = [
    "AsyncClient", "AsyncLLM", "Client", "CompletionOutput", "LLM", "LLMServing", "LLMTrainer", "LLMasOSError",
    "ModelLoadError", "RequestOutput", "SamplingParams", "SemanticIndex", "StructuredOutputError",
    "StructuredOutputsParams", "Tokenizer", "TrainingArguments", "pipeline",
]
