"""Models loaded and unloaded in a running server (issue 13): load on first request, keep_alive, LRU under
max_loaded, stop while streaming, a model imported while the server runs, /v1/models marking what is loaded, and
`llmasos ps / load / stop` against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, assert_error, free_port, openai_client, sse_events, wait_until, wait_until_healthy
from support import family_config, make_checkpoint

from llmasos import LLM
from llmasos.cli.main import cli as llmasos_cli
from llmasos.library.importer import import_directory
from llmasos.server.lifecycle import FOREVER, ModelManager, parse_keep_alive
from llmasos.server.serving import Service
from llmasos.server.state import ServerSettings

ALPHA, BETA, GAMMA = "alpha", "beta", "gamma"


def greedy(llm: LLM, prompt: str, n: int) -> str:
    return llm.generate([prompt], llm.default_sampling(max_tokens=n, temperature=0))[0].outputs[0].text


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lifecycle")
    made = {}
    # alpha has a long context: a stream long enough to still be running when it is stopped
    for seed, (name, family, context) in enumerate(((ALPHA, "qwen2", 2048), (BETA, "llama", 256),
                                                    (GAMMA, "qwen2", 256))):
        directory = root / name
        make_checkpoint(directory, family_config(family, num_hidden_layers=2, max_position_embeddings=context),
                        seed=seed + 11)
        made[name] = directory
    return made


@pytest.fixture(scope="module")
def library_server(home, checkpoints):
    """A server over the library (alpha and beta imported; gamma comes later), nothing loaded, at most 2 at once,
    on-demand models kept 60 s."""
    for name in (ALPHA, BETA):
        import_directory(checkpoints[name], name)
    manager = ModelManager(library=True, load_options={"dtype": "float32"}, max_loaded=2, keep_alive=60.0)
    service = Service(manager, ServerSettings(host="127.0.0.1", port=free_port())).start()
    yield service
    service.stop()


def ps(service: Service) -> dict[str, dict]:
    response = httpx.get(service.base_url + "/api/ps")
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["models"]}


def listed(service: Service) -> dict[str, bool]:
    return {card["id"]: card["loaded"] for card in httpx.get(service.base_url + "/v1/models").json()["data"]}


def stop(service: Service, model: str) -> httpx.Response:
    return httpx.post(service.base_url + "/api/stop", json={"model": model})


def test_keep_alive_values_parse_like_ollamas():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive(90) == 90
    assert parse_keep_alive("500ms") == 0.5 and parse_keep_alive("0") == 0 and parse_keep_alive("120") == 120
    assert parse_keep_alive(-1) == FOREVER and parse_keep_alive("-1") == FOREVER and parse_keep_alive("-5m") == FOREVER
    for bad in ("soon", "5 minutes", "", "m", True, None, [1]):
        with pytest.raises(ValueError, match="keep_alive"):
            parse_keep_alive(bad)


def test_library_models_load_on_first_request_and_are_marked_loaded(library_server, checkpoints):
    assert listed(library_server) == {ALPHA: False, BETA: False} and ps(library_server) == {}
    client = openai_client(library_server)
    answer = client.completions.create(model=ALPHA, prompt="To be", max_tokens=6, temperature=0)
    reference = LLM.load(checkpoints[ALPHA], dtype="float32")
    assert answer.choices[0].text == greedy(reference, "To be", 6)
    reference.close()
    assert listed(library_server) == {ALPHA: True, BETA: False}
    entry = ps(library_server)[ALPHA]
    assert entry["state"] == "loaded" and entry["device"] == "cpu" and entry["in_flight"] == 0
    assert entry["weight_bytes"] > 0 and entry["kv_cache_bytes"] > 0 and entry["size"] == \
        entry["weight_bytes"] + entry["kv_cache_bytes"]
    assert entry["keep_alive"] == 60 and entry["expires_at"] is not None


def test_unknown_model_is_404_and_bad_keep_alive_is_400(library_server):
    response = httpx.post(library_server.base_url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert_error(response, 404, code="model_not_found")
    response = httpx.post(library_server.base_url + "/v1/completions",
                          json={"model": ALPHA, "prompt": "x", "keep_alive": "soon"})
    body = assert_error(response, 400)
    assert body["param"] == "keep_alive" and "duration" in body["message"]
    assert_error(stop(library_server, "nope"), 404, code="model_not_found")


def test_keep_alive_unloads_an_idle_model_and_the_next_request_loads_it_again(library_server):
    client = openai_client(library_server)
    client.completions.create(model=BETA, prompt="Hi", max_tokens=2, extra_body={"keep_alive": "1s"})
    assert ps(library_server)[BETA]["keep_alive"] == 1
    wait_until(lambda: BETA not in ps(library_server), timeout=15, interval=0.1)
    assert listed(library_server)[BETA] is False
    # keep_alive 0: unloaded as soon as the request is done
    client.completions.create(model=BETA, prompt="Hi", max_tokens=2, extra_body={"keep_alive": 0})
    wait_until(lambda: BETA not in ps(library_server), timeout=15, interval=0.1)


def test_a_third_model_unloads_the_least_recently_used_idle_one(library_server, checkpoints):
    client = openai_client(library_server)
    client.completions.create(model=ALPHA, prompt="Hi", max_tokens=2)
    client.completions.create(model=BETA, prompt="Hi", max_tokens=2)
    client.completions.create(model=ALPHA, prompt="Hi", max_tokens=2)  # beta is now the least recently used
    assert set(ps(library_server)) == {ALPHA, BETA}
    # Imported while the server runs: servable at once, no restart.
    import_directory(checkpoints[GAMMA], GAMMA)
    answer = client.completions.create(model=GAMMA, prompt="To be", max_tokens=4, temperature=0)
    reference = LLM.load(checkpoints[GAMMA], dtype="float32")
    assert answer.choices[0].text == greedy(reference, "To be", 4)
    reference.close()
    assert set(ps(library_server)) == {ALPHA, GAMMA}  # max_loaded=2: beta went
    assert listed(library_server) == {ALPHA: True, BETA: False, GAMMA: True}


def test_stop_waits_for_the_stream_in_flight_then_unloads(library_server):
    client = openai_client(library_server)
    client.completions.create(model=ALPHA, prompt="Hi", max_tokens=2)
    body = {"model": ALPHA, "prompt": "To be", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    with httpx.stream("POST", library_server.base_url + "/v1/completions", json=body, timeout=60) as response:
        events = sse_events(response)
        first = next(events)
        assert ps(library_server)[ALPHA]["in_flight"] == 1
        answer = stop(library_server, ALPHA)
        assert answer.status_code == 200 and answer.json()["status"] == "unloading"
        assert ps(library_server)[ALPHA]["stopping"] is True
        rest = list(events)
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in [first, *rest[:-1]]) == 1500
    wait_until(lambda: ALPHA not in ps(library_server), timeout=15, interval=0.05)
    assert_error(stop(library_server, ALPHA), 404, code="model_not_loaded")
    client.completions.create(model=ALPHA, prompt="Hi", max_tokens=2)  # and it loads again
    assert ps(library_server)[ALPHA]["state"] == "loaded"


def test_cli_ps_load_and_stop_talk_to_the_running_server(library_server, monkeypatch):
    monkeypatch.setenv("LLMASOS_BASE_URL", library_server.base_url)
    runner = CliRunner()
    for name in list(ps(library_server)):
        assert runner.invoke(llmasos_cli, ["stop", name]).exit_code == 0
    result = runner.invoke(llmasos_cli, ["load", BETA, "--keep-alive", "-1"])
    assert result.exit_code == 0, result.output
    assert f"{BETA} loaded on cpu" in result.output and "forever" in result.output
    result = runner.invoke(llmasos_cli, ["ps"])
    assert result.exit_code == 0 and "NAME" in result.output and BETA in result.output and "forever" in result.output
    entries = json.loads(runner.invoke(llmasos_cli, ["ps", "--json"]).output)
    assert [e["name"] for e in entries] == [BETA] and entries[0]["keep_alive"] == -1
    result = runner.invoke(llmasos_cli, ["stop", BETA])
    assert result.exit_code == 0 and f"{BETA} unloaded" in result.output
    result = runner.invoke(llmasos_cli, ["stop", BETA])
    assert result.exit_code == 1 and "is not loaded" in result.output and "Traceback" not in result.output
    result = runner.invoke(llmasos_cli, ["load", "no-such-model"])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = runner.invoke(llmasos_cli, ["ps", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_a_fixed_server_serves_only_its_models(server):
    """--model: the models named, kept loaded until stopped; library models are not servable by name."""
    cards = httpx.get(server.base_url + "/v1/models").json()["data"]
    assert [(card["id"], card["loaded"]) for card in cards] == [("tiny", True)]
    assert ps(server)["tiny"]["expires_at"] is None and ps(server)["tiny"]["keep_alive"] == -1


# --- `llmasos serve` as a process: bind first, banner, access log ---------------------------------------------------

def serve_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmasos", "serve", "--port", str(port), "--dtype", "float32", *extra]


def test_serve_fails_at_once_when_the_port_is_taken_before_loading_anything(home, checkpoints):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(serve_command(port, "--model", str(checkpoints[ALPHA])), capture_output=True,
                                text=True, timeout=120, cwd=REPO_ROOT, env=dict(os.environ))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "loading" not in result.stderr  # refused before any model was loaded
    assert time.monotonic() - started < 60


def test_serve_banner_and_json_access_log(home, checkpoints, tmp_path):
    from conftest import create_key

    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(serve_command(port, "--model", str(checkpoints[ALPHA]), "--log-format", "json",
                                                 "--engine-in-process"),
                                   cwd=REPO_ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, base, log=log_path)
        secret = create_key("log-reader")  # auth turns on within a second; the log names the key, never the secret
        time.sleep(1.2)
        response = httpx.post(base + "/v1/completions", json={"model": ALPHA, "prompt": "To be", "max_tokens": 3},
                              headers={"Authorization": f"Bearer {secret}"})
        assert response.status_code == 200, response.text
        refused = httpx.post(base + "/v1/completions", json={"model": ALPHA, "prompt": "x"})
        assert refused.status_code == 401
        wait_until(lambda: log_path.read_text().count('"logger": "llmasos.access"') >= 2, timeout=10)
    finally:
        process.terminate()
        process.wait(timeout=60)
    text = log_path.read_text()
    assert f"LLMasOS serving on http://127.0.0.1:{port}/v1" in text and f"model {ALPHA}: loaded on cpu" in text
    assert "auth: off" in text  # no key existed when it started
    assert secret not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "llmasos.access"]
    ok = next(line for line in access if line["status"] == 200)
    assert ok["method"] == "POST" and ok["path"] == "/v1/completions" and ok["key"] == "log-reader"
    assert ok["model"] == ALPHA and ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 3
    assert ok["latency_ms"] > 0 and ok["client"].startswith("127.0.0.1:")
    denied = next(line for line in access if line["status"] == 401)
    assert denied["key"] is None and "missing API key" in denied["error"]
    assert all({"time", "level", "message"} <= set(line) for line in lines)


def test_banner_says_auth_is_on_when_keys_exist(home, checkpoints, tmp_path):
    from conftest import create_key

    create_key("banner-key")
    port = free_port()
    process = subprocess.Popen(serve_command(port, "--model", str(checkpoints[ALPHA]), "--engine-in-process"),
                               cwd=REPO_ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "auth:" in line:
                break
        assert "auth: on (" in lines[-1] and "Authorization: Bearer" in lines[-1], "".join(lines)
    finally:
        process.terminate()
        process.wait(timeout=60)
