"""`document` blocks on `/v1/messages` (a PDF, plain text, content blocks, a URL, a Files API
file). Every one was refused ("blocks of type 'document' are not supported by edgeroute"), on
every deployment. An Anthropic deployment now gets them as sent, its usage priced; a chat
deployment gets a base64 PDF as a chat `file` part and a text document as text, and refuses by
name what only Anthropic reads (a URL it fetches, a Files API file) and, by its provider's rule,
`citations`. A PDF's pages are counted by `count_tokens` and reserved for by budgets."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import anthropic
import pytest

from edgeroute.cost import media
from edgeroute.mock.anthropic import FETCHED_TOKENS, PDF_PAGE_TOKENS
from tests.providers_fixtures import provider_config, start_mock
from tests.test_anthropic_with_budgets import downgrading_config
from tests.test_budget_media_parts import ADMIN, APP, _spent
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]


def pdf(pages: int) -> str:
    """A PDF of `pages` empty pages, base64 (its page tree and page objects, as a writer makes them)."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objs = [
        "1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj",
        f"2 0 obj << /Type /Pages /Kids [{kids}] /Count {pages} >> endobj",
        *(f"{3 + i} 0 obj << /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >> endobj" for i in range(pages)),
    ]
    return base64.b64encode(("%PDF-1.4\n" + "\n".join(objs) + "\n%%EOF\n").encode()).decode()


PDF3 = pdf(3)
PDF_DOC: Any = {
    "type": "document",
    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF3},
    "title": "report.pdf",
}
TEXT_DOC: Any = {
    "type": "document",
    "source": {"type": "text", "media_type": "text/plain", "data": "The grass is green."},
    "title": "Notes",
    "context": "Written by the gardener",
}
URL_DOC: Any = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
FILE_DOC: Any = {"type": "document", "source": {"type": "file", "file_id": "file_011abc"}}
ASK: Any = {"type": "text", "text": "Summarise these"}


def _turn(*blocks: Any) -> Any:
    return [{"role": "user", "content": [*blocks, ASK]}]


async def test_documents_reach_an_anthropic_deployment_as_sent(start_mock: Any, start_proxy: Any) -> None:
    up = await start_mock("anthropic", record=True)
    proxy = await start_proxy(provider_config({"a": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    cited = {**PDF_DOC, "citations": {"enabled": True}, "context": "Q3", "cache_control": {"type": "ephemeral"}}
    turn = _turn(cited, TEXT_DOC, URL_DOC, {"type": "document", "source": {"type": "content", "content": "Hi."}})
    said = await client.messages.create(model="m", max_tokens=20, messages=turn)
    assert said.content[0].type == "text" and said.content[0].text
    assert up.options.requests[-1]["body"]["messages"] == turn  # title, context, citations, cache_control kept
    rec = proxy.recorder.records[-1]
    # The provider's usage is the ledger's: the PDF's three pages and the fetched document priced.
    assert rec.usage is not None and rec.usage.prompt_tokens == said.usage.input_tokens
    assert said.usage.input_tokens > 3 * PDF_PAGE_TOKENS + FETCHED_TOKENS
    assert rec.cost_usd == pytest.approx((rec.usage.prompt_tokens * 1.0 + rec.usage.completion_tokens * 2.0) / 1e6)

    async with client.messages.stream(model="m", max_tokens=20, messages=turn) as s:
        final = await s.get_final_message()
    assert final.content[0].type == "text" and final.usage.output_tokens > 0
    assert up.options.requests[-1]["body"]["messages"] == turn
    rec = proxy.recorder.records[-1]
    assert rec.stream and rec.usage is not None and rec.usage.prompt_tokens > 3 * PDF_PAGE_TOKENS

    # Counted: a PDF's pages at a page of text's count, before anything is sent.
    asked = len(up.options.requests)
    with_pdf = await client.messages.count_tokens(model="m", messages=_turn(PDF_DOC))
    without = await client.messages.count_tokens(model="m", messages=_turn())
    assert 3 * 2_000 <= with_pdf.input_tokens - without.input_tokens <= 3 * 3_000
    await client.messages.count_tokens(model="m", messages=_turn(URL_DOC, FILE_DOC, TEXT_DOC))
    assert len(up.options.requests) == asked


async def test_a_chat_deployment_reads_a_pdf_and_text_documents(start_mock: Any, start_proxy: Any) -> None:
    up = await start_mock("openai", record=True)
    proxy = await start_proxy(provider_config({"o": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=_turn(PDF_DOC, TEXT_DOC))
    said = await raw.parse()
    assert said.content[0].type == "text" and said.usage.output_tokens > 0
    assert "x-edgeroute-dropped-params" not in raw.headers  # nothing was left out
    sent = up.options.requests[-1]["body"]["messages"]
    assert sent == [
        {
            "role": "user",
            "content": [
                {
                    "type": "file",
                    "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF3}"},
                },
                {"type": "text", "text": "Notes\nWritten by the gardener\n\n"},
                {"type": "text", "text": "The grass is green."},
                {"type": "text", "text": "Summarise these"},
            ],
        }
    ]
    async with client.messages.stream(model="m", max_tokens=20, messages=_turn(PDF_DOC)) as s:
        text = "".join([t async for t in s.text_stream])
    assert text and up.options.requests[-1]["body"]["messages"][0]["content"][0]["type"] == "file"
    rec = proxy.recorder.records[-1]
    assert rec.stream and rec.status == 200 and rec.usage is not None and rec.usage.completion_tokens > 0


@pytest.mark.parametrize("rule", ["reject", "drop"])
async def test_a_chat_deployment_refuses_what_only_anthropic_reads(
    start_mock: Any, start_proxy: Any, rule: str
) -> None:
    up = await start_mock("openai", record=True)
    proxy = await start_proxy(provider_config({"o": up}, options={"o": {"unsupported_params": rule}}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    for doc, why in [
        (URL_DOC, "a URL Anthropic fetches"),
        (FILE_DOC, "a file of Anthropic's Files API"),
    ]:
        for stream in (False, True):
            with pytest.raises(anthropic.BadRequestError) as refused:
                await client.messages.create(model="m", max_tokens=20, messages=_turn(TEXT_DOC, doc), stream=stream)
            assert refused.value.body == {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": f"The deployment `d-o` cannot read messages.0.content.1 (a document whose source is "
                    f"{why}: send it as base64 or text); only an Anthropic deployment can.",
                },
            }
    cited = {**PDF_DOC, "citations": {"enabled": True}}
    if rule == "reject":  # citations only Anthropic gives: by the provider's rule
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model="m", max_tokens=20, messages=_turn(cited))
        assert "`d-o` cannot honour citations" in refused.value.message
        assert up.options.requests == []
    else:
        raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=_turn(cited))
        assert raw.headers["x-edgeroute-dropped-params"] == "citations"
        assert up.options.requests[-1]["body"]["messages"][0]["content"][0]["type"] == "file"
        assert len(up.options.requests) == 1


def budget_config(up: Any, tmp_path: Path) -> dict[str, Any]:
    """Deployment `d-a` on `up` at $1 a million input tokens, team `t` (key `APP`) held to $0.10 a day."""
    cfg = provider_config({"a": up})
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 1.0, "output_per_mtok": 0}
    cfg |= {
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": 0.1, "period": "day"}]},
    }
    return cfg


async def test_a_budget_reserves_a_pdfs_pages(start_mock: Any, tmp_path: Path) -> None:
    """A PDF was reserved at 50,000 tokens whatever its pages: a hundred pages (220,000 tokens
    billed) passed a budget that holds a fifth of them. Its pages are reserved for now."""
    up = await start_mock("anthropic", record=True)
    cfg = budget_config(up, tmp_path)
    big = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf(100)}}
    async with cost_proxy(cfg) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=APP, max_retries=0) as client:
            with pytest.raises(anthropic.RateLimitError) as refused:
                await client.messages.create(model="m", max_tokens=5, messages=_turn(big))
            assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
            assert up.options.requests == []
            await client.messages.create(model="m", max_tokens=5, messages=_turn(PDF_DOC))  # 3 pages fit
        spent = await _spent(proxy.url)
    assert len(up.options.requests) == 1 and 0 < spent <= 0.1


async def test_a_downgrade_takes_a_document_a_chat_model_reads(start_mock: Any, tmp_path: Path) -> None:
    """A budget's downgrade left a request with a PDF on its Anthropic model, as one with fields
    only Anthropic honours: a chat model reads a base64 PDF, so it goes down; one by URL stays."""
    a = await start_mock("anthropic", record=True)
    o = await start_mock("openai", record=True)
    async with cost_proxy(downgrading_config(a, o, tmp_path)) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
            await client.messages.create(model="m", max_tokens=50, messages=_turn())  # crosses the threshold
            served = {}
            for name, doc in (("pdf", PDF_DOC), ("url", URL_DOC)):
                raw = await client.messages.with_raw_response.create(model="m", max_tokens=50, messages=_turn(doc))
                assert (await raw.parse()).content[0].type == "text"
                served[name] = raw.headers["x-edgeroute-deployment"]
    assert served == {"pdf": "d-o", "url": "d-a"}
    assert o.options.requests[-1]["body"]["messages"][0]["content"][0]["type"] == "file"


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
TOOL_TURNS: Any = [
    {"role": "user", "content": "Open the report and take a screenshot"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "screen", "input": {}}]},
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [
                    {"type": "text", "text": "Here it is"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    PDF_DOC,
                ],
            }
        ],
    },
]
SCREEN: Any = [{"name": "screen", "input_schema": {"type": "object"}}]


async def test_a_tool_result_with_an_image_or_a_document(start_mock: Any, start_proxy: Any) -> None:
    """A tool result holding an image (a computer use screenshot) or a document was refused
    ("only text blocks are supported here") even on an Anthropic deployment. It reaches one as
    sent; a chat deployment, whose tool messages hold text only, refuses it by name."""
    up = await start_mock("anthropic", record=True)
    proxy = await start_proxy(provider_config({"a": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    said = await client.messages.create(model="m", max_tokens=20, messages=TOOL_TURNS, tools=SCREEN)
    assert said.content and up.options.requests[-1]["body"]["messages"] == TOOL_TURNS
    assert said.usage.input_tokens > 3 * PDF_PAGE_TOKENS

    chat = await start_mock("openai", record=True)
    proxy = await start_proxy(provider_config({"o": chat}, options={"o": {"unsupported_params": "drop"}}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(model="m", max_tokens=20, messages=TOOL_TURNS, tools=SCREEN)
    assert refused.value.body["error"]["message"] == (  # type: ignore[index]
        "The deployment `d-o` cannot read messages.2.content.0 (a tool_result holding images or documents: a chat "
        "tool message holds text only); only an Anthropic deployment can."
    )
    assert chat.options.requests == []


@pytest.mark.parametrize("pad", range(0, 80, 9))
def test_a_large_pdfs_pages_are_counted_across_the_blocks_it_is_read_in(pad: int) -> None:
    """A PDF is decoded and searched a block at a time (the GIL let go between): a page object
    or `/Count` cut by a block's end is counted once."""
    filler = bytes(range(256)) * 4000  # no `/` followed by a letter in it
    page = b"%d 0 obj << /Type /Page /Parent 2 0 R >> endobj\n"
    body = b"".join(filler[: 786_380 + pad] + page % i for i in range(5))
    pdf = b"%PDF-1.4\n" + body + b"2 0 obj << /Type /Pages /Count 5 >> endobj\n"
    assert media.pdf_pages({"file_data": "data:application/pdf;base64," + base64.b64encode(pdf).decode()}) == 5
    assert media.pdf_pages({"file_data": "data:application/pdf;base64," + base64.b64encode(pdf + pdf).decode()}) == 10
