"""Pooled HTTP clients, one per provider, and the table of deployments.

Each provider gets one `HttpClient` (edgeroute.upstream_http) with its own connection
limit and keep-alive pool, created with the live config and closed when it is replaced
or the server stops. The URL and credentials always come from the config: nothing in
a client's request can change where a call goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeroute import secrets
from edgeroute.config import Config, Deployment, Price
from edgeroute.egress import Egress
from edgeroute.providers import Adapter, adapter_for
from edgeroute.upstream_http import wire
from edgeroute.upstream_http.client import HttpClient
from edgeroute.upstream_http.tls import tls_context

# Seconds an unused upstream connection stays open (many servers close theirs after 60-75 s).
KEEPALIVE_TIMEOUT_S = 30.0


@dataclass(slots=True)
class Upstream:
    """A provider: its adapter and its connection pool."""

    name: str
    adapter: Adapter
    client: HttpClient

    async def close(self) -> None:
        await self.client.close()


@dataclass(slots=True, frozen=True)
class DeploymentInfo:
    """What the request path needs to know about a deployment, by core index."""

    index: int
    name: str
    model: str
    provider: str
    price: Price
    context_window: int

    @property
    def cached_as(self) -> tuple[str, str]:
        """Its name and what it is (provider and upstream model), for the response cache: an
        answer is reused only while the deployment of that name is still the same model."""
        return self.name, f"{self.provider}/{self.model}"


# A provider key a refresh replaced leaves the cached request heads at once.
secrets.on_replaced(wire.forget)


def retire_keys(old: dict[str, Upstream], current: dict[str, Upstream]) -> None:
    """Drops the cached request heads of the keys `old` (a retired generation's providers)
    used that `current` does not: a reload that changed a key leaves none of the old behind."""
    in_use = {u.adapter.api_key.reveal() for u in current.values() if u.adapter.api_key is not None}
    for up in old.values():
        if up.adapter.api_key is not None and (key := up.adapter.api_key.reveal()) not in in_use:
            wire.forget(key)


def resolved_headers(headers: dict[str, str]) -> dict[str, str]:
    """A provider's `headers` with each value given by reference (`x-api-key: file:...`) read:
    sent as its text, it was a credential the upstream never got, and no secret to redact.
    Read at load and reload (as `proxy`); a credential rotated without a reload goes in `api_key`."""
    return {
        k: secrets.resolve(v).reveal() if v.startswith(secrets.REFERENCE_PREFIXES) else v for k, v in headers.items()
    }


def make_upstreams(cfg: Config) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, p in cfg.providers.items():
        key = secrets.resolve(p.api_key) if p.api_key else None
        if any(v.startswith(secrets.REFERENCE_PREFIXES) for v in p.headers.values()):
            p = p.model_copy(update={"headers": resolved_headers(p.headers)})
        adapter = adapter_for(p.kind)(name, p, key)
        tls = tls_context(p.tls.ca_bundle, p.tls.client_cert, p.tls.client_key) if p.tls else None
        proxy = p.proxy if p.proxy in (None, "direct") else secrets.resolve(p.proxy).reveal()
        client = HttpClient(
            p.max_connections,
            p.timeouts.connect,
            ssl_context=tls,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            egress=Egress.build(proxy),
        )
        out[name] = Upstream(name, adapter, client)
    return out


def deployment_table(cfg: Config, names: list[str]) -> list[DeploymentInfo]:
    """Deployment facts in the core's index order."""
    table = []
    for i, name in enumerate(names):
        d: Deployment = cfg.deployments[name]
        table.append(DeploymentInfo(i, name, d.model, d.provider, d.price, d.context_window))
    return table
