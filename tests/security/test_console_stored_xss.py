"""Stored XSS in the console (`/ui`), in a real headless Chromium: markup in every string a
client (or a key's holder) controls that reaches a page - a requested model name (kept for
a refused request), a request's tags, its `x-request-id` (the correlation id), a managed
key's user and team — is shown as text on every page that shows it (tables, the request
detail, the keys panel), never parsed as markup; and the console's pages carry a CSP
without inline script and refuse framing (a second line of defence, checked here too).

The console builds its DOM with text nodes only (`dom.js`); this proves it end to end, so
that a page drawn later with `innerHTML` fails here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import requests

from tests.ui.conftest import need_browser
from tests.ui.harness import HELLO, TOKENS, Console, config_data
from tests.ui.test_console import sign_in

# Each would run script (or at least create an element) if a page parsed it as markup.
IMG = '<img src=x id=xss-img onerror="window.__xss=1">'
SVG = '"><svg id=xss-svg onload="window.__xss=2"></svg>'
MODEL = "m" + IMG
TEAM = "t" + SVG
USER = "u</td><script id=xss-script>window.__xss=3</script>"
MARKUP_IDS = ("xss-img", "xss-svg", "xss-script")


class _KeysConsole(Console):
    """The console's harness with managed keys on (keys created through `/admin/keys`)."""

    def start(self) -> Console:
        import asyncio

        import yaml

        urls = {}
        for name, bg in self.upstreams.items():
            bg.start()
            urls[name] = bg.server.url
        data = config_data(urls, self.workdir / "ledger.db", self.with_keys)
        data["governance"] = {"managed_keys": True}
        self.config_path.write_text(yaml.safe_dump(data))
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(30)
        return self


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Console, str]]:
    """The console's proxy, with a refused request for a model named with markup, a managed
    key whose user and team are markup, and a request by that key with markup in its tags
    and its x-request-id. Yields the console and the refused request's id."""
    need_browser()
    c = _KeysConsole(Path(tmp_path_factory.mktemp("xss"))).start()
    try:
        admin = {"Authorization": f"Bearer {TOKENS['admin']}"}
        made = requests.post(c.url + "/admin/keys", json={"user": USER, "team": TEAM}, headers=admin, timeout=10)
        assert made.status_code in (200, 201), made.text
        secret = made.json()["secret"]
        with openai.OpenAI(base_url=c.url + "/v1", api_key=secret, max_retries=0, timeout=20) as cl:
            headers = {"x-edgeroute-tags": "a" + IMG, "x-request-id": "rid" + SVG}
            cl.chat.completions.create(model="m", messages=HELLO, extra_headers=headers)
            with contextlib.suppress(openai.NotFoundError):
                cl.chat.completions.create(model=MODEL, messages=HELLO)
        c._wait_written(2)
        found = requests.get(c.url + "/admin/requests", params={"model": MODEL}, headers=admin, timeout=10).json()
        assert found["data"], "the refused request is in the request log"
        yield c, found["data"][0]["id"]
    finally:
        c.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need_browser()
    from tests.ui.browser import start_browser

    drv = start_browser()
    try:
        yield drv
    finally:
        drv.quit()


def _assert_text_only(drv: Any, *shown: str) -> None:
    from selenium.webdriver.common.by import By

    assert drv.execute_script("return window.__xss === undefined"), "a payload ran"
    for el_id in MARKUP_IDS:
        assert not drv.find_elements(By.ID, el_id), f"markup from a client became an element: #{el_id}"
    text = drv.find_element(By.ID, "main").text
    for s in shown:
        assert s in text, f"{s!r} is not shown as text"


def test_client_markup_is_text_on_every_page(browser: Any, hostile: tuple[Console, str]) -> None:
    from tests.ui.browser import console_errors, navigate

    console, refused = hostile
    sign_in(browser, console, "admin")
    console_errors(browser)  # only what the pages below log
    pages = [
        ("requests", (MODEL,)),
        ("requests/" + refused, (MODEL,)),
        ("overview", ()),
        ("spend", ()),
        ("routing", ()),
        ("deployments", ()),
        ("alerts", ()),
        ("config", (USER, TEAM)),
    ]
    for hash_, shown in pages:
        navigate(browser, lambda h=hash_: browser.get(console.url + "/ui/#/" + h))
        _assert_text_only(browser, *shown)
    # The tagged request, by the key with markup in its name: its detail shows tags and
    # correlation id as text.
    tagged = requests.get(
        console.url + "/admin/requests",
        params={"team": TEAM},
        headers={"Authorization": f"Bearer {TOKENS['admin']}"},
        timeout=10,
    ).json()["data"]
    # The key's refused request (its unknown model) is the team's too, and newer: the answered one.
    tagged = [r for r in tagged if r["status"] == 200]
    assert tagged, "the tagged request is in the log"
    navigate(browser, lambda: browser.get(console.url + "/ui/#/requests/" + tagged[0]["id"]))
    _assert_text_only(browser, "a" + IMG, TEAM)
    # A CSP violation (something tried to run inline) would be logged at SEVERE.
    errors = [e for e in console_errors(browser) if "Content Security Policy" in e.get("message", "")]
    assert not errors, errors


async def test_console_pages_forbid_inline_script_and_framing(hostile: tuple[Console, str]) -> None:
    console, _ = hostile
    async with aiohttp.ClientSession() as s:
        for path in ("/ui/", "/ui/static/app.js", "/ui/session"):
            async with s.get(console.url + path) as r:
                assert r.status == 200
                csp = r.headers["Content-Security-Policy"]
                directives = dict([*d.strip().split(" ", 1), ""][:2] for d in csp.split(";"))
                assert directives["script-src"] == "'self'" and "unsafe" not in csp
                assert directives["frame-ancestors"] == "'none'" and r.headers["X-Frame-Options"] == "DENY"
                assert directives["default-src"] == "'none'"
                assert "set-cookie" not in r.headers  # no ambient credential for a cross-site request to ride on
