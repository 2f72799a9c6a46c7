"""Alert notifications to webhooks, off the request path.

Notifications wait in a bounded queue; one background task hands each to its webhook's
own sender, so a slow or unreachable webhook delays nothing but its own notifications
(each webhook keeps at most `QUEUE_SIZE` waiting; beyond that one is dropped and
counted). Each attempt has its webhook's `timeout_s`; a timeout, a connection error, a 429
or a 5xx is tried again after a backoff (`BACKOFF_S`, `ATTEMPTS` in all), any other answer
is final. Redirects are never followed, and a failure is logged with the webhook's name and
the error's type, never its URL (a Slack URL is a secret).
Two formats: `json` (the event and the alert object, as `GET /admin/alerts` shows it)
and `slack` (an incoming-webhook `{"text": ...}` body, which Slack-compatible chat
tools such as Mattermost and Rocket.Chat accept too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from edgeroute import secrets
from edgeroute.telemetry.settings import Webhook

log = logging.getLogger("edgeroute.alerts")

QUEUE_SIZE = 256
# At shutdown, what is queued or being sent (a retry's backoff included) may take this long
# to go out before the notifier stops: cancelled at once, a "firing" whose webhook had
# answered 503 once was never sent, and the restarted process did not know it had fired.
FLUSH_AT_EXIT_S = 5.0
BACKOFF_S = (0.5, 2.0)  # before the 2nd and the 3rd attempt
ATTEMPTS = len(BACKOFF_S) + 1
_ICONS = {"firing": ":rotating_light:", "resolved": ":white_check_mark:", "test": ":information_source:"}


@dataclass(slots=True, frozen=True)
class Notification:
    webhook: str
    event: str  # firing | resolved | test
    alert: dict[str, Any]


def body_for(fmt: str, n: Notification) -> bytes:
    if fmt == "slack":
        a = n.alert
        text = f"{_ICONS.get(n.event, '')} [{n.event.upper()}] {a['severity']}: {_slack_text(a['message'])}"
        return orjson.dumps({"text": text.strip()})
    return orjson.dumps({"source": "edgeroute", "event": n.event, "alert": n.alert})


def _slack_text(text: str) -> str:
    """`text` shown as written: Slack reads `<...>` as a mention or a link (`<!channel>` pings
    everyone, `<https://x|Sign in again>` hides where it goes) and `&` as an entity's start. A
    message holds names (a key's, a team's, a deployment's) that need not be the operator's own."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def longest_delivery_s(hook: Webhook) -> float:
    """How long `Notifier.deliver` can take for one webhook, every attempt timing out."""
    return hook.timeout_s * ATTEMPTS + sum(BACKOFF_S)


class _Retry(Exception):
    """An attempt that failed in a way that may pass on a later one."""


class Notifier:
    """Sends notifications to the configured webhooks; counts what was sent, failed or dropped."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue(QUEUE_SIZE)
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.dropped = 0
        self.webhooks: dict[str, Webhook] = {}
        self._session: aiohttp.ClientSession | None = None
        self._backlog: dict[str, deque[Notification]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}

    def enqueue(self, n: Notification) -> None:
        try:
            self.queue.put_nowait(n)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            self._session = session
            try:
                while True:
                    n = await self.queue.get()
                    self.queue.task_done()  # handed on (or dropped): `flush` waits for its sender
                    backlog = self._backlog.setdefault(n.webhook, deque())
                    if len(backlog) >= QUEUE_SIZE:  # this webhook is that far behind
                        self.dropped += 1
                        continue
                    backlog.append(n)
                    if n.webhook not in self._senders:
                        self._senders[n.webhook] = asyncio.create_task(self._drain(n.webhook))
            finally:
                for task in self._senders.values():
                    task.cancel()
                for task in list(self._senders.values()):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self._session = None

    async def flush(self) -> None:
        """Until nothing is queued or being sent (`run` still running); the caller bounds it."""
        await self.queue.join()
        while self._senders:
            await asyncio.wait(list(self._senders.values()))

    def pending(self) -> int:
        return self.queue.qsize() + sum(len(b) for b in self._backlog.values()) + len(self._senders)

    async def _drain(self, webhook: str) -> None:
        backlog = self._backlog[webhook]
        try:
            while backlog:
                await self.deliver(backlog.popleft())
        finally:
            del self._senders[webhook]

    async def deliver(self, n: Notification) -> bool:
        """Sends `n`, trying again after a backoff while it may pass; counts the result."""
        hook = self.webhooks.get(n.webhook)
        if hook is None or self._session is None:  # removed by a reload meanwhile, or shutting down
            return False
        ok = False
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(BACKOFF_S[attempt - 1])
            try:
                ok = await self._send(self._session, n, hook)
                break
            except _Retry as e:
                status = str(e)
                if attempt + 1 < ATTEMPTS:
                    log.info("alert notification to webhook %r failed (%s); trying again", n.webhook, status)
                else:
                    log.warning("alert notification to webhook %r failed (%s)", n.webhook, status)
        counts = self.sent if ok else self.failed
        counts[n.webhook] = counts.get(n.webhook, 0) + 1
        return ok

    async def _send(self, session: aiohttp.ClientSession, n: Notification, hook: Webhook) -> bool:
        """True: sent; False: failed for good; raises `_Retry` when another attempt may pass."""
        try:
            url = secrets.resolve(hook.url).reveal()
            headers = {k: secrets.resolve(v).reveal() for k, v in hook.headers.items()}
        except secrets.SecretError as e:
            log.warning("alert notification to webhook %r failed (%s)", n.webhook, type(e).__name__)
            return False
        headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(hook.timeout_s):
                # Never followed: a redirect would carry the alert and the webhook's secret
                # headers to a host the config did not name (aiohttp keeps all but Authorization).
                body = body_for(hook.format, n)
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as r:
                    # The status is the answer; its body is never read (one without end was read
                    # to the timeout, held in memory, and the delivered alert sent again).
                    if r.status < 300:
                        return True
                    status = f"HTTP {r.status}"
                    if r.status == 429 or r.status >= 500:
                        raise _Retry(status)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise _Retry(type(e).__name__) from None  # never the URL: it may hold a token
        log.warning("alert notification to webhook %r failed (%s)", n.webhook, status)
        return False
