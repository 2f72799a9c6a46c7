"""The shadow log (`learning.shadow_log`) follows the request log's content policy.

Content is private by default: the request log stores no prompt or answer unless
`request_log.log_content` (or `content_models`, `content_keys`) says `redacted` or `full`.
The shadow log wrote both answers of every mirrored pair whatever that policy said (only
credentials redacted), so a model repeating its prompt put the client's text in a file the
operator had been promised held none. Now `none` keeps each answer's length and how the two
compare, `redacted` masks PII and credentials, `full` credentials only; a pair takes the more
private of its primary's and its mirror's settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson

from tests.conftest import eventually, shadow_config

EMAIL = "marta.kowalska@example.org"
SECRET = "sk-proj-Zq8vN3kL0pR7tY2wX5cB9mJ4"
PROMPT = f"mail {EMAIL} key {SECRET}"
FREE = {"input_per_mtok": 0, "output_per_mtok": 0}
PRIVATE_TOKEN = "tok-private-7d1e2f9a"
AUDITOR_TOKEN = "tok-auditor-3c8b5e1d"


async def _pair(start_upstream: Any, start_proxy: Any, tmp_path: Path, request_log: dict[str, Any], token: str) -> Any:
    up = await start_upstream()
    log = tmp_path / "shadow.jsonl"
    proxy = await start_proxy(
        shadow_config(
            up.base_url,
            FREE,
            keys={"private": {"token": PRIVATE_TOKEN}, "auditor": {"token": AUDITOR_TOKEN}},
            request_log=request_log,
            learning={"shadow_log": str(log)},
        )
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0)
    got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}])
    await client.close()
    assert EMAIL in (got.choices[0].message.content or "")  # the premise: the model repeats its prompt

    async def logged() -> list[Any]:
        return [orjson.loads(line) for line in log.read_bytes().splitlines()] if log.exists() else []

    (pair,) = await eventually(logged, "the pair in the shadow log")
    return pair, log.read_text(), got.choices[0].message.content


async def test_with_content_off_the_shadow_log_keeps_no_prompt_or_answer(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    pair, text, answer = await _pair(start_upstream, start_proxy, tmp_path, {}, PRIVATE_TOKEN)
    assert EMAIL not in text and "kowalska" not in text and "You said" not in text, text
    assert pair["content"] == "none"
    for side in ("primary", "shadow"):
        assert pair[side]["status"] == 200 and pair[side]["answer"] is None, pair
        assert pair[side]["answer_chars"] > len(EMAIL), pair
    assert pair["primary"]["answer_chars"] == len(answer)
    assert pair["same_answer"] is False and 0 < pair["word_overlap"] < 1, pair  # "Hello from <model>" differs


async def test_a_key_held_to_redacted_gets_its_pii_masked_in_the_shadow_log(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    log = {"log_content": "full", "content_keys": {"private": "redacted"}}
    pair, text, _ = await _pair(start_upstream, start_proxy, tmp_path, log, PRIVATE_TOKEN)
    assert EMAIL not in text and SECRET not in text, text
    assert pair["content"] == "redacted"
    for side in ("primary", "shadow"):
        assert "[PII:email]" in pair[side]["answer"], pair


async def test_the_more_private_of_the_primary_and_its_mirror_holds(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    log = {"log_content": "full", "content_models": {"s": "none"}}
    pair, text, _ = await _pair(start_upstream, start_proxy, tmp_path, log, AUDITOR_TOKEN)
    assert EMAIL not in text and pair["content"] == "none", text
    assert pair["primary"]["answer"] is None and pair["shadow"]["answer"] is None


async def test_full_keeps_both_answers_with_credentials_redacted(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    log = {"content_keys": {"auditor": "full"}}
    pair, text, _ = await _pair(start_upstream, start_proxy, tmp_path, log, AUDITOR_TOKEN)
    assert SECRET not in text and pair["content"] == "full"
    assert EMAIL in pair["primary"]["answer"] and EMAIL in pair["shadow"]["answer"], pair
