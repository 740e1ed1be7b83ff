"""`llmasos eval ...`: perplexity, multiple choice, generation metrics and YAML tasks, in process or via an endpoint.

A rich progress bar goes to stderr; the result goes to stdout as a table, or as one JSON object with --json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click

from llmasos.errors import EvalDataError
from llmasos.eval.metrics import METRICS


def _model_options(function):
    """Options every eval command shares: which model, how to reach it, how to report."""
    options = [
        click.option("--model", "-m", default=None,
                     help="Library name or checkpoint directory; with --endpoint, the served model id."),
        click.option("--endpoint", default=None, metavar="URL",
                     help="An OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of loading the model."),
        click.option("--api-key", default=None, help="Bearer key for --endpoint (default: $LLMASOS_API_KEY)."),
        click.option("--dtype", default="auto", show_default=True, help="Weights dtype in process."),
        click.option("--device", default="auto", show_default=True,
                     help="Device in process (cpu, cuda, ...); auto: a CUDA GPU when there is one, else the CPU."),
        click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 256),
                     help="Requests in flight at once against --endpoint."),
        click.option("--limit", default=None, type=click.IntRange(1), help="Evaluate only the first N examples."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table."),
        click.option("--output", "-o", default=None, type=click.Path(dir_okay=False, path_type=Path),
                     help="Also save the JSON result to this file."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), function)


def _table(report: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"llmasos eval {report['task']}" + (f": {report['name']}" if report.get("name") else ""))
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_section()
    rows = [("model", report["model"]), ("backend", report["backend"] + (f" {report['endpoint']}"
                                                                       if report.get("endpoint") else "")),
            ("data", report["data"]), ("data sha256", report["data_sha256"][:16] + "…"),
            ("examples", str(report["num_examples"]))]
    rows += [(key.replace("_", " "), str(value)) for key, value in report["settings"].items() if value is not None]
    rows.append(("seconds", f"{report['seconds']:.2f}"))
    for key, value in rows:
        table.add_row(key, value, style="dim")
    return table


def _run(task, model: str | None, endpoint: str | None, api_key: str | None, dtype: str, device: str,
         concurrency: int, limit: int | None, as_json: bool, output: Path | None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmasos.eval.backends import open_backend
    from llmasos.eval.tasks import run_task

    if limit is not None:
        task.limit = limit
    if endpoint is None and not model:
        raise click.UsageError("pass --model NAME_OR_PATH, or --endpoint URL (with --model ID if it serves several)")
    for path, option in ((task.data, "--data"), (task.few_shot_data, "--few-shot-data")):
        if path is not None and not Path(path).expanduser().is_file():  # before minutes of loading a model
            raise EvalDataError(f"data file {path} does not exist; check the {option} path")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        progress_id = bar.add_task("loading model" if endpoint is None else "connecting", total=None)
        backend = open_backend(model, endpoint, api_key=api_key, dtype=dtype, device=device,
                               context_length=task.context_length, concurrency=concurrency)
        try:
            bar.update(progress_id, description=task.kind)
            report = run_task(task, backend,
                              progress=lambda done, total: bar.update(progress_id, completed=done, total=total))
        finally:
            backend.close()
    _emit(report, output, as_json)


@click.group("eval")
def eval_group() -> None:
    """Evaluate a model: perplexity, multiple choice, or generation scored with BLEU, chrF, ROUGE, EM or F1."""


@eval_group.command("perplexity")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="A text file (scored whole) or JSONL with {\"text\": ...} per line.")
@click.option("--context-length", type=click.IntRange(2), default=None,
              help="Tokens per window (default: the model's context).")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="Tokens each window advances (default: half the context length).")
@_model_options
def perplexity_command(data: Path, context_length: int | None, stride: int | None, **common) -> None:
    """Token-level perplexity and bits per byte of a text file, in sliding windows."""
    from llmasos.eval.tasks import Task

    _run(Task("perplexity", data, name=data.name, context_length=context_length, stride=stride), **common)


@eval_group.command("multiple-choice")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help='JSONL with {"prompt", "choices": [...], "answer": index} per line.')
@_model_options
def multiple_choice_command(data: Path, **common) -> None:
    """Accuracy picking the choice with the highest log-likelihood (and per character: accuracy_norm)."""
    from llmasos.eval.tasks import Task

    _run(Task("multiple-choice", data, name=data.name), **common)


@eval_group.command("generate")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help='JSONL with {"prompt" or "messages", "reference"} per line.')
@click.option("--metric", "metrics", required=True, multiple=True, type=click.Choice(METRICS),
              help="Metric to score with; repeat for several.")
@click.option("--template", default=None, help='Prompt template over the line\'s fields, e.g. "Q: {question}\\nA:".')
@click.option("--few-shot", default=0, show_default=True, type=click.IntRange(0),
              help="Examples to show first: from --few-shot-data, else the first lines of --data (not evaluated).")
@click.option("--few-shot-data", default=None, type=click.Path(path_type=Path), help="JSONL of few-shot examples.")
@click.option("--chat", is_flag=True, help="Send prompts as a user message through the model's chat template.")
@click.option("--system", default=None, help="System message for chat prompts.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 2))
@click.option("--stop", multiple=True, help="Stop string; repeat for several.")
@_model_options
def generate_command(data: Path, metrics: tuple[str, ...], template: str | None, few_shot: int,
                     few_shot_data: Path | None, chat: bool, system: str | None, max_tokens: int, temperature: float,
                     stop: tuple[str, ...], **common) -> None:
    """Generate for every example, then score against the references."""
    from llmasos.eval.backends import GenerationParams
    from llmasos.eval.tasks import Task

    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, stop=list(stop))
    task = Task("generate", data, name=data.name, metrics=list(metrics), template=template, few_shot=few_shot,
                few_shot_data=few_shot_data, chat=chat, system=system, generation=params)
    _run(task, **common)


@eval_group.command("classification")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help='JSONL with {"text", "label"} or {"text", "text_pair", "label"} per line.')
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@_model_options
def classification_command(data: Path, batch_size: int, model: str | None, endpoint: str | None,
                           api_key: str | None, dtype: str, device: str, concurrency: int, limit: int | None,
                           as_json: bool, output: Path | None) -> None:
    """Accuracy and macro-F1 of a sequence classifier (a *ForSequenceClassification checkpoint), in process."""
    import time
    from datetime import datetime, timezone

    from llmasos import __version__
    from llmasos.classification import SequenceClassifier
    from llmasos.eval.classification import evaluate_classification
    from llmasos.eval.data import sha256_of

    if endpoint is not None:
        raise click.UsageError("eval classification runs in process: pass --model, not --endpoint")
    if not model:
        raise click.UsageError("pass --model NAME_OR_PATH")
    if not data.expanduser().is_file():
        raise EvalDataError(f"data file {data} does not exist; check the --data path")
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    classifier = SequenceClassifier.load(model, dtype="float32" if dtype == "auto" else dtype,
                                         device="cpu" if device == "auto" else device)
    result = evaluate_classification(classifier, data.expanduser(), batch_size, limit)
    metrics: dict[str, Any] = {"accuracy": result.accuracy, "macro_f1": result.macro_f1}
    metrics.update({f"f1_{name}": value for name, value in result.per_label_f1.items()})
    report = {"task": "classification", "name": data.name, "model": model, "backend": "in-process",
              "endpoint": None, "data": str(data), "data_sha256": sha256_of(data.expanduser()),
              "num_examples": result.num_examples, "metrics": metrics,
              "settings": {"labels": ", ".join(classifier.labels), "batch_size": batch_size},
              "started_at": started_at, "seconds": round(time.perf_counter() - start, 3),
              "llmasos_version": __version__}
    _emit(report, output, as_json)


@eval_group.command("run")
@click.argument("task_file", type=click.Path(path_type=Path))
@_model_options
def run_command(task_file: Path, **common) -> None:
    """Run a task YAML file (task, data, template, metric, few_shot, ...)."""
    from llmasos.eval.tasks import load_task

    _run(load_task(task_file), **common)


def register(cli: click.Group) -> None:
    cli.add_command(eval_group)


def _emit(report: dict, output: Path | None, as_json: bool) -> None:
    """Write the report to --output (JSON), then print it as JSON or as a table."""
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n", encoding="utf-8")
    if as_json:
        click.echo(text)
    else:
        from llmasos.cli import table_console

        table_console().print(_table(report))
