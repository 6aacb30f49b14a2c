#!/usr/bin/env bash
# Fuzzes sluice's three inputs from outside: the gRPC request path from raw bytes, the rule
# compiler from YAML text (mutating the project's rule files by their structure and by bytes),
# and the admin API's JSON bodies over HTTP. Each target gets INPUTS inputs (a million unless
# given) from SEED (random unless given), and prints inputs per second, how the inputs came
# out, and its findings (a panic, an input over a second, memory grown past 256 MiB, a
# rejection without a clear error); it fails if there is any. The test command runs the same
# targets on 10,000 inputs from a fixed seed.
#   scripts/fuzz.sh [INPUTS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
inputs="${1:-1000000}"
seed="${2:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
echo "fuzz.sh: $inputs inputs a target, seed $seed" >&2
FUZZ_INPUTS="$inputs" FUZZ_SEED="$seed" \
    cargo test --locked --test fuzz -- --nocapture --test-threads 1 2>&1 |
    grep -E 'fuzz |  outcomes|  input|test result'
