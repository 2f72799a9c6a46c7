"""The one error a config that cannot be used raises."""

from __future__ import annotations


class ConfigError(Exception):
    """The config is invalid; `errors` holds one line per problem, each naming file and path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
