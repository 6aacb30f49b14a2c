//! The decision path with several descriptors a request, each its own rule and counter, for
//! profilers (valgrind --tool=callgrind counts instructions, the same every run):
//!     cargo build --release --example decide_many
//!     valgrind --tool=callgrind target/release/examples/decide_many 100000 5
//! Arguments: calls (default 100,000), descriptors a request (1 to 10, default 5). With
//! `SYNCED=1` the limiter judges as a replica of three synced through Redis does.
#[path = "../benches/common/mod.rs"]
mod common;

use std::sync::Arc;

use sluice::{Ask, Limiter, Mode, Purpose, SystemClock, decide};

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (calls, n) = (arg(1, 100_000), arg(2, 5).clamp(1, 10));
    let dir = std::env::temp_dir().join(format!("sluice-decide-many-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = format!("domain: bench\ndescriptors:\n{}", common::key_rules(10));
    std::fs::write(dir.join("bench.yaml"), rules).unwrap();
    let rules = sluice::load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let limiter = Limiter::new(Arc::new(SystemClock));
    if std::env::var("SYNCED").is_ok() {
        limiter
            .fleet()
            .set(sluice::FleetView::Synced { replicas: 3 });
    }
    let values: Vec<(String, String)> = (0..10)
        .map(|i| (format!("d{i}"), format!("v{i}")))
        .collect();
    let entries: Vec<[(&str, &str); 1]> = values
        .iter()
        .map(|(k, v)| [(k.as_str(), v.as_str())])
        .collect();
    let asks: Vec<_> = entries
        .iter()
        .map(|e| Ask {
            entries: &e[..],
            hits: 1,
            refund: false,
            limit_override: None,
            purpose: Purpose::Call,
            class: None,
        })
        .collect();
    let mut allowed = 0;
    for _ in 0..calls {
        allowed +=
            usize::from(decide(&rules, &limiter, "bench", &asks[..n], Mode::default()).allowed);
    }
    println!("{allowed}");
}
