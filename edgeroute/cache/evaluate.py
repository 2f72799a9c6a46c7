"""How precise semantic cache hits are, and how fast a lookup is.

    python -m edgeroute.cache.evaluate [--pairs FILE] [--latency] [--memory]

The protocol is fixed before any figure is looked at. The pairs file holds prompts pairs
labelled `paraphrase` (the same request, worded differently: a hit is right) or a kind of
near miss (`number`, `entity`, `negation`, `language`, `code`: one detail differs, so a
hit would serve a wrong answer). Pairs are split in two halves by a hash of their id. The
threshold is chosen on the development half only: the lowest similarity at which the
precision of hits (paraphrase hits / all hits) is at least 0.99. The figures reported are
those of the test half at that threshold, beside two baselines: the embeddings alone (no
guards) at their own chosen threshold, and exact matching (hit rate 0 on paraphrases).

The shipped default (`SEMANTIC_THRESHOLD`, 0.91) is what this protocol chose with the guards
of session 25. The order guards added since refuse one more development pair (an `intent`
one, "difference between TCP and UDP" / "when to use UDP instead of TCP"), and the rule then
picks 0.84, whose test-half precision is 0.952. The default stays 0.91: a guard that catches a
near miss is no reason to let more through on similarity, and the test half had been seen.
So the default may be stricter than the protocol's pick, never looser; both are printed.

`--latency` times a lookup as the proxy does it (embed the last user turn and compute its
guards, then search an index) for a 1,000-token prompt against 100,000 indexed entries.
`--memory` measures what an exact entry costs in memory (tracemalloc) and that the in-memory
store keeps its bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import orjson

from edgeroute.cache.entry import Entry
from edgeroute.cache.semantic import Guards, SemanticIndex, builtin_embedder, guards
from edgeroute.cache.settings import SEMANTIC_THRESHOLD
from edgeroute.cache.stores import CacheCounters, MemoryStore

DEFAULT_PAIRS = Path(__file__).resolve().parents[2] / "tests" / "data" / "semantic_cache_pairs.jsonl"
TARGET_PRECISION = 0.99
GRID = [round(0.50 + i * 0.01, 2) for i in range(50)]


@dataclass(frozen=True, slots=True)
class Scored:
    id: str
    kind: str
    similarity: float
    guards_pass: bool

    @property
    def paraphrase(self) -> bool:
        return self.kind == "paraphrase"

    def hit(self, threshold: float, use_guards: bool) -> bool:
        return self.similarity >= threshold and (self.guards_pass or not use_guards)


def dev_half(pair_id: str) -> bool:
    return hashlib.blake2b(pair_id.encode(), digest_size=1).digest()[0] % 2 == 0


def score(path: Path) -> list[Scored]:
    embedder = builtin_embedder()
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        p = orjson.loads(line)
        (va, ga), (vb, gb) = embedder.analyze(p["a"]), embedder.analyze(p["b"])
        out.append(Scored(p["id"], p["kind"], float(va @ vb), ga.compatible(gb)))
    return out


@dataclass(frozen=True, slots=True)
class Figures:
    precision: float | None  # None: no hits at all
    hit_rate: float  # share of paraphrase pairs that hit
    false_hits: dict[str, float]  # per near-miss kind: share that hit


def figures(rows: list[Scored], threshold: float, use_guards: bool) -> Figures:
    para = [r for r in rows if r.paraphrase]
    near = [r for r in rows if not r.paraphrase]
    good = sum(r.hit(threshold, use_guards) for r in para)
    bad = sum(r.hit(threshold, use_guards) for r in near)
    kinds = sorted({r.kind for r in near})
    false_hits = {
        k: sum(r.hit(threshold, use_guards) for r in near if r.kind == k) / max(1, sum(r.kind == k for r in near))
        for k in kinds
    }
    return Figures(good / (good + bad) if good + bad else None, good / max(1, len(para)), false_hits)


def choose(rows: list[Scored], use_guards: bool) -> float:
    """The lowest threshold on the grid whose precision on `rows` reaches the target."""
    for t in GRID:
        f = figures(rows, t, use_guards)
        if f.precision is not None and f.precision >= TARGET_PRECISION:
            return t
    return 1.0


def report(path: Path) -> None:
    rows = score(path)
    dev = [r for r in rows if dev_half(r.id)]
    test = [r for r in rows if not dev_half(r.id)]
    n_para = sum(r.paraphrase for r in test)
    print(f"pairs: {len(rows)} ({len(dev)} development, {len(test)} test; test: {n_para} paraphrases, "
          f"{len(test) - n_para} near misses)")  # fmt: skip
    print("\ncurve on the development half (with guards | embeddings alone):")
    print("  threshold  precision  hit rate  |  precision  hit rate")
    for t in [*GRID[::5], 0.9, 0.92, 0.95]:
        a, b = figures(dev, t, True), figures(dev, t, False)
        print(f"  {t:9.2f}  {_p(a.precision):>9}  {a.hit_rate:8.2f}  |  {_p(b.precision):>9}  {b.hit_rate:8.2f}")
    print("\non the test half, each at the threshold chosen on the development half "
          f"(lowest with precision >= {TARGET_PRECISION}):")  # fmt: skip
    for name, use_guards in (("embeddings + guards (edgeroute)", True), ("embeddings alone", False)):
        t = choose(dev, use_guards)
        f = figures(test, t, use_guards)
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in f.false_hits.items())
        print(f"  {name:32} threshold {t:.2f}: precision {_p(f.precision)}, paraphrase hit rate {f.hit_rate:.2f}; "
              f"false hits by kind: {kinds}")  # fmt: skip
    print("  exact match (baseline)           precision 1.00, paraphrase hit rate 0.00")
    f = figures(test, SEMANTIC_THRESHOLD, True)
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in f.false_hits.items())
    print(f"at the shipped default ({SEMANTIC_THRESHOLD:.2f}), test half: precision {_p(f.precision)}, "
          f"paraphrase hit rate {f.hit_rate:.2f}; false hits by kind: {kinds}")  # fmt: skip


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def latency(entries: int = 100_000, runs: int = 1000) -> None:
    import numpy as np

    embedder = builtin_embedder()
    rng = np.random.default_rng(7)
    index = SemanticIndex(entries)
    # Stored prompts cluster by topic: vectors around 500 centres, not uniform noise (on which
    # any nearest-neighbour graph is at its slowest and least like real traffic).
    centres = rng.standard_normal((500, 256)).astype(np.float32)
    vectors = centres[rng.integers(0, 500, entries)] + 0.6 * rng.standard_normal((entries, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    g = guards("filler")
    t0 = time.perf_counter()
    index.add_many(vectors, "ctx", g, [f"k{i}" for i in range(entries)])
    built = time.perf_counter() - t0
    words = ("the quarterly report shows revenue growth across regions while costs in logistics rose "
             "because of fuel prices and the team proposes three measures to restore margins").split()  # fmt: skip
    text = " ".join(words[i % len(words)] for i in range(760))  # about 1,000 tokens
    tokens = len(embedder._tok.encode(text, add_special_tokens=False).ids)
    embedder.analyze(text)  # the first sight of a text's words tokenizes them; later lookups reuse them
    times, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.thread_time()
        vector, gd = embedder.analyze(text)
        index.search(vector, "ctx", gd, 0.9)
        cpu.append((time.thread_time() - c) * 1000)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    cpu.sort()
    cold = []  # every piece of the turn unseen: the remembered pieces dropped before each lookup
    for _ in range(runs // 10):
        embedder.forget_pieces()
        c = time.thread_time()
        vector, gd = embedder.analyze(text)
        index.search(vector, "ctx", gd, 0.9)
        cold.append((time.thread_time() - c) * 1000)
    cold.sort()

    def p(xs: list[float], q: float) -> float:
        return xs[max(0, int(len(xs) * q) - 1)]

    # On a shared machine the wall-clock tail is mostly waiting for a core; the thread's CPU
    # time is what a lookup costs.
    print(f"semantic lookup, {tokens}-token last turn, {entries} entries (index built in {built:.1f} s): "
          f"wall p50 {p(times, 0.5):.3f} ms, p99 {p(times, 0.99):.3f} ms; "
          f"CPU p50 {p(cpu, 0.5):.3f} ms, p99 {p(cpu, 0.99):.3f} ms (no word seen before: p50 {p(cold, 0.5):.3f} ms); "
          f"index memory {index.memory_bytes() / entries:.0f} bytes per entry, and its guards "
          f"{_guards_bytes(gd)} bytes; load average {os.getloadavg()[0]:.1f}")  # fmt: skip


def _guards_bytes(g: Guards) -> int:
    """What an entry's guards keep in memory (kept with its label beside the index)."""
    return sys.getsizeof(g) + sys.getsizeof(g.exact) + sys.getsizeof(g.spans) + sys.getsizeof(g.shape)


# A chat completion as a cache keeps it: the bench's canned answer, about 600 bytes.
_ANSWER = {
    "id": "chatcmpl-0",
    "object": "chat.completion",
    "created": 1764979200,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "A routing edge proxy sends each request to the "
                             "cheapest deployment that can answer it well, fails over when one breaks, and records "
                             "what each request cost. " * 2, "refusal": None}}],
    "usage": {"prompt_tokens": 1500, "completion_tokens": 64, "total_tokens": 1564},
}  # fmt: skip


def _fill(store: MemoryStore, n: int, bounds: tuple[int, int]) -> None:
    answer = orjson.dumps(_ANSWER)

    async def fill() -> None:
        for i in range(n):
            key = hashlib.sha256(b"%d" % i).hexdigest()  # as the proxy's keys: 64 hex digits
            body = answer.replace(b"chatcmpl-0", b"chatcmpl-%d" % i)  # a body of its own
            entry = Entry(body, "deployment-a", time.time(), 0.001, "openai:gpt-4o-mini", "req", False, key, "key:k")
            await store.put("route", key, entry, 3600.0, bounds)

    asyncio.run(fill())


def entry_memory(entries: int) -> tuple[float, float]:
    """(bytes of memory, bytes counted against `max_bytes`) an exact entry of the bench's answer
    costs in the in-memory store: its answer, key, entry and LRU link (tracemalloc)."""
    store = MemoryStore(CacheCounters())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _fill(store, entries, (entries, 1 << 40))
        per = (tracemalloc.get_traced_memory()[0] - before) / entries
    finally:
        tracemalloc.stop()
    return per, store.totals()[1] / entries


def memory(entries: int = 20_000) -> None:
    """An exact entry's memory in the in-memory store, and the store held to `max_entries`
    and `max_bytes`."""
    answer = orjson.dumps(_ANSWER)

    per, counted = entry_memory(entries)
    print(
        f"exact entry, {len(answer)}-byte answer: {per:.0f} bytes of memory each ({entries} entries, "
        f"tracemalloc), {counted:.0f} counted against max_bytes"
    )
    for bounds in ((1000, 1 << 40), (1 << 30, 1 << 20)):
        store = MemoryStore(CacheCounters())
        _fill(store, 5000, bounds)
        held, size = store.totals()
        assert held <= bounds[0] and size <= bounds[1], (held, size, bounds)
        print(
            f"bounds max_entries={bounds[0]}, max_bytes={bounds[1]}: 5000 put, {held} held, "
            f"{size} bytes counted, {store.counters.evictions} evicted"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="JSON lines of {id, kind, a, b}")
    ap.add_argument("--latency", action="store_true", help="also time a lookup against 100,000 entries")
    ap.add_argument("--memory", action="store_true", help="also measure an exact entry's memory and the bounds")
    args = ap.parse_args()
    report(args.pairs)
    if args.latency:
        latency()
    if args.memory:
        memory()


if __name__ == "__main__":
    main()
