"""Micro-benchmark of the Rust decision core through the Python binding.

Run ``python -m edgeroute.bench.core_bench``. It times, call by call, on one thread:

* ``Router.decide`` on a realistic 2,000-token chat body against a router with
  200 rules and 50 deployments, with the prompt counted and with the count
  supplied (``prompt_tokens=``), and on a trivial body;
* ``Router.count_tokens`` against ``tiktoken`` on the same text, for both
  OpenAI encodings;
* the binding's own overhead: the trivial decision through Python minus the
  same decision timed by criterion in Rust (``cargo bench -p edgeroute-core
  --bench decide``; read from ``target/criterion`` when present).

The workload is generated here, deterministically, and is the single source
of truth for both sides: ``python -m edgeroute.bench.core_bench --write-workload``
writes it to ``rust/edgeroute-core/benches/data/``, which the criterion bench
includes. This module also owns :func:`tiktoken_encoding`, which loads
tiktoken's encodings offline (the tests use it too).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import itertools
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (the Criterion data lives under rust/)
DATA_DIR = ROOT / "rust" / "edgeroute-core" / "benches" / "data"
CRITERION_DIR = ROOT / "target" / "criterion"

_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


def tiktoken_encoding(name: str) -> Any:
    """``tiktoken.get_encoding(name)``, working without network access.

    tiktoken downloads its vocabulary files on first use. Where that cannot
    happen, the cache is seeded from the gzipped copies that the ``bpe-openai``
    crate ships in the cargo registry; tiktoken checks their SHA-256 against its
    own pinned hash before using them, so a wrong file cannot pass silently.
    """
    import tiktoken

    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "edgeroute-tiktoken")
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    url = _TIKTOKEN_URL.format(name=name)
    target = cache / hashlib.sha1(url.encode()).hexdigest()
    if not target.exists():
        cargo_home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
        pattern = f"{cargo_home}/registry/src/*/bpe-openai-*/data/{name}.tiktoken.gz"
        found = sorted(glob.glob(pattern))
        if found:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(gzip.decompress(Path(found[-1]).read_bytes()))
            tmp.replace(target)
    return tiktoken.get_encoding(name)


# ---------------------------------------------------------------- workload

_WORDS = (
    "the a of to and in that is for it as with on be by this are from at or an "
    "router request latency model deployment token budget policy cluster region "
    "customer invoice report summary migration database schema index query cache "
    "timeout retry fallback stream response upstream provider service network "
    "please could you explain why how what when where should would about into "
    "système café naïve données über straße 東京 数据 模型 🚀 ✅ 😀"
).split()

_CODE = '''```python
def backoff(attempt: int, base: float = 0.1, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter."""
    import random
    return random.uniform(0, min(cap, base * 2 ** attempt))


class Pool:
    def __init__(self, size: int) -> None:
        self._free = list(range(size))

    def take(self) -> int | None:
        return self._free.pop() if self._free else None
```'''


def _prose(rng: random.Random, words: int) -> str:
    out: list[str] = []
    sentence: list[str] = []
    for _ in range(words):
        sentence.append(rng.choice(_WORDS))
        if len(sentence) >= rng.randint(8, 18):
            out.append(" ".join(sentence).capitalize() + rng.choice([".", ".", "?", "!"]))
            sentence = []
            if rng.random() < 0.15:
                out.append("\n\n")
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out).replace(" \n\n ", "\n\n")


def workload_config() -> dict[str, Any]:
    """A router with 10 public models of 5 deployments each, and 200 mixed rules."""
    providers = ["openai", "azure", "anthropic", "google", "bedrock"]
    regions = ["us", "eu", "ap"]
    deployments: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for m in range(10):
        names = []
        for d in range(5):
            name = f"chat-{m}-{providers[d]}"
            names.append(name)
            deployments.append(
                {
                    "name": name,
                    "provider": providers[d],
                    "model": "gpt-4o-mini" if m % 2 == 0 else "gpt-4o",
                    "weight": d + 1,
                    "input_per_mtok": 0.15 * (m + 1),
                    "output_per_mtok": 0.6 * (m + 1),
                    "context_window": 128_000,
                    "tags": [f"region:{regions[d % 3]}"] + (["privacy:high"] if d == 0 else []),
                }
            )
        models.append(
            {
                "name": f"chat-{m}",
                "deployments": names,
                "strategy": ["weighted", "p2c_ewma", "lowest_cost", "least_busy"][m % 4],
                "fallbacks": [f"chat-{(m + 1) % 10}"],
                **({"hedge": {"percentile": 95.0}} if m % 3 == 0 else {}),
            }
        )
    rules: list[dict[str, Any]] = []
    pii_kinds = ["email", "phone", "payment_card", "iban", "national_id"]
    for i in range(199):
        kind = i % 6
        when: dict[str, Any]
        if kind == 0:  # another model: fails on the first, cheapest check
            when = {"models": [f"chat-{1 + i % 9}"]}
        elif kind == 1:  # a tag the request does not carry
            when = {"tags": [f"team-{i}", f"exp-{i}"]}
        elif kind == 2:  # our model, but keywords that do not occur
            when = {"models": ["chat-0"], "keywords": [f"zqx{i}", f"frobnicate{i}", f"kw-{i}"]}
        elif kind == 3:  # a pattern that does not match
            when = {"patterns": [rf"\bTICKET-{i:04d}-\d+\b", rf"(?i)order\s+#{i}\d{{3}}x"]}
        elif kind == 4:  # personal data the prompt does not contain
            when = {"pii": [pii_kinds[i % len(pii_kinds)]], "min_tokens": 10}
        else:  # a token range that does not hold
            when = {"max_tokens": 100 + i, "teams": ["ml", "search"]}
        rules.append(
            {
                "name": f"rule-{i}",
                "priority": 1000 - i,
                "when": when,
                "then": {"route": f"chat-{i % 10}", "require_tags": ["region:eu"]}
                if i % 2
                else {"strategy": "lowest_cost", "exclude_tags": ["privacy:high"]},
            }
        )
    # The only rule that matches, tried last: every other rule is evaluated first.
    rules.append(
        {
            "name": "long-prompts",
            "priority": -1,
            "when": {"models": ["chat-0"], "min_tokens": 1000},
            "then": {"route": "chat-2"},
        }
    )
    return {"deployments": deployments, "models": models, "rules": rules}


def workload_body(target_tokens: int = 2000) -> dict[str, Any]:
    """A multi-turn chat of about ``target_tokens`` o200k_base prompt tokens."""
    rng = random.Random(7)
    enc = tiktoken_encoding("o200k_base")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a careful assistant for an SRE team. " + _prose(rng, 60)},
    ]
    turn = 0

    def tokens() -> int:
        n = 3
        for m in messages:
            n += 3 + sum(len(enc.encode_ordinary(v)) for v in m.values())
            n += 1 if "name" in m else 0
        return n

    while tokens() < target_tokens - 40:
        turn += 1
        if turn % 2:
            content = _prose(rng, 120)
            if turn == 3:
                content += "\n\n" + _CODE
            messages.append({"role": "user", "name": f"user_{turn}", "content": content})
        else:
            messages.append({"role": "assistant", "content": _prose(rng, 150)})
    messages.append({"role": "user", "content": "Summarise the above in three bullet points."})
    return {
        "model": "chat-0",
        "messages": messages,
        "temperature": 0.2,
        "max_tokens": 512,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "bench-user",
    }


TRIVIAL_BODY = {"model": "chat-1", "messages": [{"role": "user", "content": "hi"}]}


def write_workload() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    (DATA_DIR / "router.json").write_text(json.dumps(workload_config(), indent=1) + "\n")
    (DATA_DIR / "chat_2k.json").write_text(json.dumps(workload_body(), ensure_ascii=False) + "\n")
    (DATA_DIR / "trivial.json").write_text(json.dumps(TRIVIAL_BODY) + "\n")
    print(f"wrote {DATA_DIR}")


def _load(name: str) -> bytes:
    path = DATA_DIR / name
    if not path.exists():
        write_workload()
    return path.read_bytes().rstrip(b"\n")


# ------------------------------------------------------------------ timing


def _percentiles(fn: Callable[[], object], seconds: float, batch: int = 1) -> tuple[float, float, int]:
    """Per-call p50 and p99 in µs, timing batches of ``batch`` calls for ``seconds``."""
    for _ in range(200):
        fn()
    samples: list[float] = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(100):
            t0 = clock()
            for _ in range(batch):
                fn()
            samples.append((clock() - t0) / batch / 1000.0)
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49], q[98], len(samples) * batch


def _criterion_median_us(bench_id: str) -> float | None:
    path = CRITERION_DIR / bench_id / "new" / "estimates.json"
    if not path.exists():
        return None
    est = json.loads(path.read_text())
    return float(est["median"]["point_estimate"]) / 1000.0


def _clock_overhead_us() -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(20_000):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples) / 1000.0


# Copies of the chat cycled through: more than the rules' memory of recent prompts keeps
# (1,024 prompts, 4 MiB; `rust/edgeroute-core/benches/support/chat_variants.rs` does the same).
VARIANTS = 2048


def chat_variants(body: bytes) -> list[bytes]:
    """`VARIANTS` copies of a chat body, each with its number in its last message."""
    chat = json.loads(body)
    out = []
    for i in range(VARIANTS):
        last = chat["messages"][-1]
        copy = {**chat, "messages": [*chat["messages"][:-1], {**last, "content": f"{last['content']} (case {i})"}]}
        out.append(json.dumps(copy, ensure_ascii=False).encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeroute.bench.core_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    parser.add_argument("--write-workload", action="store_true", help="regenerate the shared workload and exit")
    args = parser.parse_args(argv)
    if args.write_workload:
        write_workload()
        return 0

    from edgeroute._core import Router

    config, body, trivial = _load("router.json"), _load("chat_2k.json"), _load("trivial.json")
    router = Router(config)
    d = router.decide(body, tags=["tier:free"], team="web")
    text = "\n".join(m["content"] for m in json.loads(body)["messages"])
    print(f"workload: {len(router.deployment_names())} deployments, {len(json.loads(config)['rules'])} rules,")
    print(f"          body {len(body)} bytes, {d.prompt_tokens} prompt tokens ({d.encoding}), rule {d.rule!r}")
    print(f"          timer overhead {_clock_overhead_us():.3f} µs per sample (included below)")
    print()
    s = args.seconds
    rows: list[tuple[str, float, float, int]] = []

    def row(label: str, fn: Callable[[], object], batch: int = 1) -> tuple[float, float]:
        p50, p99, n = _percentiles(fn, s, batch)
        rows.append((label, p50, p99, n))
        print(f"{label:<48} p50 {p50:9.2f} µs   p99 {p99:9.2f} µs   ({n} calls)", flush=True)
        return p50, p99

    print("Router.decide through the binding (each 2k-token body a copy not seen lately)")
    # The rules remember what they found in recent prompts (a cache hit's body is not scanned
    # again): one body decided over and over would time that memory. More copies than it keeps.
    chats = itertools.cycle(chat_variants(body))
    row("decide, 2k-token body, counting", lambda: router.decide(next(chats), tags=["tier:free"], team="web"))
    n = d.prompt_tokens
    row(
        "decide, 2k-token body, prompt_tokens given",
        lambda: router.decide(next(chats), tags=["tier:free"], team="web", prompt_tokens=n),
    )
    trivial_p50, _ = row("decide, trivial body", lambda: router.decide(trivial))
    print()
    print("token counting of the same text (binding vs tiktoken)")
    for name in ("o200k_base", "cl100k_base"):
        enc = tiktoken_encoding(name)
        assert Router.count_tokens(text, name) == len(enc.encode_ordinary(text))
        ours, _ = row(f"Router.count_tokens {name}", partial(Router.count_tokens, text, name))
        theirs, _ = row(f"tiktoken encode_ordinary {name}", partial(enc.encode_ordinary, text))
        print(f"  -> edgeroute is {theirs / ours:.1f}x faster than tiktoken on {len(text)} chars (p50)")
    print()
    print("token counting of hostile text: one run of letters, the slowest text to merge (ours only:")
    print("tiktoken's merge of one piece is quadratic, minutes here)")
    rng = random.Random(7)
    for size in (65_536, 1 << 20, 8 << 20):
        letters = "".join(rng.choices(string.ascii_lowercase, k=size))
        row(
            f"Router.count_tokens, {size >> 10} KiB of random letters",
            partial(Router.count_tokens, letters, "o200k_base"),
        )
    print()
    core = _criterion_median_us("decide/trivial_body")
    if core is None:
        print("binding overhead: run `cargo bench -p edgeroute-core --bench decide` first for the core's time")
    else:
        print(
            f"binding overhead: trivial decide {trivial_p50:.2f} µs via Python - {core:.2f} µs in Rust "
            f"(criterion median) = {trivial_p50 - core:.2f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
