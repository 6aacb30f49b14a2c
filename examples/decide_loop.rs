//! A tight loop over the decision path, for profilers (valgrind --tool=callgrind):
//!     cargo build --release --example decide_loop
//!     valgrind --tool=callgrind target/release/examples/decide_loop 200000
//! A second argument spreads the calls over that many keys (with `--cache-sim=yes`, to see
//! where the misses are):
//!     valgrind --tool=callgrind --cache-sim=yes target/release/examples/decide_loop 200000 1000000
//! `new N` decides one call for each of N keys met for the first time, timing each, and prints
//! the slowest with the number of counters there were when it ran (the counter table's growth
//! against the rest):
//!     taskset -c 0 target/release/examples/decide_loop new 1000000
use std::sync::Arc;
use std::time::Instant;

use sluice::{Ask, Mode, Purpose, RuleSet, decide};
use sluice::{Limiter, SystemClock};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let rules = rules();
    let limiter = Limiter::new(Arc::new(SystemClock));
    let mut name = String::with_capacity(16);
    let mut call = |i: usize| {
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
            class: None,
        }];
        decide(&rules, &limiter, "bench", &asks, Mode::default()).allowed
    };
    if args.first().is_some_and(|a| a == "new") {
        let keys = number(1, 1_000_000);
        let mut timed: Vec<(u128, usize)> = Vec::with_capacity(keys);
        for i in 0..keys {
            let started = Instant::now();
            assert!(call(i));
            timed.push((started.elapsed().as_nanos(), i));
        }
        timed.sort_unstable_by(|a, b| b.cmp(a));
        let total: u128 = timed.iter().map(|(ns, _)| ns).sum();
        println!(
            "{keys} new keys, {:.0} ns a call on average; the slowest:",
            total as f64 / keys as f64
        );
        for (ns, i) in timed.iter().take(15) {
            println!(
                "{:>10.3} ms at call {i} ({i} counters before it)",
                *ns as f64 / 1e6
            );
        }
        return;
    }
    let (n, keys) = (number(0, 1_000_000), number(1, 1));
    for i in 0..keys {
        call(i);
    }
    let mut allowed = 0;
    let mut i = 0;
    for _ in 0..n {
        // A prime stride walks the keys out of order, as traffic does.
        i = (i + 7_919) % keys;
        allowed += usize::from(call(i));
    }
    println!("{allowed}");
}

/// One rule on `api_key`, with a limit no loop reaches.
fn rules() -> RuleSet {
    let dir = std::env::temp_dir().join(format!("sluice-decide-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bench.yaml"),
        "domain: bench\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 4000000000 }\n",
    )
    .unwrap();
    let rules = sluice::load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    rules
}
