"""What the console's pages read, aggregated in SQL (a page costs the same with 10 or 10 million usage rows): usage by
key and model, by day, per key (with last use), and the training runs found under a directory."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from llmasos.db import session
from llmasos.server.auth import UsageRecord

MAX_RUNS = 200
MAX_METRIC_POINTS = 2000
# What a finished run leaves: `llmasos train` writes final/ (and adapter/ for LoRA); LLMTrainer.save_pretrained into
# the output directory itself leaves config.json or adapter_config.json there.
FINISHED_MARKERS = ("final/config.json", "adapter/adapter_config.json", "config.json", "adapter_config.json")


def date_range(start: str | None, end: str | None, default_days: int = 30) -> tuple[dt.date, dt.date]:
    """The inclusive [start, end] days of a query string (YYYY-MM-DD), defaulting to the last `default_days` days;
    a malformed date is a ValueError naming it."""
    today = dt.datetime.now(dt.timezone.utc).date()
    try:
        end_day = dt.date.fromisoformat(end) if end else today
        start_day = dt.date.fromisoformat(start) if start else end_day - dt.timedelta(days=default_days - 1)
    except ValueError:
        raise ValueError(f"dates are YYYY-MM-DD, got start={start!r} end={end!r}") from None
    if start_day > end_day:
        start_day, end_day = end_day, start_day
    return start_day, end_day


def _window(query, start: dt.date, end: dt.date, key: str | None = None, model: str | None = None):
    """Rows of [start, end], of one key and one model when given ('' for the rows without a key)."""
    since = dt.datetime.combine(start, dt.time())
    until = dt.datetime.combine(end + dt.timedelta(days=1), dt.time())
    query = query.where(UsageRecord.created_at >= since, UsageRecord.created_at < until)
    if key is not None:
        query = query.where(UsageRecord.key_name.is_(None) if key == "" else UsageRecord.key_name == key)
    if model is not None:
        query = query.where(UsageRecord.model == model)
    return query


def _totals():
    return (func.count(UsageRecord.id), func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0), func.coalesce(func.sum(UsageRecord.cost), 0.0))


def _row(values) -> dict[str, Any]:
    requests, prompt, completion, cost = values
    return {"requests": int(requests), "prompt_tokens": int(prompt), "completion_tokens": int(completion),
            "cost": float(cost)}


def usage_by_key_and_model(start: dt.date, end: dt.date, key: str | None = None,
                           model: str | None = None) -> list[dict[str, Any]]:
    query = select(UsageRecord.key_name, UsageRecord.model, *_totals()).group_by(UsageRecord.key_name,
                                                                                  UsageRecord.model)
    with session() as db:
        # keyless usage (NULL key) first on every database: PostgreSQL sorts NULL last unless told
        rows = db.execute(_window(query, start, end, key, model).order_by(UsageRecord.key_name.nulls_first(),
                                                                          UsageRecord.model)).all()
    return [{"key": key, "model": model, **_row(rest)} for key, model, *rest in rows]


def usage_by_day(start: dt.date, end: dt.date, key: str | None = None,
                 model: str | None = None) -> list[dict[str, Any]]:
    """One entry per day of the range, days without usage included (as zeros)."""
    day = func.date(UsageRecord.created_at)
    query = select(day, *_totals()).group_by(day)
    with session() as db:
        found = {str(d): _row(rest) for d, *rest in db.execute(_window(query, start, end, key, model)).all()}
    days = []
    current = start
    while current <= end:
        days.append({"day": current.isoformat(), **found.get(current.isoformat(), _row((0, 0, 0, 0.0)))})
        current += dt.timedelta(days=1)
    return days


def usage_names() -> tuple[list[str], list[str]]:
    """The key names and models that have usage (the filters of the usage page)."""
    with session() as db:
        keys = db.scalars(select(UsageRecord.key_name).where(UsageRecord.key_name.is_not(None)).distinct()).all()
        models = db.scalars(select(UsageRecord.model).distinct()).all()
    return sorted(keys), sorted(models)


def usage_by_key() -> dict[str | None, dict[str, Any]]:
    """All-time usage of every key, with the time of its last request."""
    query = select(UsageRecord.key_name, *_totals(), func.max(UsageRecord.created_at)).group_by(UsageRecord.key_name)
    with session() as db:
        rows = db.execute(query).all()
    return {key: {**_row(rest[:4]), "last_used": rest[4].isoformat(timespec="seconds") if rest[4] else None}
            for key, *rest in rows}


# --- training runs ---------------------------------------------------------------------------------------------------


def runs_directory() -> Path:
    """Where the console looks for runs: $LLMASOS_RUNS_DIR, else LLMASOS_HOME/runs."""
    from llmasos.home import home

    return Path(os.environ.get("LLMASOS_RUNS_DIR") or home() / "runs")


def find_runs(root: Path) -> list[dict[str, Any]]:
    """Output directories (up to two levels under `root`) that hold a metrics.jsonl, newest first."""
    if not root.is_dir():
        return []
    found = []
    for metrics in [*root.glob("*/metrics.jsonl"), *root.glob("*/*/metrics.jsonl")][:MAX_RUNS]:
        directory = metrics.parent
        records = read_metrics(metrics, last_only=True)
        last = records[-1] if records else {}
        checkpoints = sorted(p.name for p in directory.glob("checkpoint-*") if p.is_dir())
        finished = any((directory / name).is_file() for name in FINISHED_MARKERS)
        found.append({"name": directory.relative_to(root).as_posix(), "modified": metrics.stat().st_mtime,
                      "step": last.get("step"), "loss": last.get("loss"), "checkpoints": checkpoints,
                      "finished": finished})
    return sorted(found, key=lambda run: -run["modified"])


def find_evaluations(root: Path) -> list[dict[str, Any]]:
    """Reports of `llmasos eval ... --output FILE.json` saved up to two levels under `root`, newest first: the JSON
    objects with task, model and metrics."""
    if not root.is_dir():
        return []
    found = []
    for path in [*root.glob("*.json"), *root.glob("*/*.json"), *root.glob("*/*/*.json")][:MAX_RUNS]:
        try:
            if path.stat().st_size > 1 << 20:
                continue
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and {"task", "model", "metrics"} <= report.keys() \
                and isinstance(report["metrics"], dict):
            metrics = {k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
            found.append({"file": path.relative_to(root).as_posix(), "task": report["task"],
                          "name": report.get("name"), "model": report["model"],
                          "num_examples": report.get("num_examples"), "metrics": metrics,
                          "started_at": report.get("started_at"), "modified": path.stat().st_mtime})
    return sorted(found, key=lambda report: -report["modified"])


def resolve_run(root: Path, name: str) -> Path | None:
    """The run directory `name` names inside `root`, or None (also for anything that leaves `root`). A directory
    without metrics.jsonl yet counts: a run just started writes it once its first step is logged."""
    try:
        directory = (root / name).resolve()
        relative = directory.relative_to(root.resolve())
    except (ValueError, OSError):
        return None
    return directory if relative.parts and directory.is_dir() else None


def tail(path: Path, num_bytes: int = 4000) -> str | None:
    """The end of a text file (a failed run's log), or None."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - num_bytes))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return None


def read_metrics(path: Path, last_only: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, thinned to at most MAX_METRIC_POINTS; unreadable lines are skipped (the last
    one may be half-written while the run goes on). `last_only`: the last training-step record of the file's tail."""
    try:
        with path.open("rb") as handle:
            if last_only:
                handle.seek(max(0, path.stat().st_size - 4096))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    records = []
    for line in reversed(lines) if last_only else lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
            if last_only and "loss" in record:  # the last training step (eval records carry eval_loss only)
                return [record]
    if last_only:
        return records[:1]
    stride = max(1, len(records) // MAX_METRIC_POINTS)
    return records[::stride]


def run_arguments(directory: Path) -> dict[str, Any] | None:
    """The arguments a run was started with, when it saved them (trainer_state.json of its last checkpoint)."""
    for candidate in [directory / "trainer_state.json",
                      *sorted(directory.glob("checkpoint-*/trainer_state.json"), reverse=True)]:
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return None
