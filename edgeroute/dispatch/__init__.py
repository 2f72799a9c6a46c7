"""The request path after the decision: attempts, retries, failover, hedging, relay.

Policy comes from the core's decision (the order of deployments, the hedge delay)
and its budgets (retry and hedge); this package does the I/O and reports every
attempt back to the core. Invariants it keeps:

- exactly one answer reaches the client, never two spliced together: a stream is
  committed to one upstream only when that upstream's first real content arrives,
  and after that an upstream failure ends the stream with an explicit error event;
- every attempt, won, lost or cancelled, is reported to the core and recorded;
- client errors (400, 404 model unknown upstream, 413, ...) are returned, not retried;
- a deployment that cannot read the request (building its request is refused) is skipped
  before any call, for a first attempt, a retry, a fallback or a hedge: never an attempt
  nor a failure, and the provider limit admission took for it goes back at once; only a
  request none can read gets the first one's refusal (before a provider limit's 429).

Modules: `attempt` (one upstream attempt and reading its answer), `failover` (the loop
over attempts and the hedging race), `relay` (relaying a committed stream).
"""

from edgeroute.dispatch.attempt import Answer, Failure, JsonAnswer, StreamAnswer, parse_retry_after, preload_tokenizer
from edgeroute.dispatch.failover import Call
from edgeroute.dispatch.relay import STREAM_STARTED, relay_stream

__all__ = [
    "STREAM_STARTED",
    "Answer",
    "Call",
    "Failure",
    "JsonAnswer",
    "StreamAnswer",
    "parse_retry_after",
    "preload_tokenizer",
    "relay_stream",
]
