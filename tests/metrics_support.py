"""Reading `/metrics` the way Prometheus does: prometheus_client's own parser."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import eventually


class Scrape:
    """One scrape, parsed: `value(name, **labels)` for a sample, `families` by name."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value for f in self.families.values() for s in f.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def sample_names(self) -> set[str]:
        return {n for n, _ in self.samples}


def check_exposition(text: str) -> None:
    """The text is valid exposition: parsed, each family under one TYPE line, its samples together."""
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"a family appears twice: {names}"
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a TYPE line repeats"
    # Contiguity: once another family's samples start, a family's samples never come back.
    seen: list[str] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            seen.append(line.split()[2])
        elif line and not line.startswith("#"):
            sample = line.split("{", 1)[0].split(" ", 1)[0]
            assert seen and sample.startswith(seen[-1]), f"{sample} outside its family (after {seen[-1:]})"


async def scrape(base_url: str, token: str | None = None) -> Scrape:
    """`/metrics` as Prometheus reads it (with `token` as its bearer credential when keys are on)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(base_url + "/metrics", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    check_exposition(text)
    return Scrape(text)


async def ledger_written(base_url: str, n: int, token: str | None = None) -> None:
    """Until the spend ledger has written `n` requests, as `/metrics` counts them. Its writer is a
    thread that flushes on its own interval: on a loaded host that can take longer than any
    fixed sleep a test would allow it."""

    async def written() -> float:
        got = (await scrape(base_url, token)).value("edgeroute_ledger_written_total") or 0.0
        return got if got >= n else 0.0

    await eventually(written, f"{n} requests written to the ledger", within=20)
