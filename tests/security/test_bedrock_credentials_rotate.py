"""Bedrock credentials given as `file:` references (`options.aws_access_key_id`,
`aws_secret_access_key`, `aws_session_token`: short-lived STS credentials an agent rewrites)
were read once when the config loaded: after the files changed, requests went on being signed
with the old ones (a 403 from AWS once the session token expired) until a reload. They are
read per request now, as a provider's `api_key` is, and the new values are secrets at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes, eventually
from tests.test_cost_support import cost_proxy

OLD = ("AKIAOLDOLDOLDOLD0001", "oldSecretKey0000000000000000000000000000", "OLDsessionTOKENold0123456789")
NEW = ("AKIANEWNEWNEWNEW0002", "newSecretKey1111111111111111111111111111", "NEWsessionTOKENnew9876543210")
NAMES = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


class _Bedrock:
    """Answers Converse; remembers the key id and session token each request was signed with.
    Asked to `echo`, its 400 quotes the request's headers (a proxy in front of Bedrock)."""

    def __init__(self) -> None:
        self.signed: list[tuple[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        key_id = auth.split("Credential=", 1)[-1].split("/", 1)[0]
        self.signed.append((key_id, request.headers.get("X-Amz-Security-Token", "")))
        if body["messages"][-1]["content"][0]["text"] == "echo":
            quoted = orjson.dumps({str(k): v for k, v in request.headers.items()}).decode()
            return web.json_response({"message": f"Malformed input request, headers: {quoted}"}, status=400)
        message = {"role": "assistant", "content": [{"text": "hi"}]}
        usage = {"inputTokens": 1, "outputTokens": 1}
        return web.json_response({"output": {"message": message}, "stopReason": "end_turn", "usage": usage})


def _write(files: dict[str, Path], values: tuple[str, str, str]) -> None:
    for name, value in zip(NAMES, values, strict=True):
        staged = files[name].with_suffix(".new")
        staged.write_text(value + "\n")
        staged.replace(files[name])  # as an agent (Vault's, Kubernetes') replaces a mounted file


async def test_bedrock_file_credentials_are_rotated_without_a_reload(serve_routes: ServeRoutes, tmp_path: Path) -> None:
    bedrock = _Bedrock()
    up = await serve_routes(web.post("/model/{model}/{action}", bedrock.handle))
    files = {name: tmp_path / name for name in NAMES}
    _write(files, OLD)
    options: dict[str, Any] = {"region": "us-east-1", **{name: f"file:{files[name]}" for name in NAMES}}
    cfg = {
        "providers": {"aws": {"kind": "bedrock", "base_url": up.url, "options": options}},
        "deployments": {"d": {"provider": "aws", "model": "anthropic.claude-3-haiku", "price": {"input_per_mtok": 1}}},
        "models": {"m": {"deployments": ["d"]}},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        try:

            async def signed_with() -> tuple[str, str]:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                return bedrock.signed[-1]

            assert await signed_with() == (OLD[0], OLD[2])
            _write(files, NEW)

            async def rotated() -> bool:
                return await signed_with() == (NEW[0], NEW[2])

            await eventually(rotated, "requests signed with the rotated credentials", within=15, every=0.3)
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "echo"}])
            said = e.value.response.text
            assert "Security-Token" in said, said  # the upstream's words reached the client, the new token did not
            assert NEW[2] not in said and NEW[0] not in said, said
        finally:
            await client.close()
