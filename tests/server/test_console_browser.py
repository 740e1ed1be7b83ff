"""The console in headless Chromium against a real server: log in with an admin key, stream a chat reply from the
bundled model, create / list / revoke a key, see that key's API calls in usage, watch a LoRA run's loss curve grow,
and visit every page without a JavaScript console error."""

from __future__ import annotations

import json
import threading

import console_support as support
import pytest
from conftest import openai_client, wait_until
from console_support import BUNDLED, console_errors, find, log_in, wait
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

pytestmark = pytest.mark.slow
DATABASES = ("sqlite",)  # what a browser shows and does; the console SQL runs on both in test_console_queries
admin_key, browser, console_server = support.admin_key, support.browser, support.console_server  # the fixtures


@pytest.fixture(scope="module")
def logged_in(browser, console_server, admin_key):
    log_in(browser, console_server, admin_key)
    assert console_errors(browser) == []
    return browser


def test_a_console_page_without_a_session_goes_to_the_login_page(browser, console_server, admin_key):
    browser.delete_all_cookies()
    browser.get(console_server.base_url + "/keys")
    wait(browser).until(lambda d: d.current_url.endswith("/login"))
    find(browser, "#login-key").send_keys("sk-llmasos-not-a-real-key-at-all-000")
    browser.find_element(By.ID, "login-submit").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "login-error").text)
    assert "incorrect" in browser.find_element(By.ID, "login-error").text
    console_errors(browser)  # the refused login's 401 is logged by the browser itself, as a failed load


def test_chat_streams_a_reply_with_timings_and_shows_the_code(logged_in, console_server):
    browser = logged_in
    browser.get(console_server.base_url + "/")
    Select(find(browser, "#chat-model")).select_by_value(BUNDLED)
    browser.find_element(By.ID, "chat-system").send_keys("You are a poet.")
    max_tokens = browser.find_element(By.ID, "chat-max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    browser.find_element(By.ID, "chat-input").send_keys("ROMEO:")
    browser.find_element(By.ID, "chat-send").click()
    wait(browser, 60).until(lambda d: "tokens/s" in d.find_element(By.ID, "chat-stats").text
                            or d.find_element(By.ID, "chat-error").text)
    assert browser.find_element(By.ID, "chat-error").text == ""
    replies = browser.find_elements(By.CSS_SELECTOR, ".message.assistant .content")
    assert replies and replies[-1].text.strip()
    stats = browser.find_element(By.ID, "chat-stats").text
    assert "TTFT" in stats and ("24 tokens" in stats or "finish: stop" in stats)
    browser.find_element(By.CSS_SELECTOR, "#chat-code summary").click()
    curl = browser.find_element(By.ID, "code-curl").text
    python = browser.find_element(By.ID, "code-python").text
    assert "/v1/chat/completions" in curl and '"You are a poet."' in curl and '"max_tokens": 24' in curl
    assert "client.chat.completions.create(" in python and 'model="shakespeare:tiny"' in python
    assert console_errors(browser) == []


def test_a_json_schema_reply_and_a_bad_schema(logged_in, console_server):
    browser = logged_in
    browser.get(console_server.base_url + "/")
    find(browser, "#chat-structured summary").click()
    Select(browser.find_element(By.ID, "chat-format")).select_by_value("json_schema")
    schema = browser.find_element(By.ID, "chat-schema")
    schema.send_keys('{"type": "object", "properties": {"name": {"enum": ["Romeo", "Juliet"]}}, "required": ["name"]')
    assert "not valid JSON" in browser.find_element(By.ID, "chat-error").text  # the closing brace is missing
    schema.send_keys("}")
    assert browser.find_element(By.ID, "chat-error").text == ""
    max_tokens = browser.find_element(By.ID, "chat-max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("40")
    browser.find_element(By.ID, "chat-input").send_keys("Who loves Juliet?")
    browser.find_element(By.ID, "chat-send").click()
    wait(browser, 120).until(lambda d: "finish:" in d.find_element(By.ID, "chat-stats").text)
    assert browser.find_element(By.ID, "chat-error").text == ""
    reply = browser.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1].text
    if "finish: stop" in browser.find_element(By.ID, "chat-stats").text:
        assert json.loads(reply)["name"] in ("Romeo", "Juliet")
    else:
        assert reply.lstrip().startswith("{")
    assert 'response_format={"type": "json_schema"' in browser.find_element(By.ID, "code-python").get_attribute(
        "textContent")
    assert console_errors(browser) == []


def test_the_stop_button_ends_a_long_reply(logged_in, console_server):
    browser = logged_in
    browser.get(console_server.base_url + "/")
    max_tokens = find(browser, "#chat-max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("200")
    temperature = browser.find_element(By.ID, "chat-temperature")
    temperature.clear()
    temperature.send_keys("1")
    browser.find_element(By.ID, "chat-input").send_keys("JULIET:")
    browser.find_element(By.ID, "chat-send").click()
    wait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1].text)
    browser.find_element(By.ID, "chat-stop-button").click()
    wait(browser, 30).until(lambda d: "finish:" in d.find_element(By.ID, "chat-stats").text)
    assert "finish: stopped" in browser.find_element(By.ID, "chat-stats").text or \
        "finish: length" in browser.find_element(By.ID, "chat-stats").text
    assert browser.find_element(By.ID, "chat-send").is_enabled()
    assert console_errors(browser) == []


def _create_key(browser, service, name: str, rpm: str = "") -> str:
    browser.get(service.base_url + "/keys")
    find(browser, "#key-name").send_keys(name)
    if rpm:
        browser.find_element(By.ID, "key-rpm").send_keys(rpm)
    browser.find_element(By.ID, "key-create").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "key-secret").text or d.find_element(By.ID, "key-error").text)
    assert browser.find_element(By.ID, "key-error").text == ""
    secret = browser.find_element(By.ID, "key-secret").text
    browser.find_element(By.ID, "key-done").click()
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-key="{name}"]'))
    return secret


def test_create_a_key_see_it_listed_use_it_and_see_its_usage_then_revoke_it(logged_in, console_server):
    browser = logged_in
    secret = _create_key(browser, console_server, "browser-made", rpm="100")
    assert secret.startswith("sk-llmasos-")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-key="browser-made"]')
    assert "100 rpm" in row.text and "active" in row.text and secret not in browser.page_source

    client = openai_client(console_server, api_key=secret)
    for _ in range(3):
        client.chat.completions.create(model=BUNDLED, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    browser.get(console_server.base_url + "/usage")
    table = find(browser, "#usage-table")
    rows = [r.text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if r.text.startswith("browser-made")]
    assert rows and rows[0].split()[1] == BUNDLED and rows[0].split()[2] == "3", rows
    Select(browser.find_element(By.ID, "usage-key")).select_by_value("browser-made")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(browser).until(lambda d: "key=browser-made" in d.current_url)
    first_cells = "return Array.from(document.querySelectorAll('#usage-table tbody td:first-child'), c => c.innerText)"
    wait(browser).until(lambda d: d.execute_script(first_cells) == ["browser-made"])
    assert "key=browser-made" in browser.find_element(By.ID, "usage-csv").get_attribute("href")
    assert console_errors(browser) == []

    browser.get(console_server.base_url + "/keys")
    row = find(browser, 'tr[data-key="browser-made"]')
    assert row.find_elements(By.CSS_SELECTOR, "td")[5].text == "3"  # requests, aggregated per key
    row.find_element(By.CSS_SELECTOR, "button.revoke").click()
    wait(browser).until(lambda d: "revoked" in d.find_element(By.CSS_SELECTOR, 'tr[data-key="browser-made"]').text)
    import openai

    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=BUNDLED, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert console_errors(browser) == []


def test_a_lora_runs_loss_curve_appears_and_grows(logged_in, console_server, tmp_path, monkeypatch):
    from llmasos.train import LLMTrainer, TrainingArguments

    browser = logged_in
    monkeypatch.setenv("LLMASOS_RUNS_DIR", str(tmp_path / "runs"))
    model = LLMTrainer.from_pretrained(BUNDLED)
    args = TrainingArguments(output_dir=str(tmp_path / "runs" / "lora-1"), method="lora", max_steps=30,
                             logging_steps=1, save_steps=None, per_device_train_batch_size=2, progress_bar=False)
    chats = [{"messages": [{"role": "user", "content": "Who art thou?"},
                           {"role": "assistant", "content": "Thou art the LLMasOS, good my lord."}]}] * 8
    errors = []

    def train():
        try:
            model.train(chats, args=args)
        except Exception as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        wait_until(lambda: (tmp_path / "runs" / "lora-1" / "metrics.jsonl").is_file() or errors, timeout=120)
        browser.get(console_server.base_url + "/runs")
        find(browser, "#runs-table a").click()
        chart = find(browser, "#run-chart")
        wait(browser, 60).until(lambda d: int(chart.get_attribute("data-points") or 0) >= 1)
        first = int(chart.get_attribute("data-points"))
        wait(browser, 120).until(lambda d: int(chart.get_attribute("data-points")) > first or not thread.is_alive())
        thread.join(timeout=300)
        wait(browser, 10).until(lambda d: int(chart.get_attribute("data-points")) == 30)
        assert browser.find_elements(By.CSS_SELECTOR, "#run-chart polyline.train")
    finally:
        thread.join(timeout=300)
    assert not errors
    assert console_errors(browser) == []


def test_start_a_lora_run_from_the_console_and_watch_its_loss_curve(logged_in, console_server, tmp_path,
                                                                     monkeypatch):
    browser = logged_in
    monkeypatch.setenv("LLMASOS_RUNS_DIR", str(tmp_path / "runs"))
    chats = tmp_path / "chats.jsonl"
    record = {"messages": [{"role": "user", "content": "Who art thou?"},
                           {"role": "assistant", "content": "Thou art the LLMasOS, good my lord."}]}
    chats.write_text("\n".join(json.dumps(record) for _ in range(8)) + "\n")
    browser.get(console_server.base_url + "/runs")
    find(browser, "#run-name").send_keys("console-lora")
    Select(browser.find_element(By.ID, "run-model")).select_by_value(BUNDLED)
    steps = browser.find_element(By.ID, "run-max-steps")
    steps.clear()
    steps.send_keys("20")
    browser.find_element(By.ID, "run-data").send_keys(str(chats))
    command = browser.find_element(By.ID, "run-command").text
    assert command.startswith(f"llmasos train --model {BUNDLED} --data chats.jsonl") and "--max-steps 20" in command
    browser.find_element(By.ID, "run-start").click()
    wait(browser).until(lambda d: d.current_url.endswith("/runs/console-lora"))
    chart = find(browser, "#run-chart")
    wait(browser, 240).until(lambda d: d.find_element(By.ID, "run-status").text in ("finished", "cancelled")
                             or d.find_element(By.ID, "run-status").text.startswith("failed"))
    assert browser.find_element(By.ID, "run-status").text == "finished", browser.find_element(By.ID, "run-log").text
    wait(browser, 10).until(lambda d: int(chart.get_attribute("data-points") or 0) == 2)  # steps 10 and 20
    assert "--method lora" in browser.find_element(By.ID, "run-command").text
    assert (tmp_path / "runs" / "console-lora" / "adapter_config.json").is_file() or \
        list((tmp_path / "runs" / "console-lora").glob("**/adapter_config.json"))
    browser.get(console_server.base_url + "/runs")
    assert "finished" in find(browser, "#runs-table").text
    assert console_errors(browser) == []


def test_cancel_a_run_started_from_the_console(logged_in, console_server, tmp_path, monkeypatch):
    browser = logged_in
    monkeypatch.setenv("LLMASOS_RUNS_DIR", str(tmp_path / "runs"))
    chats = tmp_path / "long.jsonl"
    chats.write_text("\n".join(json.dumps({"text": "To be, or not to be, that is the question."})
                               for _ in range(16)) + "\n")
    browser.get(console_server.base_url + "/runs")
    find(browser, "#run-name").send_keys("to-cancel")
    steps = browser.find_element(By.ID, "run-max-steps")
    steps.clear()
    steps.send_keys("100000")
    browser.find_element(By.ID, "run-data").send_keys(str(chats))
    browser.find_element(By.ID, "run-start").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "run-status").text == "running")
    browser.find_element(By.ID, "run-cancel").click()
    wait(browser, 30).until(lambda d: d.find_element(By.ID, "run-status").text == "cancelled")
    assert not browser.find_element(By.ID, "run-cancel").is_displayed()
    assert console_errors(browser) == []


def test_a_run_refuses_bad_data_and_names(console_server, admin_key, tmp_path, monkeypatch):
    from console_support import logged_in_client

    monkeypatch.setenv("LLMASOS_RUNS_DIR", str(tmp_path / "runs"))
    client, token = logged_in_client(console_server, admin_key)
    headers = {"x-csrf-token": token}
    good = json.dumps({"text": "hello"})
    for body, message in (({"name": "../escape", "model": BUNDLED, "data": good}, "invalid"),
                          ({"name": "bad-data", "model": BUNDLED, "data": "not json"}, "not JSON"),
                          ({"name": "big", "model": BUNDLED, "data": good + "\n" + "x" * (3 << 20)}, "")):
        response = client.post("/console/api/runs", json=body, headers=headers)
        assert response.status_code in (400, 413), response.text
        assert message in response.json()["error"]["message"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_pull_a_model_with_live_progress(logged_in, console_server, checkpoint, tmp_path, monkeypatch):
    from library.hub_server import HubStandIn

    browser = logged_in
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo("test-org/tiny-model", checkpoint)
        browser.get(console_server.base_url + "/models")
        find(browser, "#pull-spec").send_keys("test-org/tiny-model")
        browser.find_element(By.ID, "pull-name").send_keys("pulled-tiny")
        browser.find_element(By.ID, "pull-start").click()
        state = "const bar = document.getElementById('pull-progress'); " \
                "return bar ? [bar.dataset.status || '', bar.value, bar.max] : ['reloaded', 0, 0]"
        def settled(driver):  # one reading of the bar, kept: a second one could catch the page reloading
            reading = driver.execute_script(state)
            return reading if reading[0] in ("done", "failed", "reloaded") else False

        status, value, maximum = wait(browser, 120).until(settled)
        size = (checkpoint / "model.safetensors").stat().st_size
        if status != "reloaded":  # caught before the page reloads: the bar is full
            assert status == "done" and value == maximum >= size, browser.find_element(By.ID, "pull-message").text
        removed = 'button.model-remove[data-name="pulled-tiny"]'
        wait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, removed))
    from llmasos.library.registry import get_model

    assert get_model("pulled-tiny").size_bytes >= size
    assert console_errors(browser) == []


def test_a_bad_pull_is_named(logged_in, console_server):
    browser = logged_in
    browser.get(console_server.base_url + "/models")
    find(browser, "#pull-spec").send_keys("a/b/c")
    browser.find_element(By.ID, "pull-start").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "models-error").text)
    assert "not a Hub repo id" in browser.find_element(By.ID, "models-error").text
    assert console_errors(browser, refusals_expected=True) == []


def test_copy_a_library_model_then_remove_the_copy(logged_in, console_server):
    browser = logged_in
    browser.get(console_server.base_url + "/models")
    find(browser, f'button.model-copy[data-name="{BUNDLED}"]').click()
    target = browser.find_element(By.ID, "copy-target")
    target.clear()
    target.send_keys("tiny-copy")
    browser.find_element(By.CSS_SELECTOR, "#copy-form button[type=submit]").click()
    remove = find(browser, 'button.model-remove[data-name="tiny-copy"]')
    assert "tiny-copy" in browser.find_element(By.ID, "library-table").text
    remove.click()
    wait(browser).until(lambda d: not d.find_elements(By.CSS_SELECTOR, 'button.model-remove[data-name="tiny-copy"]'))
    assert BUNDLED in browser.find_element(By.ID, "library-table").text
    assert console_errors(browser) == []


PAGES = [("chat", "/"), ("keys", "/keys"), ("usage", "/usage"), ("models", "/models"), ("server", "/server"),
         ("runs", "/runs"), ("model", "/models/shakespeare:tiny")]


@pytest.mark.parametrize(("name", "path"), PAGES)
def test_every_page_loads_without_javascript_errors(logged_in, console_server, name, path):
    browser = logged_in
    browser.get(console_server.base_url + path)
    find(browser, "main h1")
    if name == "server":  # the first poll has filled the table
        wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#server-rows tr[data-model="{BUNDLED}"]'))
    assert console_errors(browser) == []


def test_the_server_page_shows_a_generating_model_live(logged_in, console_server):
    from llmasos.server.auth import create_key

    browser = logged_in
    browser.get(console_server.base_url + "/server")
    find(browser, f'#server-rows tr[data-model="{BUNDLED}"]')
    client = openai_client(console_server, api_key=create_key("live-load"))

    def generate():
        for _ in range(3):
            for _chunk in client.completions.create(model=BUNDLED, prompt="ROMEO:", max_tokens=200, stream=True,
                                                    temperature=1.0):
                pass

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        rates = "return Array.from(document.querySelectorAll('#server-rows td.rate'), cell => cell.textContent)"
        wait(browser, 60).until(lambda d: any(float(rate) > 0 for rate in d.execute_script(rates)))
    finally:
        thread.join(timeout=120)
    assert console_errors(browser) == []
