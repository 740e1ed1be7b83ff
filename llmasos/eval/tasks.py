"""Evaluation tasks: one description (from CLI options or a YAML file) of data, prompt and metrics, run into a report.

A task YAML names its kind, data (relative to the YAML file) and settings, e.g.:

    task: generate
    data: tiny_qa.jsonl
    template: "Question: {question}\\nAnswer:"
    metric: [exact_match, f1]
    few_shot: 2
    max_tokens: 16
    stop: ["\\n"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmasos.errors import EvalDataError, yaml_problem
from llmasos.eval.backends import GenerationParams, ScoringBackend
from llmasos.eval.data import read_jsonl, read_texts, sha256_of
from llmasos.eval.generate import PromptFormat, generate_and_score
from llmasos.eval.metrics import METRICS
from llmasos.eval.multiple_choice import multiple_choice
from llmasos.eval.perplexity import Progress, perplexity

KINDS = ("perplexity", "multiple-choice", "generate")
TASK_KEYS = frozenset({"task", "name", "description", "data", "metric", "template", "few_shot", "few_shot_data",
                       "chat", "system", "max_tokens", "temperature", "top_p", "stop", "seed", "context_length",
                       "stride", "limit"})


@dataclass
class Task:
    kind: str
    data: Path
    name: str | None = None
    metrics: list[str] = field(default_factory=list)
    template: str | None = None
    few_shot: int = 0
    few_shot_data: Path | None = None
    chat: bool = False
    system: str | None = None
    generation: GenerationParams = field(default_factory=GenerationParams)
    context_length: int | None = None
    stride: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EvalDataError(f"unknown task {self.kind!r}; choose from {', '.join(KINDS)}")
        self.data = Path(self.data).expanduser()
        if isinstance(self.metrics, str):
            self.metrics = [self.metrics]
        for metric in self.metrics:
            if metric not in METRICS:
                raise EvalDataError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        if self.kind == "generate" and not self.metrics:
            raise EvalDataError(f"a generate task needs a metric: one or more of {', '.join(METRICS)}")
        if not isinstance(self.few_shot, int) or self.few_shot < 0:
            raise EvalDataError(f"few_shot must be a number of examples >= 0, got {self.few_shot!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise EvalDataError(f"limit must be a positive number of examples, got {self.limit!r}")


def load_task(path: str | Path) -> Task:
    """A Task from a YAML file; relative data paths are relative to the file."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalDataError(f"task file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"{path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(spec, dict):
        raise EvalDataError(f"{path} must be a YAML mapping with at least 'task' and 'data'")
    unknown = sorted(set(spec) - TASK_KEYS)
    if unknown:
        raise EvalDataError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TASK_KEYS))}")
    for key in ("task", "data"):
        if key not in spec:
            raise EvalDataError(f"{path}: missing '{key}'")

    def relative(value: Any) -> Path | None:
        return None if value is None else (path.parent / Path(str(value)).expanduser())

    generation_keys = ("max_tokens", "temperature", "top_p", "stop", "seed")
    try:
        generation = GenerationParams(**{k: spec[k] for k in generation_keys if k in spec})
        metrics = spec.get("metric", [])
        return Task(kind=spec["task"], data=relative(spec["data"]), name=spec.get("name", path.stem),
                    metrics=[metrics] if isinstance(metrics, str) else list(metrics), template=spec.get("template"),
                    few_shot=spec.get("few_shot", 0), few_shot_data=relative(spec.get("few_shot_data")),
                    chat=bool(spec.get("chat", False)), system=spec.get("system"), generation=generation,
                    context_length=spec.get("context_length"), stride=spec.get("stride"), limit=spec.get("limit"))
    except (TypeError, ValueError) as exc:
        raise EvalDataError(f"{path}: {exc}") from None


def _examples(task: Task) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(examples to evaluate, few-shot examples): few-shot ones come from few_shot_data, else from the data's head."""
    examples = read_jsonl(task.data)
    shots: list[dict[str, Any]] = []
    if task.few_shot:
        if task.few_shot_data is not None:
            shots = read_jsonl(task.few_shot_data)[: task.few_shot]
        else:
            shots, examples = examples[: task.few_shot], examples[task.few_shot:]
            if not examples:
                raise EvalDataError(f"{task.data} has {len(shots)} examples, all used as few-shot examples; lower "
                                    "--few-shot or pass --few-shot-data")
    if task.limit is not None:
        examples = examples[: task.limit]
    return examples, shots


def run_task(task: Task, backend: ScoringBackend, progress: Progress | None = None) -> dict[str, Any]:
    """Run `task` against `backend`; the report: metrics, settings and metadata, ready for JSON."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    if not task.data.is_file():
        raise EvalDataError(f"data file {task.data} does not exist; check the --data path (or the task's 'data')")
    data_sha256 = sha256_of(task.data)
    settings: dict[str, Any] = {}
    source = str(task.data)
    if task.kind == "perplexity":
        texts = read_texts(task.data)
        if task.limit is not None:
            texts = texts[: task.limit]
        result = perplexity(backend, texts, context_length=task.context_length, stride=task.stride,
                            progress=progress)
        metrics = {"perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}
        settings = {"context_length": result.context_length, "stride": result.stride,
                    "num_tokens": result.num_tokens, "num_bytes": result.num_bytes, "num_windows": result.num_windows}
        num_examples = result.num_texts
    elif task.kind == "multiple-choice":
        examples, _ = _examples(task)
        result = multiple_choice(backend, examples, progress=progress, source=source)
        metrics = {"accuracy": result.accuracy, "accuracy_norm": result.accuracy_norm}
        num_examples = result.num_examples
    else:
        examples, shots = _examples(task)
        prompt_format = PromptFormat(template=task.template, few_shot=shots, chat=task.chat, system=task.system)
        result = generate_and_score(backend, examples, task.metrics, prompt_format=prompt_format,
                                    params=task.generation, progress=progress, source=source)
        metrics = result.metrics
        generation = task.generation
        settings = {"template": task.template, "few_shot": len(shots), "chat": task.chat,
                    "max_tokens": generation.max_tokens, "temperature": generation.temperature,
                    "stop": generation.stop}
        num_examples = result.num_examples
    from llmasos import __version__

    return {
        "task": task.kind,
        "name": task.name,
        "model": backend.model_name,
        "backend": backend.kind,
        "endpoint": getattr(backend, "base_url", None),
        "data": str(task.data),
        "data_sha256": data_sha256,
        "num_examples": num_examples,
        "metrics": metrics,
        "settings": settings,
        "started_at": started_at,
        "seconds": round(time.perf_counter() - start, 3),
        "llmasos_version": __version__,
    }
