"""Headless Chromium from the distribution, driven by Selenium through the system chromedriver.

Selenium Manager is never asked for a driver (it would try the network): the driver's path
is given explicitly. `chromium_paths()` is None when either is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "ui-screenshots"
DESKTOP = (1280, 900)
PHONE = (390, 844)


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_browser(width: int = DESKTOP[0], height: int = DESKTOP[1]) -> WebDriver:
    paths = chromium_paths()
    assert paths is not None, "chromium and chromedriver are needed"
    browser, driver = paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    drv.set_page_load_timeout(30)
    return drv


def console_errors(drv: WebDriver) -> list[dict[str, Any]]:
    """Entries at SEVERE (errors, failed loads, CSP violations) in the browser's log since the last call."""
    return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]


def wait_idle(drv: WebDriver, timeout: float = 10.0) -> None:
    """Until the page's sections have finished loading (no "Loading…" left)."""

    def idle(d: WebDriver) -> bool:
        main = d.find_element(By.ID, "main")
        return "Loading" not in main.text and bool(main.find_elements(By.TAG_NAME, "h1"))

    WebDriverWait(drv, timeout, poll_frequency=0.02).until(idle)


_MARK_TITLE = "const t = document.getElementById('page-title'); if (t) t.dataset.left = '1';"
_NEW_TITLE = "const t = document.getElementById('page-title'); return !!t && !t.dataset.left;"


def navigate(drv: WebDriver, go: Callable[[], object], timeout: float = 10.0) -> None:
    """`go()` (a click, a `get`), then until the *next* page has drawn and finished loading.

    A change of the URL's fragment is handled by the console on a later event-loop turn, so
    right after it the previous page is still there, already loaded: waiting only for "no
    Loading left" could read the previous page (as it did on a busy machine). The current
    title is marked first; the page that `go()` leads to draws a title without the mark."""
    drv.execute_script(_MARK_TITLE)
    go()
    WebDriverWait(drv, timeout, poll_frequency=0.02).until(lambda d: d.execute_script(_NEW_TITLE))
    wait_idle(drv, timeout)


def set_width(drv: WebDriver, width: int, height: int) -> None:
    """The viewport as a device of that size (a window cannot be made phone-narrow)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700}
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def screenshot(drv: WebDriver, name: str) -> Path:
    """A full-page screenshot (the viewport grows to the page's height for the shot)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    w = int(drv.execute_script("return window.innerWidth"))
    h0 = int(drv.execute_script("return window.innerHeight"))
    h = drv.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    set_width(drv, w, min(int(h) + 40, 6000))
    drv.save_screenshot(str(path))
    set_width(drv, w, h0)
    return path
