//! Resident memory per active counter: 1,000,000 keys counted through the decision path, and
//! the growth of the process's resident set divided by their number; then per loaded rule.
//!
//!     cargo bench --bench memory

mod common;

use std::sync::Arc;

use sluice::{Ask, Mode, Purpose, decide};
use sluice::{Limiter, SystemClock};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // built and run by `cargo test --all-targets`: nothing to measure then
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.yaml"), common::API_KEY_RULE).unwrap();
    let rules = sluice::load_dir(dir.path()).unwrap();
    let mut kept = Vec::new();
    // Loaded rules first, while the heap is fresh (memory freed later is reused, not returned):
    // 10 and 10,000 exact-value rules (`tenant: tN`), kept while measured.
    for n in [10usize, 10_000] {
        let text = format!("domain: rules\ndescriptors:\n{}", common::tenant_rules(n));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), text).unwrap();
        let before = resident_bytes();
        let loaded = sluice::load_dir(dir.path()).unwrap();
        let grown = resident_bytes().saturating_sub(before);
        println!(
            "{n} rules loaded: {:.2} MiB resident, {:.0} bytes per rule",
            grown as f64 / 1_048_576.0,
            grown as f64 / n as f64
        );
        // Kept to the end: their memory, freed, would be reused by the counters below.
        kept.push(loaded);
    }
    let limiter = Limiter::new(Arc::new(SystemClock));
    for keys in [100_000usize, 1_000_000] {
        // The keys' own strings are made first, so they are not counted as the counters'.
        let names: Vec<String> = (0..keys).map(|i| format!("key-{i:07}")).collect();
        let before = resident_bytes();
        let live_before = limiter.counters().len();
        for name in &names {
            let entries = [("api_key", name.as_str())];
            let ask = Ask {
                entries: &entries[..],
                hits: 1,
                refund: false,
                limit_override: None,
                purpose: Purpose::Call,
                class: None,
            };
            decide(&rules, &limiter, "bench", &[ask], Mode::default());
        }
        let grown = resident_bytes().saturating_sub(before);
        let counters = limiter.counters().len() - live_before;
        println!(
            "{counters} counters (keys of 11 bytes): {:.1} MiB resident, {:.0} bytes per counter",
            grown as f64 / 1_048_576.0,
            grown as f64 / counters as f64
        );
        assert_eq!(counters, keys);
        // Counters of the next round are new keys: clear these.
        limiter.counters().remove_where(|_| true);
    }
}
