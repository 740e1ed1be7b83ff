"""Screenshots of every console page at 1280 px and 390 px wide, over a server with some history (keys, two weeks of
usage, a finished run, a chat exchange). `LLMASOS_CONSOLE_SCREENSHOTS=docs/console pytest
tests/server/test_console_screenshots.py` refreshes the ones the README shows; otherwise they go to a temporary
directory, and the test still checks that no page logs a JavaScript error at either width."""

from __future__ import annotations

import datetime as dt
import json
import random

import console_support as support
import pytest
from console_support import BUNDLED, console_errors, find, log_in, screenshot, wait
from selenium.webdriver.common.by import By
from sqlalchemy import insert

from llmasos.db import session
from llmasos.server.auth import UsageRecord, create_key

pytestmark = pytest.mark.slow
DATABASES = ("sqlite",)  # pictures for the docs
admin_key, browser, console_server = support.admin_key, support.browser, support.console_server  # the fixtures


@pytest.fixture(scope="module")
def history(console_server, tmp_path_factory):
    names = ["alice", "bob", "ci-bot", "analytics"]
    create_key("alice", rpm=60, token_quota=1_000_000)
    create_key("bob", tpm=20_000, max_concurrency=4)
    create_key("ci-bot", models=[BUNDLED])
    create_key("analytics")
    rng = random.Random(1)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    rows = [{"key_name": rng.choice(names), "model": rng.choice((BUNDLED, BUNDLED, "qwen2.5:0.5b-instruct")),
             "route": "/v1/chat/completions", "request_id": f"chatcmpl-{n}",
             "created_at": now - dt.timedelta(minutes=rng.randrange(60 * 24 * 14) * (1 + n % 2) // 2),
             "prompt_tokens": rng.randrange(20, 800), "completion_tokens": rng.randrange(5, 300),
             "cost": rng.random() / 5000} for n in range(2000)]
    with session() as db:
        db.execute(insert(UsageRecord), rows)
    runs = tmp_path_factory.mktemp("runs")
    run = runs / "shakespeare-lora"
    (run / "checkpoint-100").mkdir(parents=True)
    with (run / "metrics.jsonl").open("w") as handle:
        for step in range(1, 201):
            handle.write(json.dumps({"step": step, "loss": 3.2 * 0.993 ** step + rng.random() * 0.08}) + "\n")
            if step % 25 == 0:
                handle.write(json.dumps({"step": step, "eval_loss": 3.3 * 0.994 ** step}) + "\n")
    (runs / "evals").mkdir()
    (runs / "evals" / "perplexity.json").write_text(json.dumps({
        "task": "perplexity", "name": "tiny_text", "model": BUNDLED, "num_examples": 64,
        "metrics": {"perplexity": 9.87, "loss": 2.29}, "started_at": "2026-11-28T10:00:00"}))
    return runs


def test_screenshots_of_every_page(console_server, browser, admin_key, history, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_RUNS_DIR", str(history))
    log_in(browser, console_server, admin_key)
    find(browser, "#chat-system").send_keys("You are a player in a Shakespeare comedy.")
    find(browser, "#chat-input").send_keys("ROMEO:")
    browser.find_element(By.ID, "chat-send").click()
    wait(browser, 60).until(lambda d: "finish:" in d.find_element(By.ID, "chat-stats").text)
    browser.find_element(By.CSS_SELECTOR, "#chat-code summary").click()
    screenshot(browser, "chat", tmp_path)
    for name, path in (("keys", "/keys"), ("usage", "/usage?start=" + (dt.date.today() - dt.timedelta(days=13))
                                            .isoformat()), ("models", "/models"), ("model", f"/models/{BUNDLED}"),
                       ("server", "/server"), ("runs", "/runs"), ("run", "/runs/shakespeare-lora")):
        browser.get(console_server.base_url + path)
        find(browser, "main h1")
        if name == "server":
            wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#server-rows tr[data-model]"))
        if name == "run":
            wait(browser).until(lambda d: d.find_element(By.ID, "run-chart").get_attribute("data-points") == "200")
        screenshot(browser, name, tmp_path)
        assert console_errors(browser) == [], name
    assert console_errors(browser) == []
