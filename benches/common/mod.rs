//! Rule files the benchmarks share. Every limit is high enough that each call is admitted and
//! counted (the common path). Each benchmark uses a part of this.
#![allow(dead_code)]

const HIGH_LIMIT: &str = "rate_limit: { unit: minute, requests_per_unit: 4000000000 }";

/// Domain `bench` with one rule on `api_key`: a counter per key.
pub const API_KEY_RULE: &str = "domain: bench\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 4000000000 }\n";

/// `n` exact-value rules, `tenant: t0` .. `tenant: t{n-1}`, as lines of a `descriptors:` list.
pub fn tenant_rules(n: usize) -> String {
    (0..n)
        .map(|i| format!("  - key: tenant\n    value: t{i}\n    {HIGH_LIMIT}\n"))
        .collect()
}

/// One rule on each of the keys `d0` .. `d{n-1}`, as lines of a `descriptors:` list.
pub fn key_rules(n: usize) -> String {
    (0..n)
        .map(|i| format!("  - key: d{i}\n    {HIGH_LIMIT}\n"))
        .collect()
}

/// A free loopback port, for a server a benchmark starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
