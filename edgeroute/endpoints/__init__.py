"""OpenAI endpoints beyond chat: `/v1/embeddings`, `/v1/completions`, `/v1/responses`.

Each is served by the chat request path (`pipeline`): the core decides on a chat-shaped
view of the request, so models, rules, keys, budgets, rate limits, failover and the
ledger apply to it as to chat. Modules: `pipeline` (the request's life), `upstream`
(where each provider serves an endpoint), one module per endpoint.
"""

from __future__ import annotations

from aiohttp import web

from edgeroute.endpoints import completions, embeddings, messages, responses

__all__ = ["install", "messages"]


def install(app: web.Application) -> None:
    """Registers the endpoints (with and without the `/v1` prefix, as chat is)."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/embeddings", embeddings.handle)
        app.router.add_post(f"{prefix}/completions", completions.handle)
        app.router.add_post(f"{prefix}/responses", responses.handle)
