"""The Python SDK (llmasos.Client and AsyncClient) against a real server on 127.0.0.1 with API keys: completions,
chat, streaming, models and usage equal what the server and the in-process engine give, and each error status
becomes its typed exception."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support import family_config, make_checkpoint

from llmasos import LLM, AsyncClient, Client, SamplingParams
from llmasos import client as sdk
from llmasos.server import auth
from llmasos.server.serving import Service, free_port, load_served_model
from llmasos.server.state import ServerSettings

MODEL = "tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A served tiny model, a reference LLM on the same checkpoint, and keys: `main`, `rpm1` (one request a
    minute) and `other` (allowed another model only)."""
    directory = tmp_path_factory.mktemp("sdk") / "tiny"
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=256))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("sdk-home")))
        keys = {"main": auth.create_key("main"), "rpm1": auth.create_key("rpm1", rpm=1),
                "other": auth.create_key("other", models=["elsewhere"])}
        served = {MODEL: load_served_model(directory, MODEL, dtype="float32")}
        service = Service(served, ServerSettings(port=free_port(), max_body_bytes=64 << 10)).start()
        try:
            yield service, keys, LLM.load(directory, dtype="float32")
        finally:
            service.stop()


def greedy(llm, prompt, max_tokens: int):
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))[0]


def test_completions_chat_streams_models_and_usage(setup):
    service, keys, reference = setup
    with Client(service.base_url + "/v1", api_key=keys["main"]) as client:
        assert client.health()
        assert [m["id"] for m in client.models()] == [MODEL]
        answer = client.completions(MODEL, "To be", max_tokens=8, temperature=0)
        expected = greedy(reference, "To be", 8)
        assert answer["choices"][0]["text"] == expected.text
        streamed = list(client.stream_completions(MODEL, "To be", max_tokens=8, temperature=0,
                                                  stream_options={"include_usage": True}))
        assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == expected.text
        assert streamed[-1]["usage"] == answer["usage"]
        messages = [{"role": "user", "content": "hello"}]
        reply = client.chat(MODEL, messages, max_tokens=6, temperature=0)
        assert reply["choices"][0]["message"]["content"] == \
            reference.chat(messages, SamplingParams(max_tokens=6, temperature=0))[0].text
        chunks = list(client.stream_chat(MODEL, messages, max_tokens=6, temperature=0))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
            reply["choices"][0]["message"]["content"]
        usage = client.usage()
        assert [(row["key"], row["model"], row["requests"]) for row in usage] == [("main", MODEL, 4)]
        assert usage[0]["prompt_tokens"] == 2 * answer["usage"]["prompt_tokens"] + 2 * reply["usage"]["prompt_tokens"]


def test_async_client(setup):
    service, keys, reference = setup

    async def run():
        async with AsyncClient(service.base_url, api_key=keys["main"]) as client:
            models = await client.models()
            answers = await asyncio.gather(*(client.completions(MODEL, p, max_tokens=6, temperature=0)
                                             for p in ("To be", "The quick", "héllo")))
            text = ""
            async for chunk in client.stream_chat(MODEL, [{"role": "user", "content": "hi"}], max_tokens=5,
                                                  temperature=0):
                text += chunk["choices"][0]["delta"].get("content", "")
            whole = await client.chat(MODEL, [{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
            with pytest.raises(sdk.NotFoundError):
                await client.completions("missing", "x")
            return models, answers, text, whole

    models, answers, text, whole = asyncio.run(run())
    assert [m["id"] for m in models] == [MODEL]
    assert [a["choices"][0]["text"] for a in answers] == [greedy(reference, p, 6).text
                                                          for p in ("To be", "The quick", "héllo")]
    assert text == whole["choices"][0]["message"]["content"]


def test_environment_variables_configure_the_client(setup, monkeypatch):
    service, keys, _ = setup
    monkeypatch.setenv("LLMASOS_BASE_URL", service.base_url + "/v1/")
    monkeypatch.setenv("LLMASOS_API_KEY", keys["main"])
    with Client() as client:
        assert client.models()[0]["id"] == MODEL


def test_typed_errors(setup):
    service, keys, _ = setup
    cases = [
        (Client(service.base_url, api_key="sk-llmasos-wrong"), sdk.AuthenticationError, 401, "invalid_api_key",
         lambda c: c.models()),
        (Client(service.base_url, api_key=keys["main"]), sdk.NotFoundError, 404, "model_not_found",
         lambda c: c.completions("missing", "x")),
        (Client(service.base_url, api_key=keys["main"]), sdk.BadRequestError, 400, None,
         lambda c: c.completions(MODEL, "x", max_tokens=-1)),
        (Client(service.base_url, api_key=keys["main"]), sdk.BadRequestError, 400, "context_length_exceeded",
         lambda c: c.chat(MODEL, [{"role": "user", "content": "x"}], max_tokens=100_000)),
        (Client(service.base_url, api_key=keys["other"]), sdk.PermissionDeniedError, 403, "model_not_allowed",
         lambda c: c.completions(MODEL, "x")),
        (Client(service.base_url, api_key=keys["main"]), sdk.RequestTooLargeError, 413, None,
         lambda c: c.completions(MODEL, "x" * (100 << 10))),
        (Client(service.base_url, api_key="sk-llmasos-wrong"), sdk.AuthenticationError, 401, None,
         lambda c: list(c.stream_completions(MODEL, "x"))),
    ]
    for client, error_type, status, code, call in cases:
        with client, pytest.raises(error_type) as caught:
            call(client)
        assert isinstance(caught.value, sdk.APIError) and caught.value.status == status
        if code is not None:
            assert caught.value.code == code, caught.value
    with Client(service.base_url, api_key=keys["rpm1"]) as limited:
        limited.completions(MODEL, "x", max_tokens=1)
        with pytest.raises(sdk.RateLimitError) as caught:
            limited.completions(MODEL, "x", max_tokens=1)
        assert caught.value.code == "rate_limit_exceeded" and int(caught.value.headers["retry-after"]) >= 1
        assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"


def test_an_unreachable_server_is_a_connection_error():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=5) as client:
        assert client.health() is False
        with pytest.raises(sdk.APIConnectionError, match="cannot reach"):
            client.models()
        with pytest.raises(sdk.APIConnectionError):
            list(client.stream_completions(MODEL, "x"))

    async def run():
        async with AsyncClient(url, timeout=5) as client:
            await client.models()

    with pytest.raises(sdk.APIConnectionError):
        asyncio.run(run())
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def test_a_stream_that_fails_midway_raises(tmp_path, monkeypatch):
    """The server reports a failure after the stream started as an error event; the SDK raises it."""
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    make_checkpoint(tmp_path / "tiny", family_config("qwen2", num_hidden_layers=2, max_position_embeddings=256))
    served = {MODEL: load_served_model(tmp_path / "tiny", MODEL, dtype="float32")}
    with Service(served, ServerSettings(port=free_port())) as service, Client(service.base_url) as client:
        chunks = client.stream_completions(MODEL, "To be", max_tokens=240, ignore_eos=True)
        next(chunks)
        served[MODEL].async_llm.shutdown()  # the engine stops mid-stream
        with pytest.raises(sdk.APIError, match="generation stopped") as caught:
            list(chunks)
        assert caught.value.type == "server_error"

