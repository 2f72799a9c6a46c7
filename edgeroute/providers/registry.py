"""Provider kind → adapter class. Add a provider by adding a line here."""

from __future__ import annotations

from edgeroute.providers.anthropic import AnthropicAdapter
from edgeroute.providers.azure import AzureAdapter
from edgeroute.providers.base import Adapter
from edgeroute.providers.bedrock import BedrockAdapter
from edgeroute.providers.gemini import GeminiAdapter
from edgeroute.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    "openai": OpenAIAdapter,
    "openai_compatible": OpenAIAdapter,
    "anthropic": AnthropicAdapter,
    "gemini": GeminiAdapter,
    "bedrock": BedrockAdapter,
    "azure": AzureAdapter,
}
