"""The Python face of the Rust decision core (`edgeroute._core`, private).

The core is compiled from a config: its `RouterSpec` JSON (`Config.core_json`) and the
learned models the config names (`learning.task_model` / `learning.router_model`:
`builtin` for the ones shipped in `edgeroute/models/`, else a path, relative to the
config file). `build_router` is the one place that puts those together; the rest of
edgeroute (and library users) never call `_core.Router` themselves.

Only `_core` is imported at run time: the config package checks configs with this
module, so it must not import the config back.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from edgeroute import secrets
from edgeroute._core import (
    BadRequestError,
    ConfigError,
    ContextLengthError,
    Decision,
    EdgerouteError,
    ForbiddenError,
    NoDeploymentError,
    Router,
    UnknownModelError,
)

if TYPE_CHECKING:
    from edgeroute.config import Config

__all__ = [
    "BUILTIN_ROUTER",
    "BUILTIN_TASK",
    "BadRequestError",
    "ConfigError",
    "ContextLengthError",
    "Decision",
    "EdgerouteError",
    "ForbiddenError",
    "NoDeploymentError",
    "Router",
    "UnknownModelError",
    "build_router",
    "learned_models",
    "pattern_error",
]

BUILTIN_TASK = "task.erlm"
BUILTIN_ROUTER = "router-gpt4-mixtral.erlm"


def _read(ref: str, builtin: str, what: str, base_dir: Path | None) -> bytes:
    # Offline (a config sent over the API to be checked), a model file is not read, as a TLS
    # file or a secret is not: a viewer learnt which paths existed, and a FIFO or /dev/zero
    # held the check for good or read until memory ran out. The built-in model stands in.
    if ref == "builtin" or secrets.is_offline():
        return resources.files("edgeroute").joinpath("models", builtin).read_bytes()
    path = Path(ref).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"learning.{what}: cannot read {path}: {e.strerror}") from None


def learned_models(config: Config, source: str = "<config>") -> tuple[bytes, bytes]:
    """The (task model, router model) bytes the config names; `source` is the config file's path
    (or a `<name>` for a config not read from a file). Raises :class:`ConfigError`."""
    base_dir = Path(source).parent if source and not source.startswith("<") else None
    task = _read(config.learning.task_model, BUILTIN_TASK, "task_model", base_dir)
    router = _read(config.learning.router_model, BUILTIN_ROUTER, "router_model", base_dir)
    return task, router


def build_router(config: Config, source: str = "<config>", *, previous: Router | None = None) -> Router:
    """The core compiled for `config`. With `previous`, a reload: health state carries over for
    deployments whose provider and model did not change. Raises :class:`ConfigError` for a spec
    or a model file the core refuses."""
    spec = config.core_json()
    task, router = learned_models(config, source)
    if previous is not None:
        return previous.reload(spec, task, router)
    return Router(spec, task, router)


def pattern_error(pattern: str) -> str | None:
    """Why the core refuses `pattern` as a rule's regex (its regex dialect, not Python's), or None."""
    spec = {
        "deployments": [{"name": "d", "provider": "p", "model": "m"}],
        "models": [{"name": "m", "deployments": ["d"]}],
        "rules": [{"name": "r", "when": {"patterns": [pattern]}, "then": {"reject": "-"}}],
    }
    try:
        Router(json.dumps(spec).encode())
    except ConfigError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return lines[-1].removeprefix("error: ") if lines else str(e)
    return None
