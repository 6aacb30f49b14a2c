//! A tight loop over the decision path, for profilers (valgrind --tool=callgrind):
//!     cargo build --release --example decide_loop
//!     valgrind --tool=callgrind target/release/examples/decide_loop 200000
use std::sync::Arc;

use sluice::decision::{Ask, Mode, Purpose, decide};
use sluice::limiter::{Limiter, SystemClock};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("sluice-decide-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bench.yaml"),
        "domain: bench\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 4000000000 }\n",
    )
    .unwrap();
    let rules = sluice::rules::load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let limiter = Limiter::new(Arc::new(SystemClock));
    let entries = [("api_key", "k1")];
    let asks = [Ask {
        entries: &entries[..],
        hits: 1,
        refund: false,
        limit_override: None,
        purpose: Purpose::Call,
    }];
    let mut allowed = 0;
    for _ in 0..n {
        allowed += usize::from(decide(&rules, &limiter, "bench", &asks, Mode::default()).allowed);
    }
    println!("{allowed}");
}
