"""Prices: the bundled catalogue of public list prices and time-of-day price windows.

One source of truth for a price: a deployment's `price` in the config is either
explicit, or a reference to `catalogue.json`, resolved while the config validates
(`edgeroute.config.prices`, re-exported here), so the rest of the proxy only ever sees
concrete prices.

Windows (e.g. an off-peak discount) multiply a price during a local time of day.
Cost accounting applies them (`multiplier_at`); routing does not yet: the Rust core
gets the base price once per config. For the `lowest_cost` strategy to follow windows,
the core needs either window specs in `RouterSpec` or a `set_price(index, in, out)`
call that a timer would make at each window edge.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgeroute.config import Config, Price

# The catalogue lookups live with the config (which resolves references); re-exported for callers here.
from edgeroute.config.prices import CATALOGUE_PATH, catalogue, catalogue_entry, parse_hhmm, resolve_price_input  # noqa: F401
from edgeroute.cost.media import DEFAULT_RULE, MediaRule, rule_of
from edgeroute.providers.anthropic import DEFAULT_MAX_TOKENS


def multiplier_at(price: Price, at: float | None = None) -> float:
    """The price multiplier in force at unix time `at` (1.0 outside every window; first match wins)."""
    if not price.windows:
        return 1.0
    t = time.time() if at is None else at
    for w in price.windows:
        minute = int((t // 60 + w.utc_offset_minutes) % 1440)
        start, end = parse_hhmm(w.start), parse_hhmm(w.end)
        inside = start <= minute < end if start <= end else (minute >= start or minute < end)
        if inside:
            return w.multiplier
    return 1.0


def cache_write_1h_price(price: Price) -> float:
    """USD a million tokens written to a 1-hour prompt cache: the price's own, else Anthropic's
    rule (2x input) for a price that bills cache writes (the catalogue's Claude entries: their
    `cache_write` is the 5-minute write, 1.25x), else the input price, as a cache write without
    a price is."""
    if price.cache_write_1h_per_mtok is not None:
        return price.cache_write_1h_per_mtok
    return 2 * price.input_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok


def apply_windows(router: Any, deployments: list[tuple[int, Price]], at: float | None = None) -> None:
    """Tells the core the price multiplier in force now for each deployment with windows,
    so that lowest-cost selection and policies route by the current price."""
    for index, price in deployments:
        if price.windows:
            router.set_price_multiplier(index, multiplier_at(price, at))


@dataclass(slots=True, frozen=True)
class Ceiling:
    """The highest price of each component over a set of deployments (for reservations)."""

    input_per_mtok: float
    output_per_mtok: float
    per_request: float
    # The most output tokens an answer may have when its request names no bound and a
    # deployment's provider sends one of its own (Anthropic requires `max_tokens`: its
    # provider's `default_max_tokens`); 0 when none does (`budgets.reserve_max_tokens` then).
    unbounded_output: int = 0
    media: MediaRule = DEFAULT_RULE  # the deployments' allowances for image, audio and file parts
    tool_calls: dict[str, float] = field(default_factory=dict)  # USD a call of each built-in tool

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        tools: tuple[tuple[str, int, int], ...] = (),
        unbounded_calls: int = 1,
    ) -> float:
        """The most a request may cost: its tokens, and the calls of `tools` (the built-in tools
        it enables, each with the calls its bounds allow and its tools without one, which may
        make `unbounded_calls` each: `cost.tool_calls`)."""
        fees = 0.0
        if self.tool_calls:
            fees = sum(self.tool_calls.get(t, 0.0) * (n + free * unbounded_calls) for t, n, free in tools)
        return (
            (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6
            + self.per_request
            + fees
        )


def ceiling(prices: list[Price], unbounded_output: int = 0, media: MediaRule = DEFAULT_RULE) -> Ceiling:
    """Componentwise maximum, at the highest multiplier any window may apply (a reservation must not
    be below what the request can cost at any time of day). A prompt token costs at most the
    dearest of the input, cache-write (5-minute and 1-hour) and audio prices: Anthropic bills a
    prompt written to its cache above the input price (1.25x or 2x), and a reservation at the
    input price was overshot; an
    answer's token at the dearer of the output and audio-output prices."""
    if not prices:
        return Ceiling(0.0, 0.0, 0.0)
    mult = [max([1.0, *(w.multiplier for w in p.windows)]) for p in prices]
    return Ceiling(
        max(
            max(p.input_per_mtok, p.cache_write_per_mtok or 0.0, cache_write_1h_price(p), p.audio_input_per_mtok or 0.0)
            * m
            for p, m in zip(prices, mult, strict=True)
        ),
        max(max(p.output_per_mtok, p.audio_output_per_mtok or 0.0) * m for p, m in zip(prices, mult, strict=True)),
        max(p.per_request * m for p, m in zip(prices, mult, strict=True)),
        unbounded_output,
        media,
        {
            kind: max(p.tool_calls.get(kind, 0.0) * m for p, m in zip(prices, mult, strict=True))
            for kind in {k for p in prices for k in p.tool_calls}
        },
    )


def unbounded_output(cfg: Config, deployments: Iterable[str]) -> int:
    """The most output tokens edgeroute lets an answer of `deployments` have when the request
    names no bound: an Anthropic provider's `default_max_tokens`, sent for it (0: none sets one)."""
    out = 0
    for name in deployments:
        provider = cfg.providers[cfg.deployments[name].provider]
        if provider.kind == "anthropic":
            out = max(out, int(provider.options.get("default_max_tokens", DEFAULT_MAX_TOKENS)))
    return out


# Model names of OpenAI's that take or give audio (gpt-4o-audio-preview, gpt-realtime, ...).
_AUDIO_MODELS = ("audio", "realtime")


def audio_unpriced(cfg: Config) -> list[str]:
    """The priced deployments of audio models without an audio price: their audio tokens are
    priced as text (OpenAI bills them at 8 to 16 times that)."""
    return [
        name
        for name, d in cfg.deployments.items()
        if "price" in d.model_fields_set
        and any(w in d.model.lower() for w in _AUDIO_MODELS)
        and (d.price.audio_input_per_mtok is None or d.price.audio_output_per_mtok is None)
    ]


def reachable_models(cfg: Config, model: str) -> list[str]:
    """A public model and, for a policy or an experiment, the models it chooses between (and
    theirs), each once."""
    seen: list[str] = []
    todo = [model]
    while todo:
        name = todo.pop()
        if name in seen or name not in cfg.models:
            continue
        seen.append(name)
        m = cfg.models[name]
        if m.policy is not None:
            todo += [c.route for c in m.policy.candidates]
        if m.experiment is not None:
            todo += [v.route for v in m.experiment.variants]
    return seen


def reachable_deployments(cfg: Config, model: str) -> list[str]:
    """The deployments a public model can send a request to: its own, or, for a policy or an
    experiment, those of the models it chooses between."""
    out: list[str] = []
    for name in reachable_models(cfg, model):
        out += [d for d in cfg.models[name].deployments if d not in out]
    return out


def may_hedge(cfg: Config, model: str) -> bool:
    """Whether a request for `model` may be hedged (sent to a second deployment before the first answers)."""
    return any(cfg.models[name].hedge is not None for name in reachable_models(cfg, model))


def route_ceilings(cfg: Config) -> dict[str, Ceiling]:
    """For each public model: the ceiling over the deployments it can reach."""
    out = {}
    for name in cfg.models:
        deployments = reachable_deployments(cfg, name)
        out[name] = ceiling(
            [cfg.deployments[d].price for d in deployments],
            unbounded_output(cfg, deployments),
            rule_of(cfg.deployments[d] for d in deployments),
        )
    return out


def most_expensive(cfg: Config) -> dict[str, Price]:
    """For each public model: the most expensive deployment it can reach (input + output), for savings
    reports. A model that reaches none (not possible in a validated config) has no entry."""
    out: dict[str, Price] = {}
    for name in cfg.models:
        ps = [cfg.deployments[d].price for d in reachable_deployments(cfg, name)]
        if ps:
            out[name] = max(ps, key=lambda p: p.input_per_mtok + p.output_per_mtok + p.per_request * 1e3)
    return out
