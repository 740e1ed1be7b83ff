"""Console test fixtures, taken in by the test_console_* modules: a real server on loopback serving the bundled model
(and the library), an admin key, and headless Chromium from Debian (/usr/bin/chromium, /usr/bin/chromedriver)
driven by Selenium, whose JavaScript console is read after every page."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from llmasos.server.auth import create_key
from llmasos.server.lifecycle import ModelManager
from llmasos.server.serving import Service, free_port, load_served_model
from llmasos.server.state import ServerSettings

BUNDLED = "shakespeare:tiny"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT_DIR = os.environ.get("LLMASOS_CONSOLE_SCREENSHOTS")  # e.g. docs/console: where the screenshots go
PAGES = ("/", "/keys", "/usage", "/models", "/server", "/runs", f"/models/{BUNDLED}")


def make_admin_key(name: str) -> str:
    return create_key(name, admin=True)


@pytest.fixture(scope="module")
def console_server(home) -> Iterator[Service]:
    """The bundled model loaded, every library model servable by name (as `llmasos serve` does)."""
    served = {BUNDLED: load_served_model(BUNDLED, BUNDLED, dtype="float32")}
    manager = ModelManager(served, library=True, load_options={"dtype": "float32"})
    service = Service(manager, ServerSettings(host="127.0.0.1", port=free_port())).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def admin_key(console_server) -> str:
    return make_admin_key("console-admin")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    # The browser's profile, caches and crash reports go to a temporary home: a test run never writes into the
    # user's home (the CI checks it stays byte-identical).
    browser_home = tmp_path_factory.mktemp("browser-home")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                     f"--user-data-dir={browser_home / 'profile'}", "--disable-crash-reporter",
                     "--disable-breakpad"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    environment = {**os.environ, "HOME": str(browser_home), "XDG_CONFIG_HOME": str(browser_home / "config"),
                   "XDG_CACHE_HOME": str(browser_home / "cache")}
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER, env=environment))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class _Wait(WebDriverWait):
    """Also looks again when chromedriver reports an element of a re-rendered page in its own words ("Node with
    given id does not belong to the document", a WebDriverException, not StaleElementReferenceException)."""

    def until(self, method, message: str = ""):
        def tolerant(driver):
            try:
                return method(driver)
            except WebDriverException as exc:
                if "does not belong to the document" in str(exc):
                    return False
                raise

        return super().until(tolerant, message)


def wait(driver, timeout: float = 20.0) -> WebDriverWait:
    """A wait that looks again when the page reloaded under it (a stale element is not a failure)."""
    return _Wait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,
                                                                             NoSuchElementException))


def find(driver, css: str):
    return wait(driver).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def console_errors(driver, refusals_expected: bool = False) -> list[dict]:
    """Messages of the page's JavaScript console at SEVERE level (errors, CSP violations, failed loads) since the
    last call; with `refusals_expected`, the browser's own lines for 4xx answers the test provoked are left out."""
    def provoked(entry: dict) -> bool:
        return refusals_expected and entry["source"] == "network" and bool(re.search(r"status of 4\d\d",
                                                                                      entry["message"]))

    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE" and not provoked(entry)]


def log_in(driver, service: Service, key: str) -> None:
    driver.get(service.base_url + "/login")
    find(driver, "#login-key").send_keys(key)
    driver.find_element(By.ID, "login-submit").click()
    wait(driver).until(lambda d: d.current_url.rstrip("/") == service.base_url)
    find(driver, "#chat-send")


def screenshot(driver, name: str, tmp_dir: Path) -> None:
    """The page at 1280 px and at 390 px wide (a phone), under $LLMASOS_CONSOLE_SCREENSHOTS when set."""
    directory = Path(SCREENSHOT_DIR) if SCREENSHOT_DIR else tmp_dir
    directory.mkdir(parents=True, exist_ok=True)
    for width, height in ((1280, 900), (390, 844)):
        driver.set_window_size(width, height)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(directory / f"{name}-{width}.png"))
    driver.set_window_size(1280, 900)


def logged_in_client(service, key: str) -> tuple[httpx.Client, str]:
    """An HTTP client holding a console session, and the session's CSRF token (read from a page, as the JS does)."""
    client = httpx.Client(base_url=service.base_url, timeout=30)
    response = client.post("/console/login", json={"key": key})
    assert response.status_code == 200, response.text
    token = re.search(r'<meta name="csrf-token" content="([^"]+)">', client.get("/keys").text).group(1)
    return client, token
