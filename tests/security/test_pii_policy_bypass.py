"""Policy bypass: personal data in a field the core did not read reached a deployment the rules forbid.

On `/v1/responses`, `/v1/completions`, `/v1/embeddings` and `/v1/messages` the core decides on
a routing body (the chat translation, or one user turn of the request's text), while the
deployment that serves the request natively gets the client's body as sent. Whatever the
routing body left out was never seen by the PII rule: `instructions` and `tools` of a
Responses request that has no chat translation, a completions `suffix`, an embeddings `user`,
the thinking blocks, `metadata` and unknown fields of a Messages request passed through to
Anthropic. Each carried an e-mail or a card number to the public deployment.

A real proxy with mock upstreams, the official SDKs as clients: the same request without
personal data goes to the public deployment (cheapest first), with it to the private one.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock
from tests.test_pii_everywhere import PII_STAYS_PRIVATE

__all__ = ["start_mock"]

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.co.uk"


async def _proxy(start_mock: Any, start_proxy: Any, kind: str) -> tuple[str, Any, Any]:
    public = await start_mock(kind, record=True)
    private = await start_mock(kind, record=True)
    cfg = provider_config({"pub": public, "priv": private})
    cfg["deployments"]["d-priv"]["tags"] = ["privacy:high"]
    # Lowest cost first: without personal data the cheap public deployment serves, every time.
    cfg["deployments"]["d-priv"]["price"] = {"input_per_mtok": 10.0, "output_per_mtok": 20.0}
    cfg["models"]["m"] = {"deployments": ["d-pub", "d-priv"], "strategy": "lowest_cost"}
    cfg["rules"] = [PII_STAYS_PRIVATE]
    proxy = await start_proxy(cfg)
    return proxy.url, public, private


def _served_privately(headers: Any, public: Any, private: Any) -> None:
    assert not public.options.requests, "personal data reached the public deployment"
    assert headers["x-edgeroute-deployment"] == "d-priv"
    assert headers["x-edgeroute-rule"] == "pii-stays-private"
    assert len(private.options.requests) == 1


# Each: the request without personal data, and the same with it where the routing body did not look.
RESPONSES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # `reasoning` has no chat translation: the routing body held `input` alone.
    "instructions_untranslatable": (
        {"input": "hi", "reasoning": {"effort": "low"}, "instructions": "Be brief."},
        {"input": "hi", "reasoning": {"effort": "low"}, "instructions": f"Customer: {EMAIL}"},
    ),
    "metadata": ({"input": "hi", "metadata": {"k": "v"}}, {"input": "hi", "metadata": {"customer": EMAIL}}),
    "tools_untranslatable": (
        {"input": "hi", "tools": [{"type": "web_search"}]},
        {
            "input": "hi",
            "tools": [
                {"type": "web_search"},
                {"type": "function", "name": "pay", "description": f"pays {CARD}", "parameters": {}},
            ],
        },
    ),
}


@pytest.mark.parametrize("place", sorted(RESPONSES))
async def test_responses_pii_outside_the_translation_goes_to_the_private_deployment(
    start_mock: Any, start_proxy: Any, place: str
) -> None:
    url, public, private = await _proxy(start_mock, start_proxy, "openai")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    clean, personal = RESPONSES[place]
    raw = await client.responses.with_raw_response.create(model="m", **clean)
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"
    public.options.requests.clear()
    raw = await client.responses.with_raw_response.create(model="m", **personal)
    _served_privately(raw.headers, public, private)


async def test_completions_suffix_with_pii_goes_to_the_private_deployment(start_mock: Any, start_proxy: Any) -> None:
    url, public, private = await _proxy(start_mock, start_proxy, "openai")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    raw = await client.completions.with_raw_response.create(model="m", prompt="Dear", suffix="Regards")
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"
    public.options.requests.clear()
    raw = await client.completions.with_raw_response.create(model="m", prompt="Dear", suffix=f"Reply to {EMAIL}")
    _served_privately(raw.headers, public, private)
    assert private.options.requests[0]["body"]["suffix"] == f"Reply to {EMAIL}"


async def test_embeddings_user_with_pii_goes_to_the_private_deployment(start_mock: Any, start_proxy: Any) -> None:
    url, public, private = await _proxy(start_mock, start_proxy, "openai")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    raw = await client.embeddings.with_raw_response.create(model="m", input=["hello"], user="u-1")
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"
    public.options.requests.clear()
    raw = await client.embeddings.with_raw_response.create(model="m", input=["hello"], user=EMAIL)
    _served_privately(raw.headers, public, private)


def _thinking(text: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Pay the invoice."},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": text, "signature": "c2ln"},
                {"type": "text", "text": "Paid."},
            ],
        },
        {"role": "user", "content": "Thanks."},
    ]


# Each makes the request one the chat translation would lose something of: passed through as sent.
MESSAGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "thinking_block": (
        {"messages": _thinking("The user wants to pay.")},
        {"messages": _thinking(f"The card is {CARD}.")},
    ),
    "metadata": (
        {"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "u1", "note": "x"}},
        {"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "u1", "note": EMAIL}},
    ),
    "unknown_field": (
        {"messages": [{"role": "user", "content": "hi"}], "extra_body": {"container": "c-1"}},
        {"messages": [{"role": "user", "content": "hi"}], "extra_body": {"container": f"c-1 {EMAIL}"}},
    ),
}


@pytest.mark.parametrize("place", sorted(MESSAGES))
async def test_messages_pii_in_passed_through_fields_goes_to_the_private_deployment(
    start_mock: Any, start_proxy: Any, place: str
) -> None:
    url, public, private = await _proxy(start_mock, start_proxy, "anthropic")
    client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
    clean, personal = MESSAGES[place]
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, **clean)
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"
    public.options.requests.clear()
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, **personal)
    _served_privately(raw.headers, public, private)


# Personal data as people type or paste it: the ASCII patterns did not read it; the model does.
_WIDE = {c: c + 0xFEE0 for c in range(0x21, 0x7F)}  # an input method's full-width forms
_ARABIC_INDIC = {0x30 + d: 0x0660 + d for d in range(10)}


def _digits(zero: int) -> dict[int, int]:
    """ASCII digits to those of the script whose zero is `zero`."""
    return {0x30 + d: zero + d for d in range(10)}


UNICODE_FORMS = {
    "full_width_card": "\u30ab\u30fc\u30c9 " + CARD.translate(_WIDE),
    "nbsp_card": CARD.replace(" ", "\u00a0"),  # pasted from a web page
    "thin_space_card": CARD.replace(" ", "\u202f"),
    "full_width_at": EMAIL.replace("@", "@".translate(_WIDE)),
    "zero_width_in_email": EMAIL.replace("@", "@\u200b"),
    "arabic_indic_ssn": "SSN " + "078-05-1120".translate(_ARABIC_INDIC),
    # Found by a red team (session 35, redP F3, F4): characters Unicode draws as nothing, and
    # plain formats the patterns did not know.
    "bidi_marks_in_card": "card 4111\u200e1111\u200f1111\u061c1111",
    "bidi_embedding_in_card": "card \u202a4111 1111 1111 1111\u202c",
    "variation_selector_in_email": EMAIL.replace("example", "exa\ufe0fmple"),
    "tag_character_in_email": EMAIL.replace("example", "exa\U000e0020mple"),
    "invisible_operator_in_email": EMAIL.replace("example", "exa\u2062mple"),
    "e164_phone": "call me at +14155550132",
    "french_phone": "appelez le +33 1 23 45 67 89",
    "spaced_ssn": "SSN 078 05 1120",
    # Session 36: card groups split otherwise than by one space or hyphen (a JSON `\n` escape
    # from a pasted multi-line card), digits of other scripts, internationalised e-mail
    # domains and the small at sign, IBANs in lower case, national phones after a phone word.
    "newline_split_card": "My card:\n4111\n1111\n1111\n1111\nexp 12/29",
    "tab_split_card": "card\t4111\t1111\t1111\t1111",
    "dotted_card": "card 4111.1111.1111.1111",
    "slashed_card": "card 4111/1111/1111/1111",
    "math_bold_card": "card " + CARD.translate({0x30 + d: 0x1D7CE + d for d in range(10)}),
    "double_struck_card": "card " + CARD.translate({0x30 + d: 0x1D7D8 + d for d in range(10)}),
    "devanagari_card": "\u0915\u093e\u0930\u094d\u0921 " + CARD.translate({0x30 + d: 0x0966 + d for d in range(10)}),
    "bengali_card": "card " + CARD.translate({0x30 + d: 0x09E6 + d for d in range(10)}),
    "idn_email": "write to jane@b\u00fccher.de",
    "cjk_idn_email": "write to jane@\u4f8b\u3048.jp",
    "small_at_email": "write to " + EMAIL.replace("@", "\ufe6b"),
    "lower_case_iban": "my iban is de89 3704 0044 0532 0130 00",
    "announced_national_phone": "call me at 03012345678",
    "mobile_national_phone": "My mobile number is 4155550132.",
    # Session 37: digits of plane 1's scripts, the ideographic and half-width full stops as a
    # domain's dot, e-mail addresses with a non-ASCII local part (EAI), IBANs in mixed case.
    "adlam_card": "card " + CARD.translate(_digits(0x1E950)),
    "osmanya_phone": "call +1 415 555 0132".translate(_digits(0x104A0)),
    "brahmi_iban": "IBAN GB82 WEST 1234 5698 7654 32".translate(_digits(0x11066)),
    "nyiakeng_puachue_hmong_card": "card " + CARD.translate(_digits(0x1E140)),
    "ideographic_full_stop_email": "write to jane@example\u3002com",
    "half_width_full_stop_email": "write to jane@example\uff61com",
    "eai_latin_email": "write to jos\u00e9@example.com",
    "eai_cjk_email": "\u8bf7\u53d1\u5230 \u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a",
    "mixed_case_iban": "my iban is GB82 west 1234 5698 7654 32",
    # redP F1: prose after a data URL's head, which made the whole string read as a payload.
    "data_url_prefix": "data:text/plain;base64,SGk= my card is 4111 1111 1111 1111 and my e-mail "
    + EMAIL
    + ". Please help me pay. "
    + "Thanks a lot. " * 20,
}


@pytest.mark.parametrize("form", sorted(UNICODE_FORMS))
async def test_pii_in_unicode_forms_goes_to_the_private_deployment(
    start_mock: Any, start_proxy: Any, form: str
) -> None:
    url, public, private = await _proxy(start_mock, start_proxy, "openai")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "\u30ab\u30fc\u30c9 " + "1234".translate(_WIDE)}]
    )
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"
    public.options.requests.clear()
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": UNICODE_FORMS[form]}]
    )
    _served_privately(raw.headers, public, private)


# Ordinary prompts that hold numbers, code and emoji but no personal data: the PII rule must
# not take them for any (they would all go to the private deployment, at its price).
ORDINARY = {
    "numbers_in_prose": "In 2024 we shipped 4521 orders, v1.2.3 on 2024.05.01; "
    "order 4155550132 and ticket 03012345678.",
    "number_column": "totals:\n1200\n3400\n5600\n7800\n9100",
    "code": "for i in range(1000000000):\n    x = i * 1234567890  # de89 mp3 h264\n",
    "emoji": "\U0001f680\U0001f600 \u2705 \U0001f44d\U0001f3fd \U0001f1e9\U0001f1ea "
    "2024 \U0001d7cf\U0001d7d0 \u0967\u0968",
    "call_without_number": "Call the function twice; the phone is on the desk, version 1.2.",
    # An @-mention in Chinese prose, plane-1 digits that are no number of a person.
    "cjk_mention": "\u8c22\u8c22@\u5c0f\u660e\u3002\u660e\u5929\u89c1\uff01 \U0001e951\U0001e952\U0001e953 2024",
}


@pytest.mark.parametrize("text", sorted(ORDINARY))
async def test_ordinary_prompts_stay_on_the_public_deployment(start_mock: Any, start_proxy: Any, text: str) -> None:
    url, public, private = await _proxy(start_mock, start_proxy, "openai")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": ORDINARY[text]}]
    )
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"
    assert "x-edgeroute-rule" not in raw.headers
    assert len(public.options.requests) == 1 and not private.options.requests
