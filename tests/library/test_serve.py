"""`llmasos serve` by library name, in a subprocess, queried with the official openai client: the derived model's system
prompt shows in the prompt token count; without a model and without the bundled default, serve says how to get one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import llmasos
from llmasos.library import DEFAULT_MODEL_NAME

BUNDLED = Path(llmasos.__file__).parent / "assets" / "default_model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(cli_process_env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_process_env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("serve did not become healthy in 120 s")


@pytest.fixture
def env(home):
    import os

    return dict(os.environ)


def _reference_prompt_length(checkpoint, messages) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_serve_by_name_applies_the_derived_system_prompt(cli, env, workdir, checkpoint):
    from openai import OpenAI

    assert cli("import", str(checkpoint), "--name", "tiny").exit_code == 0
    modelfile = workdir / "Modelfile"
    modelfile.write_text('FROM tiny\nSYSTEM """You are a terse assistant who answers in one word."""\n'
                         "PARAMETER max_tokens 2\n")
    assert cli("create", "tiny-terse", "-f", str(modelfile)).exit_code == 0

    process, base = _start(env, "--model", "tiny", "--model", "tiny-terse")
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert {m.id for m in client.models.list()} == {"tiny", "tiny-terse"}
        messages = [{"role": "user", "content": "What is an operating system?"}]
        plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        terse = client.chat.completions.create(model="tiny-terse", messages=messages)
        system = [{"role": "system", "content": "You are a terse assistant who answers in one word."}, *messages]
        assert plain.usage.prompt_tokens == _reference_prompt_length(checkpoint, messages)
        assert terse.usage.prompt_tokens == _reference_prompt_length(checkpoint, system)
        assert terse.usage.prompt_tokens > plain.usage.prompt_tokens
        assert terse.usage.completion_tokens <= 2  # the Modelfile's max_tokens applied to a request that set none
        # A request with its own system message keeps it.
        own = [{"role": "system", "content": "Hi."}, *messages]
        mine = client.chat.completions.create(model="tiny-terse", messages=own)
        assert mine.usage.prompt_tokens == _reference_prompt_length(checkpoint, own)
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.skipif(BUNDLED.is_dir(), reason="the bundled default model exists: see the test below")
def test_serve_without_model_says_how_to_get_one(cli_process):
    result = cli_process("serve", "--port", "1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "llmasos pull" in error and "llmasos import" in error, result.stderr
    assert json.loads(cli_process("list", "--json").stdout) == []


@pytest.mark.slow
@pytest.mark.skipif(not BUNDLED.is_dir(), reason="the bundled default model (training issue) is not built yet")
def test_serve_without_model_serves_the_bundled_default(env):
    process, base = _start(env)
    try:
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == [DEFAULT_MODEL_NAME]
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_model_the_engine_process_cannot_load_is_one_error_line(cli_process, checkpoint, workdir):
    """The engine process reports a load failure as text (EngineStartError); serve prints it as one `error:` line."""
    broken = workdir / "broken"
    broken.mkdir()
    for item in checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = cli_process("serve", "--model", str(broken), "--port", str(free_port()), "--num-threads", "1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not load broken: ") and str(weights) in error, result.stderr
