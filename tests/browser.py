"""Headless Chromium for the tests that browse the MLflow UI: the driver, and the few things they do with a page."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
Q = "?workflowType=machine_learning"  # SPEC: every UI link opens the "Model training" view
PAGE_TIMEOUT_S = 180  # the UI is a React app that loads its data after the page: the machine may be slow
PAGE_LOADS = 2  # tries per page: the time above is shared between them


def need_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        message = (f"no browser to drive: {', '.join(missing)} missing "
                   "(apt-get install chromium chromium-driver; .ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: a missing browser there is a broken setup, not a skip
        pytest.skip(message)


def ui_chromium():
    """Headless Chromium for the MLflow UI on 127.0.0.1 (never through a proxy), 1500 x 1000."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    need_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1500,1000", "--lang=en-US", "--no-proxy-server"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # Debian's driver: no download
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    return driver


class Browser:
    """The few things the tests do with a page: open it, wait for text, find, screenshot."""

    def __init__(self, driver, base: str, shots: Path) -> None:
        self.driver, self.base, self.shots = driver, base, shots
        self.assistant_closed = False
        self.failures = 0

    def open(self, path: str, *texts: str) -> str:
        """Go to a page of the UI and wait until it shows every one of `texts`; returns its text."""
        assert path.endswith(Q) or Q + "&" in path, path
        for attempt in range(PAGE_LOADS):
            self.driver.get("about:blank")  # a new hash alone would not load the page anew
            self.driver.get(self.base + path)
            last = attempt == PAGE_LOADS - 1
            # On a busy machine the app's first data request can stall: load the page again once.
            page = self.wait_for(*texts, timeout=PAGE_TIMEOUT_S / PAGE_LOADS, fail=last)
            if page is not None:
                break
        if not self.assistant_closed:  # MLflow opens its assistant panel on a first visit: close it once
            from selenium.webdriver.common.by import By

            for button in self.driver.find_elements(By.CSS_SELECTOR,
                                                    "[data-component-id='mlflow.assistant.chat_panel.close']"):
                if button.is_displayed():
                    button.click()
            self.assistant_closed = True
        return page

    def text(self) -> str:
        return self.driver.execute_script("return document.body ? document.body.innerText : ''")

    def wait_for(self, *texts: str, timeout: float = PAGE_TIMEOUT_S, fail: bool = True) -> str | None:
        """Wait until the page shows every one of `texts`; returns the page's text (None on timeout
        when not `fail`)."""
        deadline = time.monotonic() + timeout
        while True:
            page = self.text()
            missing = [t for t in texts if t not in page]
            if not missing:
                return page
            if time.monotonic() > deadline:
                if not fail:
                    return None
                self.fail(f"{self.driver.current_url} does not show {missing} after {timeout:.0f}s; "
                          f"it shows:\n{page[-3000:]}")
            time.sleep(0.5)

    def wait_until(self, condition, what: str, timeout: float = PAGE_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"{self.driver.current_url}: {what} after {timeout:.0f}s")
            time.sleep(0.5)

    def show_charts(self, search: str, *texts: str) -> None:
        """Type `search` into the metric charts' search box (only the charts on screen are drawn),
        then wait for `texts` and for a drawn line."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(search or Keys.BACKSPACE)
        self.wait_for(*texts)
        self.wait_until(lambda: self.driver.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace path"),
                        f"no line drawn for {search!r}")

    def fail(self, message: str):
        self.failures += 1
        path = self.shots / f"FAILED-{self.failures}.png"
        self.driver.save_screenshot(str(path))
        raise AssertionError(f"{message}\n(screenshot: {path})")

    def shot(self, name: str) -> Path:
        time.sleep(1)  # let charts finish drawing
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 0
        return path
