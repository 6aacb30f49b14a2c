//! A tight loop over the decision path, for profilers (valgrind --tool=callgrind):
//!     cargo build --release --example decide_loop
//!     valgrind --tool=callgrind target/release/examples/decide_loop 200000
//! A second argument spreads the calls over that many keys (with `--cache-sim=yes`, to see
//! where the misses are):
//!     valgrind --tool=callgrind --cache-sim=yes target/release/examples/decide_loop 200000 1000000
use std::sync::Arc;

use sluice::{Ask, Mode, Purpose, decide};
use sluice::{Limiter, SystemClock};

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
    let rules = sluice::load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let keys: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
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
        }];
        decide(&rules, &limiter, "bench", &asks, Mode::default()).allowed
    };
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
