"""The one vocabulary for what happened on an upstream attempt.

The same names are used by the Rust core (`Router.report`, `_core.OUTCOMES`), by the
provider adapters' error classification, by the request path's failover policy, by
the records and metrics, and by the config's `fallbacks_on` keys. Nothing here does
I/O or imports the rest of the package, so every layer may import it.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import BeforeValidator


class Outcome(enum.StrEnum):
    """An attempt's outcome; the values are the core's names."""

    SUCCESS = "success"
    CLIENT_ERROR = "client_error"  # the request itself is wrong: return it, do not retry
    CONTEXT_WINDOW = "context_window"  # prompt too long for this model: a larger one may take it
    CONTENT_POLICY = "content_policy"  # the provider's filter refused the request
    RATE_LIMITED = "rate_limited"  # 429 and overload answers: retry elsewhere, cool down
    SERVER_ERROR = "server_error"  # 5xx, malformed or unreadable answers, redirects
    # 401 / 403: the provider refused *our* credentials for this deployment. Not the
    # client's fault (its key was checked by edgeroute): fail over, and never pass the
    # provider's text on (it can quote part of the key).
    AUTH_ERROR = "auth_error"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"

    @property
    def retryable(self) -> bool:
        """Whether another deployment may succeed where this one failed."""
        return self not in _NOT_RETRYABLE

    @property
    def about_request(self) -> bool:
        """Whether the outcome says something about the request rather than the
        deployment (so it never counts against the deployment's health)."""
        return self in _ABOUT_REQUEST


_NOT_RETRYABLE = frozenset({Outcome.SUCCESS, Outcome.CLIENT_ERROR, Outcome.CONTENT_POLICY})
_ABOUT_REQUEST = frozenset({Outcome.SUCCESS, Outcome.CLIENT_ERROR, Outcome.CONTEXT_WINDOW, Outcome.CONTENT_POLICY})

# `fallbacks_on` keys: the failure outcomes another model can help with, and `capacity`. `server_error`
# also covers `connect_error` and `auth_error` unless those have an entry of their own.
FallbackOutcome = Literal[
    "rate_limited", "server_error", "connect_error", "auth_error", "timeout", "context_window", "content_policy",
    "capacity",  # not an attempt outcome: every deployment of the route is at its max_concurrency
]  # fmt: skip
FALLBACK_ALIASES = {"rate_limit": "rate_limited"}  # the spelling configs used before the one vocabulary
_FALLBACK_COVERS = {Outcome.CONNECT_ERROR: Outcome.SERVER_ERROR, Outcome.AUTH_ERROR: Outcome.SERVER_ERROR}


def _alias(value: object) -> object:
    return FALLBACK_ALIASES.get(value, value) if isinstance(value, str) else value


# The config's key type: an outcome name, or an alias read as the name it stands for.
FallbackKey = Annotated[FallbackOutcome, BeforeValidator(_alias)]


def fallback_keys(outcome: Outcome) -> tuple[str, ...]:
    """The `fallbacks_on` keys that apply to `outcome`, the most specific first."""
    cover = _FALLBACK_COVERS.get(outcome)
    return (outcome.value,) if cover is None else (outcome.value, cover.value)
