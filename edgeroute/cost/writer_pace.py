"""When the ledger's writer takes its next batch, so that a record is committed within one
flush interval of being recorded (what a `kill -9` may lose).

Sleeping one interval between batches is not enough: a record that arrives just after a
batch was taken waits that interval *and* the write of the next batch. So the period `P`
between batches leaves room for the write: the next batch holds about `rate * P` records,
each taking `per_record_s` to write (its share of the batch's fixed costs included), so
`P + margin * per_record_s * rate * P <= interval`. `per_record_s` is a decaying maximum,
so a slow write (a checkpoint, a busy machine) shortens the next few periods. A queue
twice as long as the expected batch (a burst) wakes the writer at once.

Pure arithmetic, no clock and no thread: the writer feeds it what each cycle measured.
"""

from __future__ import annotations

import sys

MARGIN = 2.0  # room, in expected write times, for a write slower than the recent ones
MIN_WAKE_ROWS = 64  # a size wake-up for fewer records would cost more commits than it saves
_DECAY = 0.8  # per cycle: a slow write counts for about five cycles


class WriterPace:
    def __init__(self, interval: float, margin: float = MARGIN) -> None:
        self.interval = interval
        self.margin = margin
        self.rate = 0.0  # records a second over the last cycle
        self.per_record_s = 0.0
        self.period_s = interval / 2  # before anything was measured: half an interval
        self.wake_rows = sys.maxsize  # no size wake-up until a rate is known

    def cycle(self, taken: int, over_s: float, took_s: float) -> None:
        """A batch of `taken` records, which arrived over `over_s` seconds, was written (with
        the retention work after it) in `took_s` seconds."""
        per = took_s / taken if taken else 0.0
        self.per_record_s = max(per, _DECAY * self.per_record_s)
        self.rate = taken / max(over_s, 1e-3)
        self.period_s = self.interval / (1 + self.margin * self.per_record_s * self.rate)
        self.wake_rows = max(MIN_WAKE_ROWS, int(2 * self.rate * self.period_s))
