"""How long a whole (non-streamed) answer's body may take once its head has arrived.

Each piece of a body moved the attempt's timer to `idle` after it, and nothing bounded the body
as a whole but the total timeout: an upstream that sent its head, then its JSON one byte under
every `idle`, held the request for all of `total` (300 s and more), and the healthy deployment
was never tried. A JSON answer is written after its generation ended, so its body must also have
arrived by the attempt's first-byte deadline plus `idle`, plus the time its size takes at
`MIN_BODY_RATE` (a large answer over a slow link still arrives); past that it fails as a stalled
body does (a timeout, failed over). The same holds for a stream request answered with JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edgeroute.dispatch.deadline import Deadline

# Bytes a second a body may not fall under once its allowance is spent: far under any link an
# upstream answers over, far over a trickle (one byte a second).
MIN_BODY_RATE = 256 * 1024


def pacer(
    loop: asyncio.AbstractEventLoop, deadline: Deadline, idle: float, overall: float, pieces: list[bytes]
) -> Callable[[], None]:
    """What to run after each piece of a body (`read_up_to`'s `each`) that `pieces` collects:
    the attempt's `deadline` (still its first-byte one) moves to `idle` after the piece, but
    never past `overall` nor past the body's own allowance, which starts with its content:
    whitespace before it is a server's keep-alive while the model still writes (oMLX sends the
    head at once, then a space every few seconds), each bounded by `idle` as before."""
    by: float | None = None  # when the content began, plus `idle`
    size = 0

    def more() -> None:
        nonlocal size, by
        piece = pieces[-1]
        if by is None:
            if not piece.strip():
                deadline.reschedule(min(loop.time() + idle, overall))
                return
            by = loop.time() + idle
        size += len(piece)
        deadline.reschedule(min(loop.time() + idle, overall, by + size / MIN_BODY_RATE))

    return more
