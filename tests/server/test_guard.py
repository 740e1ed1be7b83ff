"""The browser guard and the connection limits, on real servers on 127.0.0.1: a keyless server answers only loopback
(or --allowed-hosts) Host headers but /health answers any, takes only JSON bodies, answers CORS only for configured
origins; slowloris connections are closed at their deadlines while others are served; one address holds at most
max_connections_per_client connections."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import MODEL, assert_error, create_key, openai_client, start_service, wait_until

from llmasos.server.guard import host_allowed, host_name
from llmasos.server.state import ServerSettings

ORIGIN = "https://app.example"
CAP = 8
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def guarded(home, checkpoint) -> Iterator:
    """A keyless server with one allowed extra host, one CORS origin, 2 s deadlines and 8 connections per address."""
    service = start_service({MODEL: checkpoint}, allowed_hosts=("api.internal",), cors_origins=(ORIGIN,),
                            header_timeout=TIMEOUT, body_timeout=TIMEOUT, timeout_keep_alive=30.0,
                            max_connections_per_client=CAP)
    yield service
    service.stop()


def request(service, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
            host: str | None = None) -> tuple[int, dict[str, str], str]:
    """One request with exactly these headers (Host included; none when host is "")."""
    netloc = urlsplit(service.base_url)
    connection = http.client.HTTPConnection(netloc.hostname, netloc.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host != "":
            connection.putheader("Host", host or netloc.netloc)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        connection.close()


def error_of(status: int, text: str, expected_status: int, code: str) -> None:
    assert status == expected_status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error


def test_host_names():
    assert host_name("LOCALHOST:8000") == "localhost" and host_name("[::1]:80") == "[::1]"
    assert all(host_allowed(h, ()) for h in ("localhost", "127.0.0.1:1", "[::1]:8000", "LocalHost"))
    assert not any(host_allowed(h, ()) for h in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "",
                                                  None, "[::1].evil", "0.0.0.0"))
    assert host_allowed("a.example.com:8000", (".example.com",)) and host_allowed("example.com", ("*.example.com",))
    assert not host_allowed("badexample.com", (".example.com",)) and host_allowed("anything", ("*",))
    with pytest.raises(ValueError, match="header_timeout"):
        ServerSettings(header_timeout=0)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]:8000", "LOCALHOST", "api.internal:443"])
def test_a_keyless_server_answers_loopback_and_allowed_hosts(guarded, host):
    status, _, text = request(guarded, "GET", "/v1/models", host=host)
    assert status == 200 and json.loads(text)["data"][0]["id"] == MODEL


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "192.168.1.4"])
def test_a_keyless_server_refuses_other_hosts_dns_rebinding(guarded, host):
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
        body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode() if method == "POST" else None
        headers = {"Content-Type": "application/json"} if body else {}
        status, _, text = request(guarded, method, path, headers, body, host=host)
        error_of(status, text, 400, "host_not_allowed")


def test_health_answers_any_host_for_probes(guarded):
    for host in ("10.42.0.17:8000", "evil.example"):
        status, _, text = request(guarded, "GET", "/health", host=host)
        assert status == 200 and json.loads(text) == {"status": "ok"}
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # no WebSocket hand-off past the protocol's limits
    assert request(guarded, "GET", "/health", upgrade)[0] == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonx"])
def test_bodies_must_be_json_so_a_cross_origin_form_post_does_not_run(guarded, content_type):
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize"):
        headers = {"Content-Type": content_type} if content_type else {}
        status, _, text = request(guarded, "POST", path, headers, body)
        error_of(status, text, 415, "unsupported_media_type")


def test_json_bodies_and_the_openai_client_are_served(guarded):
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        status, _, text = request(guarded, "POST", "/v1/completions", {"Content-Type": content_type}, body)
        assert status == 200, text
    assert openai_client(guarded).completions.create(model=MODEL, prompt="To be", max_tokens=2).usage
    assert httpx.post(guarded.base_url + "/tokenize", json={"model": MODEL, "prompt": "hi"}).status_code == 200


def test_cors_preflight_and_headers_only_for_configured_origins(guarded):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = request(guarded, "OPTIONS", "/v1/chat/completions", {"Origin": ORIGIN, **preflight})
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    assert "content-type" in headers["access-control-allow-headers"] and "origin" in headers["vary"].lower()
    status, headers, text = request(guarded, "OPTIONS", "/v1/chat/completions", {"Origin": "https://evil.example",
                                                                                 **preflight})
    error_of(status, text, 403, "cors_origin_not_allowed")
    assert not any(name.startswith("access-control-") for name in headers)

    status, headers, _ = request(guarded, "GET", "/v1/models", {"Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = request(guarded, "GET", "/v1/models", {"Origin": "https://evil.example"})
    assert status == 200 and not any(name.startswith("access-control-") for name in headers)
    status, headers, _ = request(guarded, "POST", "/v1/completions", {"Origin": ORIGIN, "Content-Type": "text/plain"},
                                 b"{}")
    assert status == 415 and headers["access-control-allow-origin"] == ORIGIN  # the page can read why


def test_with_keys_any_host_is_served_with_the_key_and_preflights_need_none(fresh_home, checkpoint):
    key = create_key("guard")
    service = start_service({MODEL: checkpoint}, cors_origins=(ORIGIN,))
    try:
        bearer = {"Authorization": f"Bearer {key}"}
        for host in ("llm.example.com", "10.0.0.5:8000"):
            assert request(service, "GET", "/v1/models", bearer, host=host)[0] == 200
            error_of(*request(service, "GET", "/v1/models", host=host)[::2], 401, "invalid_api_key")
        status, headers, _ = request(service, "OPTIONS", "/v1/completions",
                                     {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
        status, headers, _ = request(service, "GET", "/v1/models", {"Origin": ORIGIN, **bearer})
        assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    finally:
        service.stop()


def connect(service, source: str) -> socket.socket:
    """A TCP connection to the server from the loopback address `source` (all of 127/8 is loopback on Linux)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", urlsplit(service.base_url).port))
    return sock


def test_slowloris_connections_are_closed_at_their_deadlines_while_others_are_served(guarded):
    """80 connections that never finish: a third send nothing, a third trickle a header forever, a third send their
    headers and trickle a body. Spread over 10 addresses (8 each, the cap), all are closed within the 2 s deadlines
    (plus slack for a busy machine), and a normal client is served meanwhile."""
    num_sockets = 80
    head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
    sockets = [connect(guarded, f"127.0.0.{2 + i // CAP}") for i in range(num_sockets)]
    started = time.monotonic()
    for i, sock in enumerate(sockets):
        if i % 3 == 1:
            sock.sendall(head + b"X-Slow: a")
        elif i % 3 == 2:
            sock.sendall(head + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"model\": \"")
    open_sockets, received, closed_after = set(range(num_sockets)), {i: b"" for i in range(num_sockets)}, {}
    served_meanwhile, next_trickle = None, started
    try:
        while open_sockets and time.monotonic() - started < 20:  # bounded: 20 s at most
            now = time.monotonic()
            if now >= next_trickle:  # a byte every 0.3 s: an idle timeout alone would never fire
                next_trickle = now + 0.3
                for i in open_sockets:
                    if i % 3:
                        try:
                            sockets[i].send(b"a")
                        except OSError:
                            pass
            if served_meanwhile is None and now - started > 0.5:
                served_meanwhile = openai_client(guarded, timeout=10).completions.create(
                    model=MODEL, prompt="To be", max_tokens=2).usage.completion_tokens
            readable, _, _ = select.select([sockets[i] for i in open_sockets], [], [], 0.1)
            for sock in readable:
                i = sockets.index(sock)
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                received[i] += data
                if not data:
                    open_sockets.discard(i)
                    closed_after[i] = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert not open_sockets, f"{len(open_sockets)} slowloris connections still open after 20 s"
    assert max(closed_after.values()) < TIMEOUT + 8, closed_after
    assert served_meanwhile == 2
    answered = [data for data in received.values() if data]
    assert len(answered) > num_sockets // 2 and all(data.startswith(b"HTTP/1.1 408 ") for data in answered)
    assert any(b"request headers" in data for data in answered) and any(b"request body" in data for data in answered)
    wait_until(lambda: not connections_from(guarded, {f"127.0.0.{2 + i // CAP}" for i in range(num_sockets)}),
               timeout=5)  # the server's side too, and so their per-address counts


def connections_from(service, sources: set[str]) -> int:
    return sum(1 for p in service._server.server_state.connections if p.client and p.client[0] in sources)


def test_one_address_holds_at_most_the_cap_of_connections(guarded):
    source = "127.0.0.99"
    held = []
    try:
        for _ in range(CAP):  # kept-alive connections after one request each: past the header deadline
            sock = connect(guarded, source)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            held.append(sock)
        extra = connect(guarded, source)
        extra.settimeout(10)
        try:
            answer = extra.recv(4096)
        except ConnectionResetError:
            answer = b""
        finally:
            extra.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 429 "), answer
        assert httpx.get(guarded.base_url + "/v1/models", timeout=10).status_code == 200  # other addresses: served
        held.pop().close()
        wait_until(lambda: connections_from(guarded, {source}) < CAP, timeout=5)
        again = connect(guarded, source)
        again.settimeout(10)
        again.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200 ")
        again.close()
    finally:
        for sock in held:
            sock.close()


def test_assert_error_shape_of_a_refused_host(guarded):
    response = httpx.get(guarded.base_url + "/v1/models", headers={"Host": "evil.example"})
    assert_error(response, 400, "invalid_request_error", "host_not_allowed")
