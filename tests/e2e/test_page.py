"""The status page in a real browser: Debian's headless Chromium, driven by selenium through
Debian's chromedriver, against a real daemon and a real origin. A download started from the page
shows its bar moving to 100 %, a model is loaded, unloaded and deleted (with the confirmation),
and with a token the page asks for it once (again after a wrong one) and then works, a download
cancelled and resumed; the browser logs no error. Screenshots, wide and narrow, in tmp_path."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon
from tests.gguf_factory import write_tiny_llama
from tests.origin import Origin, run_origin_in_thread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")

# Shaped like `openssl rand -base64` output: "/" and "=" may not go in a WebSocket subprotocol, so
# the page's progress socket carries it as the query parameter instead.
TOKEN = "pAge+t0ken/0123456789abc="


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Origin, bytes]]:
    tiny = write_tiny_llama(tmp_path_factory.mktemp("page") / "tiny.gguf", seed=11).read_bytes()
    with run_origin_in_thread() as server:
        server.add("/tiny.gguf", tiny)
        # About 1.2 s for the whole file: the bar is seen between 0 and 100 %, and a cancel
        # clicked as soon as the download shows lands before its end.
        server.faults("/tiny.gguf").throttle = 400 * 1024
        yield server, tiny


@contextmanager
def page_daemon(browser: Any, tmp: Path, origin: tuple[Origin, bytes],
                **sections: dict[str, Any]) -> Iterator[Daemon]:
    """A daemon with the one catalog model; the browser leaves its page before it stops (the
    page would log every refused poll after) and starts each test with an empty console log."""
    server, tiny = origin
    catalog = [{"id": "tiny", "name": "Tiny llama", "url": server.url("/tiny.gguf"),
                "sha256": hashlib.sha256(tiny).hexdigest(), "size": len(tiny)}]
    daemon = Daemon(tmp, catalog, **sections)
    daemon.start()
    browser.get_log("browser")
    try:
        yield daemon
    finally:
        browser.get("about:blank")
        daemon.close()


def wait(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def row(browser: Any, model: str) -> Any:
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, f'[data-model="{model}"]')
    return rows[0] if rows else None


def state(browser: Any, model: str) -> str | None:
    found = row(browser, model)
    return None if found is None else found.get_attribute("data-state")


def button(browser: Any, model: str, action: str) -> Any:
    from selenium.webdriver.common.by import By

    return row(browser, model).find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]')


def click(browser: Any, model: str, action: str) -> None:
    found = button(browser, model, action)
    assert found.is_displayed(), f"no {action} button while {state(browser, model)}"
    found.click()


def bar_value(browser: Any, model: str) -> float | None:
    from selenium.webdriver.common.by import By

    found = row(browser, model)
    if found is None:
        return None
    bar = found.find_element(By.CSS_SELECTOR, ".bar")
    value = bar.get_attribute("aria-valuenow")
    return None if value is None else float(value)


def severe_console_entries(browser: Any) -> list[dict[str, Any]]:
    return [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]


def download_from_the_page(browser: Any, daemon: Daemon) -> list[float]:
    """Click download; the bar's values seen until the model is downloaded."""
    click(browser, "tiny", "download")
    seen: list[float] = []

    def done() -> bool:
        value = bar_value(browser, "tiny")
        if value is not None and (not seen or seen[-1] != value):
            seen.append(value)
        return state(browser, "tiny") == "downloaded" and value == 100.0

    wait("the download to end on the page", done)
    daemon.wait_for("download_completed", model="tiny")
    return seen


def test_the_page_shows_and_steers_the_models(browser: Any, origin: tuple[Origin, bytes],
                                              tmp_path: Path) -> None:
    with page_daemon(browser, tmp_path / "d", origin) as daemon:
        browser.get(daemon.url + "/")
        assert "modeld" == browser.title
        wait("the model's row", lambda: state(browser, "tiny") == "absent")

        seen = download_from_the_page(browser, daemon)
        assert any(0 < v < 100 for v in seen), f"the bar never showed a step between: {seen}"
        assert seen == sorted(seen) and seen[-1] == 100.0, seen
        assert (daemon.storage / "models" / "tiny.gguf").read_bytes() == origin[1]

        click(browser, "tiny", "load")
        wait("loaded", lambda: state(browser, "tiny") == "loaded")
        daemon.wait_for("model_loaded", model="tiny")
        facts = row(browser, "tiny").text
        assert "only when asked" in facts, facts  # an explicit load stays until unloaded
        browser.save_screenshot(str(tmp_path / "page-wide.png"))
        browser.set_window_size(400, 900)  # a narrow window: nothing runs off its side
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        browser.save_screenshot(str(tmp_path / "page-narrow.png"))
        browser.set_window_size(1280, 900)
        click(browser, "tiny", "unload")
        wait("unloaded", lambda: state(browser, "tiny") == "downloaded")

        click(browser, "tiny", "delete")
        browser.switch_to.alert.dismiss()  # asked, and declined: nothing happens
        assert "downloaded" == state(browser, "tiny")
        click(browser, "tiny", "delete")
        browser.switch_to.alert.accept()
        wait("deleted", lambda: state(browser, "tiny") == "absent")
        assert not (daemon.storage / "models" / "tiny.gguf").exists()
        assert [] == severe_console_entries(browser)


def check_the_page_over_http(daemon: Daemon) -> None:
    """With a token: the page and its two files need none (they hold no data) and carry their
    CSP; nothing else is served from the package, the data needs the token, and the Host check
    applies to the page as to the rest."""
    import httpx

    with httpx.Client(base_url=daemon.url, timeout=10) as http:
        page = http.get("/")
        assert 200 == page.status_code and 'data-token="required"' in page.text
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert "DENY" == page.headers["x-frame-options"]
        for name, media in (("page.js", "text/javascript"), ("page.css", "text/css")):
            asset = http.get(f"/static/{name}")
            assert 200 == asset.status_code and asset.headers["content-type"].startswith(media)
        for path in ("/static/index.html", "/static/nope.js", "/static/..%2Fpage.py",
                     "/static/../page.py"):
            refused = http.get(path)
            assert refused.status_code in (401, 404), (path, refused.status_code)
            assert "import" not in refused.text
        assert 401 == http.get("/models").status_code
        assert 403 == http.get("/", headers={"host": "rebound.example"}).status_code


def test_with_a_token_the_page_asks_once(browser: Any, origin: tuple[Origin, bytes],
                                         tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with page_daemon(browser, tmp_path / "d", origin,
                     server={"token_file": str(token_file)}) as daemon:
        check_the_page_over_http(daemon)
        browser.get(daemon.url + "/")
        form = browser.find_element(By.ID, "token-form")
        wait("the token question", form.is_displayed)
        assert row(browser, "tiny") is None  # nothing is shown without the token

        def answer(token: str) -> None:
            browser.find_element(By.ID, "token").send_keys(token)
            form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

        answer("not-" + TOKEN)  # a wrong token: asked again, with the reason
        refusal = browser.find_element(By.ID, "token-error")
        wait("the refusal", lambda: "not accepted" in refusal.text)
        assert form.is_displayed() and row(browser, "tiny") is None
        refused = severe_console_entries(browser)  # Chromium logs the 401 itself, nothing else
        assert refused and all(" 401 " in e["message"] for e in refused), refused
        answer(TOKEN)
        wait("the model's row", lambda: state(browser, "tiny") == "absent")
        assert not form.is_displayed()

        # Cancel once bytes arrived, then resume: the partial is kept and the bar ends at 100 %.
        click(browser, "tiny", "download")
        wait("the first bytes", lambda: (bar_value(browser, "tiny") or 0) > 0)
        click(browser, "tiny", "cancel")
        wait("the partial to be offered for resuming",
             lambda: button(browser, "tiny", "download").text == "Resume")
        assert "absent" == state(browser, "tiny")
        daemon.wait_for("download_cancelled", model="tiny")
        download_from_the_page(browser, daemon)  # the progress WebSocket carries the token too
        browser.refresh()  # kept for the tab: not asked again
        wait("the model's row", lambda: state(browser, "tiny") == "downloaded")
        assert not browser.find_element(By.ID, "token-form").is_displayed()
        assert [] == severe_console_entries(browser)
