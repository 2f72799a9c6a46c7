"""Reading and validating a config file: YAML, the schema, the cross-checks, then the core's
own check; every problem is reported at once, each naming the file and the path in it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgeroute import _core
from edgeroute.config.checks import cross_check
from edgeroute.config.errors import ConfigError
from edgeroute.config.schema import Config
from edgeroute.core import build_router

# A key is quoted in an error only when it looks like a name: a config pointed at another
# file (say /etc/shadow, or a .env) must not have that file's lines echoed back as "keys".
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-/:@ ]{1,80}")


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and not _PLAIN_KEY.fullmatch(part):
            part = "<a key that is not a plain name, not shown>"
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse(data: Any, source: str = "<config>", *, check_secrets: bool = True) -> Config:
    """Validates already-loaded YAML data; raises :class:`ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: (top level): expected a mapping, got {type(data).__name__}"])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}: {_path(err['loc'])}: {msg}")
        raise ConfigError(lines) from None
    problems = cross_check(cfg)
    if not check_secrets:
        secret_paths = (".api_key", ".token", "ledger.dsn", ".url")
        secret_sections = ("server.api_keys", "alerts.webhooks", "tracing.headers")
        problems = [p for p in problems if not (p[0].endswith(secret_paths) or p[0].startswith(secret_sections))]
    if problems:
        raise ConfigError([f"{source}: {path}: {msg}" for path, msg in problems])
    # The core compiles regexes and checks what Python cannot (e.g. time formats).
    try:
        build_router(cfg, source)
    except _core.ConfigError as e:
        raise ConfigError([f"{source}: {e}"]) from None
    return cfg


def load(path: str | Path, *, check_secrets: bool = True) -> Config:
    """Reads and validates a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{p}: {where}invalid YAML: {getattr(e, 'problem', e)}"]) from None
    return parse(data, str(p), check_secrets=check_secrets)
