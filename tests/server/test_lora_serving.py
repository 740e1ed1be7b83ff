"""LoRA adapters served unmerged over HTTP (issue 15): `model` names an adapter, /v1/models lists it with its
parent, answers equal the in-process engine's (whose adapter math is checked against PEFT in tests/engine), usage
rows and prices name the adapter, keys are scoped to adapters, and vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter load and unload at run time — admin only, from allowed places, with clear 400s."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from conftest import assert_error, create_key, openai_client, sse_events
from support import family_config, make_checkpoint

from llmasos import LLM, SamplingParams
from llmasos.server.lifecycle import ModelManager
from llmasos.server.serving import Service, free_port, load_served_model
from llmasos.server.state import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_lora import ALL_LINEAR, ATTENTION, peft_adapter  # noqa: E402  (the engine tests' PEFT adapter maker)

BASE = "base"
PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-serving")
    base = root / "base"
    make_checkpoint(base, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=512))
    allowed = root / "allowed"
    allowed.mkdir()
    return {"base": base, "root": root, "allowed": allowed,
            "support": peft_adapter(base, root / "support", 4, ATTENTION, seed=1),
            "sql": peft_adapter(base, root / "sql", 8, ALL_LINEAR, seed=2),
            "legal": peft_adapter(base, allowed / "legal", 2, ATTENTION, seed=3),
            "big": peft_adapter(base, allowed / "big", 32, ATTENTION, seed=4)}


@pytest.fixture(scope="module")
def service(home, made):
    served = load_served_model(made["base"], BASE, dtype="float32", max_lora_rank=16)
    served.llm.load_lora("support", made["support"])
    served.llm.load_lora("sql", made["sql"])
    settings = ServerSettings(host="127.0.0.1", port=free_port(), lora_dirs=(str(made["allowed"]),))
    started = Service(ModelManager({BASE: served}), settings).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def reference(made):
    llm = LLM.load(made["base"], dtype="float32", lora_adapters={"support": made["support"], "sql": made["sql"],
                                                                  "legal": made["legal"]})
    yield llm
    llm.close()


def answer(llm: LLM, lora: str | None, n: int = 8) -> str:
    return llm.generate(PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), lora=lora)[0].text


def complete(service: Service, model: str, **extra) -> httpx.Response:
    return httpx.post(service.base_url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                                  "temperature": 0, "ignore_eos": True, **extra},
                      timeout=60)


def test_models_lists_adapters_with_their_parent(service):
    cards = {c["id"]: c for c in httpx.get(service.base_url + "/v1/models").json()["data"]}
    assert cards[BASE]["parent"] is None
    assert cards["support"]["parent"] == BASE and cards["sql"]["parent"] == BASE and cards["sql"]["loaded"]


def test_an_adapter_answers_as_the_engine_does_and_differs_from_the_base(service, reference):
    client = openai_client(service)
    texts = {}
    for model in (BASE, "support", "sql"):
        result = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert result.model == model
        texts[model] = result.choices[0].text
        assert texts[model] == answer(reference, None if model == BASE else model)
    assert len(set(texts.values())) == 3
    stream = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            stream=True)
    assert {chunk.model for chunk in stream} == {"sql"}


def test_usage_rows_and_prices_name_the_adapter(service):
    from llmasos.server.auth import usage_summary

    assert complete(service, "support").status_code == 200
    rows = {row["model"]: row for row in usage_summary()}
    assert "support" in rows and rows["support"]["completion_tokens"] >= 8


def test_load_and_unload_at_run_time_with_a_request_in_flight(service, reference, made):
    url = service.base_url
    loaded = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "legal",
                                                             "lora_path": str(made["legal"])})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["parent"] == BASE
    assert complete(service, "legal").json()["choices"][0]["text"] == answer(reference, "legal")
    body = {"model": "legal", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        events = sse_events(response)
        next(events)
        unloaded = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "legal"})
        assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
        rest = list(events)
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"  # it finished first
    assert_error(complete(service, "legal"), 404, code="model_not_found")
    assert_error(httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "legal"}), 404)


def test_bad_adapters_are_clear_400s_and_the_server_stays_up(service, made, tmp_path):
    url = service.base_url + "/v1/load_lora_adapter"
    outside = assert_error(httpx.post(url, json={"lora_name": "x", "lora_path": str(made["support"])}), 400)
    assert "outside the directories" in outside["message"] and outside["param"] == "lora_path"
    big = assert_error(httpx.post(url, json={"lora_name": "big", "lora_path": str(made["big"])}), 400)
    assert "rank 32" in big["message"]
    pickled = made["allowed"] / "pickled"
    pickled.mkdir(exist_ok=True)
    shutil.copy(made["support"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    assert "pickle" in assert_error(httpx.post(url, json={"lora_name": "p", "lora_path": str(pickled)}), 400)[
        "message"]
    other = made["root"] / "other-base"
    if not other.exists():
        make_checkpoint(other, family_config("qwen2", num_hidden_layers=2, hidden_size=32, intermediate_size=48))
    foreign = peft_adapter(other, made["allowed"] / "foreign", 4, ATTENTION)
    assert "another base model" in assert_error(httpx.post(url, json={"lora_name": "f", "lora_path": str(foreign)}),
                                                400)["message"]
    assert_error(httpx.post(url, json={"lora_name": BASE, "lora_path": str(made["legal"])}), 400)  # a model's name
    assert_error(httpx.post(url, json={"lora_name": "n", "lora_path": "/no/such/dir"}), 400)
    assert_error(httpx.post(url, json={"lora_name": "y", "lora_path": str(made["legal"]), "model": "nope"}), 404)
    assert httpx.get(service.base_url + "/health").status_code == 200
    assert complete(service, "support").status_code == 200


def test_keys_are_scoped_to_adapters_and_loading_needs_an_admin_key(service, made):
    only_support = create_key("support-only", "--models", "support")
    plain = create_key("plain")
    try:
        import time

        time.sleep(1.2)  # auth turns on within a second of the first key
        headers = {"Authorization": f"Bearer {only_support}"}
        ok = httpx.post(service.base_url + "/v1/completions", headers=headers,
                        json={"model": "support", "prompt": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        denied = httpx.post(service.base_url + "/v1/completions", headers=headers,
                            json={"model": "sql", "prompt": PROMPT, "max_tokens": 2})
        assert_error(denied, 403, code="model_not_allowed")
        listed = httpx.get(service.base_url + "/v1/models", headers=headers).json()["data"]
        assert [card["id"] for card in listed] == ["support"]
        refused = httpx.post(service.base_url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {plain}"},
                             json={"lora_name": "legal", "lora_path": str(made["legal"])})
        assert_error(refused, 403, code="admin_required")
        usage = httpx.get(service.base_url + "/v1/usage", headers=headers).json()["data"]
        assert [(row["key"], row["model"]) for row in usage] == [("support-only", "support")]
    finally:
        json.dumps({})  # keys stay: this module's home is its own


def test_serve_lora_flag_serves_adapters_on_the_base(made, fresh_home):
    import os
    import subprocess
    import time

    from conftest import REPO_ROOT

    port = free_port()
    env = dict(os.environ)  # fresh_home, keyless: this module's home has keys by now
    process = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "--model", str(made["base"]), "--lora",
                                f"support={made['support']}", "--port", str(port), "--dtype", "float32",
                                "--engine-in-process", "--log-level", "warning"], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                cards = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert {c["id"]: c["parent"] for c in cards} == {"base": None, "support": "base"}
    finally:
        process.terminate()
        process.wait(timeout=60)
    bad = subprocess.run([sys.executable, "-m", "llmasos", "serve", "--model", str(made["base"]), "--lora", "oops"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "NAME=ADAPTER_DIR" in bad.stderr


def test_a_library_model_with_an_adapter_is_served_unmerged_while_its_base_is_loaded(fresh_home, made):
    """Issue 15: a Modelfile ADAPTER model whose base is being served runs on the base's engine as an adapter (one
    copy of the weights), with its own SYSTEM and PARAMETERs; with the base not loaded it loads merged on its own."""
    from llmasos.library.importer import import_directory
    from llmasos.library.modelfile import create_model

    import_directory(made["base"], "base")
    create_model("tuned", f"FROM base\nADAPTER {made['support']}\nSYSTEM You are terse.\nPARAMETER temperature 0\n")
    manager = ModelManager(library=True, load_options={"dtype": "float32"}, max_loaded=3)
    with Service(manager, ServerSettings(host="127.0.0.1", port=free_port())) as running:
        def ask(model: str) -> str:
            response = httpx.post(running.base_url + "/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 6, "ignore_eos": True,
                "messages": [{"role": "user", "content": "To be"}]})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        merged = ask("tuned")  # base not loaded: tuned loads on its own, merged
        ps = {e["name"] for e in httpx.get(running.base_url + "/api/ps").json()["models"]}
        assert ps == {"tuned"}
        assert httpx.post(running.base_url + "/api/stop", json={"model": "tuned"}).status_code == 200
        ask("base")
        unmerged = ask("tuned")  # now on the base's engine
        ps = {e["name"] for e in httpx.get(running.base_url + "/api/ps").json()["models"]}
        assert ps == {"base"}
        assert unmerged == merged
        cards = {c["id"]: c for c in httpx.get(running.base_url + "/v1/models").json()["data"]}
        assert cards["tuned"]["parent"] == "base"
