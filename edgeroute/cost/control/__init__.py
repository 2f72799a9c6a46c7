"""The cost-control `Admission`: identity, rate limits, deployment limits and budgets.

`admit` runs after the core's decision and before dispatch:

1. the client's identity (set by the keys middleware; anonymous without `keys:`) goes
   into the record;
2. key and model token buckets (RPM, TPM) are taken, all or nothing, else 429 with
   `Retry-After` and OpenAI's `x-ratelimit-*` headers (also sent on success);
3. the first deployment's provider limits: when its bucket is empty the core is told
   (a rate-limit cool-down until a token is back) and the ticket asks the endpoint to
   decide again, so selection routes around it;
4. budgets: the estimated maximum cost (prompt tokens + max_tokens, or the configured
   cap, for each of the `n` choices, at the highest price among the deployments the
   request may use in the running config generation) is reserved in every budget the
   request falls under, atomically; at a `downgrade` threshold the request is rerouted
   to the cheaper model (the reservation and the model's rate limits follow); over a
   `block` threshold it is refused with 429 naming the budget and when it resets.

A refused request gives back its reservations and token estimates. `settle` replaces reservations by the
actual cost and token estimates by the actual tokens (a deployment's by the tokens that
deployment served). Without Redis everything is synchronous dict arithmetic
(microseconds). With Redis, admission's three checks are one script (one round trip) and
settlements are batched with other requests' after the answer; if Redis fails, `on_unavailable: open`
falls back to this instance's own counters, `closed` refuses with 503. Under
`serve --workers N` without Redis, the workers share one SQLite file instead
(`workers/local_state.py`, the same interface and guarantee on one machine).

Its parts, one module each, combined into `CostControl` (`admit.py`):

- `stores`: the shared store when configured and up, else this process's counters;
- `rate_limits`: key, model and deployment token buckets, their headers and 429;
- `reservations`: budgets' reservations, downgrades and the 429 of a blocked budget;
- `settlement`: reservations held, settled to the actual cost, given back when refused;
- `read_back`: spend read back from the ledger (at start, after a reload, into a shared store);
- `notify`: budget `notify` thresholds (log and webhook);
- `ticket`: what one request holds from admission until settlement.
"""

from edgeroute.cost.control.admit import CostControl
from edgeroute.cost.control.rate_limits import on_response_prepare
from edgeroute.cost.control.reservations import prompt_upper

__all__ = ["CostControl", "on_response_prepare", "prompt_upper"]
