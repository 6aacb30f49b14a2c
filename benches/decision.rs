//! The decision path alone (match + count, no gRPC), and the same work in the limitador
//! crate's in-memory limiter and the governor crate, measured side by side in one run.
//!
//!     cargo bench --bench decision
//!
//! Limits are set high so every call is admitted and counted (the common path).

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::API_KEY_RULE;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice::RuleSet;
use sluice::{Ask, Mode, Purpose, decide};
use sluice::{Limiter, SystemClock};

fn rules(text: &str) -> RuleSet {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.yaml"), text).unwrap();
    sluice::load_dir(dir.path()).unwrap()
}

/// `n` exact-value rules plus the one the benchmark hits.
fn many_rules(n: usize) -> String {
    format!("{API_KEY_RULE}{}", common::tenant_rules(n))
}

/// Ten top-level keys `d0`..`d9`, one rule each.
fn ten_rules() -> String {
    format!("domain: bench\ndescriptors:\n{}", common::key_rules(10))
}

/// Five descriptors, as an LLM gateway sends them.
const FIVE: &str = r#"
domain: bench
descriptors:
  - key: api_key
    limits:
      - { unit: minute, requests: 4000000000 }
      - { unit: minute, tokens: 4000000000 }
    descriptors:
      - key: model
        limits: [{ unit: minute, requests: 4000000000 }]
  - key: endpoint
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: tenant
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: route
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
"#;

fn ask<'a>(entries: &'a [(&'a str, &'a str)]) -> Ask<'a, (&'a str, &'a str)> {
    Ask {
        entries,
        hits: 1,
        refund: false,
        limit_override: None,
        purpose: Purpose::Call,
        class: None,
    }
}

/// limitador's in-memory limiter with the same work as sluice's rule: one high limit per
/// minute, one counter per `api_key`.
fn limitador_per_api_key(cache: u64) -> (limitador::RateLimiter, limitador::limit::Namespace) {
    let limiter = limitador::RateLimiter::new(cache);
    limiter.add_limit(limitador::limit::Limit::new(
        "bench",
        4_000_000_000,
        60,
        vec![],
        vec![limitador::limit::Expression::parse("api_key").unwrap()],
    ));
    (limiter, "bench".into())
}

/// The LLM gateway's five descriptors (as in `FIVE`) for one API key, handed to `f`.
fn with_gateway_asks<R>(key: &str, f: impl FnOnce(&[Ask<'_, (&str, &str)>]) -> R) -> R {
    let by_key = [("api_key", key)];
    let by_model = [("api_key", key), ("model", "gpt-4o")];
    f(&[
        ask(&by_key),
        ask(&by_model),
        ask(&[("endpoint", "openai")]),
        ask(&[("tenant", "acme")]),
        ask(&[("route", "/v1/chat")]),
    ])
}

fn key_name(i: usize) -> String {
    let mut name = String::new();
    write_key_name(&mut name, i);
    name
}

fn write_key_name(name: &mut String, i: usize) {
    use std::fmt::Write;
    write!(name, "key-{i}").unwrap();
}

fn limiter() -> Limiter {
    Limiter::new(Arc::new(SystemClock))
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));

    let one = rules(API_KEY_RULE);
    let lim = limiter();
    let key = [("api_key", "k1")];
    let asks = [ask(&key)];
    group.bench_function("sluice/1 descriptor", |b| {
        b.iter(|| black_box(decide(&one, &lim, "bench", black_box(&asks), Mode::default()).allowed))
    });

    let five = rules(FIVE);
    let lim5 = limiter();
    let entries: [&[(&str, &str)]; 5] = [
        &[("api_key", "k1")],
        &[("api_key", "k1"), ("model", "gpt-4o")],
        &[("endpoint", "openai")],
        &[("tenant", "acme")],
        &[("route", "/v1/chat")],
    ];
    let asks5: Vec<_> = entries.iter().map(|e| ask(e)).collect();
    group.throughput(Throughput::Elements(5));
    group.bench_function("sluice/5 descriptors", |b| {
        b.iter(|| {
            black_box(decide(&five, &lim5, "bench", black_box(&asks5), Mode::default()).allowed)
        })
    });
    group.throughput(Throughput::Elements(1));

    // 1 to 10 descriptors a request, each its own rule and counter: the time per descriptor.
    let ten = rules(&ten_rules());
    let lim10 = limiter();
    let values: Vec<(String, String)> = (0..10)
        .map(|i| (format!("d{i}"), format!("v{i}")))
        .collect();
    let entries: Vec<[(&str, &str); 1]> = values
        .iter()
        .map(|(k, v)| [(k.as_str(), v.as_str())])
        .collect();
    let asks10: Vec<_> = entries.iter().map(|e| ask(e)).collect();
    for n in [1usize, 2, 5, 10] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new("sluice/descriptors a request", n),
            &n,
            |b, &n| {
                b.iter(|| {
                    black_box(
                        decide(
                            &ten,
                            &lim10,
                            "bench",
                            black_box(&asks10[..n]),
                            Mode::default(),
                        )
                        .allowed,
                    )
                })
            },
        );
    }
    group.throughput(Throughput::Elements(1));

    for n in [10usize, 10_000] {
        let set = rules(&many_rules(n));
        let lim = limiter();
        let tenant = [("tenant", "t7")];
        let asks = [ask(&tenant)];
        group.bench_with_input(BenchmarkId::new("sluice/rules", n), &n, |b, _| {
            b.iter(|| {
                black_box(decide(&set, &lim, "bench", black_box(&asks), Mode::default()).allowed)
            })
        });
    }

    for keys in [1usize, 1_000_000] {
        let lim = limiter();
        let names: Vec<String> = (0..keys).map(key_name).collect();
        for name in &names {
            decide(
                &one,
                &lim,
                "bench",
                &[ask(&[("api_key", name)])],
                Mode::default(),
            );
        }
        let mut i = 0usize;
        let mut name = String::with_capacity(16);
        group.bench_with_input(
            BenchmarkId::new("sluice/active keys", keys),
            &keys,
            |b, _| {
                b.iter(|| {
                    // A prime stride walks the keys out of order, as traffic does. The key is
                    // written afresh each call, as a request's values arrive freshly decoded
                    // (in cache), so the figure is the table's, not the benchmark's input's.
                    i = (i + 7_919) % keys;
                    name.clear();
                    write_key_name(&mut name, i);
                    let entries = [("api_key", name.as_str())];
                    black_box(
                        decide(&one, &lim, "bench", &[ask(&entries)], Mode::default()).allowed,
                    )
                })
            },
        );
        if keys == 1_000_000 {
            // The same 1,000,000 keys in limitador.
            let (rl, ns) = limitador_per_api_key(2_000_000);
            let contexts: Vec<limitador::limit::Context> = names
                .iter()
                .step_by(100)
                .map(|n| {
                    limitador::limit::Context::from(HashMap::from([(
                        "api_key".to_string(),
                        n.clone(),
                    )]))
                })
                .collect();
            let mut j = 0usize;
            group.bench_with_input(
                BenchmarkId::new("limitador/active keys (10,000)", keys),
                &keys,
                |b, _| {
                    b.iter(|| {
                        j = (j + 7_919) % contexts.len();
                        black_box(
                            rl.check_rate_limited_and_update(&ns, &contexts[j], 1)
                                .unwrap()
                                .limited,
                        )
                    })
                },
            );
        }
    }

    // The LLM gateway's five descriptors with 1,000,000 active API keys: the two descriptors
    // naming the key find cold counters, the other three hot ones.
    let lim5 = limiter();
    let keys = 1_000_000;
    for i in 0..keys {
        with_gateway_asks(&key_name(i), |asks| {
            decide(&five, &lim5, "bench", asks, Mode::default());
        });
    }
    let (mut i, mut name) = (0usize, String::with_capacity(16));
    group.throughput(Throughput::Elements(5));
    group.bench_function("sluice/5 descriptors, 1000000 keys", |b| {
        b.iter(|| {
            i = (i + 7_919) % keys;
            name.clear();
            write_key_name(&mut name, i);
            with_gateway_asks(&name, |asks| {
                black_box(decide(&five, &lim5, "bench", asks, Mode::default()).allowed)
            })
        })
    });
    group.throughput(Throughput::Elements(1));
    drop(lim5);

    // The machine's floor at 1,000,000 keys: one load from a random place in as much memory
    // as 1,000,000 counters take (~142 MiB), that waits for the load before it (a pointer
    // chase over one random cycle). A lookup that misses the cache costs at least this.
    let slots = 142 * (1 << 20) / 8;
    let mut cycle: Vec<u64> = (0..slots as u64).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..slots).rev() {
        // Sattolo's shuffle (j < i) makes the permutation one cycle through every slot.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        cycle.swap(i, (seed % i as u64) as usize);
    }
    let mut at = 0u64;
    group.bench_function("reference/one dependent load in 142 MiB", |b| {
        b.iter(|| {
            at = cycle[at as usize];
            black_box(at)
        })
    });
    drop(cycle);

    // The limitador crate's in-memory limiter on the same work: one limit keyed by api_key.
    let (rl, ns) = limitador_per_api_key(1_000);
    let ctx =
        limitador::limit::Context::from(HashMap::from([("api_key".to_string(), "k1".to_string())]));
    group.bench_function("limitador/1 descriptor", |b| {
        b.iter(|| {
            black_box(
                rl.check_rate_limited_and_update(&ns, black_box(&ctx), 1)
                    .unwrap()
                    .limited,
            )
        })
    });

    // governor's keyed limiter (GCRA): a check by key, no rule matching.
    let gov = governor::RateLimiter::keyed(governor::Quota::per_second(
        std::num::NonZeroU32::new(4_000_000_000).unwrap(),
    ));
    let gkey = "k1".to_string();
    group.bench_function("governor/1 key", |b| {
        b.iter(|| black_box(gov.check_key(black_box(&gkey)).is_ok()))
    });
    group.finish();
}

/// Two threads at once: on one key (one contended counter) and on distinct keys.
fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide, 2 threads");
    group.throughput(Throughput::Elements(2));
    let set = Arc::new(rules(API_KEY_RULE));
    let lim = Arc::new(limiter());
    for (label, distinct) in [("sluice/same key", false), ("sluice/distinct keys", true)] {
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..2 {
                        let (set, lim) = (set.clone(), lim.clone());
                        s.spawn(move || {
                            let name = if distinct {
                                format!("key-{t}")
                            } else {
                                "shared".to_string()
                            };
                            let entries = [("api_key", name.as_str())];
                            let asks = [ask(&entries)];
                            for _ in 0..iters {
                                black_box(
                                    decide(&set, &lim, "bench", &asks, Mode::default()).allowed,
                                );
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();
}

/// One descriptor against one limit counted by each algorithm, side by side in one run (the
/// limit high enough that every call passes, so each pays the counting it would in use).
fn algorithms(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide by algorithm");
    group.throughput(Throughput::Elements(1));
    let key = [("api_key", "k1")];
    let asks = [ask(&key)];
    for algorithm in ["fixed_window", "sliding_window", "token_bucket"] {
        let set = rules(&format!(
            "domain: bench\ndescriptors:\n  - key: api_key\n    rate_limit: {{ unit: second, requests_per_unit: 4000000000, algorithm: {algorithm} }}\n"
        ));
        let lim = limiter();
        group.bench_function(algorithm, |b| {
            b.iter(|| {
                black_box(decide(&set, &lim, "bench", black_box(&asks), Mode::default()).allowed)
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = single_thread, two_threads, algorithms }
criterion_main!(benches);
