"""Runtime deployment changes over the admin API: add, remove, drain/undrain, reweight.

Each change edits the running config's text, validates it like a new file, applies it
whole and records it as a new version (source `api`) and in the audit log, so adding a
model endpoint is an authorized, audited and reversible act (`edgeroute config rollback`).
The new text is written back over the config file so that a restart keeps the change.

A drained deployment stays in the config (`drained: true`) but leaves every model's
list, so it takes no new requests; requests already on it finish.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.errors import ProxyError
from edgeroute.governance.apply import apply_text, editing, refused
from edgeroute.governance.http import json_object, json_response
from edgeroute.governance.runtime import GOV, Change, actor_of, answered
from edgeroute.reload import to_the_end
from edgeroute.state import STATE

_EDITABLE = frozenset({"weight", "tags", "price", "context_window"})


def install(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/deployments", add_deployment)
    r.add_patch("/admin/deployments/{name}", update_deployment)
    r.add_delete("/admin/deployments/{name}", remove_deployment)
    r.add_post("/admin/deployments/{name}/drain", drain)
    r.add_post("/admin/deployments/{name}/undrain", undrain)


Mutation = Callable[[dict[str, Any]], tuple[Any, Any]]


async def _change(request: web.Request, action: str, target: str, mutate: Mutation) -> web.Response:
    # To its end once begun, its client gone or not: a change recorded is a change applied. A
    # store that does not confirm it within its deadline: 503, the change may apply yet.
    return await answered(to_the_end(_made(request, action, target, mutate)))


async def _made(request: web.Request, action: str, target: str, mutate: Mutation) -> web.Response:
    gov = request.app[GOV]
    actor = actor_of(request)
    audit: list[Change] = []

    def changed() -> str:  # from the running config's text once no reload is in progress
        data = yaml.safe_load(gov.versions.running_text)
        before, after = mutate(data)
        if before == after:  # already so (an undrain of a deployment in service)
            raise _Unchanged
        audit.append((f"deployment.{action}", target, before, after))
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    async with gov.changing(), editing(request.app):
        try:
            written = await apply_text(request.app, changed, "api", actor, audit)
        except _Unchanged:  # no version, no audit entry, the file untouched
            return json_response(
                {"deployment": target, "action": "unchanged", "version": gov.versions.active, "file_updated": False}
            )
        except config_mod.ConfigError as e:
            msg = f"The change to deployment {target!r} makes the config invalid; nothing changed."
            raise refused(400, msg, "invalid_config", e) from None
    return json_response(
        {"deployment": target, "action": action, "version": gov.versions.active, "file_updated": written}
    )


class _Unchanged(Exception):
    """The change asked for is already so: nothing to apply."""


def _existing(data: dict[str, Any], name: str) -> dict[str, Any]:
    dep = (data.get("deployments") or {}).get(name)
    if not isinstance(dep, dict):
        raise ProxyError(404, f"No deployment {name!r}.", code="deployment_not_found")
    return dep


async def drain(request: web.Request) -> web.Response:
    name = request.match_info["name"]

    def mutate(data: dict[str, Any]) -> tuple[Any, Any]:
        dep = _existing(data, name)
        for model, m in (data.get("models") or {}).items():
            others = [d for d in m.get("deployments") or [] if d != name and not _drained(data, d)]
            if name in (m.get("deployments") or []) and not others:
                raise ProxyError(
                    409, f"{name!r} is the last deployment of model {model!r} in service; add another first.",
                    code="last_deployment",
                )  # fmt: skip
        before = {"drained": bool(dep.get("drained"))}
        dep["drained"] = True
        return before, {"drained": True}

    return await _change(request, "drained", name, mutate)


def _drained(data: dict[str, Any], name: str) -> bool:
    dep = (data.get("deployments") or {}).get(name)
    return isinstance(dep, dict) and bool(dep.get("drained"))


async def undrain(request: web.Request) -> web.Response:
    name = request.match_info["name"]

    def mutate(data: dict[str, Any]) -> tuple[Any, Any]:
        dep = _existing(data, name)
        before = {"drained": bool(dep.get("drained"))}
        dep.pop("drained", None)
        return before, {"drained": False}

    return await _change(request, "undrained", name, mutate)


async def update_deployment(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await json_object(request)
    if not body or set(body) - _EDITABLE:
        bad = sorted(set(body) - _EDITABLE) or ["(nothing)"]
        raise ProxyError(400, f"Fields that can change: {', '.join(sorted(_EDITABLE))}; got {', '.join(bad)}.")

    def mutate(data: dict[str, Any]) -> tuple[Any, Any]:
        dep = _existing(data, name)
        running = request.app[STATE].live.config.deployments[name].model_dump(mode="json")
        before = {k: running.get(k) for k in body}  # as in force (defaults included)
        dep.update(body)
        return before, dict(body)

    return await _change(request, "updated", name, mutate)


async def add_deployment(request: web.Request) -> web.Response:
    body = await json_object(request)
    name = body.pop("name", None)
    models = body.pop("models", [])
    if not isinstance(name, str) or not name:
        raise ProxyError(400, "'name' (the new deployment's name) is required.", param="name")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ProxyError(400, "'models' must be a list of public model names to serve it under.", param="models")

    def mutate(data: dict[str, Any]) -> tuple[Any, Any]:
        deps = data.setdefault("deployments", {})
        if name in deps:
            raise ProxyError(409, f"Deployment {name!r} exists.", code="deployment_exists")
        deps[name] = body
        for m in models:
            model = (data.get("models") or {}).get(m)
            if not isinstance(model, dict):
                raise ProxyError(400, f"Unknown model {m!r}.", param="models")
            model.setdefault("deployments", []).append(name)
        return None, {**body, "models": models}

    return await _change(request, "added", name, mutate)


async def remove_deployment(request: web.Request) -> web.Response:
    name = request.match_info["name"]

    def mutate(data: dict[str, Any]) -> tuple[Any, Any]:
        before = _existing(data, name)
        del data["deployments"][name]
        for m in (data.get("models") or {}).values():
            if name in (m.get("deployments") or []):
                m["deployments"].remove(name)
        return before, None

    return await _change(request, "removed", name, mutate)
