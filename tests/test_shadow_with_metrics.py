"""Shadow mirrors with the metrics and alerts: a mirror's upstream call is paid for, so it is
in the spend Prometheus and the spend alerts read.

Mirrors were recorded in the ledger only: `edgeroute_cost_usd_total` (the Grafana spend
panels, `deploy/`'s "spend over $50/h" rule) and a `spend_per_hour` alert did not see them,
so a 100 % mirror to a dearer model could multiply the bill without a sign. Their attempts
count now; the request counters still count clients' requests only.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai

from tests.conftest import eventually, shadow_config
from tests.metrics_support import scrape
from tests.test_cost_support import cost_proxy

FREE = {"input_per_mtok": 0, "output_per_mtok": 0}
DEAR = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.50}


async def test_a_mirrors_spend_is_in_the_metrics_and_the_spend_alert(start_upstream: Any) -> None:
    up = await start_upstream()
    rules = [{"name": "burn", "kind": "spend_per_hour", "threshold": 50, "window_s": 60}]
    cfg = shadow_config(up.base_url, FREE, DEAR, alerts={"interval_s": 1, "rules": rules})
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        for _ in range(2):  # free answers; each mirror costs $0.50: $1 a minute is $60 an hour
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await client.close()

        async def mirrored() -> Any:
            m = await scrape(proxy.url)
            return m if m.total("edgeroute_cost_usd_total", deployment="strong") > 0 else None

        m = await eventually(mirrored, "the mirrors' spend in /metrics")
        assert m.total("edgeroute_cost_usd_total") == 1.0
        assert m.total("edgeroute_attempts_total", deployment="strong") == 2
        assert m.total("edgeroute_requests_total") == 2  # clients' requests only

        async def firing() -> list[Any]:
            async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/alerts") as r:
                return [a for a in (await r.json())["firing"] if a["rule"] == "burn"]

        (alert,) = await eventually(firing, "the spend alert")
        assert alert["value"] == 60.0
