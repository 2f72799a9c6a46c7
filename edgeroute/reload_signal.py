"""A SIGHUP that arrives while `serve` is still starting.

The server sets its reload handler once it listens, seconds after the process starts (the
config, the stores, the models). Until then a SIGHUP had its default action: it ended the
process. Under systemd (`Type=exec`: started as soon as it runs) a `systemctl reload` right
after `systemctl start` did so, and `Restart=on-failure` does not restart a process that
SIGHUP ended (systemd counts it a clean exit): the service stayed down. So `serve` notes a
SIGHUP from its first steps (`hold`), and the server (or the supervisor) reloads once for
it when its own handler is in place (`take`): a config written before the reload was asked
is the one that runs.
"""

from __future__ import annotations

import signal
from types import FrameType

_asked = False


def _note(_signum: int, _frame: FrameType | None) -> None:
    global _asked
    _asked = True


def hold() -> None:
    """From now on, a SIGHUP is noted rather than ending the process (main thread only)."""
    signal.signal(signal.SIGHUP, _note)


def take() -> bool:
    """Whether a SIGHUP was noted since `hold` (and not taken yet)."""
    global _asked
    asked, _asked = _asked, False
    return asked
