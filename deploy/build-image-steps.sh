#!/usr/bin/env bash
# The Dockerfile's steps without Docker: build the wheel once, install it into a fresh
# virtualenv (as the runtime stage does), and check that the installed proxy starts and
# answers /readyz — the image's HEALTHCHECK. Needs cargo and maturin (as the build stage).
#   deploy/build-image-steps.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
maturin build --release --out "$work/wheels" >/dev/null
python -m venv "$work/runtime"
"$work/runtime/bin/pip" install -q --no-cache-dir "$work"/wheels/*.whl
cd "$work"   # not the source tree: the runtime must not need it
"$work/runtime/bin/edgeroute" --version
# No top-level bench package and no training data in the wheel.
python - "$work"/wheels/*.whl <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
# One wheel for every CPython >= 3.11 (the stable ABI), as the release workflow builds per platform.
assert "-cp311-abi3-" in sys.argv[1], f"not an abi3 wheel: {sys.argv[1]}"
bad = [n for n in names if n.startswith(("bench/", "edgeroute/learn/labels/"))]
assert not bad, f"the wheel ships files it must not: {bad}"
assert "edgeroute/_core.pyi" in names and "edgeroute/models/task.erlm" in names and "edgeroute/bench/gate.py" in names
assert "edgeroute/ui/static/index.html" in names and "edgeroute/ui/static/pages/overview.js" in names  # the console
print(f"wheel: {len(names)} files, no training data, no top-level bench")
PY
cat > edgeroute.yaml <<'YAML'
providers: {p: {base_url: "http://127.0.0.1:9/v1"}}
deployments: {d: {provider: p, model: gpt-4o-mini}}
models: {m: {deployments: [d]}}
ledger: {backend: memory}
YAML
port=$("$work/runtime/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
EDGEROUTE_CONFIG=edgeroute.yaml EDGEROUTE_HOST=127.0.0.1 EDGEROUTE_PORT=$port "$work/runtime/bin/edgeroute" serve &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if "$work/runtime/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=1)" 2>/dev/null; then
    echo "ready on /readyz"; exit 0
  fi
  sleep 0.2
done
echo "the proxy did not become ready" >&2; exit 1
