"""Provider kind → adapter class. Add a provider by adding a line here."""

from __future__ import annotations

from edgeroute.providers.base import Adapter
from edgeroute.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    "openai": OpenAIAdapter,
    "openai_compatible": OpenAIAdapter,
}
