"""Pooled HTTP clients, one per provider, and the table of deployments.

Each provider gets one `aiohttp.ClientSession` with its own connection limit and
keep-alive pool, created when the server starts and closed when it stops. The URL
and credentials always come from the config: nothing in a client's request can
change where a call goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from edgeroute import secrets
from edgeroute.config import Config, Deployment, Price
from edgeroute.providers import Adapter, adapter_for


@dataclass(slots=True)
class Upstream:
    """A provider: its adapter and its connection pool."""

    name: str
    adapter: Adapter
    session: aiohttp.ClientSession

    async def close(self) -> None:
        await self.session.close()


@dataclass(slots=True, frozen=True)
class DeploymentInfo:
    """What the request path needs to know about a deployment, by core index."""

    index: int
    name: str
    model: str
    provider: str
    price: Price
    context_window: int


def make_upstreams(cfg: Config) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, p in cfg.providers.items():
        key = secrets.resolve(p.api_key) if p.api_key else None
        adapter = adapter_for(p.kind)(name, p, key)
        connector = aiohttp.TCPConnector(
            limit=p.max_connections, limit_per_host=p.max_connections, keepalive_timeout=30, ttl_dns_cache=300
        )
        timeout = aiohttp.ClientTimeout(total=None, connect=p.timeouts.connect, sock_connect=p.timeouts.connect)
        session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",), raise_for_status=False
        )
        out[name] = Upstream(name, adapter, session)
    return out


def deployment_table(cfg: Config, names: list[str]) -> list[DeploymentInfo]:
    """Deployment facts in the core's index order."""
    table = []
    for i, name in enumerate(names):
        d: Deployment = cfg.deployments[name]
        table.append(DeploymentInfo(i, name, d.model, d.provider, d.price, d.context_window))
    return table
