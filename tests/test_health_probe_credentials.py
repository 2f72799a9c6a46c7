"""An active health probe that the provider refuses our credentials for is a failed probe.

The probe asks the provider's `/models` with the deployment's own credentials; it counted any
answer under 500 but a 429 as healthy, a 401 or 403 included. A provider that revoked our key
(every real request refused) was therefore never ejected by its probe, and every interval the
probe restored the deployments that user requests' auth errors had ejected, so requests went
on trying a deployment that could not answer.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai

from tests.conftest import eventually, simple_config


async def test_a_probe_refused_our_key_ejects_and_never_restores(start_upstream: Any, start_proxy: Any) -> None:
    revoked, good = await start_upstream(api_key="a-rotated-key"), await start_upstream(record=True)
    cfg = simple_config({"a": revoked, "b": good}, health={"base_ejection_ms": 600_000})
    cfg["providers"]["a"]["health_check"] = {"interval": 0.05, "timeout": 2}
    cfg["models"]["m"]["strategy"] = "weighted"
    cfg["deployments"]["d-a"]["weight"] = 1000  # chosen first whenever it is in
    proxy = await start_proxy(cfg)

    async def circuit_of_a() -> str:
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
            return str({d["name"]: d for d in (await r.json())["deployments"]}["d-a"]["circuit"])

    async def ejected() -> bool:
        return await circuit_of_a() == "open"

    # Before any user request: the probe alone finds the provider refusing our key.
    await eventually(ejected, "d-a ejected by its probe (the provider refuses our key)", within=10)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-edgeroute-deployment"] == "d-b"
        assert [a.deployment for a in proxy.recorder.records[-1].attempts] == ["d-b"]  # d-a not tried
    assert await circuit_of_a() == "open"  # many probes later, still out
