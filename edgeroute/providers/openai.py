"""OpenAI and OpenAI-compatible servers (vLLM, Ollama, Groq, Together, Mistral, ...).

Pass-through: the client's body goes upstream with only `model` rewritten, and the
answer comes back byte for byte. Per-provider quirks are config:

- `headers` (provider field): extra headers on every request;
- `options.unsupported`: parameters the server cannot honour, handled by
  `options.unsupported_params` (`reject`: a 400 before any call; `drop`: removed);
- `options.rename_params`: e.g. `{max_tokens: max_completion_tokens}`;
- `options.chat_path`: the chat endpoint under base_url (default `/chat/completions`).

The body is re-serialised only when one of these applies to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from yarl import URL

from edgeroute.outcome import Outcome
from edgeroute.providers import openai_format as oa
from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.providers.error_fields import ErrorFields

# A prompt too long, as OpenAI-compatible servers say it without OpenAI's code (`Adapter.judge`
# reads the code and vLLM's words): llama.cpp's error type, and the opening words of an Anthropic
# model's refusal behind an OpenAI-format gateway (LiteLLM, Anthropic's own compatibility API).
# Their clients got `upstream_client_error`, and no larger deployment was tried.
_CONTEXT_TYPES = frozenset({"exceed_context_size_error"})
_CONTEXT_OPENINGS = ("prompt is too long",)
# Whole openings (the message's start, lower case), where a few words could open another error:
# TGI's validation errors (answered 422; `max_new_tokens` alone past its bound is not one), Mistral's
# API, and vLLM's engine check and its `max_tokens` check, which names the context as OpenAI does.
_CONTEXT_WORDS = re.compile(
    r"input validation error: `inputs` tokens \+ `max_new_tokens` must be <= \d+"
    r"|input validation error: `inputs` must have less than \d+ tokens"
    r"|prompt contains \d+ tokens and \d+ draft tokens, too large for model with \d+ maximum context length"
    r"|the (?:decoder |encoder )?prompt \(length \d+\) is longer than the maximum model length"
    r"|'max_tokens' or 'max_completion_tokens' is too large: \d+\. this model's maximum context length"
)


class OpenAIAdapter(Adapter):
    passthrough: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.provider.options
        self.unsupported = frozenset(str(p) for p in opts.get("unsupported") or ())
        self.rename = {str(k): str(v) for k, v in (opts.get("rename_params") or {}).items()}
        self.rule = oa.unsupported_rule(opts)
        self.chat_path = str(opts.get("chat_path", "/chat/completions"))
        # Built once: the request path only copies them (and rebuilds them when a `file:` or
        # `exec:` key was rotated, which moves the secret's version).
        self._url = URL(self.provider.base_url + self.chat_path)
        self._make_headers()

    def _make_headers(self) -> None:
        self._key_version = self.api_key.version if self.api_key is not None else 0
        self._headers = {"Content-Type": "application/json", **self.provider.headers, **self.auth_headers()}
        self._stream_headers = {**self._headers, "Accept": "text/event-stream"}

    def adjust_body(self, body: bytes) -> bytes:
        """Applies the configured parameter quirks (a no-op, without parsing, when there are none)."""
        if not self.unsupported and not self.rename:
            return body
        req = oa.parse_request(body)
        present = self.unsupported.intersection(k for k, v in req.items() if v is not None)
        renames = [k for k in self.rename if k in req]
        if not present and not renames:
            return body
        for name in sorted(present):
            if self.rule == "reject":
                raise oa.bad_request(
                    f"The parameter `{name}` is not supported by the provider serving this model ({self.name}).",
                    name,
                    "unsupported_parameter",
                )
            del req[name]
        for old in renames:
            req[self.rename[old]] = req.pop(old)
        return orjson.dumps(req)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key.reveal()}"} if self.api_key else {}

    def judge(self, status: int, err: ErrorFields, headers: Mapping[str, str]) -> Outcome:
        if status == 400 and (err.type in _CONTEXT_TYPES or err.says(*_CONTEXT_OPENINGS)):
            return Outcome.CONTEXT_WINDOW
        if status in (400, 422) and _CONTEXT_WORDS.match(err.message) is not None:
            return Outcome.CONTEXT_WINDOW
        return super().judge(status, err, headers)

    def chat_url(self, model: str) -> str | URL:
        return self._url

    def build(self, model: str, body: bytes, stream: bool) -> UpstreamRequest:
        if self.api_key is not None and self.api_key.version != self._key_version:
            self._make_headers()
        headers = dict(self._stream_headers if stream else self._headers)
        return UpstreamRequest(self.chat_url(model), headers, self.adjust_body(body))

    def health_headers(self) -> dict[str, str]:
        return self.auth_headers()
