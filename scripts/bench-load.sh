#!/usr/bin/env bash
# The gRPC load benchmark: sluice beside a no-op ShouldRateLimit server, with and without Redis.
# LOAD_SECONDS sets the length of each run (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin sluice
cargo bench --bench load
