"""What one request holds from admission until settlement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgeroute.cost import budgets as B
from edgeroute.cost.keys import Identity
from edgeroute.cost.limits import BucketState, Take
from edgeroute.cost.media import NONE, MediaParts


@dataclass(slots=True)
class Held:
    """Token-bucket takes charged together at admission, in one store."""

    takes: list[Take]
    shared: bool
    deployment: str | None = None  # a provider limit: settled to that deployment's own tokens
    # Its take drained the limit and held the deployment out of selection: ends that hold.
    end_hold: Callable[[], None] | None = None

    def give_back_hold(self) -> None:
        """Its takes are given back: a deployment its take held out of selection has room again."""
        if self.end_hold is not None:
            self.end_hold()
            self.end_hold = None


@dataclass(slots=True)
class CostTicket:
    """What one request holds until settlement."""

    identity: Identity
    request_id: str = ""  # its record's, which journals its reservations
    started: float = 0.0  # the request's start (its record's ts): which budgets count it in memory
    reroute: str | None = None  # the endpoint decides again for this model before dispatch
    tokens: int = 0  # the request's token estimate (prompt + max completions), for limits
    # Beyond `tokens`, taken from TPM buckets as far as they hold (`limits.Take.more`): the output
    # a request that names no bound may write (`tokens` then counts one token per answer).
    more: int = 0
    answers: int = 1  # how many answers `more` is for (`n`): each needs its floor (`limits.unbounded_take`)
    media: MediaParts = NONE  # its image, audio and file parts, which budgets reserve for too
    charges: list[B.Charge] = field(default_factory=list)
    charges_shared: bool = False
    charges_generation: str = ""  # the generation of Redis's counters they are in (`Reserved.generation`)
    run_epoch: int = 0  # this instance's run when it was admitted (`liveness`)
    held: list[Held] = field(default_factory=list)
    parallel: list[str] = field(default_factory=list)  # the keys whose `max_parallel` slot it holds
    parallel_leased: bool = False  # and holds their shared leases too
    # The public models a budget's downgrade may send this request to (None: any; see `admit`).
    can_serve: Callable[[str], bool] | None = None


Taken = tuple[bool, list[BucketState], bool]  # allowed, the buckets' states, taken in the shared store


@dataclass(slots=True)
class AtOnce:
    """Admission's checks made in one round trip (`CostControl._at_once`); None: not made."""

    rate: Taken | None = None
    deployment: Taken | None = None
    reserved: B.Reserved | None = None
    charges: list[B.Charge] = field(default_factory=list)  # what `reserved` reserved (when ok)
    leased: bool | None = None  # the keys' slots in flight (None: not asked for)
    lease_refused: int = -1  # the index of the key at its cap in the fleet, or -1
    leases: list[tuple[str, int, str]] = field(default_factory=list)  # what `leased` leased
