"""The `edgeroute` command line: serve, check, demo, route, spend, prices, logs, stats, bench, keys,
config, audit, router.

Defaults may come from the environment (a flag wins): `EDGEROUTE_CONFIG` (the config file),
`EDGEROUTE_HOST`, `EDGEROUTE_PORT` (where `serve` listens), `EDGEROUTE_LOG_LEVEL` (`serve --log-level`)
and `EDGEROUTE_WORKERS` (`serve --workers`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from edgeroute import config as config_mod


def _load(path: str, check_secrets: bool = True) -> config_mod.Config | None:
    """The config at `path`, or None after printing every problem with it."""
    try:
        return config_mod.load(path, check_secrets=check_secrets)
    except config_mod.ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return None


ENV_CONFIG, ENV_HOST, ENV_PORT, ENV_LOG_LEVEL, ENV_WORKERS = (
    "EDGEROUTE_CONFIG",
    "EDGEROUTE_HOST",
    "EDGEROUTE_PORT",
    "EDGEROUTE_LOG_LEVEL",
    "EDGEROUTE_WORKERS",
)
LOG_LEVELS = ("debug", "info", "warning", "error")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from edgeroute import _core

    try:
        package = version("edgeroute")
    except PackageNotFoundError:  # running from a source tree that was never installed
        package = "unknown"
    return f"edgeroute {package} (core {_core.__version__})"


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return port


def _workers(value: str) -> str:
    from edgeroute.workers.supervisor import resolve_workers

    try:
        resolve_workers(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _config_option(p: argparse.ArgumentParser) -> None:
    """`--config/-c`, required unless EDGEROUTE_CONFIG names the file."""
    default = os.environ.get(ENV_CONFIG) or None
    p.add_argument(
        "--config", "-c", default=default, required=default is None,
        help=f"the YAML config file (default: ${ENV_CONFIG})",
    )  # fmt: skip


def _cmd_check(args: argparse.Namespace) -> int:
    from edgeroute.config.checks import shared_state_notes
    from edgeroute.cost.prices import audio_unpriced
    from edgeroute.words import counted

    if (cfg := _load(args.config)) is None:
        return 1
    counts = ", ".join(
        counted(len(part), noun)
        for part, noun in (
            (cfg.providers, "provider"), (cfg.deployments, "deployment"), (cfg.models, "model"), (cfg.rules, "rule"),
        )
    )  # fmt: skip
    print(f"{args.config}: OK ({counts})")
    if unpriced := [name for name, d in cfg.deployments.items() if "price" not in d.model_fields_set]:
        # Valid (a self-hosted model may cost nothing), but easy to miss: spend, budgets and
        # `lowest_cost` see such a deployment as free.
        print(
            f"note: {'deployment' if len(unpriced) == 1 else 'deployments'} {', '.join(unpriced)} "
            f"{'has' if len(unpriced) == 1 else 'have'} no price, so {'its' if len(unpriced) == 1 else 'their'} "
            "requests cost $0 in spend, budgets and lowest_cost; give `price: catalogue` or "
            "`price: {input_per_mtok: N, output_per_mtok: N}` (zeros for a free one) to say so",
            file=sys.stderr,
        )
    if audio := audio_unpriced(cfg):
        print(
            f"note: {', '.join(audio)} {'serves an audio model' if len(audio) == 1 else 'serve audio models'} "
            "without audio prices: audio tokens are priced as text; give `audio_input_per_mtok` and "
            "`audio_output_per_mtok` in its price",
            file=sys.stderr,
        )
    for note in [*_content_notes(cfg), *_residency_notes(cfg), *shared_state_notes(cfg)]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _content_notes(cfg: config_mod.Config) -> list[str]:
    """The request log's per-model and per-key content settings that name nothing this config
    serves or knows: valid (a model may be added later, a managed key is not in the file), but
    a misspelt name keeps that model's or key's prompts as `log_content` says, silently."""
    import re

    log = cfg.request_log
    notes = []
    if models := [m for m in log.content_models if m not in cfg.models]:
        notes.append(
            f"request_log.content_models names {', '.join(models)}, "
            f"{'which is not a model' if len(models) == 1 else 'which are not models'} of this config: "
            f"{'its setting applies' if len(models) == 1 else 'their settings apply'} to no request"
        )
    managed = re.compile(r"k[0-9a-f]{12}")  # a managed key's id: it lives in the database, not the file
    if keys := [k for k in log.content_keys if k not in cfg.keys and not managed.fullmatch(k)]:
        notes.append(
            f"request_log.content_keys names {', '.join(keys)}, "
            f"{'which is not a key' if len(keys) == 1 else 'which are not keys'} of this config (nor a managed "
            f"key's id, k and 12 hex digits): {'its setting applies' if len(keys) == 1 else 'their settings apply'}"
            " to no request"
        )
    return notes


def _residency_notes(cfg: config_mod.Config) -> list[str]:
    """Keys and teams bound to a region no deployment is tagged with: valid (a deployment may
    be tagged later), but every request of theirs is refused (403) until one is."""
    from edgeroute.governance.residency import regions

    res = cfg.governance.residency
    if res is None:
        return []
    served = regions(cfg)
    bound: dict[str, list[str]] = {}
    for what, table in (("key", res.keys), ("team", res.teams)):
        for name, region in table.items():
            if region not in served:
                bound.setdefault(region, []).append(f"{what} {name}")

    def listed(who: list[str]) -> str:
        return " and ".join([", ".join(who[:-1]), who[-1]] if len(who) > 1 else who)

    return [
        f"governance.residency binds {listed(who)} to region {region}, which no deployment is tagged with "
        f"({res.tag_prefix}{region}): {'its' if len(who) == 1 else 'their'} requests are refused (403) until one is"
        for region, who in sorted(bound.items())
    ]


def _cmd_serve(args: argparse.Namespace) -> int:
    from edgeroute import reload_signal

    reload_signal.hold()  # a reload asked while starting is applied once serving, not fatal
    from edgeroute.workers import worker as workers

    if args.workers == "1":  # one process: a worker of `--cpu-affinity`, or alone
        allowed = workers.cpus()
        if args.cpu_affinity and not allowed:
            print("edgeroute: --cpu-affinity: this system cannot pin a process to a CPU", file=sys.stderr)
            return 2
        cpu = workers.pin(allowed[0] if args.cpu_affinity else None)  # before any thread starts
        if args.cpu_affinity and workers.current() is None:
            print(f"edgeroute: pinned to CPU {cpu}", flush=True)
    if (cfg := _load(args.config)) is None:
        return 1
    from edgeroute.server import serve

    logging = {k: v for k in ("log_format", "log_level") if (v := getattr(args, k)) is not None}
    if logging:  # the flags win over the config file's `server:` settings
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update=logging)})
    if workers.current() is None:  # a supervisor holds it for its workers
        from edgeroute.cost import ledger_lock

        try:
            ledger_lock.claim(cfg, args.config)  # held until the process exits
        except ledger_lock.LedgerInUse as e:
            print(f"edgeroute: {e}", file=sys.stderr)
            return 1
    if args.workers != "1":
        from edgeroute.workers.cli import serve_workers

        return serve_workers(cfg, args)
    serve(cfg, args.config, args.host, args.port, print_fn=lambda s: print(s, flush=True))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgeroute.demo import run_demo

    return run_demo(port=args.port, tour_only=args.tour_only)


def _cmd_route(args: argparse.Namespace) -> int:
    import orjson

    from edgeroute.core import EdgerouteError, build_router

    if (cfg := _load(args.config, check_secrets=False)) is None:
        return 1
    if args.model is None:
        if len(cfg.models) != 1:
            print(f"error: name the model to route with --model (one of: {', '.join(cfg.models)})", file=sys.stderr)
            return 2
        args.model = next(iter(cfg.models))
    elif args.model not in cfg.models:
        import difflib

        close = difflib.get_close_matches(args.model, list(cfg.models), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (one of: {', '.join(cfg.models)})"
        print(f"error: {args.config} has no model {args.model!r}{hint}", file=sys.stderr)
        return 2
    router = build_router(cfg, args.config)
    body = orjson.dumps({"model": args.model, "messages": [{"role": "user", "content": args.prompt}]})
    try:
        d = router.decide(body, tags=args.tag or None, explain=True)
    except EdgerouteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = router.deployment_names()
    print(f"model:      {d.model}\nroute:      {d.route}\nrule:       {d.rule or '(default)'}")
    print(f"why:        {'; '.join(d.reasons)}\nstrategy:   {d.strategy}")
    print(f"tokens:     {d.prompt_tokens} ({d.encoding})\ndeployment: {names[d.order[0]]}")
    print(f"fallbacks:  {', '.join(names[i] for i in d.order[1:]) or '(none)'}")
    if d.variant is not None:
        print(f"variant:    {d.variant}")
    if d.policy is not None:
        print(f"policy:     {d.policy}")
    if d.task is not None:
        print(f"task:       {d.task} (p={d.task_confidence:.2f})")
    if d.difficulty is not None:
        scores = ", ".join(f"{m}={s:.2f}" for m, s in d.scores)
        print(f"difficulty: {d.difficulty:.2f}  (predicted scores: {scores})")
    return 0


def _cmd_spend(args: argparse.Namespace) -> int:
    from edgeroute.cost.reports import cli

    return cli(args.config, args.by, args.format, args.since)


def build_parser() -> argparse.ArgumentParser:
    from edgeroute.cost.reports import GROUPS

    p = argparse.ArgumentParser(
        prog="edgeroute",
        description="An LLM routing edge proxy.",
        epilog=(
            f"Environment: {ENV_CONFIG}, {ENV_HOST}, {ENV_PORT}, {ENV_LOG_LEVEL}, {ENV_WORKERS} set defaults "
            "(EDGEROUTE_URL, EDGEROUTE_ADMIN_KEY for keys, config and audit); flags win. "
            "`edgeroute COMMAND --help` for each command."
        ),
    )
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    _config_option(s)
    s.add_argument(
        "--host",
        default=os.environ.get(ENV_HOST) or None,
        help=f"listen address (default: ${ENV_HOST}, else server.host)",
    )
    s.add_argument(
        "--port",
        type=_port,
        default=None,  # $EDGEROUTE_PORT, checked in `_main` so that its error names the variable
        help=f"listen port (default: ${ENV_PORT}, else server.port)",
    )
    s.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (server.log_format)")
    s.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=os.environ.get(ENV_LOG_LEVEL) or None,
        help=f"log verbosity (default: ${ENV_LOG_LEVEL}, else server.log_level)",
    )
    s.add_argument(
        "--workers",
        type=_workers,
        default=None,  # $EDGEROUTE_WORKERS, else 1: see `_main`
        help=f"worker processes on the one port, or 'auto' for one per core (default: ${ENV_WORKERS}, else 1)",
    )
    s.add_argument(
        "--cpu-affinity",
        action="store_true",
        help="pin each worker process to one CPU, in turn (as nginx's worker_cpu_affinity auto)",
    )
    s.set_defaults(fn=_cmd_serve)

    c = sub.add_parser("check", help="validate a config file without serving")
    c.add_argument(
        "config",
        nargs="?" if os.environ.get(ENV_CONFIG) else None,
        default=os.environ.get(ENV_CONFIG),
        help=f"the YAML config file (default: ${ENV_CONFIG})",
    )
    c.set_defaults(fn=_cmd_check)

    d = sub.add_parser("demo", help="run the proxy on bundled mock providers (no keys, no network)")
    d.add_argument("--port", type=_port, default=8080, help="the proxy's port (0: any free port; default 8080)")
    d.add_argument("--tour-only", action="store_true", help="run the guided tour, then exit")
    d.set_defaults(fn=_cmd_demo)

    r = sub.add_parser("route", help="show the routing decision for a prompt")
    r.add_argument("prompt", help="the user message to route")
    _config_option(r)
    r.add_argument("--model", "-m", help="the public model to route (default: the config's only model)")
    r.add_argument("--tag", action="append", help="a request tag for rules (repeatable)")
    r.add_argument("--explain", action="store_true", help="print the explanation (always printed; kept for scripts)")
    r.set_defaults(fn=_cmd_route)

    sp = sub.add_parser("spend", help="spend from the ledger, grouped, with savings vs. the priciest model")
    _config_option(sp)
    sp.add_argument("--by", default="key", choices=list(GROUPS), help="what to group by (as GET /admin/spend?by=)")
    sp.add_argument("--format", default="table", choices=["table", "csv", "json"], help="output format")
    sp.add_argument("--since", help="e.g. 24h, 7d, 2026-11-01 (UTC)")
    sp.set_defaults(fn=_cmd_spend)

    from edgeroute.cost import prices_cli

    prices_cli.add_parser(sub)

    from edgeroute.requestlog import cli as requestlog_cli

    requestlog_cli.add_logs_parser(sub)
    requestlog_cli.add_stats_parser(sub)

    b = sub.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint (see `edgeroute bench -h`)", add_help=False
    )
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=lambda a: _delegate("edgeroute.bench.cli", a.rest))

    from edgeroute.governance.cli import add_parsers

    add_parsers(sub)  # keys, config, audit

    t = sub.add_parser("router", help="train and evaluate learned routers", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=_cmd_router)
    name_commands(p)
    return p


def name_commands(parser: argparse.ArgumentParser) -> None:
    """Each command group names its commands where argparse would name its `dest`: a missing
    one said `the following arguments are required: prices_command` (or `action`, `cmd`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if action.metavar is None:
                action.metavar = "{" + ",".join(action.choices) + "}"
            for child in action.choices.values():
                name_commands(child)


_ROUTER_USAGE = """usage: edgeroute router {train,eval,calibrate,replay,shadow} ...

  train      fit a router from per-prompt outcomes (needs numpy)
  eval       cost-quality curve, APGR, CPT(50%), CPT(80%) of a router on outcomes
  calibrate  a policy threshold from a target strong share or quality
  replay     replay logged outcomes through a config's routing
  shadow     a candidate router against the running one on live traffic

`edgeroute router COMMAND --help` for each."""
_ROUTER_COMMANDS = ("train", "eval", "calibrate", "replay", "shadow")


def _cmd_router(args: argparse.Namespace) -> int:
    from edgeroute import policy_tools

    if not args.rest or args.rest[0] in ("-h", "--help"):
        print(_ROUTER_USAGE)
        return 0 if args.rest else 2
    if args.rest[0] not in _ROUTER_COMMANDS:  # each command's own parser knows only some of them
        print(f"{_ROUTER_USAGE.splitlines()[0]}\nedgeroute router: error: unknown command {args.rest[0]!r} "
              f"(one of: {', '.join(_ROUTER_COMMANDS)})", file=sys.stderr)  # fmt: skip
        return 2

    handled = policy_tools.main(args.rest)
    return handled if handled is not None else _delegate("edgeroute.learn.cli", args.rest)


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    mod = importlib.import_module(module)
    result: int = mod.main(argv)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`edgeroute prices list | head`): stop quietly as Unix tools do,
        # with stdout pointed at /dev/null so that the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: every `finally` on the way has run (a bench's proxies and mocks are stopped);
        # stop as shells expect (128 + SIGINT) without a traceback.
        print("edgeroute: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with parsers of their own get their arguments untouched (`--help` included).
    if argv and argv[0] == "bench":
        return _delegate("edgeroute.bench.cli", argv[1:])
    if argv and argv[0] == "router":
        return _cmd_router(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        # Defaults from the environment, checked here: argparse would blame `--port` for a bad
        # EDGEROUTE_PORT the command line never named.
        for attr, env, convert, fallback in ((
            ("port", ENV_PORT, _port, None), ("workers", ENV_WORKERS, _workers, "1"),
        )):  # fmt: skip
            if getattr(args, attr) is None:
                raw = os.environ.get(env) or None
                try:
                    setattr(args, attr, fallback if raw is None else convert(raw))
                except argparse.ArgumentTypeError as e:
                    parser.error(f"{env}={raw!r}: {e}")
    level = getattr(args, "log_level", None)
    if level is not None and level not in LOG_LEVELS:  # from the environment: not checked by choices
        parser.error(f"{ENV_LOG_LEVEL}={level!r} is not one of {', '.join(LOG_LEVELS)}")
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
