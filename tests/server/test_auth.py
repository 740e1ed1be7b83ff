"""API keys end to end: `llmasos keys create|list|revoke`, then a real server that refuses missing, wrong, revoked,
expired and injection-shaped keys on every route but /health — whatever the path spelling or Host header — and
enforces each key's model allow-list."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from conftest import MODEL, assert_error, cli, create_key, openai_client, start_service

from llmasos.server import auth


@pytest.fixture(scope="module")
def keyed(home, checkpoint):
    """A server whose database holds keys: `good`, `other-only` (may use only another model), `expired`."""
    keys = {"good": create_key("good"),
            "other-only": auth.create_key("other-only", models=["some-other-model"]),
            "expired": auth.create_key("expired", expires=dt.datetime(2000, 1, 1))}
    service = start_service({MODEL: checkpoint})
    yield service, keys
    service.stop()


def raw_request(service, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None):
    """Send the path byte for byte (httpx would normalise '..', '//' and percent escapes before sending)."""
    netloc = urlsplit(service.base_url)
    connection = http.client.HTTPConnection(netloc.hostname, netloc.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": netloc.netloc, **(headers or {})}.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def test_cli_creates_lists_and_revokes_keys_and_never_shows_a_secret_twice(home):
    secret = create_key("cli-made", "--rpm", "5", "--models", "a,b")
    assert secret.startswith("sk-llmasos-") and len(secret) > 40
    listed = {row["name"]: row for row in json.loads(cli("keys", "list", "--json").stdout)}
    row = listed["cli-made"]
    assert row["rpm"] == 5 and row["models"] == ["a", "b"] and row["revoked"] is False
    assert secret not in json.dumps(listed) and secret[:16] == row["prefix"]
    assert secret not in cli("keys", "list").stdout
    duplicate = cli("keys", "create", "--name", "cli-made", check=False)
    assert duplicate.returncode == 1 and duplicate.stderr.startswith("error:") and "Traceback" not in duplicate.stderr
    bad_name = cli("keys", "create", "--name", "'; DROP TABLE api_keys; --", check=False)
    assert bad_name.returncode == 1 and "invalid" in bad_name.stderr
    assert "revoked" in cli("keys", "revoke", "cli-made").stdout
    assert json.loads(cli("keys", "list", "--json").stdout)[-1]["revoked"] is True
    again = cli("keys", "revoke", "cli-made", check=False)
    assert again.returncode == 1 and "no active key" in again.stderr


@pytest.mark.parametrize("api_key", [
    None, "wrong", "' OR 1=1 --", "sk-llmasos-' OR 1=1 --", "sk-llmasos-\" OR \"\"=\"", "sk-llmasos-%",
    "sk-llmasos-" + "A" * 43, "sk-llmasos-" + "A" * 5000, "sk-llmasos-*", "Bearer sk-llmasos-x",
])
def test_missing_wrong_and_injection_shaped_keys_get_401(keyed, api_key):
    service, _ = keyed
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    response = httpx.post(service.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
    assert_error(response, 401, code="invalid_api_key")


def test_other_schemes_and_key_places_get_401(keyed):
    service, keys = keyed
    for headers in ({"Authorization": keys["good"]}, {"Authorization": f"Basic {keys['good']}"},
                    {"X-Api-Key": keys["good"]}, {"Authorization": f"Bearer {keys['good']}x"}):
        assert_error(httpx.get(service.base_url + "/v1/models", headers=headers), 401)
    assert_error(httpx.get(service.base_url + f"/v1/models?api_key={keys['good']}"), 401)
    for header in ("Bearer", "Bearer  ", f"Bearer\t{keys['good']}", "Bearer sk-llmasos-\u00e9" + "A" * 20):
        status, text = raw_request(service, "GET", "/v1/models", {"Authorization": header})
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", (header, status, text)


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("GET", "//v1/models"), ("GET", "/v1/models/../models"), ("GET", "/V1/MODELS"),
    ("GET", "/v1/models%2f.."), ("GET", "/v1/models/"), ("GET", "/v1//models"), ("GET", "/v1/./models"),
    ("GET", "/%761/models"), ("GET", "/v1/models/" + MODEL), ("GET", "/v1/models?x=/health"), ("GET", "/metrics"),
    ("GET", "/metrics/"), ("GET", "/v1/usage"), ("GET", "/health/../v1/models"), ("GET", "/healthz"),
    ("GET", "/HEALTH"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "//v1/completions"),
    ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nowhere"),
])
@pytest.mark.parametrize("host", [None, "localhost", "127.0.0.1", "evil.example"])
def test_no_path_spelling_or_host_header_bypasses_auth(keyed, method, path, host):
    service, _ = keyed
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode() if method == "POST" else None
    status, text = raw_request(service, method, path, {"Host": host} if host else None, body)
    assert status == 401, (path, status, text)
    assert json.loads(text)["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key_and_the_key_opens_the_api(keyed):
    service, keys = keyed
    assert httpx.get(service.base_url + "/health").status_code == 200
    status, _ = raw_request(service, "GET", "/metrics", {"Authorization": f"Bearer {keys['good']}"})
    assert status == 200
    client = openai_client(service, keys["good"])
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.completions.create(model=MODEL, prompt="To be", max_tokens=3).usage.completion_tokens == 3


def test_expired_keys_get_401(keyed):
    service, keys = keyed
    with pytest.raises(openai.AuthenticationError):
        openai_client(service, keys["expired"]).models.list()
    tomorrow = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).strftime("%Y-%m-%d")
    fresh = create_key("expires-later", "--expires", tomorrow)
    assert openai_client(service, fresh).models.list().data


def test_revoked_keys_get_401_at_once(keyed):
    service, _ = keyed
    secret = create_key("short-lived")
    client = openai_client(service, secret)
    assert client.completions.create(model=MODEL, prompt="To be", max_tokens=1).usage.completion_tokens == 1
    cli("keys", "revoke", "short-lived")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.completions.create(model=MODEL, prompt="To be", max_tokens=1)
    assert caught.value.body["code"] == "invalid_api_key"


def test_a_key_limited_to_other_models_gets_403_for_this_one(keyed):
    service, keys = keyed
    client = openai_client(service, keys["other-only"])
    assert client.models.list().data == []
    for call in (lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=1),
                 lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}]),
                 lambda: client.models.retrieve(MODEL)):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            call()
        assert caught.value.body["code"] == "model_not_allowed" and caught.value.body["type"] == "permission_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="some-other-model", prompt="x", max_tokens=1)


def test_revoking_the_only_key_locks_the_server_rather_than_opening_it(fresh_home, checkpoint):
    secret = create_key("only")
    service = start_service({MODEL: checkpoint})
    try:
        client = openai_client(service, secret)
        assert client.models.list().data
        cli("keys", "revoke", "only")
        time.sleep(1.2)  # past any caching of "are there keys at all?"
        for api_key in (secret, "unused"):
            with pytest.raises(openai.AuthenticationError):
                openai_client(service, api_key).completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert_error(httpx.get(service.base_url + "/v1/models"), 401)
    finally:
        service.stop()


def test_admin_keys(home):
    secret, plain = create_key("an-admin", "--admin"), create_key("not-admin")
    listed = {row["name"]: row for row in json.loads(cli("keys", "list", "--json").stdout)}
    assert listed["an-admin"]["admin"] is True and listed["not-admin"]["admin"] is False
    assert auth.lookup_key(plain).admin is False
    assert auth.lookup_key(secret).admin is True
    assert "an-admin" in cli("keys", "list").stdout


def test_limits_beyond_the_column_range_are_refused_with_the_range(home):
    too_many = cli("keys", "create", "--name", "huge-rpm", "--rpm", str(2**31), check=False)
    assert too_many.returncode == 1 and "rpm must be an integer from 1 to 2147483647" in too_many.stderr
    big_quota = create_key("big-quota", "--token-quota", str(10**12))  # BIGINT: fine on both databases
    assert auth.lookup_key(big_quota).token_quota == 10**12
