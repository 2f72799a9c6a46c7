"""Priority classes: the names a request's class may take, highest first, and their checks.

A request's class comes from the rule that matched (`then.priority`), else the
`x-edgeroute-priority` header when its key may set that class (`keys.<id>.priorities`),
else its key's own class (`keys.<id>.priority`), else `priority.default`. Under contention
the higher class takes a freed slot first, keys within a class take turns, and only the
highest class may use a deployment's `reserve_percent`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from edgeroute.config.schema import Config


class PrioritySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(default=["interactive", "default", "batch"], min_length=1)  # highest first
    # The class of a request that names none: `default` when there is one, else the lowest.
    default: str | None = None

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"class name {name!r}: use letters, digits, '-' and '_'")
        if len(set(v)) != len(v):
            raise ValueError("a class is named twice")
        return v

    @property
    def default_class(self) -> str:
        if self.default is not None:
            return self.default
        return "default" if "default" in self.classes else self.classes[-1]


def cross_check(cfg: Config) -> list[tuple[str, str]]:
    """Class names that no class defines, and capacity settings that need each other."""
    from edgeroute.config.checks import unknown

    classes = cfg.priority.classes
    problems: list[tuple[str, str]] = []
    if cfg.priority.default is not None and cfg.priority.default not in classes:
        problems.append(("priority.default", unknown("priority class", cfg.priority.default, classes)))
    for key_id, k in cfg.keys.items():
        if k.priority is not None and k.priority not in classes:
            problems.append((f"keys.{key_id}.priority", unknown("priority class", k.priority, classes)))
        for i, p in enumerate(k.priorities):
            if p not in classes:
                problems.append((f"keys.{key_id}.priorities[{i}]", unknown("priority class", p, classes)))
    for i, r in enumerate(cfg.rules):
        if r.then.priority is not None and r.then.priority not in classes:
            problems.append((f"rules[{i}].then.priority", unknown("priority class", r.then.priority, classes)))
    for name, d in cfg.deployments.items():
        if d.reserve_percent and d.max_concurrency is None:
            problems.append((f"deployments.{name}.reserve_percent", "reserve_percent needs max_concurrency"))
    return problems
