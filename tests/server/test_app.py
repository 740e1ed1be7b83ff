"""The application around the generation routes, on a real server without keys: models, health, Prometheus metrics,
and every client error in OpenAI's shape with the right status — never a traceback or a local path."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import MODEL, assert_error, assert_no_leak, openai_client, sse_events, start_service, wait_until
from prometheus_client.parser import text_string_to_metric_families


def post(service, path: str, **kwargs) -> httpx.Response:
    return httpx.post(service.base_url + path, timeout=60, **kwargs)


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "To be", **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def test_models_list_and_retrieve(server):
    client = openai_client(server)
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].object == "model" and models[0].owned_by == "llmasos"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"


def test_health_is_200_while_the_engine_is_alive(server):
    response = httpx.get(server.base_url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": -3}, "n"),
    ({"n": 10_000}, "n"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 1e9}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -7}, None),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"seed": 2 ** 80}, "seed"),
    ({"stop": ""}, None),
    ({"stop": ["x"] * 17}, "stop"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"model": 5}, "model"),
    ({"stream": True, "max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
])
def test_invalid_completion_fields_are_400_naming_the_field(server, fields, param):
    error = assert_error(post(server, "/v1/completions", json=completion(**fields)), 400, "invalid_request_error")
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), error


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": -2}, "max_completion_tokens"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
])
def test_invalid_chat_fields_are_400(server, fields, param):
    error = assert_error(post(server, "/v1/chat/completions", json=chat(**fields)), 400, "invalid_request_error")
    assert error["param"] and error["param"].startswith(param), error


def test_malformed_json_and_non_object_bodies_are_400(server):
    headers = {"content-type": "application/json"}
    for raw in (b'{"model": "tiny", "prompt": ', b"[1, 2]", b"null", b"\xff\xfe", b"", b'{"model": NaN}'):
        assert_error(post(server, "/v1/completions", content=raw, headers=headers), 400, "invalid_request_error")


def test_context_length_exceeded_is_400_and_checked_before_queueing(server):
    served = server.models[MODEL]
    # The engine is paused (its lock held): an answer that came from the queue could not arrive at all.
    with served.llm.engine.lock:
        for fields in ({"max_tokens": 10 ** 12}, {"max_tokens": 254}, {"prompt": [5] * 300, "max_tokens": 1}):
            error = assert_error(post(server, "/v1/completions", json=completion(**fields)), 400,
                                 "invalid_request_error", "context_length_exceeded")
            assert "256" in error["message"]
        assert_error(post(server, "/v1/chat/completions", json=chat(max_tokens=10 ** 6)), 400,
                     code="context_length_exceeded")
        long_chat = chat(messages=[{"role": "user", "content": "a " * 400}])
        assert_error(post(server, "/v1/chat/completions", json=long_chat), 400, code="context_length_exceeded")


def test_unknown_model_is_404_model_not_found(server):
    for path, body in (("/v1/completions", completion(model="gpt-17")), ("/v1/chat/completions", chat(model="x"))):
        error = assert_error(post(server, path, json=body), 404, code="model_not_found")
        assert error["param"] == "model"


def test_body_too_large_is_413_whether_announced_or_chunked(server):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}'
    assert_error(post(server, "/v1/completions", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():
        for start in range(0, len(big), 1 << 16):
            yield big[start:start + (1 << 16)]

    assert_error(post(server, "/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                 413)


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    assert_error(httpx.get(server.base_url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.base_url + "/v1/completions"), 405)


def test_metrics_expose_every_family_and_count_the_tokens(server):
    def scrape() -> dict[str, dict]:
        text = httpx.get(server.base_url + "/metrics").text
        return {family.name: family for family in text_string_to_metric_families(text)}

    def value(families, name, sample_name, **labels) -> float:
        return sum(s.value for s in families[name].samples
                   if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))

    before = scrape()
    answer = openai_client(server).completions.create(model=MODEL, prompt="To be", max_tokens=7, temperature=0)
    list(openai_client(server).completions.create(model=MODEL, prompt="To be", max_tokens=4, stream=True))
    after = scrape()
    expected = {"llmasos_requests", "llmasos_prompt_tokens", "llmasos_generation_tokens",
                "llmasos_time_to_first_token_seconds", "llmasos_inter_token_latency_seconds",
                "llmasos_num_requests_running", "llmasos_num_requests_waiting", "llmasos_kv_cache_usage_ratio"}
    assert expected <= set(after)
    assert after["llmasos_time_to_first_token_seconds"].type == "histogram"
    assert after["llmasos_inter_token_latency_seconds"].type == "histogram"
    for name in ("llmasos_num_requests_running", "llmasos_kv_cache_usage_ratio"):
        assert {s.labels["model"] for s in after[name].samples} == {MODEL}
    grew = lambda name, sample, **labels: value(after, name, sample, **labels) - value(before, name, sample, **labels)  # noqa: E731
    assert grew("llmasos_requests", "llmasos_requests_total", route="/v1/completions", status="200") == 2
    assert grew("llmasos_prompt_tokens", "llmasos_prompt_tokens_total", model=MODEL) == 2 * answer.usage.prompt_tokens
    assert grew("llmasos_generation_tokens", "llmasos_generation_tokens_total", model=MODEL) == \
        answer.usage.completion_tokens + 4
    assert grew("llmasos_time_to_first_token_seconds", "llmasos_time_to_first_token_seconds_count", model=MODEL) == 2


def test_overloaded_is_503_with_retry_after(home, checkpoint):
    service = start_service({MODEL: checkpoint}, max_queue=0)
    try:
        for path, body in (("/v1/completions", completion()), ("/v1/chat/completions", chat(stream=True))):
            response = post(service, path, json=body)
            assert_error(response, 503, "server_error", "overloaded")
            assert int(response.headers["retry-after"]) >= 1
        assert httpx.get(service.base_url + "/v1/models").status_code == 200
    finally:
        service.stop()


def test_an_engine_that_stops_ends_streams_with_an_error_event_and_health_turns_503(home, checkpoint):
    service = start_service({MODEL: checkpoint})
    try:
        body = completion(max_tokens=240, stream=True, ignore_eos=True)
        with httpx.stream("POST", service.base_url + "/v1/completions", json=body, timeout=30) as response:
            events = sse_events(response)
            next(events)
            service.models[MODEL].async_llm.shutdown()  # the engine stops while the stream is open
            rest = list(events)
        assert rest and isinstance(rest[-1], dict) and rest[-1]["error"]["type"] == "server_error", rest[-3:]
        assert_no_leak(json.dumps(rest[-1]))
        wait_until(lambda: httpx.get(service.base_url + "/health").status_code == 503)
        with pytest.raises(openai.InternalServerError) as caught:
            openai_client(service).completions.create(model=MODEL, prompt="To be", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "engine_unavailable"
    finally:
        service.stop()
