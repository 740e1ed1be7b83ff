"""Hostile request bodies against a real server (llmasos/server/app.py's parse_body, protocol.py's strict models):
each is a 4xx with an OpenAI-shaped body, at most one log line and no traceback, and the next client is served."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import MODEL, assert_error, openai_client

from llmasos.server.app import MAX_JSON_DEPTH

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
BODY_ROUTES = (*GENERATION_ROUTES, "/v1/embeddings", "/tokenize", "/detokenize")


class _Lines(logging.Handler):
    """Every line the server logs (a traceback counts each of its lines)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += self.format(record).splitlines()


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Lines logged meanwhile, from our loggers and uvicorn's (which does not propagate to the root)."""
    handler = _Lines()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.lines
    for logger in loggers:
        logger.removeHandler(handler)


def post(server, path: str, content: bytes | str, **headers: str) -> httpx.Response:
    headers = {"content-type": "application/json", **headers}
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=60)


def still_serving(server) -> None:
    """Another client is served after the hostile one."""
    assert httpx.get(server.base_url + "/health", timeout=10).json() == {"status": "ok"}
    answer = openai_client(server).completions.create(model=MODEL, prompt="hello", max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")


def assert_quiet(lines: list[str]) -> None:
    """One log line at most, and no traceback."""
    assert len(lines) <= 1, lines[:20]
    assert not any("Traceback" in line for line in lines), lines[:20]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def fill(template: str, **raw: str) -> str:
    """A JSON body from a template: `@name` is replaced by raw JSON text, `@model` by the served model's id."""
    for name, text in {"model": MODEL, **raw}.items():
        template = template.replace("@" + name, text)
    return template


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_deep_nesting_is_400_on_every_route(server, log_lines, path):
    body = fill('{"model": "@model", "prompt": @deep, "messages": @deep, "input": "a", "tokens": [1]}',
                deep=nested(1000))
    error = assert_error(post(server, path, body), 400)
    assert "nested deeper" in error["message"]
    assert_quiet(log_lines)
    still_serving(server)


def test_nesting_past_the_recursion_limit_is_400(server, log_lines):
    error = assert_error(post(server, "/v1/completions", fill('{"prompt": @deep}', deep=nested(100_000))), 400)
    assert f"{MAX_JSON_DEPTH} levels" in error["message"]
    assert_quiet(log_lines)
    still_serving(server)


def test_nested_chat_template_kwargs_is_one_400(server, log_lines):
    """A 1.2 KB request once wrote ~3,000 log lines (the template's recursion, logged as a traceback)."""
    body = fill('{"model": "@model", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
                '{"x": @deep}}', deep=nested(600))
    assert len(body) < 1300, len(body)
    error = assert_error(post(server, "/v1/chat/completions", body), 400)
    assert error["param"] == "chat_template_kwargs"
    assert_quiet(log_lines)
    still_serving(server)


def test_shallow_chat_template_kwargs_still_render(server):
    kwargs = {"note": {"a": {"b": {"c": [1, [2, [3]]]}}}}
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "chat_template_kwargs": kwargs})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("number", ["1" * 4301, "-" + "9" * 100_000, str(2 ** 64), str(-(2 ** 63) - 1)])
def test_huge_integers_are_400(server, log_lines, number):
    body = fill('{"model": "@model", "prompt": [1, @number], "max_tokens": 1}', number=number)
    error = assert_error(post(server, "/v1/completions", body), 400)
    assert number[:50] not in error["message"]
    assert_quiet(log_lines)
    still_serving(server)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_400(server, log_lines, constant):
    body = fill('{"model": "@model", "prompt": "hi", "max_tokens": 1, "temperature": @constant}', constant=constant)
    assert_error(post(server, "/v1/completions", body), 400)
    assert_quiet(log_lines)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", '{"model": "@model", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"model": "@model", "prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt.1"),
    ("/v1/chat/completions", '{"model": "@model", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "@model", "messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "x\\ud83d"}]}]}', "messages.0.content.0.text"),
    ("/tokenize", '{"model": "@model", "prompt": "\\ud800"}', "prompt"),
])
def test_lone_surrogates_are_400_naming_the_field(server, log_lines, path, body, param):
    error = assert_error(post(server, path, fill(body)), 400)
    assert error["param"] == param and "UTF-8" in error["message"], error
    assert_quiet(log_lines)
    still_serving(server)


def test_surrogate_in_a_key_is_quoted_safely(server):
    body = fill('{"model": "@model", "prompt": "hi", "logit_bias": {"\\ud800": 1}}')
    error = assert_error(post(server, "/v1/completions", body), 400)
    assert "\\ud800" in error["param"]


def test_invalid_utf8_body_is_400(server):
    error = assert_error(post(server, "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400)
    assert "UTF-8" in error["message"]


def test_client_hanging_up_mid_body_is_a_quiet_499(server, log_lines):
    def count_499() -> float:
        text = httpx.get(server.base_url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("llmasos_requests_total") and 'status="499"' in line)

    before = count_499()
    with socket.create_connection((server.settings.host, server.settings.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"model": "tiny", "prompt": "')
        time.sleep(0.3)  # the route is reading the body when the connection goes
    deadline = time.monotonic() + 10
    while count_499() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count_499() == before + 1
    assert_quiet(log_lines)
    still_serving(server)


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/completions", {"prompt": [False, 1]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, True]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0.0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 1.0}, "n"),
    ("/v1/completions", {"prompt": "hi", "echo": 0}, "echo"),
    ("/v1/completions", {"prompt": "hi", "stream": "false"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "seed": True}, "seed"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "tool"}]}, "messages.0"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": None, "tool_call_id": "a"}]}, "messages.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("/detokenize", {"tokens": [False]}, "tokens.0"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": 0}, "add_special_tokens"),
])
def test_loose_types_are_400(server, log_lines, path, fields, param):
    response = httpx.post(server.base_url + path, json={"model": MODEL, **fields}, timeout=60)
    error = assert_error(response, 400)
    assert error["param"] == param, error
    assert error["message"].startswith(f"invalid value for {param}: "), error
    assert_quiet(log_lines)


def test_floats_take_integers_as_openai_does(server):
    response = httpx.post(server.base_url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "hi", "max_tokens": 1, "temperature": 1, "top_p": 1, "presence_penalty": 0,
        "logit_bias": {"5": 1}})
    assert response.status_code == 200, response.text


def test_tool_message_with_content_is_served(server):
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 1, "messages": [
            {"role": "user", "content": "weather?"}, {"role": "assistant", "content": None},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]})
    assert response.status_code == 200, response.text


def test_errors_quote_at_most_100_characters_of_input(server, log_lines):
    huge = "m" * (3 << 20)
    for path in GENERATION_ROUTES:
        response = httpx.post(server.base_url + path, timeout=60, json={
            "model": huge, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})
        error = assert_error(response, 404, code="model_not_found")
        assert len(response.content) < 600 and "m" * 101 not in error["message"] and "…" in error["message"]
    error = assert_error(httpx.get(server.base_url + "/v1/models/" + "m" * 5000, timeout=60), 404)
    assert "m" * 101 not in error["message"]
    key = "k" * 100_000
    error = assert_error(httpx.post(server.base_url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "hi", "logit_bias": {key: 1}}), 400)
    assert "k" * 101 not in error["message"] and len(error["param"] or "") <= 101
    error = assert_error(httpx.post(server.base_url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "hi", "stop": "s", key: {"deep": json.loads(nested(200))}}), 400)
    assert "k" * 101 not in error["message"] and len(error["message"]) < 300
    assert_quiet(log_lines)
    still_serving(server)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/completions", "", 400),
    ("POST", "/v1/completions", "[]", 400),
    ("POST", "/v1/completions", '"text"', 400),
    ("POST", "/v1/completions", '{"model": "tiny", "prompt": "a"', 400),
    ("POST", "/v1/completions", '{"model": "tiny"}', 400),
    ("GET", "/v1/completions", None, 405),
    ("GET", "/v1/nowhere", None, 404),
    ("DELETE", "/v1/models", None, 405),
])
def test_every_error_is_openai_shaped(server, log_lines, method, path, body, status):
    headers = {"content-type": "application/json"} if body is not None else {}
    response = httpx.request(method, server.base_url + path, content=body, headers=headers, timeout=60)
    assert_error(response, status)
    assert_quiet(log_lines)
