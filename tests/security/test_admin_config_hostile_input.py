"""Hostile input to the config admin API: YAML aliases that expand exponentially, a value
that contains itself, nesting past Python's recursion limit, version numbers past 64 bits.

`POST /admin/config/check` takes a YAML text from any key of role viewer (a dashboard's).
Aliases share one parsed node, but the loader walked every path through them to note where
each value is: nine aliases to nine aliases ..., six levels deep (288 bytes) took a second
and 250 MB, seven levels nine seconds and 2 GB, and eight would exhaust the host's memory.
A value that contains itself (`a: &a [*a]`) or a few thousand `[` were a RecursionError,
a 500 with a traceback. Now each is the text's problem, named in the answer (`ok: false`),
as it is in a config file at a reload; a version number past 64 bits is a 404, not a 500
(SQLite cannot hold it).
"""

from __future__ import annotations

import resource
from typing import Any

import aiohttp
import pytest

from tests.conftest import simple_config


def _laughs(levels: int, width: int = 9) -> str:
    lines = ["l0: &l0 [x]"]
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


async def _check(s: aiohttp.ClientSession, url: str, text: str) -> dict[str, Any]:
    async with s.post(url + "/admin/config/check", data=text.encode()) as r:
        assert r.status == 200, await r.text()
        got: dict[str, Any] = await r.json()
        return got


async def test_config_check_refuses_yaml_that_aliases_expand(start_upstream: Any, start_proxy: Any) -> None:
    proxy = await start_proxy(simple_config({"a": await start_upstream()}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with aiohttp.ClientSession() as s:
        got = await _check(s, proxy.url, _laughs(6))  # 590,000 values from 288 bytes
        assert not got["ok"]
        assert any("alias" in e for e in got["errors"]), got["errors"]
        # A config that uses aliases as people do (shared defaults) is still fine.
        ok = await _check(s, proxy.url, "x: &d {a: 1}\n" + "".join(f"y{i}: *d\n" for i in range(100)))
        assert not any("alias" in e for e in ok["errors"]), ok["errors"]
    # The check did not grow the process by the hundreds of megabytes a walk of every path takes.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024


@pytest.mark.parametrize(
    "text, says",
    [("a: &a [1, *a]\n", "contain itself"), ("a: " + "[" * 5000 + "\n", "nested too deeply")],
    ids=["recursive_alias", "deep_nesting"],
)
async def test_config_check_names_a_recursive_or_too_deep_text(
    start_upstream: Any, start_proxy: Any, text: str, says: str
) -> None:
    proxy = await start_proxy(simple_config({"a": await start_upstream()}))
    async with aiohttp.ClientSession() as s:
        got = await _check(s, proxy.url, text)
    assert not got["ok"] and any(says in e for e in got["errors"]), got["errors"]


async def test_version_numbers_past_64_bits_are_unknown_versions(start_upstream: Any, start_proxy: Any) -> None:
    proxy = await start_proxy(simple_config({"a": await start_upstream()}))
    huge = str(2**63)
    async with aiohttp.ClientSession() as s:
        for method, path, body in [
            ("GET", f"/admin/config/versions/{huge}", None),
            ("GET", f"/admin/config/diff?from={huge}", None),
            ("GET", f"/admin/config/diff?from=1&to={huge}", None),
            ("POST", "/admin/config/rollback", f'{{"version": {huge}}}'.encode()),
            ("POST", "/admin/config/rollback", b'{"version": 18446744073709551615}'),
        ]:
            async with s.request(method, proxy.url + path, data=body) as r:
                err = (await r.json())["error"]
                assert (r.status, err["code"]) == (404, "version_not_found"), (path, body, err)
        async with s.get(proxy.url + "/admin/config/versions/1") as r:
            assert r.status == 200
