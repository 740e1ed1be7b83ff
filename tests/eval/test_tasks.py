"""Data files and task YAML: what is read, and the errors for files a user can get wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmasos.errors import EvalDataError
from llmasos.eval import load_task
from llmasos.eval.data import read_jsonl, read_texts
from llmasos.eval.tasks import _examples

EVALS = Path(__file__).resolve().parents[2] / "evals"


def test_read_texts_from_text_and_jsonl(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("line one\n\nline two\n", encoding="utf-8")
    assert read_texts(text) == ["line one\n\nline two\n"]
    assert len(read_texts(EVALS / "tiny_text.jsonl")) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(EvalDataError, match=r'bad.jsonl, line 3: expected a non-empty string field "text"'):
        read_texts(bad)


@pytest.mark.parametrize(("content", "message"), [
    ('{"a": 1}\n{"a": \n', r"line 2: not valid JSON \(Expecting value at column 7\)"),
    ('[1, 2]\n', "line 1: expected a JSON object, got list"),
    ("\n  \n", "holds no examples"),
])
def test_malformed_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(EvalDataError, match=message):
        read_jsonl(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist; check the --data path"):
        read_jsonl(tmp_path / "absent.jsonl")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(EvalDataError, match="is not UTF-8 text"):
        read_texts(latin)


def test_task_yaml_resolves_data_next_to_it_and_takes_few_shot_from_the_head():
    task = load_task(EVALS / "tiny_qa.yaml")
    assert task.kind == "generate" and task.data == EVALS / "tiny_qa.jsonl" and task.name == "tiny_qa"
    assert task.metrics == ["exact_match", "f1"] and task.generation.stop == ["\n"] and task.few_shot == 2
    examples, shots = _examples(task)
    everything = read_jsonl(EVALS / "tiny_qa.jsonl")
    assert shots == everything[:2] and examples == everything[2:]


@pytest.mark.parametrize(("content", "message"), [
    ("task: generate\ndata: x.jsonl\n", "a generate task needs a metric"),
    ("task: rank\ndata: x.jsonl\n", "unknown task 'rank'; choose from perplexity, multiple-choice, generate"),
    ("task: generate\ndata: x.jsonl\nmetric: meteor\n", "unknown metric 'meteor'"),
    ("task: perplexity\n", "missing 'data'"),
    ("task: generate\ndata: x.jsonl\nmetric: f1\nmax_tokens: 0\n", "max_tokens must be a positive integer"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("task: [unclosed\n", "is not valid YAML"),
    ("task: generate\n  data: x\n", r"is not valid YAML: line 2, column 7: mapping values are not allowed here$"),
])
def test_bad_task_files(tmp_path, content, message):
    path = tmp_path / "task.yaml"
    path.write_text(content)
    with pytest.raises(EvalDataError, match=message):
        load_task(path)
