"""Running the server: the seeds' LLMServing API, the refusal to bind a public address without keys, and the real
`llmasos serve` process — several --model flags routed by `model`, and SIGTERM draining an in-flight stream before a
clean exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT, cli, create_key, openai_client, sse_events, wait_until, wait_until_healthy

from llmasos import LLM, LLMServing, SamplingParams
from llmasos.cli.main import cli as llmasos_cli
from llmasos.server.serving import Service, check_bind, free_port, is_loopback
from llmasos.server.state import ServerSettings


def greedy(llm, prompt: str, max_tokens: int) -> str:
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))[0].text


def test_llmserving_from_pretrained_create_service_start_predict_stop(home, checkpoint, reference):
    serving = LLMServing.from_pretrained(checkpoint, dtype="float32")
    service = serving.create_service(port=free_port())
    with pytest.raises(RuntimeError, match=r"the service is not started: call service.start\(\)"):
        service.predict(text="To be")  # was httpx's bare "[Errno 111] Connection refused"
    service.start()
    try:
        assert service.predict(text="To be", max_tokens=8, temperature=0) == greedy(reference, "To be", 8)
        assert httpx.get(service.base_url + "/v1/models").json()["data"][0]["id"] == checkpoint.name
    finally:
        service.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(service.base_url + "/health")
    with pytest.raises(RuntimeError, match="the service has stopped"):
        service.predict(text="To be")
    with serving.create_service(port=0) as second:  # the context manager starts and stops it; port 0 picks one
        assert second.predict("The quick", max_tokens=5, temperature=0) == greedy(reference, "The quick", 5)
        with pytest.raises(RuntimeError, match="400"):
            second.predict("x", max_tokens=-1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(second.base_url + "/health")


def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.com", "localhost.evil.com"))


def test_without_keys_a_public_bind_is_refused_unless_explicitly_allowed(fresh_home, checkpoint):
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, allow_unauthenticated=False)
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(ValueError, match="llmasos keys create"):
            check_bind(host, allow_unauthenticated=False)
        check_bind(host, allow_unauthenticated=True)
    port = free_port()
    refused = cli("serve", "--model", str(checkpoint), "--host", "0.0.0.0", "--port", str(port), check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: refusing to serve on 0.0.0.0")
    assert "Traceback" not in refused.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")
    with pytest.raises(ValueError, match="refusing"):
        LLMServing.from_pretrained(checkpoint).create_service(host="0.0.0.0", port=free_port()).start()
    create_key("admin")
    check_bind("0.0.0.0", allow_unauthenticated=False)  # with a key, the API is guarded: binding is fine


def test_served_model_name_applies_to_one_model(fresh_home, checkpoint, other_checkpoint):
    result = CliRunner().invoke(llmasos_cli, ["serve", "--model", str(checkpoint), "--model", str(other_checkpoint),
                                              "--served-model-name", "x"])
    assert result.exit_code == 2 and "--served-model-name" in result.output


@pytest.mark.slow
def test_llmasos_serve_routes_several_models_and_drains_on_sigterm(fresh_home, tmp_path, long_checkpoint,
                                                                  other_checkpoint):
    port = free_port()
    env = dict(os.environ)  # fresh_home: its LLMASOS_HOME (and database)
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "llmasos", "serve", "--model", str(long_checkpoint), "--model",
               str(other_checkpoint), "--port", str(port), "--dtype", "float32", "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, base, log=(tmp_path / "serve.log"))
        engines = psutil.Process(process.pid).children()  # one engine process per model
        assert len(engines) == 2
        service = type("Remote", (), {"base_url": base})()
        client = openai_client(service)
        assert sorted(m.id for m in client.models.list().data) == sorted([long_checkpoint.name, other_checkpoint.name])
        references = {long_checkpoint.name: LLM.load(long_checkpoint, dtype="float32"),
                      other_checkpoint.name: LLM.load(other_checkpoint, dtype="float32")}
        for model, llm in references.items():
            answer = client.completions.create(model=model, prompt="To be", max_tokens=8, temperature=0)
            assert answer.model == model and answer.choices[0].text == greedy(llm, "To be", 8)

        body = {"model": long_checkpoint.name, "prompt": "To be", "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True, "stream": True, "logprobs": 0}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
            events = sse_events(response)
            first = next(events)
            process.send_signal(signal.SIGTERM)  # mid-stream: the request must still complete
            rest = list(events)
        chunks = [first, *rest[:-1]]
        assert rest[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks) == 1500
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health")
        _, alive = psutil.wait_procs(engines, timeout=5)
        assert not alive  # the engines stopped with the server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    # The drained request was metered (no key: the row has no key name).
    rows = json.loads(subprocess.run([sys.executable, "-m", "llmasos", "usage", "--json"], env=env, cwd=REPO_ROOT,
                                     capture_output=True, text=True, check=True).stdout)
    assert sum(r["completion_tokens"] for r in rows if r["model"] == long_checkpoint.name) == 8 + 1500


def test_start_raises_when_the_port_is_taken_even_by_another_llmasos_server(home, checkpoint, server):
    """The old start() accepted any /health 200 — another server's — while its own thread had died on the bind."""
    taken = int(server.base_url.rsplit(":", 1)[1])
    served = server.models[next(iter(server.models))]
    intruder = Service({"other": served}, ServerSettings(host="127.0.0.1", port=taken))
    with pytest.raises(RuntimeError, match="port in use"):
        intruder.start(timeout=30)


def test_predict_uses_the_services_own_credentials_once_keys_exist(home, checkpoint, reference):
    service = LLMServing.from_pretrained(checkpoint, served_name="own", dtype="float32",
                                         engine_process=False).create_service(port=free_port())
    with service:
        expected = reference.generate("To be", SamplingParams(max_tokens=4, temperature=0))[0].text
        create_key("someone")  # from now on every other client needs a key
        wait_until(lambda: httpx.post(service.base_url + "/v1/completions", json={
            "model": "own", "prompt": "x", "max_tokens": 1}).status_code == 401)
        assert service.predict("To be", max_tokens=4, temperature=0) == expected
        forged = httpx.post(service.base_url + "/v1/completions", json={"model": "own", "prompt": "x"},
                            headers={"Authorization": "Bearer " + "x" * 43})
        assert forged.status_code == 401
