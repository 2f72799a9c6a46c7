"""`edgeroute keys|config|audit`: the governance admin API from the command line.

Each command calls a running instance (`--url`, default http://127.0.0.1:8080) with an
admin key (`--key`, default `$EDGEROUTE_ADMIN_KEY`), so the same roles apply and every
change lands in the audit log under that key. Output is JSON, or a table for lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from edgeroute import redact
from edgeroute.errors import ProxyError
from edgeroute.governance.http import parse_since


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("EDGEROUTE_URL", "http://127.0.0.1:8080"),
        help="a running edgeroute (default: $EDGEROUTE_URL or http://127.0.0.1:8080)",
    )
    common.add_argument("--key", default=os.environ.get("EDGEROUTE_ADMIN_KEY"), help="default: $EDGEROUTE_ADMIN_KEY")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    kp = sub.add_parser("keys", help="managed virtual keys")
    kp.set_defaults(fn=_keys)
    k = kp.add_subparsers(dest="action", required=True)
    c = k.add_parser("create", parents=[common], help="create a key; its secret is printed once")
    _key_fields(c)
    k.add_parser("list", parents=[common], help="every key (config and managed; a team's key: its team's)")
    for name, what in (("show", "one key"), ("revoke", "revoke a key on every instance")):
        p = k.add_parser(name, parents=[common], help=what)
        p.add_argument("id", help="the key's id")
    r = k.add_parser("rotate", parents=[common], help="a new secret (printed once)")
    r.add_argument("id", help="the key's id")
    r.add_argument("--grace", default="0", help="how long the old secret keeps working, e.g. 1h (default: 0)")
    u = k.add_parser("update", parents=[common], help="change a key's fields")
    u.add_argument("id", help="the key's id")
    _key_fields(u)

    cp = sub.add_parser("config", help="config versions and rollback")
    cp.set_defaults(fn=_config)
    cf = cp.add_subparsers(dest="action", required=True)
    cf.add_parser("versions", parents=[common], help="every applied config")
    s = cf.add_parser("show", parents=[common], help="a version (default: the running one), secrets masked")
    s.add_argument("version", nargs="?", type=int, help="a version number (default: the running config)")
    d = cf.add_parser("diff", parents=[common], help="unified diff between two versions")
    d.add_argument("from_version", type=int, help="the older version")
    d.add_argument("to_version", type=int, nargs="?", help="the newer version (default: the running one)")
    rb = cf.add_parser("rollback", parents=[common], help="apply an earlier version")
    rb.add_argument("version", type=int, help="the version to apply again")

    a = sub.add_parser("audit", parents=[common], help="the audit log of admin actions")
    a.add_argument("--since", help="epoch seconds or a span such as 24h, 7d")
    a.add_argument("--actor", help="only what this key id (or rollback-guard, signal:SIGHUP) did")
    a.add_argument("--action", help="e.g. key, key.revoked, config.rollback")
    a.add_argument("--until", help="only entries before this (epoch seconds or a span such as 1h)")
    a.add_argument(
        "--limit",
        type=int,
        default=50,
        help="at most this many entries, newest first, fetched a page at a time (default: 50)",
    )
    a.add_argument("--all", action="store_true", help="every entry that matches (no --limit)")
    a.add_argument("--before-id", type=int, help="only entries older than this id (where the last call stopped)")
    a.set_defaults(fn=_audit)


def _key_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="a label for people")
    p.add_argument("--user", help="the owner (user), for rules, budgets and reports")
    p.add_argument("--team", help="the owner (team); a team's residency applies to its keys")
    p.add_argument("--role", help="service (default), viewer, operator or admin")
    p.add_argument("--model", action="append", dest="models", help="a model it may use (repeatable; default: all)")
    p.add_argument("--deny-tag", action="append", dest="deny_tags", help="a request tag it may not send")
    p.add_argument("--expires", help="a span from now (30d, 12h) or epoch seconds")
    p.add_argument("--budget-usd", type=float, help="its own budget per calendar month, in USD")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--max-parallel", type=int, help="requests in flight at once (429 past it)")
    p.add_argument("--residency", help="the only region it may reach, e.g. eu")
    p.add_argument("--priority", help="its requests' priority class (one of the config's priority.classes)")
    p.add_argument(
        "--allow-priority",
        action="append",
        dest="priorities",
        help="a further class it may ask for with x-edgeroute-priority (repeatable)",
    )
    p.add_argument("--metadata", help="a JSON object kept with the key (ticket, owner's e-mail, ...)")


def _span(raw: str, flag: str) -> float:
    """Seconds in `raw` (a span such as 1h, or plain seconds); ValueError naming `flag`."""
    try:
        if raw[-1:].isalpha():
            return round(time.time() - parse_since(raw))
        return float(raw)
    except (ProxyError, ValueError):  # parse_since speaks to API callers ('since' must be ...)
        raise ValueError(f"{flag}: {raw!r} is not a span such as 15m, 12h, 30d (or seconds)") from None


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    listed = (
        "name",
        "user",
        "team",
        "role",
        "models",
        "deny_tags",
        "budget_usd",
        "rpm",
        "tpm",
        "max_parallel",
        "residency",
    )
    for f in (*listed, "priority", "priorities"):
        if getattr(args, f) is not None:
            out[f] = getattr(args, f)
    if args.expires is not None:
        exp = args.expires
        try:
            out["expires_at"] = time.time() + _span(exp, "--expires") if exp[-1:].isalpha() else float(exp)
        except ValueError:
            raise ValueError(f"--expires: {exp!r} is not a span from now (30d, 12h) or epoch seconds") from None
    if args.metadata is not None:
        try:
            out["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as e:
            raise ValueError(f"--metadata: not JSON ({e})") from None
    return out


class ApiError(Exception):
    pass


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is refused, not followed: urllib's default handler sends the admin key on to
    wherever `Location` points (an SSO proxy in front of the server, say) and turns a POST into
    a GET there, whose JSON answer the command then printed as done."""

    def redirect_request(self, *args: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if args.key:
        req.add_header("Authorization", f"Bearer {args.key}")
    try:
        with _OPENER.open(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise ApiError(
                f"{e.code}: {args.url} redirects to {e.headers.get('Location', '(nowhere)')!r}; not followed"
                " (the admin key goes to edgeroute alone): name the server's own address with --url"
            ) from None
        try:
            err = json.loads(e.read())["error"]
            msg = err["message"]
            for p in err.get("problems") or []:
                said = str(p.get("error") or p)
                if said not in msg:  # a message that quotes its one problem already says it
                    msg += f"\n  {said}"
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        if e.code == 401:  # say how this command gives the server a key
            given = "Check the key given" if args.key else "Give an admin key"
            msg += f" {given} with --key or $EDGEROUTE_ADMIN_KEY."
        raise ApiError(f"{e.code}: {msg}") from None
    except urllib.error.URLError as e:
        raise ApiError(
            f"cannot reach {args.url}: {e.reason}; is `edgeroute serve` running there? Name its address"
            " with --url or $EDGEROUTE_URL"
        ) from None


def _print(
    args: argparse.Namespace, obj: Any, rows: list[dict[str, Any]] | None = None, cols: tuple[str, ...] = ()
) -> None:
    if rows is None or args.json:
        print(json.dumps(obj, indent=2))
        return
    table = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v))
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    # A key's user and team are whoever made it's to choose: no terminal codes, one row a line.
    return redact.printable(str(v))


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        fn(args)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _keys(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> None:
        a = args.action
        if a == "create":
            made = _call(args, "POST", "/admin/keys", _fields(args))
            print(json.dumps(made, indent=2))
            print("\nThe secret above is shown once; store it now.", file=sys.stderr)
        elif a == "list":
            got = _call(args, "GET", "/admin/keys")
            cols = ("id", "name", "source", "status", "role", "team", "user", "residency", "expires_at")
            _print(args, got, got["keys"], cols)
        elif a == "show":
            _print(args, _call(args, "GET", f"/admin/keys/{args.id}"))
        elif a == "revoke":
            _print(args, _call(args, "DELETE", f"/admin/keys/{args.id}"))
        elif a == "rotate":
            grace = _span(args.grace, "--grace")
            _print(args, _call(args, "POST", f"/admin/keys/{args.id}/rotate", {"grace_seconds": grace}))
            print("\nThe new secret above is shown once; store it now.", file=sys.stderr)
        elif a == "update":
            _print(args, _call(args, "PATCH", f"/admin/keys/{args.id}", _fields(args)))

    return _run(go, args)


def _config(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> None:
        a = args.action
        if a == "versions":
            got = _call(args, "GET", "/admin/config/versions")
            _print(args, got, got["versions"], ("version", "active", "created_at", "source", "applied_by", "hash"))
        elif a == "show":
            path = "/admin/config" if args.version is None else f"/admin/config/versions/{args.version}"
            _print(args, _call(args, "GET", path))
        elif a == "diff":
            q = f"from={args.from_version}" + (f"&to={args.to_version}" if args.to_version else "")
            diff = _call(args, "GET", f"/admin/config/diff?{q}")["diff"]
            print(diff, end="")
            if not diff:  # say so, rather than print nothing
                to = args.to_version or "the running one"
                print(f"version {args.from_version} and {to} do not differ", file=sys.stderr)
        elif a == "rollback":
            _print(args, _call(args, "POST", "/admin/config/rollback", {"version": args.version}))

    return _run(go, args)


AUDIT_PAGE = 1000  # the most `GET /admin/audit` returns at once


def _audit(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> None:
        for flag in ("since", "until"):
            if (raw := getattr(args, flag)) is not None:
                try:
                    parse_since(raw)
                except ProxyError:  # it speaks to API callers ('since' must be ...)
                    raise ValueError(f"--{flag}: {raw!r} is not epoch seconds or a span such as 15m, 24h, 7d") from None
        if args.limit < 1:
            raise ValueError("--limit: must be 1 or more")
        entries, more = _audit_pages(args)
        _print(args, {"entries": entries, "next_before_id": more}, entries, ("id", "ts", "actor", "action", "target"))
        if more is not None and not args.json:
            print(f"(more: --before-id {more})", file=sys.stderr)

    return _run(go, args)


def _audit_pages(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int | None]:
    """Up to `--limit` entries (every one with `--all`), following the API's `next_before_id`;
    returns them and where to continue (None: nothing older matches)."""
    q = {"since": args.since, "until": args.until, "actor": args.actor, "action": args.action}
    base = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in q.items() if v)
    entries: list[dict[str, Any]] = []
    more: int | None = args.before_id
    while True:
        want = AUDIT_PAGE if args.all else min(AUDIT_PAGE, args.limit - len(entries))
        cursor = f"&before_id={more}" if more is not None else ""
        got = _call(args, "GET", f"/admin/audit?{base}&limit={want}{cursor}")
        entries += got["entries"]
        more = got.get("next_before_id")
        if more is None or (not args.all and len(entries) >= args.limit):
            return entries, more
