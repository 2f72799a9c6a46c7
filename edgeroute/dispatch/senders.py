"""Who sent a request, as the core's passive health counts it.

One client's failing requests (prompts its upstream times out on, say) must not open a
deployment's circuit for every other client: when a failure streak, error rate or failed
half-open probe is one sender's alone and other senders were seen lately, the core
(`health.rs`, `senders.rs`) ejects the deployment for that sender only; its requests skip the
deployment (`failover`) until its own probe is served. Another sender's failure meanwhile opens
the circuit for everyone. The sender is the virtual key's team when it has one (a team's keys
can mint keys of that team: one sender), else the key's id, else 0 (a keyless set-up is one
client). Never a value the client chooses (not `user`, not a header).
"""

from __future__ import annotations

import logging
import time

from edgeroute import redact
from edgeroute.cost.keys import ANONYMOUS

log = logging.getLogger("edgeroute.health")

_U64 = (1 << 64) - 1
# Sender id -> what the log says of it ("team X", "key Y"); bounded: cleared when full.
_NAMES: dict[int, str] = {}
_MAX_NAMES = 4096
# An ejection for one sender is logged once per deployment this often (the metric counts each).
LOG_EVERY_S = 60.0
_logged: dict[str, float] = {}


def sender_of(team: str | None, key: str | None) -> int:
    """The request's sender id for `Router.report`: its team, else its key, else 0."""
    if team:
        name = f"team {team}"
    elif key and key != ANONYMOUS.key:
        name = f"key {key}"
    else:
        return 0
    # In-process ids only (the core's table is per process): str's own hash, cached on the str.
    sender = hash(name) & _U64 or 1
    if sender not in _NAMES:
        if len(_NAMES) >= _MAX_NAMES:
            _NAMES.clear()
        _NAMES[sender] = name
    return sender


def ejected(deployment: str, sender: int | None) -> None:
    """Tells the operator, once a window per deployment, whose failures alone ejected
    `deployment` for that sender only (the others are still served by it)."""
    if sender is None:
        return
    now = time.monotonic()
    if now < _logged.get(deployment, 0.0):
        return
    _logged[deployment] = now + LOG_EVERY_S
    log.warning(
        "deployment %s: ejected for %s alone, whose failures alone tripped its circuit; still serving "
        "the others (edgeroute_circuit_sender_ejections_total counts each time)",
        redact.text(deployment),
        redact.text(name_of(sender)),
    )


def name_of(sender: int) -> str:
    """What the log says of `sender`."""
    return _NAMES.get(sender, "an anonymous client") if sender else "the keyless clients"
