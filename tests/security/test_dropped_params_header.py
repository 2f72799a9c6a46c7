"""`x-edgeroute-dropped-params` names the fields an Anthropic request lost on its way to a
deployment that cannot honour them (`unsupported_params: drop`), and those include any field
the client made up: its name went into the header as written. A name holding a line break
(`"x\\r\\nSet-Cookie: a=b"`) made aiohttp refuse the header after the upstream had answered
(and been paid): a JSON answer's connection was dropped without a response, a stream was a
500 with a traceback in the log. A name outside ASCII went out as raw UTF-8, and a long one
as long as the client liked. Names are now percent-encoded where they are not plain tokens,
and the header is bounded (what does not fit is left out, `...` said)."""

from __future__ import annotations

import urllib.parse
from typing import Any

import anthropic
import pytest

from tests.security.conftest import Served

ODD = ("x\r\nSet-Cookie: a=b", "tab\there", "日本", "del\x7f")
LONG = "p" * 20_000


def _config(base_url: str) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 1}
    return {
        "providers": {"a": {"base_url": base_url, "api_key": "k", "options": {"unsupported_params": "drop"}}},
        "deployments": {"d": {"provider": "a", "model": "x", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_made_up_field_names_are_named_safely_in_the_header(
    start_upstream: Any, serve: Any, stream: bool
) -> None:
    up = await start_upstream(record=True)
    proxy: Served = await serve(_config(up.base_url))
    extra = {**{name: 1 for name in ODD}, LONG: 1, "top_k": 3}
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        raw = await client.messages.with_raw_response.create(
            model="m",
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_body=extra,
            stream=stream,  # type: ignore[call-overload]
        )
        if stream:
            events = [ev.type async for ev in await raw.parse()]
            assert events[-1] == "message_stop"
        else:
            assert (await raw.parse()).content[0].type == "text"
    assert raw.status_code == 200
    assert "set-cookie" not in raw.headers
    shown = raw.headers["x-edgeroute-dropped-params"]
    assert shown.isascii() and shown.isprintable() and len(shown) <= 1024, shown[:200]
    names = [urllib.parse.unquote(n) for n in shown.split(",")]
    assert "top_k" in names and set(ODD) <= set(names)
    assert shown.endswith(",...")  # the long name is left out, and that is said
    assert not set(extra) & set(up.options.requests[-1]["body"])  # dropped on the way
