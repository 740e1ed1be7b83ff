"""`llmasos index` (llmasos/cli/index.py) through click's CliRunner against a temporary LLMASOS_HOME: create, query
(--json and the table), add, delete, list, rm; each mistake is one `error:` line with exit code 1, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from encoders_support import make_sentence_transformer, minilm_dir

from llmasos.cli.main import cli
from llmasos.search import SemanticIndex

from .support import minilm, sentences

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cli-home")
        patch.setenv("LLMASOS_HOME", str(path))
        patch.setenv("OMP_NUM_THREADS", "1")  # `llmasos index` sets torch threads from it
        # Every command loads its model, as a fresh process must; here MiniLM is loaded once for the module (the
        # subprocess test below runs the whole real path).
        import llmasos.search.index as index_module

        load = index_module.load_embedder
        patch.setattr(index_module, "load_embedder",
                      lambda model: minilm() if str(model) == str(minilm_dir()) else load(model))
        yield path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "text": text, "topic": "demo"}) + "\n"
                            for i, text in enumerate(sentences()[:70])))
    return path


def test_round_trip(data, tmp_path):
    created = ok("index", "create", "demo", "--model", str(minilm_dir()), "--data", str(data))
    assert "created index 'demo': 70 chunks of 70 documents, 384-dimensional" in created.output
    assert "embedding chunks" in created.stderr  # the progress bar (70 chunks)
    query = "music played by an orchestra"
    printed = json.loads(ok("index", "query", "demo", query, "-k", "3", "--json").stdout)
    expected = SemanticIndex.open("demo", embedder=minilm()).query(query, 3)
    assert printed["model"] == str(minilm_dir()) and printed["index"] == "demo"
    assert printed["data"] == [hit.to_dict() for hit in expected]
    assert printed["data"][0]["metadata"]["topic"] == "demo" and printed["data"][0]["metadata"]["line"] >= 1
    table = ok("index", "query", "demo", query, "-k", "3").stdout
    assert expected[0].id in table and f"{expected[0].score:.4f}" in table

    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"id": "tuba", "text": "A tuba player marches in the brass band."}) + "\n")
    assert "added 1 chunks to index 'demo' (71 in all)" in ok("index", "add", "demo", "--data", str(more)).stdout
    top = json.loads(ok("index", "query", "demo", "brass band musician", "-k", "1", "--json").stdout)["data"]
    assert top[0]["id"] == "tuba"
    assert_one_error_line(run("index", "add", "demo", "--data", str(more)), "'tuba' is already in index")
    ok("index", "add", "demo", "--data", str(more), "--replace")

    assert "deleted 2 chunks" in ok("index", "delete", "demo", "--ids", "tuba,s0").stdout
    after = json.loads(ok("index", "query", "demo", "brass band musician", "-k", "100", "--json").stdout)["data"]
    assert {"tuba", "s0"}.isdisjoint(hit["id"] for hit in after) and len(after) == 69
    assert "deleted 69 chunks" in ok("index", "delete", "demo", "--source", str(data)).stdout

    shown = json.loads(ok("index", "show", "demo", "--json").stdout)
    assert shown["num_chunks"] == 0 and shown["chunking"] == {"unit": "tokens", "size": 254, "overlap": 32}
    assert shown["dimension"] == 384 and shown["path"].endswith("indexes/demo")
    table = ok("index", "show", "demo").stdout
    assert "exact scan" in table and "254 tokens, overlap 32" in table
    listed = json.loads(ok("index", "list", "--json").stdout)
    assert [(r["name"], r["chunks"], r["dimension"]) for r in listed] == [("demo", 0, 384)]
    table = ok("index", "list").stdout
    assert "demo" in table and "384" in table and "KB" in table
    assert "removed index 'demo'" in ok("index", "rm", "demo").stdout
    assert json.loads(ok("index", "list", "--json").stdout) == []


def test_chunk_options(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta " * 50)
    ok("index", "create", "chunked", "--model", str(minilm_dir()), "--data", str(tmp_path), "--chunk-unit", "chars",
       "--chunk-size", "200", "--chunk-overlap", "20", "--quiet")
    hits = json.loads(ok("index", "query", "chunked", "alpha", "-k", "100", "--json").stdout)["data"]
    assert len(hits) == 7 and all(len(hit["text"]) <= 200 for hit in hits)
    assert {hit["metadata"]["source"] for hit in hits} == {str((tmp_path / "a.txt").resolve())}
    (tmp_path / "b.md").write_text("# B\nbeta notes")
    (tmp_path / "c.jsonl").write_text('{"text": "gamma record", "id": "c1"}\n')
    ok("index", "add", "chunked", "--data", str(tmp_path / "b.md"), "--data", str(tmp_path / "c.jsonl"), "--quiet")
    ids = {hit["id"] for hit in json.loads(ok("index", "query", "chunked", "x", "-k", "100", "--json").stdout)["data"]}
    assert {"b.md", "c1"} <= ids
    (tmp_path / "long.txt").write_text("word " * 2000)
    added = ok("index", "add", "chunked", "--data", str(tmp_path / "long.txt"))
    assert "note:" not in added.stderr  # the index's 200-character chunks fit the model
    created = run("index", "create", "wider", "--model", str(minilm_dir()), "--data", str(tmp_path / "long.txt"),
                  "--chunk-unit", "chars", "--chunk-size", "4000", "--chunk-overlap", "0", "--quiet")
    assert created.exit_code == 0 and "note: 3 chunks are longer than the model reads (256 tokens" in created.stderr


def test_mistakes_are_one_error_line(data, tmp_path, tmp_path_factory):
    model = str(minilm_dir())
    assert_one_error_line(run("index", "query", "nope", "x"), "index 'nope' does not exist")
    assert_one_error_line(run("index", "rm", "nope"), "index 'nope' does not exist")
    assert_one_error_line(run("index", "show", "nope"), "index 'nope' does not exist")
    assert_one_error_line(run("index", "create", "Bad/Name", "--model", model, "--data", str(data)), "index name")
    assert_one_error_line(run("index", "create", "x", "--model", model, "--data", str(tmp_path / "no.jsonl")),
                          "does not exist")
    (tmp_path / "empty.jsonl").write_text("")
    assert_one_error_line(run("index", "create", "x", "--model", model, "--data", str(tmp_path / "empty.jsonl")),
                          "nothing to index")
    assert_one_error_line(run("index", "create", "x", "--model", model, "--data", str(data), "--chunk-size", "1000"),
                          "more than the embedding model reads")
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "one small document"}) + "\n")
    ok("index", "create", "q", "--model", model, "--data", str(small), "--quiet")
    assert_one_error_line(run("index", "query", "q", "  "), "must not be empty")
    assert_one_error_line(run("index", "delete", "q", "--ids", "zzz"), "no chunk or document with id 'zzz'")
    assert_one_error_line(run("index", "delete", "q"), "give the ids to delete")
    other = tmp_path_factory.mktemp("encoder") / "tiny"
    make_sentence_transformer(other)
    assert_one_error_line(run("index", "add", "q", "--data", str(data), "--model", str(other)),
                          "384-dimensional", "64-dimensional")
    assert not [p for p in (Path(os.environ["LLMASOS_HOME"]) / "indexes").iterdir() if p.name.startswith("x")]


def test_the_real_command_prints_no_traceback():
    result = subprocess.run([sys.executable, "-m", "llmasos", "index", "query", "nope", "text"], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT, env=dict(os.environ))
    assert result.returncode == 1 and result.stderr.startswith("error: index 'nope' does not exist"), result.stderr
    assert "Traceback" not in result.stderr


def test_a_library_model_by_name(data):
    assert "minilm" in ok("import", str(minilm_dir()), "--name", "minilm").output
    ok("index", "create", "named", "--model", "minilm", "--data", str(data), "--quiet")
    listed = {row["name"]: row for row in json.loads(ok("index", "list", "--json").stdout)}
    assert listed["named"]["model"] == "minilm"  # recorded by name: a re-pulled model is picked up
    printed = json.loads(ok("index", "query", "named", "fruit in a basket", "-k", "2", "--json").stdout)
    expected = SemanticIndex.open("named", embedder=minilm()).query("fruit in a basket", 2)
    assert [hit["id"] for hit in printed["data"]] == [hit.id for hit in expected] and printed["model"] == "minilm"
    assert_one_error_line(run("index", "create", "other", "--model", "no-such-model", "--data", str(data)),
                          "no-such-model")
