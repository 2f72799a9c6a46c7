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
