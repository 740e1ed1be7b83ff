"""`llmasos rm` of a model a running server holds is refused, naming the server (issue 19); --force overrides; the
server's registry entry tracks loads and unloads and goes when the server exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmasos.library.importer import import_directory
from llmasos.server.serving import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def llmasos(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmasos", *args], cwd=REPO_ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def serving(home, checkpoint):
    import_directory(checkpoint, "mine")
    import_directory(checkpoint, "other")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "--model", "mine", "--port", str(port),
                                "--engine-in-process", "--log-level", "warning"], cwd=REPO_ROOT,
                               env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.ConnectError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
    yield process, base, home
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)


def test_rm_refuses_a_model_a_running_server_holds(serving):
    process, base, home = serving
    entry = json.loads((home / "servers" / f"{process.pid}.json").read_text())
    assert entry["models"] == ["mine"] and entry["url"] == base
    refused = llmasos("rm", "mine")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"loaded by the running server at {base} (pid {process.pid})" in refused.stderr
    assert "llmasos stop mine" in refused.stderr and "--force" in refused.stderr
    assert "mine" in llmasos("list").stdout  # nothing was removed
    assert llmasos("rm", "other").returncode == 0  # a model no server holds goes as before
    # unloaded there: removable
    assert httpx.post(base + "/api/stop", json={"model": "mine"}).json()["status"] == "unloaded"
    assert json.loads((home / "servers" / f"{process.pid}.json").read_text())["models"] == []
    process.terminate()
    assert process.wait(timeout=60) == 0
    assert not (home / "servers" / f"{process.pid}.json").exists()
    assert llmasos("rm", "mine").returncode == 0


def test_rm_force_removes_it_anyway(serving):
    assert llmasos("rm", "mine", "--force").returncode == 0
    assert "mine" not in llmasos("list").stdout


def test_a_dead_servers_entry_is_ignored(home, checkpoint):
    import_directory(checkpoint, "mine")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (home / "servers").mkdir(parents=True)
    (home / "servers" / f"{pid}.json").write_text(json.dumps({"pid": pid, "url": "x", "models": ["mine"]}))
    assert llmasos("rm", "mine").returncode == 0
    assert not (home / "servers" / f"{pid}.json").exists()
