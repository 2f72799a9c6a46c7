"""Provider adapters: how to call each upstream and how to read its answers.

An adapter turns an OpenAI-format chat request into the provider's request and the
provider's answers (JSON, stream, errors) back into OpenAI's format. The OpenAI
adapter is a pass-through: the body is forwarded with only `model` rewritten, and
the upstream's bytes reach the client unchanged.
"""

from __future__ import annotations

from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.providers.openai import OpenAIAdapter

__all__ = ["Adapter", "OpenAIAdapter", "UpstreamRequest", "adapter_for"]


def adapter_for(kind: str) -> type[Adapter]:
    """The adapter class for a provider `kind` from the config."""
    from edgeroute.providers import registry

    return registry.ADAPTERS[kind]
