"""A chat turn naming a spoken answer's audio by its id (`{"role": "assistant", "audio": {"id":
...}}`) makes the provider read the stored clip again, billed as prompt (audio) tokens each time
it is named; none of it is in the request's text. Admission reserved nothing for it: a team with
a $0.50 budget sent one request naming its own clip 50 times and spent $100. Each audio id is
now bound with its clip's size (the answer's `completion_tokens_details.audio_tokens`), and a
request's prompt counts the size once per reference before the decision, so budgets and token
limits reserve for it. A clip of unknown size (every clip without virtual keys, which bind
nothing; an id bound by an earlier release) is reserved at the audio allowance: the
deployment's `media_tokens.audio`, else 1,000 tokens.

The client is the official openai SDK; the bundled OpenAI mock keeps each spoken answer and
bills it as OpenAI does (its clip among the answer's completion tokens, then among the prompt
tokens of each request naming it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import eventually, simple_config
from tests.test_cost_support import budget_spent, cost_proxy, statuses_of

ADMIN, APP, LIMITED = "sk-audio-admin", "sk-audio-app", "sk-audio-limited"
LIMIT = 0.05  # USD, at $1 a million tokens: 50,000 tokens
CLIP = 12_000  # the mock's 12-word spoken answer, at 1,000 audio tokens a word
TPM = 30_000
_SPEAK: dict[str, Any] = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}


def _config(up: Any, tmp_path: Path, keyed: bool = True) -> dict[str, Any]:
    cfg = simple_config({"a": up}, ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05})
    cfg["providers"]["a"]["kind"] = "openai"
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 1.0, "output_per_mtok": 1.0}
    budget: dict[str, Any] = {"name": "b", "scope": "team", "match": "t", "limit_usd": LIMIT, "period": "day"}
    if keyed:
        cfg["keys"] = {
            "app": {"token": APP, "team": "t"},
            "limited": {"token": LIMITED, "team": "u", "limits": {"tpm": TPM}},
            "ops": {"token": ADMIN, "role": "admin"},
        }
    else:
        budget = {"name": "b", "scope": "global", "limit_usd": LIMIT, "period": "day"}
    cfg["budgets"] = {"limits": [budget]}
    return cfg


def _client(url: str, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)


async def _clip(client: openai.AsyncOpenAI, stream: bool) -> str:
    """A spoken answer's audio id, from a JSON answer or a stream's deltas."""
    messages: Any = [{"role": "user", "content": "speak"}]
    if not stream:
        done = await client.chat.completions.create(model="m", messages=messages, **_SPEAK)
        assert done.choices[0].message.audio is not None
        return str(done.choices[0].message.audio.id)
    ids: set[str] = set()
    events = await client.chat.completions.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True}, **_SPEAK
    )
    async for chunk in events:
        audio: Any = getattr(chunk.choices[0].delta, "audio", None) if chunk.choices else None
        if (aid := audio.get("id") if isinstance(audio, dict) else getattr(audio, "id", None)) is not None:
            ids.add(str(aid))
    return ids.pop()


def _naming(client: openai.AsyncOpenAI, aid: str, times: int) -> Any:
    """A request whose history names the clip `times` times (each read, and billed, again)."""
    turns: Any = [{"role": "assistant", "audio": {"id": aid}}] * times
    messages: Any = [{"role": "user", "content": "speak"}, *turns, {"role": "user", "content": "again?"}]
    return client.chat.completions.create(model="m", messages=messages, max_tokens=5)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_audio_named_by_id_is_reserved_against_budgets(stream: bool, start_upstream: Any, tmp_path: Path) -> None:
    """$0.012 spent on the clip; each request naming it three times is billed $0.036: the
    $0.05 budget holds one of them, however many are sent at once."""
    up = await start_upstream(audio_tokens_per_word=1000, latency_ms=300)
    async with cost_proxy(_config(up, tmp_path)) as proxy:
        async with _client(proxy.url, APP) as client:
            aid = await _clip(client, stream)
            statuses = await statuses_of(lambda: _naming(client, aid, 3), n=5)
        spent = await budget_spent(proxy.url, ADMIN)
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget ({statuses})"
    assert statuses == [200, 429, 429, 429, 429], statuses


async def test_audio_named_by_id_is_counted_against_token_limits(start_upstream: Any, tmp_path: Path) -> None:
    """Three readings of a 12,000-token clip pass a 30,000-token minute; one does not."""
    up = await start_upstream(audio_tokens_per_word=1000)
    async with cost_proxy(_config(up, tmp_path)) as proxy:
        async with _client(proxy.url, LIMITED) as client:
            aid = await _clip(client, False)  # 12,000 tokens of the key's minute: 18,000 left
            with pytest.raises(openai.RateLimitError):
                await _naming(client, aid, 3)
            said = await _naming(client, aid, 1)
    assert said.usage is not None and said.usage.prompt_tokens > CLIP  # the provider billed the clip


@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "bound-before-sizes"])
async def test_a_clip_of_unknown_size_is_reserved_at_the_audio_allowance(
    keyed: bool, start_upstream: Any, tmp_path: Path
) -> None:
    """Without a size (no virtual keys bind none; an id bound by an earlier release), each
    reference is reserved at the deployment's `media_tokens.audio` (20,000 tokens here: $0.02):
    three do not fit the $0.05 budget, one does."""
    up = await start_upstream(audio_tokens_per_word=1000)
    cfg = _config(up, tmp_path, keyed)
    cfg["deployments"]["d-a"]["media_tokens"] = {"audio": 20_000}
    async with cost_proxy(cfg) as proxy:
        async with _client(proxy.url, APP) as client:
            aid = await _clip(client, False)
            if keyed:
                with sqlite3.connect(tmp_path / "l.db") as db:
                    db.execute("UPDATE gov_response_owners SET tokens = NULL")
            with pytest.raises(openai.RateLimitError):
                await _naming(client, aid, 3)
            said = await _naming(client, aid, 1)
    assert said.choices[0].message.content is not None and "The audio said" in said.choices[0].message.content


async def test_a_shadow_mirror_counts_the_audio_it_names(start_upstream: Any, start_proxy: Any, tmp_path: Path) -> None:
    """A mirror of a chat naming a clip is read again by its provider, clip and all: its
    deployment's provider TPM (10,000) counted the text alone, and the mirror of a 12,000-token
    prompt was sent to it."""
    up = await start_upstream(audio_tokens_per_word=1000)
    candidate = await start_upstream(record=True)
    cfg = _config(up, tmp_path)
    cfg["providers"]["s"] = {"base_url": candidate.base_url, "api_key": "key-s"}
    cfg["deployments"]["d-s"] = cfg["deployments"]["d-a"] | {"provider": "s"}
    cfg["models"] = {
        "speaker": {"deployments": ["d-a"]},  # the clip is made unmirrored
        "m": {"deployments": ["d-a"], "shadow": {"model": "s", "percent": 100}},
        "s": {"deployments": ["d-s"]},
    }
    cfg["rate_limits"] = {"deployments": {"d-s": {"tpm": 10_000}}}
    proxy = await start_proxy(cfg)
    async with _client(proxy.url, APP) as client:
        spoken = await client.chat.completions.create(
            model="speaker", messages=[{"role": "user", "content": "speak"}], **_SPEAK
        )
        assert spoken.choices[0].message.audio is not None
        messages: Any = [
            {"role": "user", "content": "speak"},
            {"role": "assistant", "audio": {"id": spoken.choices[0].message.audio.id}},
            {"role": "user", "content": "again?"},
        ]
        said = await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    assert said.usage is not None and said.usage.prompt_tokens > CLIP  # the primary's provider read the clip

    async def mirrored() -> bool:
        return any(r.outcome == "shadow" for r in proxy.recorder.records)

    await eventually(mirrored, "the mirror recorded (sent or passed over)")
    assert candidate.options.requests == [], "a 12,000-token mirror was sent to a deployment of 10,000 a minute"
