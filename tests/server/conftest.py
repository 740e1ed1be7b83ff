"""Server test fixtures: tiny random checkpoints, a temporary LLMASOS_HOME (and so a fresh SQLite database) per test
module, and real servers on 127.0.0.1 — uvicorn in a background thread — driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support import family_config, make_checkpoint

from llmasos.server.serving import Service, free_port, load_served_model
from llmasos.server.state import ServerSettings

MODEL = "tiny"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-layer random qwen2 with the test ChatML template and a 256-token context."""
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny-qwen2"
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=256))
    return directory


@pytest.fixture(scope="session")
def long_checkpoint(tmp_path_factory) -> Path:
    """Like `checkpoint` with a 2048-token context: streams long enough to be caught mid-flight on a busy machine."""
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny-long"
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=2048), seed=3)
    return directory


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory) -> Path:
    """A second, different model (llama family, other weights) for multi-model routing."""
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny-llama"
    make_checkpoint(directory, family_config("llama", num_hidden_layers=2, max_position_embeddings=256), seed=7)
    return directory


@pytest.fixture(scope="session")
def reference(checkpoint):
    """An in-process LLM on the same checkpoint: the reference the server's answers must equal. It has an engine of
    its own, because driving the served engine from the test thread would steal the server's outputs."""
    from llmasos import LLM

    return LLM.load(checkpoint, dtype="float32")


# Every server module runs on both databases unless it sets DATABASES itself (with the reason it needs only one).
# LLMASOS_TEST_DATABASES=sqlite (or postgresql) narrows a local run to one.
ALL_DATABASES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    """Each test that uses `home` (or `fresh_home`) runs on each database its module names (DATABASES), by default
    SQLite and PostgreSQL: the whole server and keys suite is the test of the PostgreSQL backend too."""
    databases = tuple(getattr(metafunc.module, "DATABASES", ALL_DATABASES))
    wanted = os.environ.get("LLMASOS_TEST_DATABASES")
    if wanted:
        databases = tuple(d for d in databases if d in wanted.split(",")) or databases[:1]
    if "home" in metafunc.fixturenames:
        metafunc.parametrize("home", databases, indirect=True, scope="module")


@pytest.fixture(scope="module")
def home(request, tmp_path_factory) -> Iterator[Path]:
    """LLMASOS_HOME for the whole module, since a module's server reads the database of the current home: a SQLite
    file in it, or (param "postgresql") a fresh database on the session's PostgreSQL server, upgraded to head."""
    database = getattr(request, "param", "sqlite")
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMASOS_HOME", str(path))
        patch.delenv("LLMASOS_DATABASE_URL", raising=False)
        if database == "postgresql":
            from llmasos.db import upgrade

            url = request.getfixturevalue("postgres").create_database()
            upgrade(url)
            patch.setenv("LLMASOS_DATABASE_URL", url)
        yield path


@pytest.fixture
def fresh_home(home, request, tmp_path, monkeypatch) -> Path:
    """An empty LLMASOS_HOME of the test's own on the module's database kind: a new SQLite file, or a new database
    on the session's PostgreSQL server (for tests that need no keys, or keys of their own)."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("LLMASOS_HOME", str(path))
    monkeypatch.delenv("LLMASOS_DATABASE_URL", raising=False)
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("home") == "postgresql":
        from llmasos.db import upgrade

        url = request.getfixturevalue("postgres").create_database()
        upgrade(url)
        monkeypatch.setenv("LLMASOS_DATABASE_URL", url)
    return path


def start_service(models: dict[str, Path], **settings) -> Service:
    """Load each checkpoint under its id and serve them all on a free loopback port (returns once healthy)."""
    served = {name: load_served_model(path, name, dtype="float32") for name, path in models.items()}
    service = Service(served, ServerSettings(host="127.0.0.1", port=free_port(), **settings))
    return service.start()


@pytest.fixture(scope="module")
def server(home, checkpoint) -> Iterator[Service]:
    service = start_service({MODEL: checkpoint})
    yield service
    service.stop()


def openai_client(service: Service, api_key: str = "unused", **options):
    """The official client, without retries (it would otherwise retry 429 and 503 answers on its own)."""
    import openai

    return openai.OpenAI(base_url=service.base_url + "/v1", api_key=api_key, max_retries=0, **options)


def async_openai_client(service: Service, api_key: str = "unused", **options):
    import openai

    return openai.AsyncOpenAI(base_url=service.base_url + "/v1", api_key=api_key, max_retries=0, **options)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `llmasos` command in a subprocess, against the current LLMASOS_HOME."""
    result = subprocess.run([sys.executable, "-m", "llmasos", *args], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT, env=dict(os.environ))
    if check and result.returncode != 0:
        raise AssertionError(f"llmasos {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def create_key(name: str, *options: str) -> str:
    """A key made by `llmasos keys create --json`, which prints {"name", "key", "admin"}."""
    printed = json.loads(cli("keys", "create", "--name", name, "--json", *options).stdout)
    assert set(printed) == {"name", "key", "admin"} and printed["name"] == name
    return printed["key"]


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class Statements:
    executed: list[str] = field(default_factory=list)  # every statement the database saw
    on_loop: list[str] = field(default_factory=list)  # those run on an event-loop thread ("thread: statement")


@contextmanager
def watch_statements() -> Iterator[Statements]:
    """The statements the current database sees meanwhile, and which of them ran on an event-loop thread (a
    server must never block its loop on the database: there must be none)."""
    from sqlalchemy import event

    from llmasos.db import get_engine

    seen = Statements()

    def check(_connection, _cursor, statement, *_args) -> None:
        seen.executed.append(statement)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a worker thread: fine
        seen.on_loop.append(f"{threading.current_thread().name}: {statement[:120]}")

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", check)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", check)


def wait_until_healthy(process: subprocess.Popen, base: str, log: Path | None = None, timeout: float = 120) -> None:
    """Wait until a `llmasos serve` subprocess answers GET /health; fail with its log (or stderr) if it exits."""

    def healthy() -> bool:
        assert process.poll() is None, log.read_text() if log is not None else process.stderr.read()
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=timeout, interval=0.2)


def engine_idle(service: Service, model: str = MODEL) -> bool:
    """The served engine holds no request and no KV block."""
    stats = service.models[model].llm.metrics()
    return stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """Parsed `data:` events of a streamed response; the final "[DONE]" is yielded as the string."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def assert_error(response: httpx.Response, status: int, type_: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-shaped error with this status, and nothing that looks like a traceback or a local path."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert_no_leak(response.text)
    return body["error"]


def assert_no_leak(text: str) -> None:
    for marker in ("Traceback", 'File "', "/work/", "/tmp/", "/home/", "site-packages", str(REPO_ROOT)):
        assert marker not in text, f"{marker!r} leaked in {text!r}"
