"""Alert notifications to webhooks, off the request path.

Notifications wait in a bounded queue and one background task sends them; when the
queue is full a notification is dropped and counted, so an unreachable webhook can
slow or fail nothing but its own notifications. Each send has its webhook's timeout.
Two formats: `json` (the event and the alert object, as `GET /admin/alerts` shows it)
and `slack` (an incoming-webhook `{"text": ...}` body, which Slack-compatible chat
tools such as Mattermost and Rocket.Chat accept too).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from edgeroute import secrets
from edgeroute.telemetry.settings import Webhook

log = logging.getLogger("edgeroute.alerts")

QUEUE_SIZE = 256
_ICONS = {"firing": ":rotating_light:", "resolved": ":white_check_mark:", "test": ":information_source:"}


@dataclass(slots=True, frozen=True)
class Notification:
    webhook: str
    event: str  # firing | resolved | test
    alert: dict[str, Any]


def body_for(fmt: str, n: Notification) -> bytes:
    if fmt == "slack":
        a = n.alert
        text = f"{_ICONS.get(n.event, '')} [{n.event.upper()}] {a['severity']}: {a['message']}"
        return orjson.dumps({"text": text.strip()})
    return orjson.dumps({"source": "edgeroute", "event": n.event, "alert": n.alert})


class Notifier:
    """Sends notifications to the configured webhooks; counts what was sent, failed or dropped."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue(QUEUE_SIZE)
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.dropped = 0
        self.webhooks: dict[str, Webhook] = {}

    def enqueue(self, n: Notification) -> None:
        try:
            self.queue.put_nowait(n)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                n = await self.queue.get()
                hook = self.webhooks.get(n.webhook)
                if hook is None:  # removed by a reload meanwhile
                    continue
                ok = await self._send(session, n, hook)
                counts = self.sent if ok else self.failed
                counts[n.webhook] = counts.get(n.webhook, 0) + 1

    async def _send(self, session: aiohttp.ClientSession, n: Notification, hook: Webhook) -> bool:
        try:
            url = secrets.resolve(hook.url).reveal()
            headers = {k: secrets.resolve(v).reveal() for k, v in hook.headers.items()}
            headers["Content-Type"] = "application/json"
            async with asyncio.timeout(hook.timeout_s):
                # Never followed: a redirect would carry the alert and the webhook's secret
                # headers to a host the config did not name (aiohttp keeps all but Authorization).
                body = body_for(hook.format, n)
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as r:
                    await r.read()
                    if r.status < 300:
                        return True
                    status = f"HTTP {r.status}"
        except (TimeoutError, aiohttp.ClientError, OSError, secrets.SecretError) as e:
            status = type(e).__name__  # never the URL: it may hold a token
        log.warning("alert notification to webhook %r failed (%s)", n.webhook, status)
        return False
