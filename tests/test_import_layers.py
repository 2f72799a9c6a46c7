"""The import graph of `edgeroute` has no cycles and follows its layers.

Each module may import modules of its own layer and the layers below it, never above:
a cycle or an upward import fails here, naming the import. Imports under
`if TYPE_CHECKING:` are for annotations only and do not count; imports inside
functions do (a late import is still a dependency). ARCHITECTURE.md explains the layers.

A new module must be placed in `LAYERS` (by its own name or a package prefix). A module
named `settings` (a feature's pydantic config models, which the root `Config` includes)
belongs to the config layer wherever it lives.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgeroute"

# Lowest first. A name covers the module and everything under it unless a longer name says otherwise.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "leaves: the binding and helpers that know nothing of edgeroute",
        [
            "edgeroute._core",
            "edgeroute.errors",
            "edgeroute.service_tiers",
            "edgeroute.words",
            "edgeroute.headers",
            "edgeroute.sse",
            "edgeroute.large_json",
            "edgeroute.anthropic_models",
            "edgeroute.secrets",
            "edgeroute.redact",
            "edgeroute.redis_client",
            "edgeroute.redis_pipe",
            "edgeroute.sqlite_wal",
            "edgeroute.pg_schema",
            "edgeroute.pg_dead_peer",
            "edgeroute.memory",
            "edgeroute.reload_signal",
            "edgeroute.atomic_file",
            "edgeroute.background",
            "edgeroute.cost.writer_pace",
            "edgeroute.cost.writer_breath",
            "edgeroute.cost.null_literals",
            "edgeroute.cost.spend_once",
            "edgeroute.cost.store_errors",
            "edgeroute.cost.pdf",
            "edgeroute.capacity",
            "edgeroute.telemetry.trace_context",
            "edgeroute.outcome",
            "edgeroute.roles",
            "edgeroute.upstream_http",  # the package: client, connection, response, wire, tls, errors
            "edgeroute.egress",
            "edgeroute.ready_response",
            "edgeroute.mock",
            "edgeroute.learn",
            "edgeroute.workers.worker",
            "edgeroute.workers.peers",
            "edgeroute.workers.merge",
            "edgeroute.workers.run_dir",
            "edgeroute.workers.supervisor",
        ],
    ),
    ("the core facade", ["edgeroute.core"]),
    ("config and provider adapters", ["edgeroute.config", "edgeroute.providers"]),
    (
        "prices, keys, counters, the response cache and the upstream pools",
        [
            "edgeroute.cost.prices",
            "edgeroute.cost.media",
            "edgeroute.cost.tool_calls",
            "edgeroute.cost.prediction",
            "edgeroute.cost.limits",
            "edgeroute.cost.budgets",
            "edgeroute.cost.redis_store",
            "edgeroute.cost.redis_scripts",
            "edgeroute.cost.redis_settle",
            "edgeroute.cost.redis_runs",
            "edgeroute.workers.local_state",
            "edgeroute.leases",
            "edgeroute.cost.keys",
            "edgeroute.upstream",
            "edgeroute.sidecar_guard",
            "edgeroute.cache",
            "edgeroute.governance.store",
            "edgeroute.governance.write_limit",
            "edgeroute.governance.keys",
            "edgeroute.governance.key_names",
            "edgeroute.governance.residency",
            "edgeroute.governance.drain",
            "edgeroute.governance.guard",
            "edgeroute.governance.weakening",
            "edgeroute.governance.http",
        ],
    ),
    ("records and the live state", ["edgeroute.accounting", "edgeroute.cost.received", "edgeroute.state"]),
    (
        "cost control, observability, governance",
        [
            "edgeroute.cost.ledger",
            "edgeroute.cost.ledger_store",
            "edgeroute.cost.ledger_lock",
            "edgeroute.cost.control",  # the package and every part of it (cost/control/*.py)
            "edgeroute.cost.reports",
            "edgeroute.cost.prices_cli",
            "edgeroute.admission",
            "edgeroute.learning",
            "edgeroute.sticky",  # a keyed request's experiment bucket (config, cost.keys)
            "edgeroute.health_checks",
            "edgeroute.health_share",
            "edgeroute.capacity_share",
            "edgeroute.learning_share",
            "edgeroute.metrics_render",  # one render shared by concurrent scrapes, off the loop
            "edgeroute.metrics",
            "edgeroute.looplag",
            "edgeroute.reload",
            "edgeroute.requestlog",
            "edgeroute.requestlog.gate",  # the operator's queries' pool (imports the live state)
            "edgeroute.cost.teams",
            "edgeroute.cost.budget_report",
            "edgeroute.cost.restore",
            "edgeroute.cost.underreport",
            "edgeroute.cost.overreport",
            "edgeroute.telemetry",
            "edgeroute.governance.versions",
            "edgeroute.governance.views",  # masked config views, off the loop
            "edgeroute.governance.runtime",
            "edgeroute.governance.apply",
            "edgeroute.governance.deployments",
        ],
    ),
    ("dispatch", ["edgeroute.dispatch", "edgeroute.shadow", "edgeroute.shadow_log", "edgeroute.router_shadow"]),
    (
        "API endpoints",
        [
            "edgeroute.request_input",
            "edgeroute.free_requests",
            "edgeroute.provider_files",
            "edgeroute.owners",
            "edgeroute.audio_owners",
            "edgeroute.openai_api",
            "edgeroute.anthropic_api",
            "edgeroute.endpoints",
            "edgeroute.cost.app",
            "edgeroute.requestlog.api",
            "edgeroute.telemetry.app",
            "edgeroute.ui",
            "edgeroute.governance.app",
        ],
    ),
    ("the server", ["edgeroute.server", "edgeroute.http_server", "edgeroute.http_connection"]),
    (
        "command line and tools",
        [
            "edgeroute.cli",
            "edgeroute.__main__",
            "edgeroute.demo",
            "edgeroute.policy_tools",
            "edgeroute.bench",
            "edgeroute.governance.cli",
            "edgeroute.workers.cli",
            "edgeroute.learn.cli",  # `router train --from-log` opens the config's ledger database
            "edgeroute.learn.from_log",
            "edgeroute.learn.knn_eval",  # the semantic cache's embedder, evaluated as a router
            "edgeroute.learn.task_embed_eval",  # the semantic cache's embedder, evaluated for the task type
        ],
    ),
]
# The package roots only re-export (or are empty); they belong to whoever imports them.
ROOTS = {"edgeroute", "edgeroute.cost", "edgeroute.governance", "edgeroute.workers"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")} | {"edgeroute._core": PACKAGE / "_core.pyi"}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path) -> dict[str, int]:
    """The edgeroute modules `name` (read from `path`) imports at run time, with the line of the first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if (mod := _known(target)) is not None and mod != name:
            found.setdefault(mod, line)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in child.names:  # `from pkg import module` imports the module
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, child.lineno)
            visit(child)

    if path.suffix == ".py":
        visit(ast.parse(path.read_text(), str(path)))
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


CONFIG_LAYER = next(i for i, (_, names) in enumerate(LAYERS) if "edgeroute.config" in names)


def layer_of(name: str) -> int | None:
    if name.endswith(".settings"):
        return CONFIG_LAYER
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for i, (_, names) in enumerate(LAYERS):
        for prefix in names:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), i)
    return None if best is None else best[1]


def test_every_module_has_a_layer() -> None:
    missing = sorted(n for n in MODULES if n not in ROOTS and layer_of(n) is None)
    assert not missing, f"place these modules in a layer of {Path(__file__).name}'s LAYERS: {missing}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for name, targets in GRAPH.items():
        if name in ROOTS or (mine := layer_of(name)) is None:
            continue
        for target, line in targets.items():
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(
                    f"{MODULES[name].relative_to(ROOT)}:{line}: {name} ({LAYERS[mine][0]}) imports "
                    f"{target} ({LAYERS[theirs][0]})"
                )
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def _cycle_from(start: str) -> list[str] | None:
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH.get(node, {}):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_import_cycles() -> None:
    cycles = {" -> ".join(c) for name in GRAPH if (c := _cycle_from(name)) is not None}
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above would fail on a real cycle and on a config module importing the server."""
    saved = dict(GRAPH)
    try:
        GRAPH["edgeroute.config.schema"] = {**GRAPH["edgeroute.config.schema"], "edgeroute.config.loader": 1}
        assert _cycle_from("edgeroute.config.schema") is not None
        GRAPH["edgeroute.config.checks"] = {"edgeroute.server": 1}
        with pytest.raises(AssertionError, match=r"edgeroute\.config\.checks"):
            test_no_module_imports_a_higher_layer()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from edgeroute.config import schema\n", {"edgeroute.config.schema"}),
        ("from edgeroute import config\n", {"edgeroute.config"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgeroute import server\n", set()),
        ("def f():\n    from edgeroute import server\n", {"edgeroute.server"}),
        ("from . import prices\n", {"edgeroute.config.prices"}),
    ],
)
def test_imports_are_read_as_python_resolves_them(tmp_path: Path, source: str, expected: set[str]) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert set(imports_of("edgeroute.config.probe", probe)) == expected
