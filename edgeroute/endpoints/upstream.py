"""Where an OpenAI-format endpoint other than chat lives at each kind of provider.

OpenAI and OpenAI-compatible servers serve `/embeddings`, `/completions` and `/responses`
under their `base_url`; Azure under its deployment URL (or `/openai/v1/...`). A provider
without the endpoint gets a 400 that names the deployment, before any call.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import orjson

from edgeroute.errors import ProxyError
from edgeroute.providers.azure import AzureAdapter
from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.providers.openai import OpenAIAdapter
from edgeroute.upstream import DeploymentInfo


def unsupported(dep: DeploymentInfo, what: str, param: str | None = None) -> ProxyError:
    return ProxyError(
        400,
        f"The deployment `{dep.name}` (provider kind of `{dep.provider}`) does not support {what}.",
        code="unsupported_endpoint",
        param=param,
    )


def speaks_openai(adapter: Adapter) -> bool:
    return isinstance(adapter, OpenAIAdapter)


def openai_request(
    adapter: Adapter, dep: DeploymentInfo, path: str, body: dict[str, Any], stream: bool
) -> UpstreamRequest:
    """`POST {path}` (e.g. `/embeddings`) at an OpenAI-format provider, `model` set to the deployment's."""
    if not isinstance(adapter, OpenAIAdapter):
        raise unsupported(dep, f"`{path.lstrip('/')}`")
    base = adapter.provider.base_url
    url = base + str(adapter.provider.options.get(f"{path.lstrip('/')}_path", path))
    if isinstance(adapter, AzureAdapter) and adapter.api_version != "v1":
        deployment = urllib.parse.quote(dep.model, safe="")
        query = urllib.parse.urlencode({"api-version": adapter.api_version})
        url = f"{base}/openai/deployments/{deployment}{path}?{query}"
    elif isinstance(adapter, AzureAdapter):
        url = f"{base}/openai/v1{path}"
    headers = {"Content-Type": "application/json", **adapter.provider.headers, **adapter.auth_headers()}
    if stream:
        headers["Accept"] = "text/event-stream"
    return UpstreamRequest(url, headers, orjson.dumps({**body, "model": dep.model}))
