"""`edgeroute bench mock --kind anthropic|gemini|azure`: another provider's mock, to try a config
without its keys.

The fault-injecting mock (`bench/faults.py`) speaks OpenAI's wire format only, so a provider of
another `kind:` had nothing to point at. These are the faithful mocks the test suite uses
(`edgeroute/mock/`): each answers its provider's API (Anthropic's `/v1/messages`, Gemini's
`generateContent`, Azure's deployment routes) as that provider would. Fault injection stays
with the OpenAI mock.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from types import ModuleType

from aiohttp import web

from edgeroute.mock import anthropic, azure, gemini

MOCKS: dict[str, ModuleType] = {"anthropic": anthropic, "gemini": gemini, "azure": azure}
# The provider's `base_url` in a config, under the mock's root.
BASE_PATHS = {"openai": "/v1", "anthropic": "", "gemini": "/v1beta", "azure": ""}
KINDS = ("openai", *MOCKS)
# Flags of the fault-injecting OpenAI mock that these mocks do not have, with their defaults.
OPENAI_ONLY = {
    "admin_port": None, "default": "ok", "latency": "0", "tps": 0.0, "error_rate": 0.0, "error_status": 500,
    "rate_limit_rate": 0.0, "seed": None,
}  # fmt: skip


def check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Exits 2 naming the flags given that only the OpenAI mock takes."""
    given = [f"--{k.replace('_', '-')}" for k, v in OPENAI_ONLY.items() if getattr(args, k) != v]
    if given:
        parser.error(f"{', '.join(given)}: fault injection is the OpenAI mock's (--kind openai), not {args.kind}'s")


def base_url_note(kind: str, host: str, port: int) -> str:
    """What to write in the config, said on stderr (stdout's one line is parsed by scripts)."""
    return f"a mock {kind} API: a provider with kind: {kind}, base_url: http://{host}:{port}{BASE_PATHS[kind]}"


async def serve(args: argparse.Namespace) -> None:
    mod = MOCKS[args.kind]
    opts = mod.MockOptions(api_key=args.api_key, reply_words=args.tokens)
    runner = web.AppRunner(mod.build_app(opts), access_log=None)
    await runner.setup()
    sock = socket.create_server((args.host, args.port))  # bound here: port 0's choice is read from it
    await web.SockSite(runner, sock).start()
    port = int(sock.getsockname()[1])
    print(f"listening port={port}", flush=True)
    print(base_url_note(args.kind, args.host, port), file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
