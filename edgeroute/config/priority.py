"""Priority classes: the names a request's class may take, highest first (checked in `checks`).

A request's class comes from the rule that matched (`then.priority`), else the
`x-edgeroute-priority` header when its key may set that class (`keys.<id>.priorities`),
else its key's own class (`keys.<id>.priority`), else `priority.default`. Under contention
the higher class takes a freed slot first, keys within a class take turns, and only the
highest class may use a deployment's `reserve_percent`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
