"""Fixtures for provider tests: mock upstreams of every kind, and configs that use them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from edgeroute.mock import anthropic as anthropic_mock
from edgeroute.mock import azure as azure_mock
from edgeroute.mock import bedrock as bedrock_mock
from edgeroute.mock import gemini as gemini_mock
from edgeroute.mock import openai as openai_mock

KIND_MOCKS: dict[str, ModuleType] = {
    "openai": openai_mock,
    "anthropic": anthropic_mock,
    "gemini": gemini_mock,
    "bedrock": bedrock_mock,
    "azure": azure_mock,
}

# Where each provider's API lives under the mock's root (the config's base_url).
BASE_PATHS = {"openai": "/v1", "anthropic": "", "gemini": "/v1beta", "bedrock": "", "azure": ""}


# Dummy AWS credentials: the Bedrock mock checks SigV4 signatures made with them.
BEDROCK_OPTIONS = {"region": "us-east-1", "aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "dummy-secret"}


@dataclass
class MockUpstream:
    kind: str
    server: TestServer
    options: Any

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def base_url(self) -> str:
        return self.root + BASE_PATHS[self.kind]


@pytest.fixture
async def start_mock() -> AsyncIterator[Callable[..., Awaitable[MockUpstream]]]:
    servers: list[TestServer] = []

    async def start(kind: str, **kwargs: Any) -> MockUpstream:
        mod = KIND_MOCKS[kind]
        if kind == "bedrock":
            kwargs.setdefault("aws_secret_access_key", BEDROCK_OPTIONS["aws_secret_access_key"])
        opts = mod.MockOptions(**kwargs)
        server = TestServer(mod.build_app(opts), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return MockUpstream(kind, server, opts)

    yield start
    for s in servers:
        await s.close()


def provider_config(
    ups: dict[str, MockUpstream], models: dict[str, str] | None = None, options: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One provider, deployment and model (`m-<name>`) per mock; model `m` tries them in the given order."""
    providers: dict[str, Any] = {}
    for name, u in ups.items():
        p: dict[str, Any] = {"kind": u.kind, "base_url": u.base_url, "api_key": f"key-{name}"}
        opts = dict(BEDROCK_OPTIONS) if u.kind == "bedrock" else {}
        opts.update((options or {}).get(name, {}))
        if opts:
            p["options"] = opts
        providers[name] = p
    names = list(ups)
    deployments = {
        f"d-{name}": {
            "provider": name,
            "model": (models or {}).get(name, "gpt-4o-mini"),
            "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "cached_input_per_mtok": 0.5},
        }
        for name in ups
    }
    return {
        "providers": providers,
        "deployments": deployments,
        "models": {
            "m": {"deployments": [f"d-{names[0]}"], "fallbacks": [f"m-{n}" for n in names[1:]]},
            **{f"m-{n}": {"deployments": [f"d-{n}"]} for n in names},
        },
    }


VOLATILE = frozenset({"id", "created", "system_fingerprint", "service_tier"})


def comparable(obj: Any) -> Any:
    """An answer without the fields that differ between any two calls (ids, timestamps)."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj
