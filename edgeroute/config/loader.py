"""Reading and validating a config file: YAML, the schema, the cross-checks, then the core's
own check; every problem is reported at once, each naming the file and the path in it."""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from edgeroute import _core
from edgeroute.config.checks import cross_check
from edgeroute.config.errors import ConfigError
from edgeroute.config.schema import Config
from edgeroute.config.source import Loc, Positions, load_yaml
from edgeroute.core import build_router, pattern_error

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


def _unwrap(t: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return next((a for a in typing.get_args(t) if a is not type(None)), t)
    return t


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The schema model whose field `loc` would be (for the keys it allows)."""
    t: Any = Config
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            if (field := t.model_fields.get(str(part))) is None:
                return None
            t = field.annotation
        elif typing.get_origin(t) in (dict, list):
            t = typing.get_args(t)[-1]  # past a name or an index
        else:
            return None
    t = _unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _unknown_key(loc: Loc) -> str:
    model = _model_at(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1) if model else []
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"


# `learning.router_model: cannot read r.erlm: ...` (edgeroute.core): a problem at a path of the config.
_LEARNING_PROBLEM = re.compile(r"(learning\.(?:task_model|router_model)): (.+)", re.S)


def _model_file_problems(cfg: Config, source: str, why: str) -> list[tuple[str, str]]:
    """Which of the config's own model files the core refused (it says only "cannot load the
    routing models"): the one whose replacement by the built-in model makes the config load."""
    out = []
    for key in ("task_model", "router_model"):
        ref = getattr(cfg.learning, key)
        if ref == "builtin":
            continue
        other = cfg.model_copy(update={"learning": cfg.learning.model_copy(update={key: "builtin"})})
        try:
            build_router(other, source)
        except _core.ConfigError:
            continue
        out.append((f"learning.{key}", f"cannot load {ref}: {why} (`edgeroute router train` writes model files)"))
    return out


def _core_problems(cfg: Config) -> list[tuple[str, str]]:
    """What the core refused, at the config's own paths (its message names its internal JSON)."""
    return [
        (f"rules[{i}].when.patterns[{j}]", f"not a valid pattern: {why}")
        for i, rule in enumerate(cfg.rules)
        for j, pattern in enumerate(rule.when.patterns)
        if (why := pattern_error(pattern)) is not None
    ]


def _in_file_order(lines: list[str], source: str) -> list[str]:
    """Errors sorted by their line and column (read top to bottom, as they are fixed); those
    without a place keep their order, after the others."""
    at = re.compile(re.escape(source) + r":(\d+):(\d+): ")

    def place(text: str) -> tuple[float, float]:
        m = at.match(text)
        return (int(m[1]), int(m[2])) if m else (float("inf"), float("inf"))

    return sorted(lines, key=place)


def _plain(msg: str) -> str:
    """A validator's message without pydantic's "Value error, " (the reader needs the reason)."""
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def parse(
    data: Any, source: str = "<config>", *, check_secrets: bool = True, positions: Positions | None = None
) -> Config:
    """Validates already-loaded YAML data; raises :class:`ConfigError` listing every problem.
    With the `positions` of the data in its file, each problem also names its line and column."""

    def line(path: str, msg: str, loc: Loc | None = None) -> str:
        pos = None if positions is None else (positions.of(loc) if loc is not None else positions.find(path))
        where = f"{source}:{pos[0]}:{pos[1]}" if pos else source
        return f"{where}: {path}: {msg}"

    if data is None:  # an empty file, or one of comments only
        raise ConfigError([f"{source}: the config is empty (it needs at least providers, deployments and models)"])
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else f"a single value ({type(data).__name__})"
        raise ConfigError(
            [line("(top level)", f"expected a mapping of sections (providers:, models:, ...), got {got}", ())]
        )
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = _unknown_key(err["loc"]) if err["type"] == "extra_forbidden" else _plain(err["msg"])
            lines.append(line(_path(err["loc"]), msg, err["loc"]))
        raise ConfigError(_in_file_order(lines, source)) from None
    problems = cross_check(cfg, Path(source).parent if Path(source).is_file() else None)
    if not check_secrets:
        secret_paths = (".api_key", ".token", "ledger.dsn", ".url", ".webhook")
        secret_sections = ("server.api_keys", "alerts.webhooks", "tracing.headers", "governance.versions_key")
        problems = [
            p
            for p in problems
            if not (p[0].endswith(secret_paths) or p[0].startswith(secret_sections) or ".headers." in p[0])
        ]
    if problems:
        raise ConfigError(_in_file_order([line(path, msg) for path, msg in problems], source))
    # The core compiles regexes and checks what Python cannot.
    try:
        build_router(cfg, source)
    except _core.ConfigError as e:
        problems = _core_problems(cfg)
        if not problems and (named := _LEARNING_PROBLEM.fullmatch(str(e))) is not None:
            problems = [(named[1], named[2])]  # a model file that cannot be read: at its key's line
        if not problems:
            problems = _model_file_problems(cfg, source, str(e).removeprefix("cannot load the routing models: "))
        raise ConfigError([line(path, msg) for path, msg in problems] or [f"{source}: {e}"]) from None
    return cfg


def read_text(path: str | Path) -> str:
    """A config file's text; :class:`ConfigError` when it cannot be read or is not UTF-8."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError as e:  # a binary file, or text saved in another encoding
        before, nl = e.object[: e.start], b"\n"
        where = f"{p}:{before.count(nl) + 1}:{e.start - before.rfind(nl)}"
        raise ConfigError(
            [f"{where}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as UTF-8"]
        ) from None


def load(path: str | Path, *, check_secrets: bool = True) -> Config:
    """Reads and validates a YAML config file."""
    return loads(read_text(path), str(path), check_secrets=check_secrets)


def loads(text: str, source: str, *, check_secrets: bool = True) -> Config:
    """Validates a config's YAML text (a file's, or a stored version's); `source` names it in errors."""
    try:
        data, positions = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source  # as every other error
        # Where the parser noticed is often lines after the mistake (a `{` never closed): say
        # where the construct it was reading began.
        context, at = getattr(e, "context", None), getattr(e, "context_mark", None)
        began = f" ({context} that starts at {at.line + 1}:{at.column + 1})" if context and at and at != mark else ""
        problem = str(getattr(e, "problem", e))
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces: replace the tab)"
        raise ConfigError([f"{where}: invalid YAML: {problem}{began}"]) from None
    return parse(data, source, check_secrets=check_secrets, positions=positions)
