"""The adapter interface every provider implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import orjson
from yarl import URL

from edgeroute import redact
from edgeroute.outcome import Outcome
from edgeroute.providers import error_fields
from edgeroute.providers.error_fields import ErrorFields

if TYPE_CHECKING:
    from edgeroute.config import Provider
    from edgeroute.secrets import Secret


class StreamTranslator(Protocol):
    """Turns one provider stream into OpenAI SSE events, ending with `data: [DONE]`."""

    @property
    def usage(self) -> dict[str, Any] | None:
        """OpenAI-format usage once the provider has reported it (for accounting, whether
        or not the client asked for a usage chunk)."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """Consumes provider bytes; returns the OpenAI SSE bytes they complete (maybe empty)."""
        ...


# The HTTP status an error object's `type` stands for (OpenAI's and Anthropic's names), for an
# error sent inside a 200 (a stream's error event, a JSON body that is an error) without a code.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "request_too_large": 413,
    "not_found_error": 404,
    "authentication_error": 401,
    "permission_error": 403,
    "rate_limit_error": 429,
    "overloaded_error": 529,
}


def in_band_status(err: Any) -> int:
    """The HTTP status an error sent inside a 200 answer stands for: its `code` (or `status`)
    when that is one (vLLM, TGI and LiteLLM-style servers send `"code": 400`), else its `type`'s;
    500 (the server's error) for anything else."""
    if isinstance(err, dict):
        for key in ("code", "status"):
            code = err.get(key)
            if isinstance(code, str) and code.isdigit():
                code = int(code)
            if type(code) is int and 400 <= code <= 599:
                return code
        return _TYPE_STATUS.get(str(err.get("type")), 500)
    return 500


# OpenAI's codes for a refusal of our account, whatever the status: its key (`invalid_api_key`),
# or its billing (`insufficient_quota`, a 429 no wait ends and never the client's rate limit).
_OUR_ACCOUNT_REFUSED = frozenset({"invalid_api_key", "insufficient_quota"})


@dataclass(slots=True)
class UpstreamRequest:
    url: str | URL  # a prebuilt URL saves aiohttp parsing the string on every request
    headers: dict[str, str]
    body: bytes


class Adapter:
    """Base adapter. Subclasses set `passthrough` when they speak OpenAI's format."""

    passthrough: ClassVar[bool] = False
    # A translated JSON answer holds one of these keys: one without any (a 200 whose body is an
    # error object, or of another shape) is the upstream's failure, not an empty answer.
    answer_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, provider: Provider, api_key: Secret | None) -> None:
        self.name = name
        self.provider = provider
        self.api_key = api_key

    def build(self, model: str, body: bytes, stream: bool) -> UpstreamRequest:
        """The upstream request for an OpenAI-format `body` whose model is already `model`."""
        raise NotImplementedError

    def classify(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Outcome:
        """The routing meaning of a non-2xx answer (or of an error sent in a 200, as its status):
        decided by the status and the body's structured fields, never by words a client can
        have had quoted in it (`error_fields`)."""
        return self.judge(status, error_fields.read(body), headers or {})

    def judge(self, status: int, err: ErrorFields, headers: Mapping[str, str]) -> Outcome:
        """`classify` on the parsed fields; adapters add their provider's codes, then call this."""
        if err.code in _OUR_ACCOUNT_REFUSED:
            return Outcome.AUTH_ERROR  # never the client's fault, nor the provider's words
        if status in (408,):
            return Outcome.TIMEOUT
        if status == 429:
            return Outcome.RATE_LIMITED
        if status in (401, 403) or err.type == "authentication_error":
            return Outcome.AUTH_ERROR
        if status >= 500:
            return Outcome.SERVER_ERROR
        # vLLM-style servers send no code for a prompt too long: their message opens with this.
        if err.code == "context_length_exceeded" or err.says("this model's maximum context length"):
            return Outcome.CONTEXT_WINDOW
        if err.code in ("content_filter", "content_policy_violation"):
            return Outcome.CONTENT_POLICY
        return Outcome.CLIENT_ERROR

    def too_large(self, body: bytes) -> bool:
        """Whether a 429 says this request is larger than the deployment's limit allows (OpenAI's
        and Azure's "Request too large for gpt-4o … on tokens per min (TPM): Limit 30000,
        Requested 50000"), which no wait lets through, rather than that the limit is in use."""
        low = body[:2048].lower()
        return b"request too large" in low or b"must be reduced" in low

    def error_message(self, status: int, body: bytes) -> str:
        """A client-safe message for a non-2xx answer (`error.message` in most providers' bodies)."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            err = obj.get("error")
            msg = err.get("message") if isinstance(err, dict) else obj.get("message", obj.get("Message"))
            if isinstance(msg, str):
                return redact.cut(msg, 500)  # before the word at the cut: never half a secret
        return f"upstream answered HTTP {status}"

    def translate_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The provider's JSON answer as an OpenAI chat completion (identity for pass-through)."""
        return obj

    def stream_translator(self, model: str, include_usage: bool = False) -> StreamTranslator | None:
        """A translator from the provider's stream bytes to OpenAI SSE bytes (None: pass-through).

        `include_usage` is the client's `stream_options.include_usage`: whether the
        translated stream ends with a usage chunk.
        """
        return None

    def health_headers(self) -> dict[str, str]:
        """Headers for the health-check request."""
        return {}

    def health_url(self) -> str:
        """A cheap URL whose 2xx answer means the provider is up."""
        path = self.provider.health_check.path if self.provider.health_check else "/models"
        return self.provider.base_url + path
