"""`llmasos eval ...` end to end: JSON and table output, --output, YAML tasks, and one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import family_config, make_checkpoint

from llmasos import LLM
from llmasos.cli.main import cli
from llmasos.eval import GenerationParams, PromptFormat, generate_and_score, multiple_choice, perplexity
from llmasos.eval.data import read_jsonl, read_texts

EVALS = Path(__file__).resolve().parents[2] / "evals"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    make_checkpoint(directory, family_config("gpt2"))
    return directory


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM.load(model_dir)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def test_perplexity_json_matches_the_api_and_is_saved(model_dir, llm, tmp_path):
    data = EVALS / "tiny_text.jsonl"
    output = tmp_path / "out" / "ppl.json"
    result = invoke("perplexity", "--model", model_dir, "--data", data, "--context-length", 64, "--stride", 32,
                    "--json", "--output", output)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = perplexity(llm, read_texts(data), context_length=64, stride=32)
    assert report["metrics"] == {"perplexity": pytest.approx(expected.perplexity, rel=1e-9),
                                 "bits_per_byte": pytest.approx(expected.bits_per_byte, rel=1e-9)}
    assert report["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert report["num_examples"] == 5 and report["model"] == str(model_dir) and report["backend"] == "in-process"
    assert report["settings"]["context_length"] == 64 and report["settings"]["stride"] == 32
    assert report["seconds"] >= 0 and report["started_at"]
    assert json.loads(output.read_text()) == report


def test_table_output(model_dir, tmp_path):
    data = tmp_path / ("a-long-folder-name-" * 5) / "tiny_mc.jsonl"  # a path longer than 80 columns
    data.parent.mkdir()
    data.write_bytes((EVALS / "tiny_mc.jsonl").read_bytes())
    result = invoke("multiple-choice", "-m", model_dir, "--data", data, "--limit", 3)
    assert result.exit_code == 0, result.output
    for word in ("accuracy", "accuracy_norm", "in-process", "examples"):
        assert word in result.stdout
    # Piped (not a terminal), the table is not cut at 80 columns: the long path stays on one line.
    assert any(data.name in line and str(data.parent.name) in line for line in result.stdout.splitlines())


def test_a_missing_data_file_is_named_before_any_model_is_loaded(tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = invoke("perplexity", "--model", "no-such-model-anywhere", "--data", missing)
    assert result.exit_code == 1 and str(missing) in result.stderr and "--data" in result.stderr
    assert "no-such-model" not in result.stderr  # the model was never resolved


def test_multiple_choice_json(model_dir, llm):
    result = invoke("multiple-choice", "-m", model_dir, "--data", EVALS / "tiny_mc.jsonl", "--json")
    assert result.exit_code == 0, result.output
    expected = multiple_choice(llm, read_jsonl(EVALS / "tiny_mc.jsonl"))
    assert json.loads(result.stdout)["metrics"] == {"accuracy": expected.accuracy,
                                                    "accuracy_norm": expected.accuracy_norm}


def test_generate_and_yaml_task_agree_with_the_api(model_dir, llm):
    examples = read_jsonl(EVALS / "tiny_qa.jsonl")
    expected = generate_and_score(llm, examples[2:], ["exact_match", "f1"],
                                  prompt_format=PromptFormat(template="Question: {question}\nAnswer:",
                                                             few_shot=examples[:2]),
                                  params=GenerationParams(max_tokens=16, stop=["\n"]))
    from_yaml = invoke("run", EVALS / "tiny_qa.yaml", "-m", model_dir, "--json")
    assert from_yaml.exit_code == 0, from_yaml.output
    from_options = invoke("generate", "-m", model_dir, "--data", EVALS / "tiny_qa.jsonl", "--metric", "exact_match",
                          "--metric", "f1", "--template", "Question: {question}\nAnswer:", "--few-shot", 2,
                          "--max-tokens", 16, "--stop", "\n", "--json")
    assert from_options.exit_code == 0, from_options.output
    for result in (from_yaml, from_options):
        report = json.loads(result.stdout)
        assert report["metrics"] == expected.metrics
        assert report["num_examples"] == len(examples) - 2 and report["settings"]["few_shot"] == 2


@pytest.mark.parametrize("task", ["tiny_text.yaml", "tiny_mc.yaml", "tiny_translation.yaml",
                                  "tiny_summaries.yaml"])
def test_every_bundled_task_runs(model_dir, task):
    result = invoke("run", EVALS / task, "-m", model_dir, "--json", "--limit", 2)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]


def test_bad_input_is_one_clear_line(model_dir, tmp_path):
    missing = invoke("perplexity", "-m", model_dir, "--data", tmp_path / "nope.txt")
    assert missing.exit_code == 1 and f"error: data file {tmp_path / 'nope.txt'} does not exist" in missing.stderr

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "choices": [" b", " c"], "answer": 0}\n{"prompt": "a", "choices": [\n')
    malformed = invoke("multiple-choice", "-m", model_dir, "--data", broken)
    assert malformed.exit_code == 1 and f"{broken}, line 2: not valid JSON" in malformed.stderr
    assert "Traceback" not in malformed.output

    task = tmp_path / "task.yaml"
    task.write_text("task: generate\ndata: x.jsonl\nmetrics: [bleu]\n")
    bad_task = invoke("run", task, "-m", model_dir)
    assert bad_task.exit_code == 1 and "unknown key(s) metrics" in bad_task.stderr

    no_model = invoke("perplexity", "--data", EVALS / "tiny_text.jsonl")
    assert no_model.exit_code == 2 and "pass --model" in no_model.output
