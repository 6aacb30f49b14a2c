#!/usr/bin/env bash
# Per-core benchmark: the server under test pinned to core 0, h2load (one thread) pinned to
# core 1, so the load generator never takes the server's CPU. sluice and a no-op server on the
# same tonic stack (examples/noop.rs, built with the same release profile) alternate A B A B;
# each run reports req/s, the server's CPU seconds (from /proc) and requests per server
# CPU-second, and each round the ratio sluice / no-op.
#
#   scripts/bench-core.sh               # 3 rounds of 10 s, the 1- and 5-descriptor requests
#   ROUNDS=5 RUN_SECONDS=20 scripts/bench-core.sh
#   SLICES=1 scripts/bench-core.sh      # each round one run of each server (default 5 slices)
#   SLUICE_ARGS="--openai-headers false" scripts/bench-core.sh
#   SLUICE_B=path/to/other/sluice scripts/bench-core.sh   # a second sluice build, in turn (A B C)
#   SLUICE=path/to/sluice NOOP=path/to/noop scripts/bench-core.sh   # other builds, none made
#   SLUICE_B=target/release/sluice SLUICE_B_ARGS="--peer-metrics false" scripts/bench-core.sh
#   NOOP_ARGS=sized scripts/bench-core.sh   # a no-op whose answers are as large as sluice's
#   PERF_OUT=/tmp/core scripts/bench-core.sh   # also profiles a run of sluice per request kind
#                                              # (perf record --call-graph dwarf: /tmp/core-one…)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
ROUNDS="${ROUNDS:-3}"
RUN_SECONDS="${RUN_SECONDS:-10}"
# Each round's RUN_SECONDS per server is cut into SLICES runs taken in turn.
SLICES="${SLICES:-5}"
SLICE_SECONDS=$(( RUN_SECONDS / SLICES > 0 ? RUN_SECONDS / SLICES : 1 ))
CLIENTS="${CLIENTS:-8}"
STREAMS="${STREAMS:-16}"
SERVER_CPU="${SERVER_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
if ! command -v h2load >/dev/null; then
    echo "installing h2load (Debian's nghttp2-client)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q nghttp2-client; else sudo apt-get install -y -q nghttp2-client; fi
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
    rm -rf "$work"
}
trap cleanup EXIT

per_core_requests "$work" "$NOOP"

# start NAME: starts the server, pinned; sets `started` to its pid and port (in this shell,
# so that cleanup stops it).
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
            sluice_pinned "$SLUICE_B" "$SERVER_CPU" "$work/rules" "$p" ${SLUICE_B_ARGS:-${SLUICE_ARGS:-}}
            ;;
        # shellcheck disable=SC2086
        noop) taskset -c "$SERVER_CPU" "$NOOP" serve "127.0.0.1:$p" ${NOOP_ARGS:-} >/dev/null 2>&1 & ;;
    esac
    pids+=("$!")
    wait_port "$p"
    started="$! $p"
}

# run PID PORT BODY SECONDS: h2load pinned to the load core; prints "req/s cpu-s req/cpu-s".
run() {
    local pid="$1" port="$2" body="$3" seconds="$4" before after out done_ rps
    before="$(cpu "$pid")"
    local perf_pid=""
    if [ -n "${PROFILE_TO:-}" ]; then
        perf record -q --call-graph dwarf,16384 -F 4000 -p "$pid" -o "$PROFILE_TO" -- sleep "$seconds" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    out="$(taskset -c "$LOAD_CPU" h2load -t 1 -c "$CLIENTS" -m "$STREAMS" -D "$seconds" \
        -H 'content-type: application/grpc' -H 'te: trailers' -d "$body" \
        "http://127.0.0.1:$port/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")"
    after="$(cpu "$pid")"
    if [ -n "$perf_pid" ]; then wait "$perf_pid" || true; fi
    done_="$(grep -oP 'requests: \d+ total, \d+ started, \d+ done, \K\d+(?= succeeded)' <<<"$out")"
    rps="$(grep -oP 'finished in [0-9.]+s, \K[0-9.]+(?= req/s)' <<<"$out")"
    awk -v n="$done_" -v r="$rps" -v b="$before" -v a="$after" \
        'BEGIN { c = a - b; printf "%.0f %.2f %.0f\n", r, c, (c > 0 ? n / c : 0) }'
}

echo "per core: servers on core $SERVER_CPU, h2load (1 thread, $CLIENTS connections x $STREAMS streams) on core $LOAD_CPU, $RUN_SECONDS s a round per server in $SLICES slices taken in turn"
echo "sluice $(git rev-parse --short HEAD 2>/dev/null || echo '?') ${SLUICE_ARGS:-}; no-op ${NOOP_ARGS:-}"
start sluice
read -r sluice_pid sluice_port <<<"$started"
start noop
read -r noop_pid noop_port <<<"$started"
if [ -n "${SLUICE_B:-}" ]; then
    echo "sluice-b: $SLUICE_B ${SLUICE_B_ARGS:-${SLUICE_ARGS:-}}"
    start sluice-b
    read -r b_pid b_port <<<"$started"
fi
for body in one five; do
    # Warm both up (page faults, buffers, the counter's first call), not measured.
    run "$sluice_pid" "$sluice_port" "$work/$body" 1 >/dev/null
    run "$noop_pid" "$noop_port" "$work/$body" 1 >/dev/null
    if [ -n "${SLUICE_B:-}" ]; then run "$b_pid" "$b_port" "$work/$body" 1 >/dev/null; fi
    if [ -n "${PERF_OUT:-}" ]; then
        PROFILE_TO="$PERF_OUT-$body" run "$sluice_pid" "$sluice_port" "$work/$body" "$RUN_SECONDS" >/dev/null
        PROFILE_TO="$PERF_OUT-$body-noop" run "$noop_pid" "$noop_port" "$work/$body" "$RUN_SECONDS" >/dev/null
        echo "profiles (runs of their own, not in the figures): $PERF_OUT-$body, $PERF_OUT-$body-noop"
    fi
    printf '%-6s %-6s %10s %8s %12s\n' request server req/s cpu-s req/cpu-s
    for round in $(seq "$ROUNDS"); do
        # A round is SLICES short runs of each server in turn (A B A B ...), summed: the
        # machine's speed drifts within seconds, and slices cancel that drift out of the ratio.
        s_n=0 s_c=0 n_n=0 n_c=0 b_n=0 b_c=0 s_r=0 n_r=0 b_r=0
        for _ in $(seq "$SLICES"); do
            read -r r c p < <(run "$sluice_pid" "$sluice_port" "$work/$body" "$SLICE_SECONDS")
            read -r s_n s_c s_r < <(awk -v a="$s_n" -v b="$s_c" -v q="$s_r" -v r="$r" -v c="$c" -v p="$p" 'BEGIN { printf "%.0f %.2f %.0f\n", a + p * c, b + c, q + r }')
            read -r r c p < <(run "$noop_pid" "$noop_port" "$work/$body" "$SLICE_SECONDS")
            read -r n_n n_c n_r < <(awk -v a="$n_n" -v b="$n_c" -v q="$n_r" -v r="$r" -v c="$c" -v p="$p" 'BEGIN { printf "%.0f %.2f %.0f\n", a + p * c, b + c, q + r }')
            if [ -n "${SLUICE_B:-}" ]; then
                read -r r c p < <(run "$b_pid" "$b_port" "$work/$body" "$SLICE_SECONDS")
                read -r b_n b_c b_r < <(awk -v a="$b_n" -v b="$b_c" -v q="$b_r" -v r="$r" -v c="$c" -v p="$p" 'BEGIN { printf "%.0f %.2f %.0f\n", a + p * c, b + c, q + r }')
            fi
        done
        s_per="$(awk -v n="$s_n" -v c="$s_c" 'BEGIN { printf "%.0f", n / c }')"
        n_per="$(awk -v n="$n_n" -v c="$n_c" 'BEGIN { printf "%.0f", n / c }')"
        printf '%-6s %-6s %10s %8s %12s\n' "$body" sluice "$((s_r / SLICES))" "$s_c" "$s_per"
        printf '%-6s %-6s %10s %8s %12s\n' "$body" no-op "$((n_r / SLICES))" "$n_c" "$n_per"
        awk -v s="$s_per" -v n="$n_per" -v r="$round" -v b="$body" \
            'BEGIN { printf "round %d (%s): sluice / no-op per server CPU-second = %.3f\n", r, b, s / n }'
        if [ -n "${SLUICE_B:-}" ]; then
            b_per="$(awk -v n="$b_n" -v c="$b_c" 'BEGIN { printf "%.0f", n / c }')"
            printf '%-6s %-6s %10s %8s %12s\n' "$body" sluice-b "$((b_r / SLICES))" "$b_c" "$b_per"
            awk -v s="$s_per" -v o="$b_per" -v n="$n_per" -v r="$round" -v b="$body" \
                'BEGIN { printf "round %d (%s): sluice-b / no-op = %.3f, sluice / sluice-b = %.3f\n", r, b, o / n, s / o }'
        fi
    done
done
