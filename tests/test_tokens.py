"""Token counts of the Rust core against tiktoken.

``Router.count_tokens`` must equal ``len(tiktoken.encode_ordinary(text))`` for
``o200k_base`` and ``cl100k_base`` on any text, and the prompt tokens of a
decision must equal OpenAI's cookbook formulas (``num_tokens_from_messages``,
and ``num_tokens_for_tools`` for tool definitions) computed with tiktoken.
tiktoken's vocabularies are loaded offline by ``edgeroute.bench.core_bench.tiktoken_encoding``
(hash-checked by tiktoken itself).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeroute._core import BadRequestError, Router
from edgeroute.bench.core_bench import tiktoken_encoding

ENCODINGS = ("o200k_base", "cl100k_base")

try:
    TIKTOKEN = {name: tiktoken_encoding(name) for name in ENCODINGS}
except Exception as e:  # no network and no cargo registry copy of the vocabularies
    pytest.skip(f"tiktoken vocabularies unavailable: {e}", allow_module_level=True)

FRAGMENTS = [
    "Hello, world!",
    " the",
    "don't",
    "I'LL",
    "we've",
    "   ",
    "\n",
    "\r\n",
    "\n\n\n",
    "\t\t",
    "  \n  ",
    " \u00a0 ",
    "1234567890",
    "3.14159",
    "naïve café",
    "Straße",
    "東京タワー",
    "数据模型",
    "Привет мир",
    "مرحبا",
    "🚀",
    "👩‍👩‍👧‍👦",
    "🇫🇷",
    "e\u0301",
    "def f(x):\n    return x ** 2\n",
    'fn main() { println!("{}", 1); }',
    "SELECT * FROM t WHERE a = 'b';",
    '{"key": [1, 2, {"nested": null}]}',
    "<div class='x'>&amp;</div>",
    "https://example.com/path?q=1&r=2",
    "<|endoftext|>",
    "////",
    "...!!!???",
    # Where the pre-tokenisation regexes' alternatives meet (the Rust splitter is hand-written).
    "HTTPServer's xmlHttp DON'T I'\u017f",
    "ǅungla ǅUNGLA ʰA",
    "e\u0301\u0301 \u0301x !\u0301",
    "٣٤٥٦ ²³ 12345",
    "a!\n/b a//\n/",
    "x\u2028y \u3000\u3000z \u0085\u0085w \x0bv",
    "a  \n  b   ",
]

# Any text but lone surrogates (which cannot cross into Rust as str).
any_text = st.text(st.characters(codec="utf-8"), max_size=300)
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
mixed_text = st.lists(st.one_of(any_text, st.sampled_from(FRAGMENTS)), max_size=12).map("".join)
whitespace_text = st.text(st.sampled_from(" \t\n\r\u00a0\u3000x"), max_size=60)
texts = st.one_of(any_text, fragment_text, mixed_text, whitespace_text)


def tiktoken_count(text: str, encoding: str) -> int:
    return len(TIKTOKEN[encoding].encode_ordinary(text))


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_count_tokens_equals_tiktoken(encoding: str, text: str) -> None:
    assert Router.count_tokens(text, encoding) == tiktoken_count(text, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_fixed_corpus(encoding: str) -> None:
    for text in ["", " ", "hello world", *FRAGMENTS]:
        assert Router.count_tokens(text, encoding) == tiktoken_count(text, encoding), repr(text)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_long_documents(encoding: str) -> None:
    body = json.loads(_bench_body())
    prose = "\n".join(m["content"] for m in body["messages"])
    doc = (prose + "\n\n" + "".join(FRAGMENTS)) * 20  # ~250 kB of mixed prose, code and scripts
    assert Router.count_tokens(doc, encoding) == tiktoken_count(doc, encoding)
    runs = "a" + " " * 10_000 + "b" + "\n" * 5_000 + "9" * 3_001
    assert Router.count_tokens(runs, encoding) == tiktoken_count(runs, encoding)


def test_unknown_encoding_is_a_bad_request() -> None:
    with pytest.raises(BadRequestError):
        Router.count_tokens("x", "p50k_base")


def test_estimates_scale_openai_counts() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 50
    assert Router.count_tokens(text, "claude_estimate") == -(-tiktoken_count(text, "cl100k_base") * 115 // 100)
    assert Router.count_tokens(text, "gemini_estimate") == -(-tiktoken_count(text, "o200k_base") * 105 // 100)


# ------------------------------------------------------------ chat formulas


def _bench_body() -> bytes:
    from edgeroute.bench.core_bench import _load

    return _load("chat_2k.json")


ROUTER = Router(
    json.dumps(
        {
            "deployments": [
                {"name": "o200k", "provider": "openai", "model": "gpt-4o"},
                {"name": "cl100k", "provider": "openai", "model": "gpt-4"},
            ],
            "models": [
                {"name": "o200k_base", "deployments": ["o200k"]},
                {"name": "cl100k_base", "deployments": ["cl100k"]},
            ],
        }
    ).encode()
)


def num_tokens_from_messages(messages: list[dict[str, str]], encoding: str) -> int:
    """OpenAI cookbook, "How to count tokens with tiktoken"."""
    tokens_per_message, tokens_per_name = 3, 1
    num_tokens = 0
    for message in messages:
        num_tokens += tokens_per_message
        for key, value in message.items():
            num_tokens += tiktoken_count(value, encoding)
            if key == "name":
                num_tokens += tokens_per_name
    num_tokens += 3  # every reply is primed with <|start|>assistant<|message|>
    return num_tokens


def num_tokens_for_tools(functions: list[dict[str, Any]], encoding: str) -> int:
    """OpenAI cookbook's ``num_tokens_for_tools`` (gpt-4o constants for o200k_base,
    gpt-4/gpt-3.5-turbo ones for cl100k_base), without the messages part."""
    func_init = 7 if encoding == "o200k_base" else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    count = 0
    if functions:
        for f in functions:
            count += func_init
            function = f["function"]
            f_desc = function["description"]
            if f_desc.endswith("."):
                f_desc = f_desc[:-1]
            count += tiktoken_count(function["name"] + ":" + f_desc, encoding)
            properties = function["parameters"]["properties"]
            if len(properties) > 0:
                count += prop_init
                for key, prop in properties.items():
                    count += prop_key
                    if "enum" in prop:
                        count += enum_init
                        for item in prop["enum"]:
                            count += enum_item + tiktoken_count(item, encoding)
                    p_desc = prop["description"]
                    if p_desc.endswith("."):
                        p_desc = p_desc[:-1]
                    count += tiktoken_count(f"{key}:{prop['type']}:{p_desc}", encoding)
        count += func_end
    return count


short_text = st.one_of(any_text, fragment_text).filter(lambda s: len(s) < 200)
names = st.from_regex(r"[a-zA-Z0-9_-]{1,20}", fullmatch=True)


@st.composite
def message(draw: st.DrawFn) -> dict[str, str]:
    m = {"role": draw(st.sampled_from(["system", "user", "assistant", "developer"])), "content": draw(short_text)}
    if draw(st.booleans()):
        m["name"] = draw(names)
    return m


@st.composite
def tool(draw: st.DrawFn) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for key in draw(st.lists(names, max_size=4, unique=True)):
        p: dict[str, Any] = {
            "type": draw(st.sampled_from(["string", "integer", "number", "boolean"])),
            "description": draw(short_text),
        }
        if draw(st.booleans()):
            p["enum"] = draw(st.lists(short_text, min_size=1, max_size=4))
        props[key] = p
    return {
        "type": "function",
        "function": {
            "name": draw(names),
            "description": draw(short_text),
            "parameters": {"type": "object", "properties": props, "required": list(props)[:1]},
        },
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(message(), min_size=1, max_size=6), ascii_json=st.booleans())
def test_chat_count_equals_cookbook(encoding: str, messages: list[dict[str, str]], ascii_json: bool) -> None:
    body = json.dumps({"model": encoding, "messages": messages}, ensure_ascii=ascii_json).encode()
    d = ROUTER.decide(body, exact_tokens=True)
    assert d.encoding == encoding
    assert d.prompt_tokens == num_tokens_from_messages(messages, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(message(), min_size=1, max_size=3), tools=st.lists(tool(), max_size=4))
def test_tools_count_equals_cookbook(
    encoding: str, messages: list[dict[str, str]], tools: list[dict[str, Any]]
) -> None:
    body = json.dumps({"model": encoding, "messages": messages, "tools": tools}).encode()
    expected = num_tokens_from_messages(messages, encoding) + num_tokens_for_tools(tools, encoding)
    assert ROUTER.decide(body, exact_tokens=True).prompt_tokens == expected


def test_bench_body_matches_cookbook() -> None:
    body = json.loads(_bench_body())
    msgs = [{k: v for k, v in m.items() if k in ("role", "content", "name")} for m in body["messages"]]
    d = ROUTER.decide(json.dumps({**body, "model": "o200k_base"}).encode(), exact_tokens=True)
    assert d.prompt_tokens == num_tokens_from_messages(msgs, "o200k_base")


def test_deciding_on_estimates_loads_no_vocabulary() -> None:
    """A decision that needs no exact count must not build a tokenizer's lookup tables
    (~14 MB, tens of ms on the event loop); counting does, and no more than that (the
    vocabulary itself is static data in the library, shared between processes). Run in a
    fresh process, where nothing is loaded yet."""
    script = """
import json
from edgeroute import _core
def rss_mb(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
cfg = {
    "deployments": [{"name": "d", "provider": "p", "model": "gpt-4o"}],
    "models": [{"name": "m", "deployments": ["d"]}],
}
r = _core.Router(json.dumps(cfg).encode())
body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 2000}]}).encode()
before = rss_mb()
d = r.decide(body)
assert not d.tokens_exact
after_decide = rss_mb()
r.count_tokens("hello", "o200k_base")
print(json.dumps([after_decide - before, rss_mb() - after_decide]))
"""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    decide_mb, count_mb = json.loads(out.stdout)
    assert decide_mb < 10, f"deciding grew RSS by {decide_mb:.0f} MB"
    assert count_mb > 5, f"counting grew RSS by only {count_mb:.0f} MB: is the vocabulary measured at all?"
    assert count_mb < 30, f"counting grew RSS by {count_mb:.0f} MB: the tables should be a few MB"
