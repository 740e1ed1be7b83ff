"""The database-backed limiter without a server, on SQLite and PostgreSQL: a running request's lease is renewed
past its length, a lapsed one stops counting, rpm and concurrency windows, and the quota counter moving with the
usage rows."""

from __future__ import annotations

import time

import pytest

from llmasos.server import auth
from llmasos.server.metering import Limiter
from llmasos.server.protocol import APIError


def key(name: str, **limits) -> auth.KeyInfo:
    return auth.lookup_key(auth.create_key(name, **limits))


def test_a_running_request_keeps_its_reservation_past_the_lease(home):
    limiter = Limiter(lease=0.6)  # renewed every 0.2 s
    info = key("renewed", max_concurrency=1)
    admission = limiter.admit(info, 4, 4)
    time.sleep(1.5)
    with pytest.raises(APIError) as refused:
        limiter.admit(info, 4, 4)
    assert refused.value.status == 429 and "concurrent" in refused.value.message
    limiter.release(admission, 8)
    limiter.release(limiter.admit(info, 4, 4), 8)


def test_a_reservation_nobody_renews_lapses(home):
    crashed, survivor = Limiter(lease=0.5), Limiter(lease=30)
    info = key("lapsing", max_concurrency=1, token_quota=100)
    crashed.admit(info, 10, 80)
    crashed._live.clear()  # its server died: nothing renews the lease any more
    with pytest.raises(APIError):
        survivor.admit(info, 10, 10)
    time.sleep(0.8)
    admission = survivor.admit(info, 10, 10)  # the lapsed reservation neither holds the slot nor the quota
    assert admission.max_completion_tokens == 90
    survivor.release(admission, 20)


def test_rpm_window_and_quota_counter(home):
    limiter = Limiter()
    info = key("counted", rpm=2, token_quota=50)
    for _ in range(2):
        admission = limiter.admit(info, 5, 5)
        auth.record_usage(info.name, "m", "completions", "r", 5, 5, 0.0)
        limiter.release(admission, 10)
    with pytest.raises(APIError) as refused:
        limiter.admit(info, 5, 5)
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert auth.tokens_used(info.name) == 20 == sum(row["prompt_tokens"] + row["completion_tokens"]
                                                    for row in auth.usage_summary(info.name))
    headers = limiter.headers(info)
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
