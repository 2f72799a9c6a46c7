"""The shadow log (`learning.shadow_log`) with the redaction layer: answers it keeps are
stored as the request log stores them, credentials replaced.

A model repeats what it is sent: a key pasted into a prompt comes back in the answer. The
request log stores answers through the redaction layer ("no token or provider key is ever
stored"); the shadow log wrote both answers of each pair, primary and mirror, as they came.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson

from tests.conftest import eventually, shadow_config

SECRET = "sk-proj-Zq8vN3kL0pR7tY2wX5cB9mJ4"
FREE = {"input_per_mtok": 0, "output_per_mtok": 0}


async def test_the_shadow_log_stores_answers_with_credentials_redacted(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    log = tmp_path / "shadow.jsonl"
    proxy = await start_proxy(
        shadow_config(up.base_url, FREE, request_log={"log_content": "full"}, learning={"shadow_log": str(log)})
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"key {SECRET} ok"}])
    await client.close()
    assert SECRET in (got.choices[0].message.content or "")  # the premise: the model repeats it

    async def logged() -> list[Any]:
        return [orjson.loads(line) for line in log.read_bytes().splitlines()] if log.exists() else []

    (pair,) = await eventually(logged, "the pair in the shadow log")
    assert SECRET not in log.read_text()
    for side in ("primary", "shadow"):
        assert pair[side]["status"] == 200 and "[REDACTED]" in pair[side]["answer"], pair
