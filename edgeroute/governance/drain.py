"""Drained deployments: kept in the config (`drained: true`), out of every model's list.

Requests already on a drained deployment finish there; new ones go elsewhere.
"""

from __future__ import annotations

from edgeroute.config import Config


def serving(cfg: Config) -> Config:
    """`cfg` with drained deployments out of every model's list (a model whose deployments
    are all drained keeps them: draining cannot take a model down by accident)."""
    drained = {n for n, d in cfg.deployments.items() if d.drained}
    if not drained:
        return cfg
    models = {}
    for name, m in cfg.models.items():
        kept = [d for d in m.deployments if d not in drained]
        models[name] = m.model_copy(update={"deployments": kept}) if kept and kept != m.deployments else m
    return cfg.model_copy(update={"models": models})


def withdrawn(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Per model, the drained deployments `serving` takes out of its list and of its fallback
    models' lists (transitively): those whose past answers its requests may still get from
    the response cache (a request's route and fallbacks are where its answers came from)."""
    drained = {n for n, d in cfg.deployments.items() if d.drained}
    if not drained:
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for name in cfg.models:
        found: list[str] = []
        seen: set[str] = set()
        todo = [name]
        while todo:
            at = todo.pop()
            if at in seen or (m := cfg.models.get(at)) is None:
                continue
            seen.add(at)
            found += [d for d in m.deployments if d in drained and d not in found]
            todo += [*m.fallbacks, *m.context_window_fallbacks, *(f for fs in m.fallbacks_on.values() for f in fs)]
        if found:
            out[name] = tuple(found)
    return out
