//! Where the time goes when many keys are met for the first time: decides one call each for
//! N new keys (one descriptor), timing each call, and prints the slowest with the number of
//! counters there were when it ran, to tell the counter table's growth from the allocator's.
//!     cargo run --release --example new_keys -- 1000000
use std::sync::Arc;
use std::time::Instant;

use sluice::{Ask, Limiter, Mode, Purpose, SystemClock, decide};

fn main() {
    let keys: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("sluice-new-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bench.yaml"),
        "domain: bench\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 4000000000 }\n",
    )
    .unwrap();
    let rules = sluice::load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let limiter = Limiter::new(Arc::new(SystemClock));
    let mut name = String::with_capacity(16);
    let mut slowest: Vec<(u128, usize)> = Vec::with_capacity(keys);
    for i in 0..keys {
        use std::fmt::Write;
        name.clear();
        write!(name, "key-{i}").unwrap();
        let entries = [("api_key", name.as_str())];
        let asks = [Ask {
            entries: &entries[..],
            hits: 1,
            refund: false,
            limit_override: None,
            purpose: Purpose::Call,
        }];
        let started = Instant::now();
        let allowed = decide(&rules, &limiter, "bench", &asks, Mode::default()).allowed;
        slowest.push((started.elapsed().as_nanos(), i));
        assert!(allowed);
    }
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    let total: u128 = slowest.iter().map(|(ns, _)| ns).sum();
    println!(
        "{keys} new keys, {:.0} ns a call on average; the slowest:",
        total as f64 / keys as f64
    );
    for (ns, i) in slowest.iter().take(15) {
        println!(
            "{:>10.3} ms at call {i} ({i} counters before it)",
            *ns as f64 / 1e6
        );
    }
}
