"""`llmasos generate` error handling: a bad model is one `error:` line and exit code 1, never a traceback, and a
pickle checkpoint's code never runs, even through the real command in a fresh process."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import family_config, make_checkpoint

from llmasos.cli.main import cli


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("LLMASOS_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2))
    return directory


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_generate_prints_a_completion(checkpoint):
    result = run_cli("generate", "--model", str(checkpoint), "--max-tokens", "4", "To be")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("To be") and result.stderr == ""


def test_a_missing_model_is_one_error_line():
    assert_one_error_line(run_cli("generate", "--model", "/missing", "x"), "/missing")


def test_a_directory_without_config_is_one_error_line(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert_one_error_line(run_cli("generate", "--model", str(empty), "x"), "config.json")


def test_corrupt_weights_are_one_error_line(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_error_line(run_cli("generate", "--model", str(broken), "x"), str(weights))


def test_a_bad_option_value_is_one_error_line(checkpoint):
    assert_one_error_line(run_cli("generate", "--model", str(checkpoint), "--max-tokens", "-3", "x"), "max_tokens")
    assert_one_error_line(run_cli("generate", "--model", str(checkpoint), "--dtype", "int3", "x"), "int3")


@pytest.mark.parametrize("command", [["generate", "--model"], ["run"], ["eval", "perplexity", "--data", "DATA", "-m"],
                                     ["train", "--data", "DATA", "--output", "OUT", "--max-steps", "1", "--model"]])
def test_a_device_torch_cannot_parse_is_one_error_line(checkpoint, tmp_path, command):
    """torch.device("gpu") raises a RuntimeError listing twenty device types; every command says what to use."""
    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "To be, or not to be"}\n')
    args = [str(data) if arg == "DATA" else str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    result = run_cli(*args, str(checkpoint), *(["x"] if command[0] in ("generate", "run") else []), "--device", "gpu")
    assert_one_error_line(result, "device 'gpu' is not supported", "cpu, cuda")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_checkpoint_never_runs_through_the_real_command(checkpoint, tmp_path, home):
    directory = tmp_path / "pickled"
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((checkpoint / name).read_bytes())
    marker = tmp_path / "pwned"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads((directory / "pytorch_model.bin").read_bytes())  # the payload is live: unpickling it runs code
    assert marker.exists()
    marker.unlink()
    result = subprocess.run([sys.executable, "-m", "llmasos", "generate", "--model", str(directory), "hello"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "LLMASOS_HOME": str(home)})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert "pytorch_model.bin" in lines[0] and "safetensors" in lines[0]
    assert result.stdout == ""
    assert not marker.exists()


@pytest.mark.parametrize("command", [["ps"], ["load", "mine"], ["stop", "mine"]])
def test_a_server_that_is_not_there_is_one_error_line(command):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert_one_error_line(run_cli(*command, "--url", url), "cannot reach a server at", "llmasos serve")


def test_a_lora_adapter_directory_given_as_a_model_says_how_to_use_it(checkpoint, tmp_path):
    """An adapter directory (adapter_config.json, no config.json) given where a model goes: not "config.json not
    found", but what it is and the two ways to use it."""
    from llmasos import LLMTrainer, TrainingArguments

    trainer = LLMTrainer.from_pretrained(checkpoint)
    trainer.train(["To be, or not to be"], args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1,
                                                                  method="lora", save_steps=None, progress_bar=False))
    adapter = trainer.save_pretrained(tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    for args in (["run", str(adapter), "x"], ["generate", "--model", str(adapter), "x"]):
        assert_one_error_line(run_cli(*args), "is a LoRA adapter, not a model", f"llmasos import {adapter}",
                              "--lora NAME=")


def test_a_reader_that_leaves_early_is_not_an_error(home):
    """`llmasos show NAME | head -1`: once the reader has gone, writing raises BrokenPipeError; that printed
    "error: [Errno 32] Broken pipe" (and Python's "Exception ignored" on exit)."""
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LLMASOS_HOME": str(home),
           "PYTHONUNBUFFERED": "1"}  # each write reaches the pipe at once, inside the command (as a long output's)
    process = subprocess.Popen([sys.executable, "-m", "llmasos", "show", "shakespeare:tiny"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # the reader is gone before the table is written
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    stderr = process.stderr.read().decode()
    assert process.returncode == 1 and stderr == "", (process.returncode, stderr)  # click's quiet exit on EPIPE
