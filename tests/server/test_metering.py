"""Metering and limits on a real server: usage rows equal the usage the client saw (streams included) through
`llmasos usage --json` and GET /v1/usage; a disconnected stream is metered by exactly what was sent and its engine
request is aborted; rpm, tpm, concurrency and quota limits answer 429 with Retry-After and x-ratelimit-* headers."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import MODEL, assert_error, cli, engine_idle, openai_client, sse_events, start_service, wait_until

from llmasos.server import auth
from llmasos.server.metering import PriceTable, default_price


@pytest.fixture(scope="module")
def metered(home, long_checkpoint):
    """A server whose model has a 2048-token context, so that a stream is still running when the test acts."""
    service = start_service({MODEL: long_checkpoint})
    yield service
    service.stop()


def usage_of(key_name: str) -> dict:
    rows = auth.usage_summary(key_name)
    return {"requests": sum(r["requests"] for r in rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows), "cost": sum(r["cost"] for r in rows)}


def settled(key_name: str, requests: int = 1) -> bool:
    """The key has this many usage rows and every one got its final write (the ledger opens a row at admission)."""
    from sqlalchemy import func, select

    from llmasos.db import session

    with session() as db:
        rows, running = db.execute(select(func.count(auth.UsageRecord.id),
                                          func.count(auth.UsageRecord.id) - func.count(auth.UsageRecord.completed_at))
                                   .where(auth.UsageRecord.key_name == key_name)).one()
    return rows == requests and running == 0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_usage_equals_the_sum_of_what_the_client_saw_streams_included(metered):
    key = auth.create_key("meter")
    client = openai_client(metered, key)
    seen: list = []
    seen.append(client.completions.create(model=MODEL, prompt="To be", max_tokens=9, temperature=0).usage)
    seen.append(client.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=5, n=2).usage)
    seen.append(client.completions.create(model=MODEL, prompt="To be or not", max_tokens=0, echo=True,
                                          logprobs=1).usage)
    stream = client.completions.create(model=MODEL, prompt="The quick", max_tokens=11, stream=True,
                                       stream_options={"include_usage": True})
    seen.append([chunk for chunk in stream][-1].usage)
    seen.append(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6).usage)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "yo"}], max_tokens=7,
                                            n=2, stream=True, stream_options={"include_usage": True})
    seen.append([chunk for chunk in stream][-1].usage)
    # A stream without include_usage: the client counts its tokens from the logprobs of each chunk.
    quiet = list(client.completions.create(model=MODEL, prompt="To be", max_tokens=8, stream=True, logprobs=0))
    quiet_tokens = sum(len(c.choices[0].logprobs.tokens) for c in quiet)
    prompt_tokens = sum(u.prompt_tokens for u in seen) + len(metered.models[MODEL].llm.tokenizer.encode("To be"))
    completion_tokens = sum(u.completion_tokens for u in seen) + quiet_tokens

    price = default_price(metered.models[MODEL].num_parameters)
    cost = (prompt_tokens * price.input + completion_tokens * price.output) / 1e6
    from_cli = json.loads(cli("usage", "--json", "--key", "meter").stdout)
    assert [(r["key"], r["model"]) for r in from_cli] == [("meter", MODEL)]
    assert from_cli[0]["requests"] == 7
    assert (from_cli[0]["prompt_tokens"], from_cli[0]["completion_tokens"]) == (prompt_tokens, completion_tokens)
    assert from_cli[0]["cost"] == pytest.approx(cost, rel=1e-6)
    from_api = httpx.get(metered.base_url + "/v1/usage", headers=bearer(key)).json()["data"]
    assert from_api == from_cli


def test_a_disconnected_stream_is_metered_by_exactly_what_was_sent(metered):
    """The engine is paused (its lock held) once a token has arrived: everything it generated is then read, the
    client hangs up, and the usage row must hold exactly the tokens read — then the engine must drop the request."""
    key = auth.create_key("hangs-up")
    served = metered.models[MODEL]
    body = {"model": MODEL, "prompt": "To be", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    read = 0
    wait_until(lambda: engine_idle(metered))
    before = served.llm.metrics()["num_generated_tokens"]  # the only request on the server from here on
    with httpx.Client(base_url=metered.base_url, headers=bearer(key), timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            events = sse_events(response)
            first = next(events)
            read += len(first["choices"][0]["logprobs"]["tokens"])
            with served.llm.engine.lock:
                stats = served.llm.metrics()
                assert stats["num_running"] == 1, "the request finished before the test could pause the engine"
                generated = stats["num_generated_tokens"] - before
                while read < generated:
                    read += len(next(events)["choices"][0]["logprobs"]["tokens"])
                response.close()
                wait_until(lambda: settled("hangs-up"))
                assert usage_of("hangs-up")["completion_tokens"] == read == generated < 2000
    wait_until(lambda: engine_idle(metered))
    assert served.llm.metrics()["kv_cache_usage"] == 0 and served.llm.metrics()["num_running"] == 0


def test_a_client_that_leaves_mid_stream_aborts_its_engine_request(metered):
    key = auth.create_key("leaves")
    body = {"model": MODEL, "prompt": "To be", "max_tokens": 2000, "ignore_eos": True, "stream": True, "logprobs": 0}
    read = 0
    with httpx.stream("POST", metered.base_url + "/v1/completions", json=body, headers=bearer(key)) as response:
        for _, event in zip(range(3), sse_events(response), strict=False):
            read += len(event["choices"][0]["logprobs"]["tokens"])
    wait_until(lambda: settled("leaves"))
    assert read <= usage_of("leaves")["completion_tokens"] < 2000
    wait_until(lambda: engine_idle(metered))


def test_a_non_streamed_request_whose_client_left_is_aborted_and_bills_no_completion(metered):
    key = auth.create_key("impatient")
    served = metered.models[MODEL]
    body = {"model": MODEL, "prompt": "To be", "max_tokens": 200, "ignore_eos": True}
    with served.llm.engine.lock:  # nothing can be generated before the client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(metered.base_url + "/v1/completions", json=body, headers=bearer(key), timeout=0.5)
        wait_until(lambda: settled("impatient"))
    assert usage_of("impatient")["completion_tokens"] == 0
    wait_until(lambda: engine_idle(metered))


def rate_limited(call) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        call()
    headers = caught.value.response.headers
    assert 1 <= int(headers["retry-after"])
    assert any(name.startswith("x-ratelimit-") for name in headers), dict(headers)
    assert_error(caught.value.response, 429)
    return caught.value


def test_requests_per_minute(metered):
    client = openai_client(metered, auth.create_key("rpm", rpm=2))
    first = client.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    error = rate_limited(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=1))
    assert error.body["code"] == "rate_limit_exceeded" and error.body["type"] == "rate_limit_error"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(error.response.headers["retry-after"]) <= 60
    assert usage_of("rpm")["requests"] == 2  # a refused request is not billed


def test_tokens_per_minute(metered):
    client = openai_client(metered, auth.create_key("tpm", tpm=30))
    used = client.completions.create(model=MODEL, prompt="To be", max_tokens=20, extra_body={"ignore_eos": True}).usage
    assert used.total_tokens <= 30
    prompt = "To be or not to be, that is"
    assert len(metered.models[MODEL].llm.tokenizer.encode(prompt)) > 30 - used.total_tokens
    error = rate_limited(lambda: client.completions.create(model=MODEL, prompt=prompt, max_tokens=1))
    assert error.response.headers["x-ratelimit-limit-tokens"] == "30"
    assert int(error.response.headers["x-ratelimit-remaining-tokens"]) == 30 - used.total_tokens


def test_concurrent_requests(metered):
    key = auth.create_key("one-at-a-time", max_concurrency=1)
    client = openai_client(metered, key)
    body = {"model": MODEL, "prompt": "To be", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", metered.base_url + "/v1/completions", json=body, headers=bearer(key)) as response:
        events = sse_events(response)  # kept referenced: a collected generator closes the connection
        next(events)
        error = rate_limited(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=1))
        assert error.response.headers["x-ratelimit-limit-concurrent-requests"] == "1"
        assert error.response.headers["x-ratelimit-remaining-concurrent-requests"] == "0"
    # The stream's slot comes back when the server sees the disconnect.
    wait_until(lambda: httpx.post(metered.base_url + "/v1/completions", headers=bearer(key),
                                  json={"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200)


def test_token_quota_runs_out_with_insufficient_quota(metered):
    client = openai_client(metered, auth.create_key("quota", token_quota=42))
    totals = []
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(10):
            totals.append(client.completions.create(model=MODEL, prompt="To be", max_tokens=8, temperature=0,
                                                    extra_body={"ignore_eos": True}).usage.total_tokens)
    assert caught.value.body["code"] == "insufficient_quota" and caught.value.body["type"] == "insufficient_quota"
    assert caught.value.response.headers["x-ratelimit-limit-quota-tokens"] == "42"
    assert "retry-after" in caught.value.response.headers
    prompt_tokens = len(metered.models[MODEL].llm.tokenizer.encode("To be"))
    full = prompt_tokens + 8
    assert totals[:42 // full] == [full] * (42 // full)
    assert sum(totals) == 42 and totals[-1] < full  # the last answer was cut short to fit the quota exactly
    assert usage_of("quota")["prompt_tokens"] + usage_of("quota")["completion_tokens"] == sum(totals)
    stream = client.chat.completions.create  # streams are refused the same way
    rate_limited(lambda: list(stream(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)))


def test_price_table_overrides_and_default_prices_grow_with_size(tmp_path):
    assert default_price(7_000_000_000).input > default_price(500_000_000).input > 0
    assert default_price(10 ** 9).output == pytest.approx(2 * default_price(10 ** 9).input)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input": 1.5, "output": 3}}))
    table = PriceTable.from_file(path)
    assert table.cost("m", 1, 1_000_000, 2_000_000) == pytest.approx(7.5)
    assert table.price("other", 10 ** 9) == default_price(10 ** 9)
    path.write_text('{"m": {"input": "cheap"}}')
    with pytest.raises(ValueError, match="price table"):
        PriceTable.from_file(path)
