"""Evaluation: perplexity, multiple-choice log-likelihood and generation metrics, in process or against an endpoint.

>>> from llmasos.eval import bleu, chrf, rouge, exact_match, f1, perplexity
>>> bleu(["the cat sat"], ["the cat sat down"])  # sacreBLEU's corpus BLEU, 0-100
"""

from __future__ import annotations

from llmasos.eval.backends import GenerationParams, InProcessBackend, ScoringBackend, open_backend
from llmasos.eval.generate import GenerationResult, PromptFormat, generate_and_score
from llmasos.eval.metrics import bleu, chrf, exact_match, f1, normalize_answer, rouge
from llmasos.eval.multiple_choice import MultipleChoiceResult, multiple_choice
from llmasos.eval.perplexity import PerplexityResult, perplexity
from llmasos.eval.tasks import Task, load_task, run_task

__all__ = [
    "GenerationParams", "GenerationResult", "InProcessBackend", "MultipleChoiceResult", "PerplexityResult",
    "PromptFormat", "ScoringBackend", "Task", "bleu", "chrf", "exact_match", "f1", "generate_and_score", "load_task",
    "multiple_choice", "normalize_answer", "open_backend", "perplexity", "rouge", "run_task",
]
