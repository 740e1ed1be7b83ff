"""The console's security: console pages need a session made from an admin key (a non-admin key is refused), the
session cookie is HttpOnly and SameSite=Strict, every state change needs the CSRF token, pages carry a CSP without
inline scripts, and user-supplied text (key names, model names, chat content, run names) renders as text."""

from __future__ import annotations

import json
import re

import console_support as support
import httpx
import pytest
from conftest import MODEL, start_service
from console_support import BUNDLED, PAGES, console_errors, find, log_in, logged_in_client, make_admin_key, wait
from selenium.webdriver.common.by import By

from llmasos.server.auth import create_key, record_usage, revoke_key

pytestmark = pytest.mark.slow
admin_key, browser, console_server = support.admin_key, support.browser, support.console_server  # the fixtures
PAYLOADS = ('<script>window.__xss = 1</script>', '"><img src=x onerror="window.__xss=1">',
            "' onmouseover='window.__xss=1' x='")


def test_console_pages_need_a_session(console_server, admin_key):
    plain = httpx.Client(base_url=console_server.base_url)
    for path in PAGES:
        response = plain.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
    assert plain.get("/console/api/stats").status_code == 401
    assert plain.post("/console/api/keys", json={"name": "x"}).status_code == 401
    bearer = plain.get("/keys", headers={"authorization": f"Bearer {admin_key}"})
    assert bearer.status_code == 303  # the console takes sessions, not bearer keys
    assert plain.get("/login").status_code == 200 and plain.get("/console/static/console.js").status_code == 200


def test_a_non_admin_key_cannot_open_the_console(console_server, browser, admin_key):
    user_key = create_key("not-an-admin")
    response = httpx.post(console_server.base_url + "/console/login", json={"key": user_key})
    assert response.status_code == 403 and response.json()["error"]["code"] == "not_admin"
    assert "set-cookie" not in response.headers
    browser.delete_all_cookies()
    browser.get(console_server.base_url + "/login")
    find(browser, "#login-key").send_keys(user_key)
    browser.find_element(By.ID, "login-submit").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "login-error").text)
    assert "not an admin key" in browser.find_element(By.ID, "login-error").text
    browser.get(console_server.base_url + "/keys")
    assert browser.current_url.endswith("/login")
    console_errors(browser)  # the 403 of the refused login is logged by the browser as a failed load


def _raw_get(service, path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (HTTP clients would normalize '..' away)."""
    import socket

    host, port = service.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_the_open_static_prefix_reaches_nothing_else(console_server, admin_key):
    for path in ("/console/static/../../v1/models", "/console/static/%2e%2e/%2e%2e/v1/models",
                 "/console/static/../templates/base.html", "/console/static/../session.py",
                 "/console/static/..%2f..%2fv1%2fmodels", "/console/static/"):
        status, body = _raw_get(console_server, path)
        assert status in (400, 401, 404, 405), (path, status)
        assert b"shakespeare" not in body and b"import" not in body and b"{%" not in body, path
    assert _raw_get(console_server, "/console/static/console.js")[0] == 200


def test_the_session_cookie_is_httponly_strict_and_the_pages_have_a_strict_csp(console_server, admin_key):
    response = httpx.post(console_server.base_url + "/console/login", json={"key": admin_key})
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    behind_tls = httpx.post(console_server.base_url + "/console/login", json={"key": admin_key},
                            headers={"x-forwarded-proto": "https"})  # a TLS proxy on this host (uvicorn trusts it)
    assert behind_tls.headers["set-cookie"].endswith("; Secure") and "Secure" not in cookie
    client, _token = logged_in_client(console_server, admin_key)
    for path in PAGES:
        page = client.get(path)
        assert page.status_code == 200, path
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), f"inline script on {path}"
        assert not re.search(r"\son[a-z]+=|\sstyle=", page.text), f"inline handler or style on {path}"


def test_state_changes_without_the_csrf_token_are_refused(console_server, admin_key):
    client, token = logged_in_client(console_server, admin_key)
    for headers in ({}, {"x-csrf-token": "wrong"}, {"x-csrf-token": token + "x"}):
        for path, body in (("/console/api/keys", {"name": "csrf-made"}), ("/console/api/keys/revoke",
                                                                           {"name": "console-admin"}),
                           ("/v1/chat/completions", {"model": BUNDLED, "messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 1}),
                           ("/api/stop", {"model": BUNDLED}), ("/console/logout", {})):
            response = client.post(path, json=body, headers=headers)
            assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed", (path, headers)
    assert "csrf-made" not in client.get("/keys").text
    made = client.post("/console/api/keys", json={"name": "csrf-made"}, headers={"x-csrf-token": token})
    assert made.status_code == 200 and made.json()["key"].startswith("sk-llmasos-")
    form = client.post("/console/api/keys", content=b"name=x", headers={
        "x-csrf-token": token, "content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415  # the browser guard: bodies are JSON, so no cross-site form can post one


def test_an_admin_key_made_in_the_console_opens_it_and_a_plain_one_does_not(console_server, admin_key):
    client, token = logged_in_client(console_server, admin_key)
    made = {}
    for name, admin in (("made-admin", True), ("made-user", False)):
        response = client.post("/console/api/keys", json={"name": name, "admin": admin},
                               headers={"x-csrf-token": token})
        assert response.status_code == 200, response.text
        made[name] = response.json()["key"]
    assert httpx.post(console_server.base_url + "/console/login", json={"key": made["made-admin"]}).status_code == 200
    assert httpx.post(console_server.base_url + "/console/login", json={"key": made["made-user"]}).status_code == 403
    page = client.get("/keys").text
    assert re.search(r'data-key="made-admin".*?<td class="status">admin</td>', page, re.S)


def test_a_session_ends_when_its_key_is_revoked(console_server):
    key = make_admin_key("short-lived-admin")
    client, _token = logged_in_client(console_server, key)
    assert client.get("/keys").status_code == 200
    revoke_key("short-lived-admin")
    assert client.get("/keys").status_code == 303
    assert client.get("/console/api/stats").status_code == 401


def _no_script_ran(browser, refusals_expected: bool = False) -> None:
    assert browser.execute_script("return window.__xss === undefined")
    assert console_errors(browser, refusals_expected) == []


def test_payloads_in_names_and_chat_render_as_text(console_server, browser, admin_key, tmp_path, monkeypatch):
    for number, payload in enumerate(PAYLOADS):  # a model name and a key name straight in the usage table
        record_usage(payload, payload, "/v1/chat/completions", f"xss-{number}", 1, 1, 0.0)
    runs = tmp_path / "runs"
    monkeypatch.setenv("LLMASOS_RUNS_DIR", str(runs))
    for number, payload in enumerate(PAYLOADS):
        directory = runs / (payload.replace("/", "_") + str(number))
        directory.mkdir(parents=True)
        (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n')
    (runs / "report.json").write_text(json.dumps({"task": PAYLOADS[0], "name": PAYLOADS[2], "model": PAYLOADS[1],
                                                  "metrics": {PAYLOADS[0]: 1.0}}))
    log_in(browser, console_server, admin_key)

    browser.get(console_server.base_url + "/usage")
    table = find(browser, "#usage-table").text
    for payload in PAYLOADS:
        assert payload in table
    _no_script_ran(browser)

    browser.get(console_server.base_url + "/runs")
    table = find(browser, "#runs-table").text
    for number, payload in enumerate(PAYLOADS):
        assert payload.replace("/", "_") + str(number) in table
        assert payload in browser.find_element(By.ID, "evals-table").text
    _no_script_ran(browser)
    browser.find_elements(By.CSS_SELECTOR, "#runs-table a")[0].click()
    wait(browser).until(lambda d: d.find_element(By.ID, "run-chart").get_attribute("data-points") == "2")
    _no_script_ran(browser)

    browser.get(console_server.base_url + "/keys")  # key names are refused, and the refusal shows the name as text
    find(browser, "#key-name").send_keys(PAYLOADS[1])
    browser.find_element(By.ID, "key-create").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "key-error").text)
    assert PAYLOADS[1] in browser.find_element(By.ID, "key-error").text
    _no_script_ran(browser, refusals_expected=True)

    browser.get(console_server.base_url + "/")
    for payload in PAYLOADS:
        find(browser, "#chat-input").send_keys(payload)
        max_tokens = browser.find_element(By.ID, "chat-max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("4")
        browser.find_element(By.ID, "chat-send").click()
        wait(browser, 60).until(lambda d: "finish:" in d.find_element(By.ID, "chat-stats").text)
    shown = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".message.user .content")]
    assert shown == list(PAYLOADS)
    code = browser.find_element(By.ID, "code-python").get_attribute("textContent")
    assert "window.__xss" in code
    _no_script_ran(browser)


def test_without_keys_the_console_is_open_on_loopback_only(fresh_home, checkpoint):
    service = start_service({MODEL: checkpoint})
    try:
        client = httpx.Client(base_url=service.base_url)
        page = client.get("/keys")
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        token = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text).group(1)
        assert client.post("/console/api/keys", json={"name": "first"}).status_code == 403  # CSRF still applies
        stranger = httpx.post(service.base_url + "/console/api/keys", json={"name": "first"})  # no session at all
        assert stranger.status_code == 403 and stranger.json()["error"]["code"] == "csrf_failed"
        assert httpx.get(service.base_url + "/keys", headers={"host": "evil.example"}).status_code == 400
        assert client.post("/console/api/keys", json={"name": "first"}, headers={"x-csrf-token": token}).status_code \
            == 200
        import time

        time.sleep(1.1)  # a server notices its first key within a second
        assert client.get("/keys").status_code == 303  # the keyless session ended with the first key
    finally:
        service.stop()
