"""Fixtures for the console's tests: one proxy with known traffic and one browser per module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui.harness import Console, Traffic


def need_browser() -> None:
    """Skip (locally) or fail (in CI) when the browser stack is missing."""
    try:
        import selenium  # noqa: F401

        from tests.ui.browser import chromium_paths
    except ImportError:
        paths = None
    else:
        paths = chromium_paths()
    if paths is None:
        why = "chromium, chromium-driver (Debian packages) and selenium are needed for the browser tests"
        if os.environ.get("CI") == "true":
            pytest.fail(why + "; .ci/run installs them")
        pytest.skip(why)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Console, Traffic]]:
    c = Console(Path(tmp_path_factory.mktemp("console"))).start()
    try:
        yield c, c.send_traffic()
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
