"""Fair admission and a loop that never blocks (issue 12): every sequence (prompts x n) counts against the queue, a
key's concurrency and its fair share; requests over the per-request caps are 400s; oversized prompts and
out-of-vocabulary logit_bias keys are refused before any work; /health stays fast meanwhile; streamed logprobs
offsets run on across chunks exactly as in the whole answer."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest
from conftest import MODEL, assert_error, sse_events, start_service, wait_until

from llmasos.server import auth


@pytest.fixture(scope="module")
def small(home, long_checkpoint):
    service = start_service({MODEL: long_checkpoint}, max_queue=16, max_prompts_per_request=8,
                            max_sequences_per_request=12, max_sequences_per_key=6)
    yield service
    service.stop()


def post(service, path: str, key: str | None = None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(service.base_url + path, json={"model": MODEL, **body}, headers=headers, timeout=60)


def test_requests_over_the_per_request_caps_are_400_before_any_work(small):
    error = assert_error(post(small, "/v1/completions", prompt=["To be"] * 9, max_tokens=1), 400)
    assert "at most 8" in error["message"] and error["param"] == "prompt"
    error = assert_error(post(small, "/v1/completions", prompt=["To be"] * 4, n=4, max_tokens=1), 400)
    assert "16 sequences" in error["message"] and error["param"] == "n"
    assert post(small, "/v1/completions", prompt=["To be"] * 4, n=3, max_tokens=2).status_code == 200


def test_logit_bias_keys_outside_the_vocabulary_are_refused_up_front(small):
    vocab = small.models[MODEL].llm.engine.info.vocab_size
    # the last one is refused while parsing, before 150k keys are walked or validated
    for bias in ({str(vocab): 1}, {"-1": 1}, {"abc": 1}, {str(i): 1 for i in range(1025)},
                 {str(i): 1 for i in range(150_000)}):
        error = assert_error(post(small, "/v1/completions", prompt="To be", max_tokens=1, logit_bias=bias), 400)
        assert error["param"] == "logit_bias" and len(error["message"]) < 200
    assert post(small, "/v1/completions", prompt="To be", max_tokens=1, logit_bias={str(vocab - 1): 5}).status_code \
        == 200


def test_huge_prompts_are_refused_before_tokenizing_and_health_stays_fast(small):
    huge = "to be or not to be " * 180_000  # 3.4 MB of text, under the 4 MiB body limit
    latencies, results = [], []

    def heavy() -> None:
        for path, body in (("/v1/completions", {"prompt": huge, "max_tokens": 1}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})):
            results.append(post(small, path, **body))

    threads = [threading.Thread(target=heavy) for _ in range(3)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        started = time.perf_counter()
        assert httpx.get(small.base_url + "/health", timeout=10).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    for response in results:
        error = assert_error(response, 400, code="context_length_exceeded")
        assert len(error["message"]) < 300
    if len(latencies) >= 2:
        assert max(latencies) < 1.0 and statistics.median(latencies) < 0.2


def test_streamed_logprob_offsets_are_continuous_and_equal_the_whole_answer(small):
    body = {"prompt": "To be, or not", "max_tokens": 12, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    for echo in (False, True):
        whole = post(small, "/v1/completions", echo=echo, **body).json()["choices"][0]["logprobs"]
        with httpx.stream("POST", small.base_url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "stream": True, "echo": echo, **body}) as response:
            chunks = [e["choices"][0]["logprobs"] for e in sse_events(response) if isinstance(e, dict) and e["choices"]]
        streamed = {key: [v for chunk in chunks if chunk for v in chunk[key]] for key in ("tokens", "text_offset")}
        assert streamed["tokens"] == whole["tokens"]
        assert streamed["text_offset"] == whole["text_offset"], echo


# Last in this module: once a key exists, the module's server requires keys.
def test_sequences_count_against_a_keys_concurrency_and_its_fair_share(small):
    narrow = auth.create_key("narrow", max_concurrency=3)
    # the server notices that keys exist within a second
    wait_until(lambda: post(small, "/v1/completions", "bogus", prompt="x", max_tokens=1).status_code == 401)
    assert_error(post(small, "/v1/completions", narrow, prompt="To be", n=4, max_tokens=1), 400)  # can never fit
    greedy_key, other_key = auth.create_key("greedy"), auth.create_key("other")
    body = {"model": MODEL, "prompt": "To be", "n": 6, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", small.base_url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {greedy_key}"}) as response:
        events = sse_events(response)
        next(events)  # six sequences of this key are running: its whole fair share
        response2 = post(small, "/v1/completions", greedy_key, prompt="x", max_tokens=1)
        error = assert_error(response2, 429, "rate_limit_error")
        assert "fair share" in error["message"] and response2.headers["retry-after"] == "1"
        assert post(small, "/v1/completions", other_key, prompt="x", max_tokens=1).status_code == 200
    # The stream's sequences come back when the server sees the disconnect.
    wait_until(lambda: post(small, "/v1/completions", greedy_key, prompt="x", max_tokens=1).status_code == 200)
