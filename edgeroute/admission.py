"""Admission control before a request is dispatched, and settlement after it.

The request path calls :meth:`Admission.admit` once the core has decided (so the
prompt's token count and the route are known) and :meth:`Admission.settle` exactly
once when the request ends, whatever happened (answered, failed, client gone).
Budgets (reserve the estimated maximum cost, settle to the actual) and rate limits
plug in here; the embedded default admits everything.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import RequestRecord


class Ticket(Protocol):
    """What admission handed out for one request; returned at settlement."""


class Admission(Protocol):
    async def admit(self, request: web.Request, decision: _core.Decision, rec: RequestRecord) -> Ticket | None:
        """Raises `ProxyError` (429/402/403) to refuse; may return a ticket to settle later."""
        ...

    def settle(self, ticket: Ticket | None, rec: RequestRecord) -> None:
        """Called once, synchronously, with the final record (cost and usage filled in)."""
        ...


class AdmitAll:
    """No budgets, no limits."""

    async def admit(self, request: web.Request, decision: _core.Decision, rec: RequestRecord) -> Ticket | None:
        return None

    def settle(self, ticket: Ticket | None, rec: RequestRecord) -> None:
        return None


ADMISSION = web.AppKey("admission", Admission)
