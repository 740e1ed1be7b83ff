"""The console's SQL aggregation and run discovery, without a browser or a server: usage by key and model and by day
(empty days included, the range inclusive), all-time usage per key with its last use, runs found under a directory
and never outside it."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import insert

from llmasos.db import session
from llmasos.server.auth import UsageRecord
from llmasos.server.console import queries


@pytest.fixture
def rows(fresh_home):
    day = dt.datetime(2026, 3, 10, 12)
    data = [("alice", "m1", day, 10, 5, 0.5), ("alice", "m1", day + dt.timedelta(hours=11), 1, 1, 0.25),
            ("alice", "m2", day + dt.timedelta(days=2), 2, 2, 1.0), ("bob", "m1", day - dt.timedelta(days=1), 7, 0, 0),
            (None, "m1", day, 3, 3, 0.0)]
    with session() as db:
        db.execute(insert(UsageRecord), [
            {"key_name": key, "model": model, "route": "/v1/chat/completions", "request_id": f"r{n}",
             "created_at": at, "prompt_tokens": p, "completion_tokens": c, "cost": cost}
            for n, (key, model, at, p, c, cost) in enumerate(data)])
    return data


def test_usage_by_key_and_model_and_by_day(rows):
    start, end = queries.date_range("2026-03-10", "2026-03-12")
    table = queries.usage_by_key_and_model(start, end)
    assert [(r["key"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in table] == [
        (None, "m1", 1, 3, 3), ("alice", "m1", 2, 11, 6), ("alice", "m2", 1, 2, 2)]
    days = queries.usage_by_day(start, end)
    assert [(d["day"], d["requests"], d["cost"]) for d in days] == [
        ("2026-03-10", 3, 0.75), ("2026-03-11", 0, 0.0), ("2026-03-12", 1, 1.0)]


def test_usage_filtered_by_key_and_model(rows):
    start, end = queries.date_range("2026-03-01", "2026-03-31")
    assert [r["requests"] for r in queries.usage_by_key_and_model(start, end, key="alice", model="m1")] == [2]
    assert [(r["key"], r["requests"]) for r in queries.usage_by_key_and_model(start, end, key="")] == [(None, 1)]
    assert sum(d["requests"] for d in queries.usage_by_day(start, end, model="m1")) == 4
    assert queries.usage_names() == (["alice", "bob"], ["m1", "m2"])


def test_usage_by_key_has_the_last_use(rows):
    usage = queries.usage_by_key()
    assert usage["alice"]["requests"] == 3 and usage["alice"]["last_used"] == "2026-03-12T12:00:00"
    assert usage["bob"]["prompt_tokens"] == 7


def test_date_range_defaults_orders_and_refuses():
    start, end = queries.date_range(None, "2026-01-30")
    assert (end - start).days == 29
    assert queries.date_range("2026-02-01", "2026-01-01") == (dt.date(2026, 1, 1), dt.date(2026, 2, 1))
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        queries.date_range("yesterday", None)


def test_runs_are_found_and_names_never_leave_the_directory(tmp_path):
    root = tmp_path / "runs"
    (root / "a" / "checkpoint-10").mkdir(parents=True)
    (root / "a" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n"
        + json.dumps({"step": 2, "eval_loss": 1.7}) + "\n" + '{"step": 3, "lo')  # a line still being written
    (root / "group" / "b").mkdir(parents=True)
    (root / "group" / "b" / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 0.5}) + "\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "metrics.jsonl").write_text("{}\n")
    found = {run["name"]: run for run in queries.find_runs(root)}
    assert set(found) == {"a", "group/b"}
    assert (found["a"]["step"], found["a"]["loss"], found["a"]["checkpoints"]) == (2, 1.5, ["checkpoint-10"])
    assert len(queries.read_metrics(root / "a" / "metrics.jsonl")) == 3
    assert queries.resolve_run(root, "group/b") == (root / "group" / "b").resolve()
    for name in ("../outside", "/etc", "a/../../outside", "", "."):
        assert queries.resolve_run(root, name) is None, name


def test_evaluation_reports_are_found(tmp_path):
    root = tmp_path / "runs"
    (root / "evals").mkdir(parents=True)
    report = {"task": "perplexity", "name": "tiny_text", "model": "shakespeare:tiny", "num_examples": 4,
              "metrics": {"perplexity": 12.5, "note": "text"}, "started_at": "2026-03-10T12:00:00"}
    (root / "evals" / "ppl.json").write_text(json.dumps(report))
    (root / "evals" / "other.json").write_text(json.dumps({"step": 1}))  # not a report
    (root / "evals" / "broken.json").write_text("{")
    found = queries.find_evaluations(root)
    assert [(r["file"], r["task"], r["metrics"]) for r in found] == [("evals/ppl.json", "perplexity",
                                                                       {"perplexity": 12.5})]
