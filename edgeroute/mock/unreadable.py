"""A request body of a shape a mock cannot read is one its provider refuses: a 400 in the
provider's own error format, as the provider answers it, not a 500.

Each mock checks the fields every request needs; the rest it reads as a valid body has them.
A body with one of them of another type (`"messages": [5]`, `"thinking": 5`, Gemini's
`"generationConfig": 5`) raised while it was read, and aiohttp answered a plain-text 500: a
provider's server error, which a gateway in front fails over from and counts against the
deployment's health, where the real provider names the client's mistake.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

# What reading a field of the wrong type raises (`5.get`, `5["x"]`, `len(5)`, `int("x")`).
_MISREAD = (TypeError, AttributeError, KeyError, IndexError, ValueError)


def refused_as(error: Callable[[str], web.StreamResponse]) -> Middleware:
    """A middleware answering `error(message)` for a body its handler could not read."""

    @web.middleware
    async def unreadable(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _MISREAD as e:
            return error(f"The request body has a field of an unexpected type or shape ({type(e).__name__}).")

    return unreadable
