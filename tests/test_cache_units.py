"""The response cache's parts: keys, entries (stream folding and replay), stores."""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
import zlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute.cache import evaluate, shared_index
from edgeroute.cache.entry import (
    MAX_STORED_BYTES,
    Entry,
    _Replays,
    completion_from_json,
    completion_from_stream,
    replay_chunks,
)
from edgeroute.cache.key import KeyMemo, cache_key, is_deterministic
from edgeroute.cache.semantic import SemanticIndex, guards, split_last_user_turn
from edgeroute.cache.settings import SEMANTIC_THRESHOLD
from edgeroute.cache.stores import CacheCounters, MemoryStore, RedisStore
from tests.test_cost_support import require_redis

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_key_ignores_what_cannot_change_the_answer() -> None:
    base = cache_key(BODY, "route", "key:a")
    assert cache_key(BODY | {"stream": True, "stream_options": {"include_usage": True}}, "route", "key:a") == base
    assert cache_key(BODY | {"user": "u1", "metadata": {"x": 1}, "model": "alias"}, "route", "key:a") == base
    reordered = dict(reversed(list(BODY.items())))
    assert cache_key(reordered, "route", "key:a") == base


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "hi!"}]},
        {"temperature": 0.0001},
        {"seed": 1},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"max_tokens": 5},
        {"top_p": 0.5},
        {"n": 2},
    ],
)
def test_key_covers_what_determines_the_answer(change: dict[str, object]) -> None:
    assert cache_key(BODY | change, "route", "key:a") != cache_key(BODY, "route", "key:a")


def test_key_is_scoped_by_route_and_tenant() -> None:
    assert cache_key(BODY, "route", "key:a") != cache_key(BODY, "route", "key:b")
    assert cache_key(BODY, "route", "key:a") != cache_key(BODY, "other", "key:a")


def test_the_key_memo_gives_the_key_of_the_parsed_body_and_stays_bounded() -> None:
    memo = KeyMemo(max_entries=3, max_bytes=400, max_body=150)
    sampled = BODY | {"temperature": 0.5}
    for body in (BODY, sampled, dict(reversed(list(BODY.items())))):
        raw = orjson.dumps(body)
        for _ in range(2):  # computed, then remembered: the same answer
            assert memo.key(raw, "route", "key:a") == (cache_key(body, "route", "key:a"), is_deterministic(body))
        assert memo.key(raw, "route", "key:b") == (cache_key(body, "route", "key:b"), is_deterministic(body))
        assert memo.key(raw, "other", "key:a") == (cache_key(body, "other", "key:a"), is_deterministic(body))
    assert memo.key(b"[1, 2]", "route", "key:a") is None and memo.key(b"{", "route", "key:a") is None
    big = BODY | {"messages": [{"role": "user", "content": "x" * 200}]}
    assert memo.key(orjson.dumps(big), "route", "key:a") == (cache_key(big, "route", "key:a"), True)
    for i in range(20):
        memo.key(orjson.dumps(BODY | {"seed": i}), "route", "key:a")
    assert len(memo.bodies()) <= 3 and memo._bytes <= 400
    assert memo._bytes == sum(len(body) for body in memo.bodies()), "the bytes it holds, counted exactly"


def test_the_key_memo_tells_apart_bodies_of_one_length_end_and_middle() -> None:
    """Bodies alike where the memo looks first (templated prompts: one figure differs) each get
    their own key, and a flood of them cannot make a lookup compare more than a few."""
    memo = KeyMemo()
    bodies = [
        BODY | {"messages": [{"role": "user", "content": f"Invoice {i:04d}: " + "total due in full. " * 20}]}
        for i in range(40)
    ]
    raws = [orjson.dumps(b) for b in bodies]
    assert len({len(r) for r in raws}) == 1 and len({(r[-64:], r[len(r) // 2 :][:32]) for r in raws}) == 1
    for _ in range(2):
        for body, raw in zip(bodies, raws, strict=True):
            assert memo.key(raw, "route", "key:a") == (cache_key(body, "route", "key:a"), True)
    assert 0 < len(memo.bodies()) <= 8, "a spot holds a few bodies, the oldest forgotten"
    assert memo._bytes == sum(len(body) for body in memo.bodies()) and memo._entries == len(memo.bodies())


def test_a_replayed_stream_is_rendered_once_and_the_renders_stay_bounded() -> None:
    entry = Entry(orjson.dumps(COMPLETION), "d", time.time(), 0.0)
    with_usage, without = entry.sse_body(True), entry.sse_body(False)
    assert with_usage != without and b'"usage"' in with_usage and b'"usage"' not in without
    assert entry.sse_body(True) is with_usage, "a second hit sends the bytes rendered for the first"
    replays = _Replays(max_bytes=16 * 4000)
    for i in range(100):
        replays.render(orjson.dumps(COMPLETION | {"id": f"c{i}"}), ("sse", True), lambda b: b * 2)
    assert replays._bytes <= 16 * 4000
    assert replays._bytes == sum(len(b) + len(r) for (b, _), r in replays._done.items())


def test_deterministic() -> None:
    assert is_deterministic({"temperature": 0}) and is_deterministic({"seed": 7, "temperature": 1})
    assert not is_deterministic({}) and not is_deterministic({"temperature": 0.2})
    assert not is_deterministic({"temperature": False}) and not is_deterministic({"temperature": "0"})


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The answer is 42, as everyone knows; " * 5,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x" }'}}
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
}


def _sse(chunks: list[dict[str, object]], done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def test_a_replayed_stream_folds_back_into_the_completion() -> None:
    chunks = list(replay_chunks(COMPLETION, include_usage=True))
    assert len(chunks) > 4, "content arrives in pieces"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == COMPLETION["usage"]
    folded = completion_from_stream(_sse(chunks))
    assert folded is not None
    assert folded["choices"] == COMPLETION["choices"]
    assert folded["usage"] == COMPLETION["usage"] and folded["id"] == "chatcmpl-1"
    no_usage = list(replay_chunks(COMPLETION, include_usage=False))
    assert all("usage" not in c for c in no_usage)


def test_partial_or_errored_streams_are_never_folded() -> None:
    chunks = list(replay_chunks(COMPLETION, include_usage=True))
    assert completion_from_stream(_sse(chunks, done=False)) is None
    assert completion_from_stream(_sse(chunks[:2])) is None, "no finish_reason"
    err: dict[str, object] = {"error": {"message": "boom", "type": "upstream_error"}}
    assert completion_from_stream(_sse([*chunks[:3], err])) is None
    assert completion_from_stream(b"data: {not json\n\n" + _sse(chunks)) is None


def test_completion_from_json_refuses_errors_and_junk() -> None:
    assert completion_from_json(orjson.dumps(COMPLETION)) is not None
    assert completion_from_json(b'{"error": {"message": "x"}}') is None
    assert completion_from_json(b"[1, 2]") is None
    assert completion_from_json(b'{"choices": [1]}') is None
    assert completion_from_json(b"not json") is None


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_corrupt_entries_never_decode_into_answers(data: bytes) -> None:
    for blob in (data, zlib.compress(data)):
        try:
            entry = Entry.loads(blob)
        except ValueError:
            continue
        assert completion_from_json(entry.body) is not None


def test_entry_round_trip() -> None:
    e = Entry(orjson.dumps(COMPLETION), "dep-a", 123.5, 0.002)
    assert Entry.loads(e.dumps()) == e


async def test_memory_store_is_bounded_and_expires() -> None:
    counters = CacheCounters()
    entry = Entry(orjson.dumps(COMPLETION), "dep-a", 0.0, 0.0)
    store = MemoryStore(counters)
    for i in range(10):
        await store.put("r", f"k{i}", Entry(entry.body, "dep-a", time.time(), 0.0), 60, (3, 10 * entry.size()))
    assert store.size("r")[0] == 3 and counters.evictions == 7
    assert await store.get("r", "k0") is None and await store.get("r", "k9") is not None
    small = MemoryStore(counters)
    bounds = (1000, 3 * entry.size())
    for i in range(10):
        await small.put("r", f"k{i}", Entry(entry.body, "dep-a", time.time(), 0.0), 60, bounds)
    entries, used = small.size("r")
    assert entries == 3 and used <= 3 * entry.size()
    # Expired past its keep time: gone.
    await small.put("r", "old", Entry(entry.body, "dep-a", 1.0, 0.0), 60, bounds)
    assert small.get_now("r", "old") is None


def test_a_compression_bomb_in_the_store_is_refused_before_it_inflates() -> None:
    """Whoever can write the shared Redis could store a few hundred kilobytes that inflate to
    gigabytes: each read of it inflated them all, on the event loop. An entry or an index record
    now stops inflating past what edgeroute ever writes, as a corrupt one (a miss and a metric)."""
    c = zlib.compressobj(9)
    zeros = b"\0" * (1 << 20)
    head = orjson.dumps([2, "dep-a", 1.0, 0.0, ""]) + b"\n"
    bomb = c.compress(head) + b"".join(c.compress(zeros) for _ in range(512)) + c.flush()  # 512 MiB
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="inflates to more than"):
            Entry.loads(bomb)
        with pytest.raises(ValueError, match="not a semantic index record"):
            shared_index.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_STORED_BYTES, peak  # the output buffer grows by doubling; all of it was 512 MiB


async def test_redis_store_round_trip_corrupt_and_outage() -> None:
    counters = CacheCounters()
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    store = RedisStore(counters, require_redis(), prefix, 500)
    try:
        entry = Entry(orjson.dumps(COMPLETION), "dep-a", 1.0, 0.5, key="k")  # (an entry names its key)
        await store.put("r", "k", entry, 5, (1, 1))
        assert await store.get("r", "k") == entry
        ttl = await store.pipe.call("PTTL", f"{prefix}:cache:r:k")
        assert 0 < ttl <= 5000
        await store.pipe.call("SET", f"{prefix}:cache:r:bad", b"\x00garbage")
        assert await store.get("r", "bad") is None and counters.corrupt == 1
        await store.pipe.call("DEL", f"{prefix}:cache:r:k", f"{prefix}:cache:r:bad")
    finally:
        await store.close()
    down = RedisStore(counters, "redis://127.0.0.1:1/0", prefix, 100)
    assert await down.get("r", "k") is None
    await down.put("r", "k", Entry(orjson.dumps(COMPLETION), "d", 1.0, 0.0), 5, (1, 1))
    assert counters.errors == 2
    await down.close()
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("a", "b", "compatible"),
    [
        ("What is the capital of France?", "What's the capital city of France?", True),
        ("What is 1,000 plus 5?", "What is 1000 plus 5?", True),
        ("What is the capital of France?", "What is the capital of Spain?", False),
        ("How long do I boil 2 eggs?", "How long do I boil 3 eggs?", False),
        ("Is it safe to eat raw eggs?", "Isn't it safe to eat raw eggs?", False),
        ("List foods with gluten.", "List foods without gluten.", False),
        ("How do I enable two-factor login?", "How do I disable two-factor login?", False),
        ("Why does my_list.append() fail?", "Why does my_list.extend() fail?", False),
        ("Explain `git rebase -i`.", "Explain `git rebase --onto`.", False),
        ("What is the capital of France?", "Quelle est la capitale de la France ?", False),
        ("What is photosynthesis?", "光合作用是什么？", False),  # noqa: RUF001
        ('Translate "good night" to Spanish.', 'Translate "good morning" to Spanish.', False),
        # Order: the same words, another request.
        ("How to convert km to miles", "How to convert miles to km", False),
        ("copy a file from my laptop to the server", "copy a file from the server to my laptop", False),
        ("is python faster than java", "is java faster than python", False),
        ("Did Germany beat Brazil in 2014?", "Did Brazil beat Germany in 2014?", False),
        ("Add 5 and 10", "Add 10 and 5", False),
        ("How to convert km to miles", "How do I convert km to miles", True),
        ("Explain recursion to a beginner", "Explain recursion for a beginner", True),
        ("Convert 100 USD to EUR", "Convert USD 100 to EUR", True),
        # Decimal commas, exponents, hex, comparisons.
        ("Is 1,5 bigger than 1?", "Is 15 bigger than 1?", False),
        ("Set the limit to 1e3", "Set the limit to 1e6", False),
        ("What is 0x1F in decimal?", "What is 0x2F in decimal?", False),
        ("Why is x >= y here?", "Why is x <= y here?", False),
        ("Convert \u221240 degrees celsius to kelvin", "Convert 40 degrees celsius to kelvin", False),
        ("Add \u00bd cup of sugar", "Add \u00be cup of sugar", False),
        ("A recipe with eggs but without cheese", "A recipe with cheese but without eggs", False),
        ("Is a kayak bigger than a canoe?", "Is a kayak smaller than a canoe?", False),
    ],
)
def test_guards_refuse_near_misses_and_keep_paraphrases(a: str, b: str, compatible: bool) -> None:
    assert guards(a).compatible(guards(b)) is compatible


def test_only_a_plain_text_last_user_turn_is_matched_by_meaning() -> None:
    body = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}], "seed": 1}
    split = split_last_user_turn(body)
    assert split is not None and split[0] == "hello"
    assert split[1]["messages"][-1] == {"role": "user"} and split[1]["seed"] == 1
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert split_last_user_turn(parts) == ("a\nb", {"messages": [{"role": "user"}]})
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}
    assert split_last_user_turn({"messages": [image]}) is None
    assert split_last_user_turn({"messages": [{"role": "assistant", "content": "x"}]}) is None
    assert split_last_user_turn({"messages": []}) is None


def test_the_default_similarity_is_the_one_the_published_protocol_chooses() -> None:
    """The README's semantic-cache figures come from `python -m edgeroute.cache.evaluate`;
    the shipped default is never looser than the threshold that protocol picks on its
    development half (stricter since the order guards: see the evaluate module)."""
    rows = evaluate.score(evaluate.DEFAULT_PAIRS)
    dev = [r for r in rows if evaluate.dev_half(r.id)]
    test = [r for r in rows if not evaluate.dev_half(r.id)]
    assert evaluate.choose(dev, use_guards=True) <= SEMANTIC_THRESHOLD
    f = evaluate.figures(test, SEMANTIC_THRESHOLD, use_guards=True)
    assert f.precision is not None and f.precision >= 0.99 and f.hit_rate > 0.5
    assert max(f.false_hits.values()) <= 0.01


def test_the_semantic_index_is_bounded_and_filters_by_context_and_guards() -> None:
    import numpy as np

    index = SemanticIndex(max_entries=5)
    g = guards("hello")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i, v in enumerate(vectors):
        index.add(v, "ctx", g, f"k{i}")
    assert len(index) == 5
    assert [c.key for c in index.search(vectors[7], "ctx", g, 0.99)] == ["k7"]
    assert index.search(vectors[0], "ctx", g, 0.99) == [], "the oldest went out first"
    assert index.search(vectors[7], "other", g, 0.99) == []
    assert index.search(vectors[7], "ctx", guards("hello 2"), 0.99) == []


def test_an_entry_counts_against_max_bytes_at_least_what_it_takes_in_memory() -> None:
    # The in-memory store is bounded by `max_bytes` as counted by `Entry.size` (its body plus
    # a fixed overhead): an overhead set below the real one let a full store hold about a fifth
    # more memory than its bound.
    in_memory, counted = evaluate.entry_memory(2000)
    assert in_memory <= counted
