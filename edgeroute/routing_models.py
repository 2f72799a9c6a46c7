"""Loading the learned routing models (task classifier, router) for the core.

`builtin` means the models shipped in `edgeroute/models/`; anything else is a path
(relative paths are relative to the config file). The core parses and checks them;
a bad file is a config error, not a failure on the first request.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from edgeroute.config import Config, ConfigError

BUILTIN_TASK = "task.erlm"
BUILTIN_ROUTER = "router-gpt4-mixtral.erlm"


def _read(ref: str, builtin: str, what: str, base_dir: Path | None, source: str) -> bytes:
    if ref == "builtin":
        return resources.files("edgeroute").joinpath("models", builtin).read_bytes()
    path = Path(ref).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError([f"{source}: learning.{what}: cannot read {path}: {e.strerror}"]) from None


def load(config: Config, source: str) -> tuple[bytes, bytes]:
    """The (task model, router model) bytes the config names."""
    base_dir = Path(source).parent if source and not source.startswith("<") else None
    task = _read(config.learning.task_model, BUILTIN_TASK, "task_model", base_dir, source)
    router = _read(config.learning.router_model, BUILTIN_ROUTER, "router_model", base_dir, source)
    return task, router
