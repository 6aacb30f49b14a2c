#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: sluice against the no-op server
# (examples/noop.rs), same release profile, same requests as scripts/bench-core.sh. The count
# is steady to a fraction of a percent run to run, where this shared machine's timings swing
# by 10-20 %, so it shows a change of 1 % that an A B A B timing cannot. It counts user-space
# instructions only (not the kernel's loopback, not cache misses), and callgrind counts each
# byte of a `rep movsb` copy as one, so large memcpys weigh more than they cost: use it beside
# scripts/bench-core.sh, not instead.
#
#   scripts/bench-instructions.sh                       # builds, then one and five descriptors
#   SLUICE=path/to/sluice NOOP=path/to/noop scripts/bench-instructions.sh   # other builds
#   SLUICE_B=path/to/other/sluice scripts/bench-instructions.sh             # a second build
#   NOOP_ARGS=sized scripts/bench-instructions.sh   # a no-op whose answers are as large as sluice's
#   REQUESTS=50000 KEEP=/tmp/cg scripts/bench-instructions.sh   # keep the profiles, for
#                                                               # callgrind_annotate --inclusive=yes
#   CACHE_SIM=1 scripts/bench-instructions.sh   # also simulated cache misses per request
#                                               # (callgrind's model of this CPU's L1 and last
#                                               # level: a model, not the hardware's counters)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
REQUESTS="${REQUESTS:-20000}"
WARMUP="${WARMUP:-3000}"
for tool in valgrind callgrind_control h2load; do
    if ! command -v "$tool" >/dev/null; then
        echo "needs $tool (Debian: valgrind, nghttp2-client)" >&2
        exit 1
    fi
done
if [ -z "${SLUICE:-}" ] || [ -z "${NOOP:-}" ]; then
    cargo build --release --bin sluice --example noop
fi
SLUICE="${SLUICE:-target/release/sluice}"
NOOP="${NOOP:-target/release/examples/noop}"
work="$(mktemp -d)"
keep="${KEEP:-$work}"
mkdir -p "$keep"
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

per_core_requests "$work" "$NOOP"

# count NAME BINARY BODY: instructions per request of one server under callgrind, counted
# after a warm-up (the counters zeroed, then dumped).
count() {
    local name="$1" binary="$2" body="$3" p out
    p="$(port)"
    out="$keep/$name-$(basename "$body").cg"
    rm -f "$out"*
    local grind=(valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file="$out")
    if [ -n "${CACHE_SIM:-}" ]; then grind+=(--cache-sim=yes); fi
    case "$name" in
        # shellcheck disable=SC2086
        no-op) "${grind[@]}" "$binary" serve "127.0.0.1:$p" ${NOOP_ARGS:-} >/dev/null 2>&1 & ;;
        *) "${grind[@]}" "$binary" serve --config "$work/rules" --grpc-addr "127.0.0.1:$p" \
            --http-addr "127.0.0.1:$(port)" --log-level warn --grpc-threads 1 >/dev/null 2>&1 & ;;
    esac
    server=$!
    for _ in $(seq 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then break; fi
        sleep 0.1
    done
    load() {
        h2load -t 1 -c 8 -m 16 -n "$1" -H 'content-type: application/grpc' -H 'te: trailers' \
            -d "$body" "http://127.0.0.1:$p/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" \
            | grep -oP '\d+(?= succeeded)'
    }
    load "$WARMUP" >/dev/null
    callgrind_control -z "$server" >/dev/null 2>&1
    local done_
    done_="$(load "$REQUESTS")"
    callgrind_control -d "$server" >/dev/null 2>&1
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=""
    local total
    total="$(grep -h '^summary:' "$out".1 | awk '{ print $2 }')"
    if [ -n "${CACHE_SIM:-}" ]; then
        # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw, summed over the counted part.
        grep -h '^summary:' "$out".1 | awk -v n="$done_" -v who="$name" -v body="$(basename "$body")" \
            '{ printf "  %-8s %-5s per request: I1 misses %.0f, D1 misses %.0f, last-level misses %.0f\n", who, body, $5 / n, ($6 + $7) / n, ($8 + $9 + $10) / n }' >&2
    fi
    awk -v t="$total" -v n="$done_" 'BEGIN { printf "%.0f\n", t / n }'
}

echo "instructions per request (callgrind), $REQUESTS requests after $WARMUP, 8 connections x 16 streams"
echo "sluice $(git rev-parse --short HEAD 2>/dev/null || echo '?'): $SLUICE; no-op: $NOOP ${NOOP_ARGS:-}${SLUICE_B:+; sluice-b: $SLUICE_B}"
for body in one five; do
    s="$(count sluice "$SLUICE" "$work/$body")"
    n="$(count no-op "$NOOP" "$work/$body")"
    line="$(printf '%-5s sluice %7d  no-op %7d  no-op / sluice %.3f' "$body" "$s" "$n" "$(awk -v s="$s" -v n="$n" 'BEGIN { print n / s }')")"
    if [ -n "${SLUICE_B:-}" ]; then
        b="$(count sluice-b "$SLUICE_B" "$work/$body")"
        line="$line$(printf '  sluice-b %7d  no-op / sluice-b %.3f' "$b" "$(awk -v b="$b" -v n="$n" 'BEGIN { print n / b }')")"
    fi
    echo "$line"
done
if [ -n "${KEEP:-}" ]; then echo "profiles kept in $keep (the .cg.1 files are the counted part)"; fi
