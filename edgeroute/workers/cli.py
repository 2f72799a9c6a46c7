"""`edgeroute serve --workers N|auto [--cpu-affinity]`: checks the flags, holds the port, runs the supervisor."""

from __future__ import annotations

import argparse
import sys

from edgeroute.config import Config
from edgeroute.cost import ledger_lock
from edgeroute.workers import run_dir
from edgeroute.workers import worker as workers
from edgeroute.workers.supervisor import Supervisor, cannot_listen, reserve_port, resolve_workers


def worker_command(args: argparse.Namespace, host: str, port: int) -> list[str]:
    """A worker's argv: the same serve command, on the supervisor's port, one process."""
    cmd = [sys.executable, "-m", "edgeroute", "serve", "--config", args.config, "--host", host, "--port", str(port)]
    for flag, value in (("--log-format", args.log_format), ("--log-level", args.log_level)):
        if value is not None:
            cmd += [flag, value]
    return [*cmd, "--workers", "1"]


def serve_workers(cfg: Config, args: argparse.Namespace) -> int:
    try:
        count = resolve_workers(args.workers)
    except ValueError as e:
        print(f"edgeroute: {e}", file=sys.stderr)
        return 2
    cpus = workers.cpus() if args.cpu_affinity else None
    if cpus is not None and not cpus:
        print("edgeroute: --cpu-affinity: this system cannot pin a process to a CPU", file=sys.stderr)
        return 2
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    try:
        held = reserve_port(host, port)
    except OSError as e:
        print(cannot_listen(host, port, e), file=sys.stderr)
        return 1
    port = held.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    where = run_dir.base()
    if left := run_dir.sweep(where):  # by supervisors killed before they could clean up
        print(f"edgeroute: removed {len(left)} run directories left in {where} by servers no longer running")
    run = run_dir.create(where)
    sup = Supervisor(
        worker_command(args, host, port), count, cfg.server.drain_timeout, lambda s: print(s, flush=True), run
    )
    sup.cpus = cpus
    sup.on_tick = ledger_lock.publish  # the workers refuse spend while another server holds the ledger
    try:
        return sup.run(f"http://{shown}:{port}")
    finally:
        held.close()
