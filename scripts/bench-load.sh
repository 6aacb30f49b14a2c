#!/usr/bin/env bash
# The gRPC load benchmark: sluice beside a no-op ShouldRateLimit server, with and without Redis,
# then latency at half of saturation from h2load.
# LOAD_SECONDS sets the length of each run (default 10), LOAD_ROUNDS how many times each
# configuration runs, interleaved (default 3; ratios are medians over rounds).
# LOAD_KEYS=1000000 runs only the many-keys runs, each in LOAD_SLICES slices (default 10) taken
# in turn with a 1-key run. NOOP_BIN=target/release/examples/noop uses that no-op (built with the
# release profile) when the bench is built with another.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v h2load >/dev/null; then
    echo "installing h2load (Debian's nghttp2-client)"
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q nghttp2-client; else sudo apt-get install -y -q nghttp2-client; fi
fi
cargo build --release --bin sluice
cargo bench --bench load
