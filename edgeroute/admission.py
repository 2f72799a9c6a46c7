"""Admission control before a request is dispatched, and settlement after it.

The request path calls :meth:`Admission.admit` once the core has decided (so the
prompt's token count and the route are known) and :meth:`Admission.settle` exactly
once when the request ends, whatever happened (answered, failed, client gone).
Budgets (reserve the estimated maximum cost, settle to the actual) and rate limits
plug in here; the embedded default admits everything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson
from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import RequestRecord
from edgeroute.cost.media import Media
from edgeroute.state import Live

# The exact prompt tokens of the request being admitted, counted when first awaited.
Counter = Callable[[], Awaitable[int]]
# Whether a public model can serve the request being admitted (its endpoint says: a Messages
# request with Anthropic-only fields needs a deployment that honours them); None: any can.
CanServe = Callable[[str], bool]


class Ticket(Protocol):
    """What admission handed out for one request; returned at settlement.

    A ticket may also carry `reroute: str | None`: the public model the endpoint must
    decide again for before dispatching (a budget's downgrade, or a deployment at its
    provider's limit); see :func:`rerouted_model` and :func:`with_model`.
    """


class Admission(Protocol):
    async def admit(
        self,
        request: web.Request,
        decision: _core.Decision,
        rec: RequestRecord,
        count: Counter | None = None,
        can_serve: CanServe | None = None,
        media: Media | None = None,
    ) -> Ticket | None:
        """Raises `ProxyError` (429/402/403) to refuse; may return a ticket to settle later.

        Budgets reserve by an upper bound of the prompt's tokens unless the decision counted
        them exactly; `count` makes the exact count (off the event loop) for a request that the
        bound alone would refuse. A budget's downgrade goes only to a model `can_serve` allows.
        `media` (the request's image, audio and file parts) is reserved for at its allowances."""
        ...

    async def count_request(self, request: web.Request) -> None:
        """A request that reaches no upstream (it decides or counts a body): raises `ProxyError`
        (429) when its key is at its requests-per-minute limit, else counts it there. Nothing
        to settle: it takes no tokens, budget or model limit."""
        ...

    async def rerouted(self, request: web.Request, decision: _core.Decision, ticket: Ticket | None) -> None:
        """The endpoint decided again for `rerouted_model(ticket)`: admit the new first choice."""
        ...

    def settle(self, ticket: Ticket | None, rec: RequestRecord) -> None:
        """Called once, synchronously, with the final record (cost and usage filled in)."""
        ...

    def attempt_gate(self, ticket: Ticket | None) -> AttemptGate | None:
        """For the attempts admission did not count (retries, fallbacks, hedges): takes the
        provider limit of the deployment named before each is sent (False: at its limit, pass
        it over), and gives back the one admission took for a first choice the request is not
        sent to. None when no deployment has a limit."""
        ...

    def mirror_ticket(self, decision: _core.Decision, live: Live) -> Ticket | None:
        """A ticket for a request no client sent (a shadow mirror): held to the provider limits
        of the deployments it goes to (`attempt_gate`, every attempt), settled like any other."""
        ...


class AttemptGate(Protocol):
    """A request's provider limits, from admission on, as its attempts go out."""

    async def take(self, deployment: str) -> bool:
        """Takes the deployment's provider limit for one more attempt on it; False: at its limit."""
        ...

    def give_back(self, deployment: str) -> None:
        """The deployment admission counted as the first choice cannot read the request: its
        request and tokens go back now, not when the request ends (nothing is sent to it)."""
        ...


class AdmitAll:
    """No budgets, no limits."""

    async def admit(
        self,
        request: web.Request,
        decision: _core.Decision,
        rec: RequestRecord,
        count: Counter | None = None,
        can_serve: CanServe | None = None,
        media: Media | None = None,
    ) -> Ticket | None:
        return None

    async def count_request(self, request: web.Request) -> None:
        return None

    async def rerouted(self, request: web.Request, decision: _core.Decision, ticket: Ticket | None) -> None:
        return None

    def settle(self, ticket: Ticket | None, rec: RequestRecord) -> None:
        return None

    def attempt_gate(self, ticket: Ticket | None) -> AttemptGate | None:
        return None

    def mirror_ticket(self, decision: _core.Decision, live: Live) -> Ticket | None:
        return None


# Admission's refusals of what would cost money or reach a provider (a budget without room,
# the only deployment at its provider limit): an answer the cache holds does neither, and is
# served instead. The refusal has counted the request against its key's and model's rate
# limits, as a hit is counted.
CACHE_MAY_ANSWER = frozenset({"budget_exceeded", "upstream_rate_limited"})


def rerouted_model(ticket: Ticket | None) -> str | None:
    """The model a ticket asks the endpoint to decide again for, if any."""
    model = getattr(ticket, "reroute", None)
    return model if isinstance(model, str) else None


def with_model(body: bytes, decision: _core.Decision, model: str) -> bytes:
    """`body` with its `model` value replaced (the span the core found), for a new decision."""
    if model == decision.model:
        return body
    start, end = decision.model_span
    return body[:start] + orjson.dumps(model) + body[end:]


ADMISSION = web.AppKey("admission", Admission)
