"""Names of the headers edgeroute reads and writes, in one place."""

REQUEST_ID = "x-request-id"  # always edgeroute's own id in answers
CORRELATION_ID = "x-edgeroute-correlation-id"  # the client's x-request-id, echoed when well-formed
DEPLOYMENT = "x-edgeroute-deployment"
ROUTE = "x-edgeroute-route"
ATTEMPTS = "x-edgeroute-attempts"
RULE = "x-edgeroute-rule"
PROMPT_TOKENS = "x-edgeroute-prompt-tokens"
COST = "x-edgeroute-cost-usd"
EXPLAIN = "x-edgeroute-explain"
TAGS = "x-edgeroute-tags"
PRIORITY = "x-edgeroute-priority"  # the request's priority class, if its key may choose it
HEDGED = "x-edgeroute-hedged"
CACHE = "x-edgeroute-cache"  # hit | miss | stale | bypass, and the client's cache directive
CACHE_SIMILARITY = "x-edgeroute-cache-similarity"  # a hit matched by meaning: how close
DROPPED_PARAMS = "x-edgeroute-dropped-params"  # what a deployment could not honour and was left out

# Hop-by-hop and client-identity headers that must never reach an upstream.
NOT_FORWARDED = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-authorization",
        "cookie",
    }
)
