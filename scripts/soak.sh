#!/usr/bin/env bash
# The soak (benches/soak.rs): one sluice synced through a real Redis under half of its measured
# saturation for SOAK_MINUTES (default 30), 100,000 new API keys every minute, its rule file
# rewritten every minute. Prints resident memory (read every second: each minute's peak and
# low, and the reading at its end), open fds, active counters, Redis's memory and keys, and
# latency every minute, then each figure's spread after a 5-minute warm-up.
# Writes target/soak/soak.csv, target/soak/soak.svg (the plot) and target/soak/sluice.log.
#
#   scripts/soak.sh                       # 30 minutes, server on core 0, load and Redis on core 1
#   SOAK_MINUTES=3 scripts/soak.sh        # a short look
#   SOAK_RATE=20000 scripts/soak.sh       # a fixed offered rate instead of half saturation
#   LOAD_PIN=0 scripts/soak.sh            # unpinned (one core, or a shared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v "${SLUICE_REDIS_SERVER:-redis-server}" >/dev/null || {
    echo "soak: redis-server not found (Debian's redis-server, or SLUICE_REDIS_SERVER=path)" >&2
    exit 1
}
cargo build --release --bin sluice
cargo bench --bench soak
