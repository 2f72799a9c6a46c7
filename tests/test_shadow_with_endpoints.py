"""Shadow mirrors (`shadow:`) of every generation endpoint: `/v1/responses`, `/v1/messages`
passed through to an Anthropic deployment, and legacy `/v1/completions`, JSON and streamed.

Only chat completions (and Messages translated to chat) were mirrored: a route with
`shadow: {percent: 100}` used through these endpoints sent its candidate nothing, and the
shadow log and the ledger stayed empty, with no sign why. Each mirror now reaches the
candidate's deployment in the format it speaks (the endpoint's own, or its translation),
asks for JSON, is paid and recorded like a chat mirror, and never touches the client's
answer. One its deployment cannot take faithfully (a completion to Anthropic) is skipped and
counted, never sent as another request. The proxy is the real app on edgeroute's HTTP
server, the clients the official SDKs, the upstreams the bundled mocks of each wire format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from edgeroute import cli
from edgeroute.shadow_log import SHADOW_LOG
from tests.conftest import eventually
from tests.metrics_support import scrape
from tests.providers_fixtures import comparable, start_mock
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]

KEY = "sk-shadowall-client-7f3a9c"  # the client's key: it must never reach an upstream
ADMIN = "sk-shadowall-ops-5b21"
PRIVATE = {"x-client-private": "hush-4411"}  # a client's own header: neither
BETA = "extended-cache-ttl-2025-04-11"
CENT = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.01}
QUARTER = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.25}
SAY = [{"role": "user", "content": "tell me a joke"}]


@dataclass
class Mocks:
    po: Any  # the primaries: OpenAI (Responses, completions) and Anthropic (Messages)
    pa: Any
    so: Any  # the candidates' deployments: OpenAI (also behind a `drop` provider) and Anthropic
    sa: Any


def _config(m: Mocks, shadow: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Models `{primary}-to-{target}` (shadowed to `s-{target}`) and `{primary}-plain` (the same
    deployment, no shadow), for primary openai|anthropic and target openai|anthropic|drop."""
    providers = {
        "po": {"kind": "openai", "base_url": m.po.base_url, "api_key": "key-po"},
        "pa": {"kind": "anthropic", "base_url": m.pa.base_url, "api_key": "key-pa"},
        "so": {"kind": "openai", "base_url": m.so.base_url, "api_key": "key-so"},
        "sod": {
            "kind": "openai", "base_url": m.so.base_url, "api_key": "key-so", "options": {"unsupported_params": "drop"}
        },
        "sa": {"kind": "anthropic", "base_url": m.sa.base_url, "api_key": "key-sa"},
    }  # fmt: skip
    deployments = {
        "d-po": {"provider": "po", "model": "gpt-4o-mini", "price": CENT},
        "d-pa": {"provider": "pa", "model": "claude-haiku-4-5", "price": CENT},
        "d-so": {"provider": "so", "model": "gpt-4o", "price": QUARTER},
        "d-sod": {"provider": "sod", "model": "gpt-4o", "price": QUARTER},
        "d-sa": {"provider": "sa", "model": "claude-sonnet-4-5", "price": QUARTER},
    }
    models: dict[str, Any] = {"s-openai": {"deployments": ["d-so"]}, "s-anthropic": {"deployments": ["d-sa"]}}
    models["s-drop"] = {"deployments": ["d-sod"]}
    for primary, dep in (("openai", "d-po"), ("anthropic", "d-pa")):
        models[f"{primary}-plain"] = {"deployments": [dep]}
        for target in ("openai", "anthropic", "drop"):
            settings = {"model": f"s-{target}", "percent": 100, **(shadow or {})}
            models[f"{primary}-to-{target}"] = {"deployments": [dep], "shadow": settings}
    cfg = {
        "providers": providers,
        "deployments": deployments,
        "models": models,
        "keys": {"client": {"token": KEY}, "ops": {"token": ADMIN, "role": "admin"}},
    }
    cfg.update(extra)
    return cfg


async def _mocks(start_mock: Any, **shadow_options: Any) -> Mocks:
    return Mocks(
        await start_mock("openai", record=True),
        await start_mock("anthropic", record=True),
        await start_mock("openai", record=True, **shadow_options),
        await start_mock("anthropic", record=True, **shadow_options),
    )


@dataclass
class Answer:
    request_id: str
    text: str
    shape: Any  # the answer without ids and timestamps (JSON), or the stream's event kinds


_VOLATILE = {"created_at", "id", "sequence_number", "item_id", "created"}


def _shape(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_shape(v) for v in obj]
    return obj


async def ask(url: str, endpoint: str, model: str, stream: bool, **extra: Any) -> Answer:
    """One request as a user's SDK sends it; the answer as that user reads it."""
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, default_headers=PRIVATE)
    claude = anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0, default_headers=PRIVATE)
    if endpoint == "responses":
        raw: Any = await oai.responses.with_raw_response.create(
            model=model, input="tell me a joke", stream=stream, **extra
        )
        got = raw.parse()
        if not stream:
            return Answer(raw.headers["x-request-id"], got.output_text, _shape(comparable(got.model_dump())))
        events = [ev async for ev in got]
        text = "".join(ev.delta for ev in events if ev.type == "response.output_text.delta")
        return Answer(raw.headers["x-request-id"], text, [ev.type for ev in events])
    if endpoint == "completions":
        raw = await oai.completions.with_raw_response.create(
            model=model, prompt="Say this is a test", max_tokens=30, stream=stream
        )
        got = raw.parse()
        if not stream:
            return Answer(raw.headers["x-request-id"], got.choices[0].text, _shape(comparable(got.model_dump())))
        chunks = [c async for c in got]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return Answer(raw.headers["x-request-id"], text, [c.choices[0].finish_reason for c in chunks if c.choices])
    if endpoint == "messages":  # top_k and a beta header: only Anthropic understands them (passed through)
        raw = await claude.messages.with_raw_response.create(
            model=model, max_tokens=100, messages=SAY, stream=stream, extra_body={"top_k": 5},  # type: ignore[arg-type]
            extra_headers={"anthropic-beta": BETA},
        )  # fmt: skip
        got = await raw.parse()  # anthropic: an async response
        if not stream:
            return Answer(raw.headers["x-request-id"], got.content[0].text, _shape(comparable(got.model_dump())))
        events = [ev async for ev in got]
        text = "".join(
            ev.delta.text for ev in events if ev.type == "content_block_delta" and ev.delta.type == "text_delta"
        )
        return Answer(raw.headers["x-request-id"], text, [ev.type for ev in events])
    assert endpoint == "chat"
    raw = await oai.chat.completions.with_raw_response.create(model=model, messages=SAY)  # type: ignore[arg-type]
    got = raw.parse()
    return Answer(raw.headers["x-request-id"], got.choices[0].message.content or "", None)


def _sent(mock: Any) -> list[dict[str, Any]]:
    """What an upstream was sent, headers by lower-case name."""
    return [{**r, "headers": {k.lower(): v for k, v in r["headers"].items()}} for r in mock.options.requests]


async def _mirror_of(proxy: Any, rid: str) -> Any:
    async def seen() -> Any:
        return next((r for r in proxy.recorder.records if r.shadow_of == rid), None)

    return await eventually(seen, f"the mirror of {rid}", within=15)


# (endpoint, primary, target): the mirror goes to the target's deployment in its own format.
MIRRORED = [
    ("responses", "openai", "openai"),  # a Responses request, as it is
    ("responses", "openai", "anthropic"),  # translated: chat, then Anthropic's Messages
    ("messages", "anthropic", "anthropic"),  # passed through: top_k and the beta header kept
    ("messages", "anthropic", "drop"),  # to chat, without them, where the provider says `drop`
    ("completions", "openai", "openai"),  # a legacy completion, as it is
]


def _check_format(endpoint: str, target: str, sent: dict[str, Any]) -> None:
    """The candidate got a well-formed request of its own API, asking for JSON."""
    body, hdrs = sent["body"], sent["headers"]
    assert "stream" not in body and "stream_options" not in body, body
    if target == "anthropic":
        assert hdrs["x-api-key"] == "key-sa" and "anthropic-version" in hdrs
        assert body["model"] == "claude-sonnet-4-5" and isinstance(body["max_tokens"], int)
        assert body["messages"][0]["role"] == "user"
        if endpoint == "messages":  # passed through: the fields only Anthropic understands, kept
            assert body["top_k"] == 5 and hdrs["anthropic-beta"] == BETA
        return
    assert hdrs["authorization"] == "Bearer key-so" and body["model"] == "gpt-4o"
    if target == "drop":  # served through chat without what chat cannot carry
        assert "path" not in sent and body["messages"][-1] == {"role": "user", "content": "tell me a joke"}
        assert "top_k" not in body
    elif endpoint == "responses":
        assert sent["path"] == "/v1/responses" and body["input"] == "tell me a joke"
    else:
        assert sent["path"] == "/v1/completions" and body["prompt"] == "Say this is a test"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("endpoint", "primary", "target"), MIRRORED, ids=["-".join(c) for c in MIRRORED])
async def test_each_endpoint_is_mirrored_in_the_candidates_format(
    start_mock: Any, start_proxy: Any, endpoint: str, primary: str, target: str, stream: bool
) -> None:
    m = await _mocks(start_mock)
    # The pairs' answers are kept where the request log keeps content.
    proxy = await start_proxy(_config(m, request_log={"log_content": "full"}))
    shadow_mock = m.sa if target == "anthropic" else m.so
    # What a chat request's mirror sends this candidate: the headers an endpoint's may send.
    chat = await ask(proxy.url, "chat", f"{primary}-to-{target}", False)
    await _mirror_of(proxy, chat.request_id)
    chat_headers = set(_sent(shadow_mock)[-1]["headers"])
    shadow_mock.options.requests.clear()

    plain = await ask(proxy.url, endpoint, f"{primary}-plain", stream)
    got = await ask(proxy.url, endpoint, f"{primary}-to-{target}", stream)
    assert got.text and (got.text, got.shape) == (plain.text, plain.shape)  # the client's answer, untouched

    mirror = await _mirror_of(proxy, got.request_id)
    assert mirror.outcome == "shadow" and mirror.status == 200 and mirror.route == f"s-{target}"
    assert mirror.key == "client" and mirror.cost_usd == pytest.approx(0.25) and not mirror.stream
    assert [r.shadow_of for r in proxy.recorder.records if r.shadow_of] == [chat.request_id, got.request_id]
    (sent,) = _sent(shadow_mock)
    _check_format(endpoint, target, sent)
    # Nothing of the client's beyond what a chat mirror sends: not its key, not its own headers.
    hdrs = sent["headers"]
    assert KEY not in orjson.dumps(sent).decode() and "x-client-private" not in hdrs
    assert set(hdrs) - chat_headers <= ({"anthropic-beta"} if endpoint == "messages" else set())

    async def paired() -> dict[str, Any] | None:  # written after the mirror's record: polled
        return next((p for p in proxy.app[SHADOW_LOG].pairs if p["request_id"] == got.request_id), None)

    pair = await eventually(paired, f"the shadow pair of {got.request_id}", within=15)
    assert pair["primary"]["answer"] == got.text and pair["shadow"]["answer"]
    assert pair["shadow"]["route"] == f"s-{target}" and pair["shadow"]["status"] == 200


# (endpoint, primary, target, extra request fields): no faithful form of the request for the
# candidate's deployment.
SKIPPED = [
    ("completions", "openai", "anthropic", {}),  # Anthropic has no legacy completions
    ("messages", "anthropic", "openai", {}),  # top_k: the provider rejects what it cannot honour
    ("responses", "openai", "anthropic", {"tools": [{"type": "web_search_preview"}]}),  # no chat form
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("endpoint", "primary", "target", "extra"), SKIPPED, ids=["-".join(c[:3]) for c in SKIPPED])
async def test_a_mirror_without_a_faithful_form_is_skipped_and_counted(
    start_mock: Any,
    start_proxy: Any,
    caplog: pytest.LogCaptureFixture,
    endpoint: str,
    primary: str,
    target: str,
    extra: dict[str, Any],
    stream: bool,
) -> None:
    m = await _mocks(start_mock)
    proxy = await start_proxy(_config(m))
    plain = await ask(proxy.url, endpoint, f"{primary}-plain", stream, **extra)
    got = await ask(proxy.url, endpoint, f"{primary}-to-{target}", stream, **extra)
    assert got.text and (got.text, got.shape) == (plain.text, plain.shape)

    async def skipped() -> float:
        return (await scrape(proxy.url, ADMIN)).total(
            "edgeroute_shadow_skipped_total", route=f"{primary}-to-{target}", reason="untranslatable"
        )

    assert await eventually(skipped, "the skip counted") == 1
    assert _sent(m.sa) == [] and _sent(m.so) == []  # no request at all rather than a wrong one
    assert not [r for r in proxy.recorder.records if r.shadow_of]  # nothing sent, nothing spent
    (said,) = [r.getMessage() for r in caplog.records if r.name == "edgeroute.shadow"]
    assert f"route {primary}-to-{target} skipped (untranslatable" in said and f"s-{target}" in said


async def test_a_mirror_goes_to_the_candidate_deployment_that_can_read_it(start_mock: Any, start_proxy: Any) -> None:
    """A candidate route [chat deployment, Anthropic deployment] and a Messages request with
    `top_k`: the mirror was skipped as untranslatable when the chat one came first; it now goes
    to the Anthropic one, the chat one never called."""
    m = await _mocks(start_mock)
    cfg = _config(m)
    cfg["deployments"]["d-so"]["weight"] = 1000  # drawn first
    cfg["models"]["s-mixed"] = {"deployments": ["d-so", "d-sa"]}
    cfg["models"]["anthropic-to-mixed"] = {"deployments": ["d-pa"], "shadow": {"model": "s-mixed", "percent": 100}}
    proxy = await start_proxy(cfg)
    got = await ask(proxy.url, "messages", "anthropic-to-mixed", False)
    mirror = await _mirror_of(proxy, got.request_id)
    assert mirror.status == 200 and mirror.deployment == "d-sa" and mirror.skipped is not None
    (sent,) = _sent(m.sa)
    _check_format("messages", "anthropic", sent)
    assert _sent(m.so) == []


async def test_mirrors_are_in_the_ledger_spend_report_and_request_log(
    start_mock: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = await _mocks(start_mock)
    cfg = _config(m, ledger={"path": str(tmp_path / "ledger.db"), "flush_interval": 0.05})
    path = tmp_path / "edge.yaml"
    path.write_bytes(orjson.dumps(cfg))
    ids = []
    async with cost_proxy(cfg) as proxy:
        for endpoint, primary, target in MIRRORED[:1] + MIRRORED[2:3] + MIRRORED[4:]:
            for stream in (False, True):
                ids.append((await ask(proxy.url, endpoint, f"{primary}-to-{target}", stream)).request_id)

        async def mirrored() -> bool:
            headers = {"Authorization": f"Bearer {ADMIN}"}
            async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/spend?by=outcome", headers=headers) as r:
                rows = (await r.json())["rows"]
            return any(r["outcome"] == "shadow" and r["requests"] == 6 for r in rows)

        await eventually(mirrored, "six mirrors in the ledger")
    assert cli.main(["spend", "--config", str(path), "--by", "outcome", "--format", "json"]) == 0
    rows = {r["outcome"]: r for r in orjson.loads(capsys.readouterr().out)["rows"]}
    assert rows["shadow"]["requests"] == 6 and rows["shadow"]["cost_usd"] == pytest.approx(6 * 0.25)
    assert rows["ok"]["requests"] == 6 and rows["ok"]["cost_usd"] == pytest.approx(6 * 0.01)
    for rid in ids:
        assert cli.main(["logs", "--config", str(path), "--id", rid + "-shadow"]) == 0
        row = orjson.loads(capsys.readouterr().out)
        assert row["outcome"] == "shadow" and row["key"] == "client" and row["cost_usd"] == pytest.approx(0.25)
        assert row["deployment"] in ("d-so", "d-sa") and not row["stream"]


@pytest.mark.parametrize("trouble", ["slow", "failing"])
async def test_a_slow_or_failing_candidate_never_reaches_the_client(
    start_mock: Any, start_proxy: Any, trouble: str
) -> None:
    options = {"latency_ms": 2000} if trouble == "slow" else {"fail_status": 500}
    m = await _mocks(start_mock, **options)
    proxy = await start_proxy(_config(m))
    for endpoint, primary, target in MIRRORED:
        for stream in (False, True):
            plain = await ask(proxy.url, endpoint, f"{primary}-plain", stream)
            got = await ask(proxy.url, endpoint, f"{primary}-to-{target}", stream)
            assert (got.text, got.shape) == (plain.text, plain.shape)
            if trouble == "slow":  # answered while its mirror still waits for the candidate
                assert not any(r.shadow_of == got.request_id for r in proxy.recorder.records)
    mirrors = [await _mirror_of(proxy, r.request_id) for r in list(proxy.recorder.records) if "-to-" in r.model]
    assert len(mirrors) == 10 and all(r.outcome == "shadow" for r in mirrors)
    want = 200 if trouble == "slow" else 502  # the candidate's 500s, as the proxy answers every upstream failure
    assert {r.status for r in mirrors} == {want}, [(r.route, r.status) for r in mirrors]


async def test_mirrors_in_flight_are_bounded_per_route(start_mock: Any, start_proxy: Any) -> None:
    m = await _mocks(start_mock, latency_ms=3000)
    proxy = await start_proxy(_config(m, shadow={"max_in_flight": 1}))
    first = await ask(proxy.url, "responses", "openai-to-openai", False)

    async def sent() -> bool:
        return len(_sent(m.so)) == 1

    await eventually(sent, "the first mirror sent")
    for stream in (False, True):  # while it runs: skipped, counted
        await ask(proxy.url, "responses", "openai-to-openai", stream)
    metrics = await scrape(proxy.url, ADMIN)
    assert metrics.total("edgeroute_shadow_skipped_total", route="openai-to-openai", reason="busy") == 2
    await _mirror_of(proxy, first.request_id)
    # Once it has finished, the next one is mirrored again.
    again = await ask(proxy.url, "responses", "openai-to-openai", False)
    assert (await _mirror_of(proxy, again.request_id)).status == 200
    assert len(_sent(m.so)) == 2


@pytest.mark.parametrize(("endpoint", "primary", "target"), [MIRRORED[0], MIRRORED[2], MIRRORED[4]])
async def test_mirrors_keep_to_the_candidates_provider_limit_and_no_client_limit(
    start_mock: Any, start_proxy: Any, endpoint: str, primary: str, target: str
) -> None:
    """As chat's: no limit of the client's key counts a mirror, its deployment's provider limit does."""
    m = await _mocks(start_mock)
    cfg = _config(m, rate_limits={"deployments": {"d-so": {"rpm": 2}, "d-sa": {"rpm": 2}}})
    cfg["keys"]["client"]["limits"] = {"rpm": 4}  # its own four requests, not their mirrors too
    proxy = await start_proxy(cfg)
    for stream in (False, True, False, True):
        await ask(proxy.url, endpoint, f"{primary}-to-{target}", stream)

    async def recorded() -> bool:
        return sum(1 for r in proxy.recorder.records if r.outcome == "shadow") == 4

    await eventually(recorded, "four mirrors recorded (sent or passed over)")
    sent = _sent(m.sa if target == "anthropic" else m.so)
    assert len(sent) == 2, f"the candidate (2 a minute) was sent {len(sent)}"
    mirrors = [r for r in proxy.recorder.records if r.outcome == "shadow"]
    assert sorted(r.status for r in mirrors)[:2] == [200, 200] and sum(r.cost_usd for r in mirrors) == 0.5
