"""The deployment files an operator copies: the Dockerfile, the Kubernetes manifests and the
systemd unit parse, and say what they must (non-root, probes on the proxy's health endpoints,
config from a ConfigMap, keys from Secrets, a drain shorter than the grace period).

The image's build steps themselves run in `deploy/build-image-steps.sh` (a release build:
minutes), which `test_image_build_steps` runs only when EDGEROUTE_TEST_IMAGE_STEPS=1."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeroute import config as config_mod
from edgeroute.config import Server

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_manifests_have_probes_config_and_secrets(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs(name)
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d) and d["metadata"].get("name"), d
    (cm,) = _kind(docs, "ConfigMap")
    secrets = _kind(docs, "Secret")
    (deployment,) = _kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    (proxy,) = [c for c in pod["containers"] if c["name"] == "edgeroute"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    probes = {k: proxy[k] for k in ("readinessProbe", "livenessProbe")}
    paths = {k: (p.get("httpGet", {}).get("path") or " ".join(p["exec"]["command"])) for k, p in probes.items()}
    assert "/readyz" in paths["readinessProbe"] and "/healthz" in paths["livenessProbe"]
    # The config the ConfigMap carries is valid, with the Secret's variables set.
    for s in secrets:
        for key, value in s["stringData"].items():
            monkeypatch.setenv(key, value)
    cfg = config_mod.parse(yaml.safe_load(cm["data"]["edgeroute.yaml"]), f"{name}:ConfigMap")
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in proxy.get("env", [])}
    assert env["EDGEROUTE_CONFIG"] == mounts["config"] + "/edgeroute.yaml"
    assert {s["metadata"]["name"] for s in secrets} <= {r["secretRef"]["name"] for r in proxy["envFrom"]}
    assert pod["terminationGracePeriodSeconds"] > cfg.server.drain_timeout
    if name == "sidecar.yaml":  # on loopback only: kubelet cannot reach it, so the probes run inside
        assert env["EDGEROUTE_HOST"] == "127.0.0.1" and all("exec" in p for p in probes.values())
    else:
        assert cfg.server.api_keys and _kind(docs, "Service")


def test_dockerfile_builds_the_core_once_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "cargo" not in runtime and "rustup" not in runtime and "COPY --from=build /wheels" in runtime
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", runtime, re.M)
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in shlex.split(src):
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "deploy" / "systemd" / "edgeroute.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"].endswith("edgeroute serve") and "EDGEROUTE_CONFIG=" in service["Environment"]
    assert service["DynamicUser"] == "yes" and service["ExecReload"].endswith("-HUP $MAINPID")
    assert int(service["TimeoutStopSec"]) > Server().drain_timeout
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(
    os.environ.get("EDGEROUTE_TEST_IMAGE_STEPS") != "1", reason="a release build; set EDGEROUTE_TEST_IMAGE_STEPS=1"
)
def test_image_build_steps(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(ROOT / "deploy" / "build-image-steps.sh"), str(tmp_path)], capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready on /readyz" in r.stdout
