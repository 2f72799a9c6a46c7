"""OpenAI and OpenAI-compatible servers (vLLM, Ollama, Groq, Together, Mistral, ...).

Pass-through: the client's body goes upstream with only `model` rewritten, and the
answer comes back byte for byte. Per-provider quirks (extra headers) are config.
"""

from __future__ import annotations

from typing import ClassVar

from edgeroute.providers.base import Adapter, UpstreamRequest


class OpenAIAdapter(Adapter):
    passthrough: ClassVar[bool] = True

    def build(self, model: str, body: bytes, stream: bool) -> UpstreamRequest:
        headers = {"Content-Type": "application/json", **self.provider.headers}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key.reveal()}"
        if stream:
            headers["Accept"] = "text/event-stream"
        return UpstreamRequest(self.provider.base_url + "/chat/completions", headers, body)

    def health_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key.reveal()}"} if self.api_key else {}
