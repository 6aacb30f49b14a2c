//! Exactness under concurrency: many threads on one counter admit exactly the limit, window
//! after window; the same for a rule with a request and a token limit sharing one counter.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{T0, one_request};
use sluice::{
    Clock, CounterRef, Counts, Demand, Enforcement, Limiter, Limits, ManualClock, Outcome, Unit,
};

const THREADS: usize = 8;

const WINDOWS: u64 = 40;

/// Every thread tries `attempts` calls in each window; returns what each window admitted.
fn hammer(limits: Limits, charge: Counts, attempts: usize) -> Vec<(u64, u64, u64)> {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = Limiter::new(clock.clone());
    let parts = ["the-one-key"];
    let demand = Demand {
        counter: CounterRef {
            scope: 1,
            unit: Unit::Second,
            parts: &parts,
        },
        limits,
        charge,
        refund: false,
        hold_taken_ms: None,
        enforcement: Enforcement::Enforce,
    };
    let mut per_window = Vec::new();
    for w in 0..WINDOWS {
        clock.set_ms(T0 + w * 1_000 + 10);
        let admitted = AtomicU64::new(0);
        let barrier = std::sync::Barrier::new(THREADS);
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    barrier.wait();
                    let mut outcome = [Outcome::default()];
                    for _ in 0..attempts {
                        if limiter.settle(&[demand], &mut outcome).allowed {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let admitted = admitted.into_inner();
        let counts = limiter
            .counters()
            .pin()
            .get(demand.counter)
            .map(|c| c.counts(Unit::Second.window_at(clock.now_ms()), false))
            .unwrap_or_default();
        per_window.push((admitted, u64::from(counts.requests), counts.tokens));
    }
    per_window
}

#[test]
fn eight_threads_admit_exactly_the_limit_every_window() {
    const LIMIT: u32 = 1_000;
    let limits = Limits {
        requests: Some(LIMIT),
        tokens: None,
        ..Default::default()
    };
    let one = Counts {
        requests: 1,
        tokens: 0,
    };
    // 8 threads x 500 attempts = 4x the limit in each window.
    let windows = hammer(limits, one, 500);
    for (w, (admitted, requests, _)) in windows.iter().enumerate() {
        assert_eq!(*admitted, u64::from(LIMIT), "window {w}");
        assert_eq!(
            *requests,
            u64::from(LIMIT),
            "window {w}: the counter agrees"
        );
    }
}

#[test]
fn requests_and_tokens_in_one_word_stay_exact() {
    // Tokens bind first: 300 requests of 10 tokens reach the 3,000-token limit
    // while the 500-request limit still has room.
    let limits = Limits {
        requests: Some(500),
        tokens: Some(3_000),
        ..Default::default()
    };
    let call = Counts {
        requests: 1,
        tokens: 10,
    };
    for (w, (admitted, requests, tokens)) in hammer(limits, call, 200).iter().enumerate() {
        assert_eq!(*admitted, 300, "window {w}");
        assert_eq!((*requests, *tokens), (300, 3_000), "window {w}");
    }
    // Requests bind first: 500 requests of 2 tokens use 1,000 of 3,000 tokens.
    let small = Counts {
        requests: 1,
        tokens: 2,
    };
    for (w, (admitted, requests, tokens)) in hammer(limits, small, 200).iter().enumerate() {
        assert_eq!(*admitted, 500, "window {w}");
        assert_eq!((*requests, *tokens), (500, 1_000), "window {w}");
    }
}

#[test]
fn a_denied_multi_limit_request_rolls_back_under_contention() {
    // Two counters per request: a per-key limit and a shared one. Threads use two keys; the
    // shared counter must end at exactly what the keys admitted.
    let clock = Arc::new(ManualClock::new(T0 + 10));
    let limiter = Limiter::new(clock);
    let shared_parts = ["shared"];
    let admitted = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let limiter = &limiter;
            let admitted = &admitted;
            let shared_parts = &shared_parts;
            scope.spawn(move || {
                let key = [if t % 2 == 0 { "even" } else { "odd" }];
                let demands = [
                    one_request(1, Unit::Minute, &key, 300),
                    one_request(2, Unit::Minute, shared_parts, 1_000),
                ];
                let mut outcomes = [Outcome::default(); 2];
                for _ in 0..1_000 {
                    if limiter.settle(&demands, &mut outcomes).allowed {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    // Each key admits 300; the shared counter holds exactly those 600, none of the denials.
    assert_eq!(admitted.into_inner(), 600);
    let window = Unit::Minute.window_at(T0 + 10);
    let pinned = limiter.counters().pin();
    let shared = pinned
        .get(CounterRef {
            scope: 2,
            unit: Unit::Minute,
            parts: &shared_parts,
        })
        .expect("shared counter");
    assert_eq!(shared.counts(window, false).requests, 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_grpc_clients_admit_exactly_the_limit_every_window() {
    let rules = "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      requests_per_unit: 50\n";
    let server = Arc::new(common::start(&[("d.yaml", rules)]).await);
    for w in 0..5u64 {
        server.clock.set_ms(T0 + w * 1_000 + 10);
        let mut clients = Vec::new();
        for _ in 0..THREADS {
            let server = server.clone();
            clients.push(tokio::spawn(async move {
                let request = common::request("d", &[&[("k", "same")]]);
                server.admitted(25, &request).await
            }));
        }
        let mut admitted = 0;
        for client in clients {
            admitted += client.await.expect("client task");
        }
        assert_eq!(admitted, 50, "window {w}: 200 calls, limit 50");
    }
    Arc::into_inner(server).expect("sole owner").stop().await;
}
