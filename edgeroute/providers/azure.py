"""Azure OpenAI: OpenAI's format at deployment URLs, with an `api-key` header.

`POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version=...`,
where the deployment is the config deployment's `model`; the body and answer pass
through as with OpenAI (Azure's extra fields, e.g. content filter results, reach the
client unchanged). Azure's content-filter rejections (400, code `content_filter`)
are content-policy errors: returned, not retried.

Options: `api_version` (default below; `v1` uses Azure's `/openai/v1/chat/completions`
route with the model in the body), plus the OpenAI adapter's parameter quirks.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from yarl import URL

from edgeroute.providers.openai import OpenAIAdapter

API_VERSION = "2024-10-21"
# The first API version that takes `stream_options` (an older one answers it 400): edgeroute
# asks every stream for its usage with it, and leaves it out for an older version.
STREAM_OPTIONS_SINCE = "2024-09-01-preview"


class AzureAdapter(OpenAIAdapter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.api_version != "v1" and self.api_version < STREAM_OPTIONS_SINCE:
            self.unsupported = self.unsupported | {"stream_options"}

    @property
    def api_version(self) -> str:
        return str(self.provider.options.get("api_version", API_VERSION))

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self.api_key.reveal()} if self.api_key else {}

    def chat_url(self, model: str) -> str | URL:
        base = self.provider.base_url
        if self.api_version == "v1":
            return f"{base}/openai/v1/chat/completions"
        deployment = urllib.parse.quote(model, safe="")
        query = urllib.parse.urlencode({"api-version": self.api_version})
        return f"{base}/openai/deployments/{deployment}/chat/completions?{query}"

    def health_url(self) -> str:
        return f"{self.provider.base_url}/openai/models?" + urllib.parse.urlencode({"api-version": self.api_version})
