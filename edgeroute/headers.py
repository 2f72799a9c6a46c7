"""Names of the headers edgeroute reads and writes, in one place, and how a list of a
client's names is written into one."""

import urllib.parse

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

# Characters a header token may hold (RFC 9110 `tchar`), but `%`, which starts an escape.
_TOKEN = "!#$&'*+-.^_`|~"
MAX_LIST = 1024  # characters of a header listing a client's names


def name_list(names: list[str]) -> str:
    """`names` (a client's: any text) as a comma-separated header value: each percent-encoded
    where it is not a plain token (a line break in a header is refused once the answer is
    ready), those that do not fit in `MAX_LIST` characters left out and `...` said instead."""
    shown: list[str] = []
    size, left_out = 0, False
    for name in names:
        quoted = urllib.parse.quote(name, safe=_TOKEN)
        if size + len(quoted) + 1 > MAX_LIST - 4:
            left_out = True
            continue
        shown.append(quoted)
        size += len(quoted) + 1
    return ",".join([*shown, "..."] if left_out else shown)
