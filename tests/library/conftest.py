"""Library test fixtures: a temporary LLMASOS_HOME, a tiny real checkpoint, the Hub stand-in, and CLI runners."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import family_config, make_checkpoint

from library.hub_server import HubStandIn
from llmasos.db import dispose_all

REPO_ROOT = Path(__file__).resolve().parents[2]
# Variables that would point the code under test at the user's real state or the real Hub.
_SCRUBBED = ("LLMASOS_HOME", "LLMASOS_DATABASE_URL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
             "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random qwen2 checkpoint written by transformers (config, safetensors, tokenizer, chat template)."""
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2))
    return directory


@pytest.fixture
def workdir(tmp_path) -> Path:
    """Everything a test may write lives under here; `home` is inside it."""
    return tmp_path


@pytest.fixture
def home(workdir, monkeypatch) -> Path:
    """A fresh LLMASOS_HOME (and HF_HOME, so no real token or cache is used); engines disposed afterwards."""
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    path = workdir / "home"
    monkeypatch.setenv("LLMASOS_HOME", str(path))
    monkeypatch.setenv("HF_HOME", str(workdir / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("COLUMNS", "200")
    # No bundled default model in these tests unless one asks for it (see test_resolve).
    monkeypatch.setattr("llmasos.library.resolve.BUNDLED_MODEL_DIR", workdir / "no-bundled-model")
    yield path
    dispose_all()


@pytest.fixture
def hub():
    with HubStandIn() as server:
        yield server


@pytest.fixture
def cli(home):
    """Run the real `llmasos` CLI in-process: cli("list", "--json") -> click Result (exit_code, stdout, stderr)."""
    from llmasos.cli.main import cli as command

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(command, list(args), catch_exceptions=False)

    return run


@pytest.fixture
def cli_process(home):
    """Run `python -m llmasos ...` in a subprocess with the test's environment (plus `env` overrides)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        return subprocess.run([sys.executable, "-m", "llmasos", *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout, cwd=str(home.parent))

    return run


def tree(root: Path) -> dict[str, int]:
    """Every file under `root` with its size: a snapshot to compare before and after an operation."""
    if not root.exists():
        return {}
    return {path.relative_to(root).as_posix(): path.stat().st_size for path in sorted(root.rglob("*"))
            if path.is_file()}


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


RESUME_CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in 10 MiB chunks: the unit a resume can keep


@pytest.fixture(scope="session")
def large_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint whose model.safetensors is larger than one download chunk (about 12.5 MB), for resume tests."""
    directory = tmp_path_factory.mktemp("tiny-qwen2-wide-vocab")
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=1, vocab_size=48_000))
    assert (directory / "model.safetensors").stat().st_size > RESUME_CHUNK + 1_000_000
    return directory
