# Helpers the benchmark scripts share (sourced, not run).

# A free loopback port.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# CPU seconds (user + system) of a process, from /proc.
cpu() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

# Waits up to 10 s for something to listen on a loopback port.
wait_port() {
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    exit 1
}

# sluice_pinned BINARY CPU CONFIG_DIR GRPC_PORT ARGS...: sluice on one core, in the background.
sluice_pinned() {
    local binary="$1" cpu_="$2" config="$3" grpc="$4"
    shift 4
    taskset -c "$cpu_" "$binary" serve --config "$config" \
        --grpc-addr "127.0.0.1:$grpc" --http-addr "127.0.0.1:$(port)" \
        --log-level warn "$@" >/dev/null 2>&1 &
}

# per_core_requests DIR NOOP: the per-core benches' rules (DIR/rules/bench.yaml, limits no
# load reaches) and their two requests, written by the no-op's encoder: DIR/one (one
# descriptor: api_key and model) and DIR/five (the LLM gateway's five descriptors).
per_core_requests() {
    local dir="$1" noop="$2"
    mkdir -p "$dir/rules"
    cat > "$dir/rules/bench.yaml" <<'EOF'
domain: bench
descriptors:
  - key: api_key
    limits:
      - { unit: minute, requests: 4000000000 }
      - { unit: minute, tokens: 4000000000 }
    descriptors:
      - key: model
        rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: endpoint
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: user
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: route
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
EOF
    "$noop" request "$dir/one" bench api_key=k1,model=gpt-4o
    "$noop" request "$dir/five" bench api_key=k1 api_key=k1,model=gpt-4o endpoint=openai user=u1 route=chat
}
