//! sluice as a library: a `RateLimiter` in the test's own process, with the server's rules and
//! pipeline, and no Envoy. Each test drives it as a service embedding it would.

mod common;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, unique_namespace, wall_ms};
use sluice::settings::Settings;
use sluice::{Descriptor, ManualClock, RateLimiter, Unit, Why};

/// 2026-12-07 00:00:00 UTC, a minute's start.
const T0: u64 = 1_796_601_600_000;

const LLM: &str = r#"
domain: llm
descriptors:
  - key: api_key
    limits:
      - { unit: minute, requests: 3 }
      - { unit: minute, tokens: 1000 }
      - { concurrency: 2, hold_ttl: 1m }
"#;

fn limiter_at(clock: &Arc<ManualClock>, yaml: &str) -> RateLimiter {
    RateLimiter::builder()
        .rules_yaml(yaml)
        .clock(clock.clone())
        .build()
        .expect("limiter builds")
}

#[test]
fn a_limiter_admits_its_limit_a_window_and_says_when_the_next_call_may_pass() {
    let clock = Arc::new(ManualClock::new(T0 + 45_000));
    let limiter = limiter_at(&clock, LLM);
    let key = Descriptor::new("llm").entry("api_key", "k1");
    let mut holds = Vec::new();
    for left in [2, 1] {
        let mut decision = limiter.try_acquire(&key).unwrap();
        assert!(decision.is_allowed(), "{decision:?}");
        assert_eq!(decision.why(), Why::Within);
        assert!(decision.remaining() <= left, "{decision:?}");
        holds.push(
            decision
                .take_hold()
                .expect("a concurrency limit takes a hold"),
        );
    }
    // Two streams run: the third call is refused by the concurrency limit.
    let third = limiter.try_acquire(&key).unwrap();
    assert!(!third.is_allowed());
    assert_eq!(third.why(), Why::OverLimit);
    drop(third);
    // One stream ends: its slot comes back, and a call passes (the third request of 3).
    holds.pop().unwrap().release();
    let mut decision = until_allowed(&limiter, &key);
    let hold = decision.take_hold().expect("a hold");
    // Every stream ends; then the minute's three requests are spent: refused until the
    // minute ends, 15 s from now.
    drop((holds, hold));
    let started = Instant::now();
    while limiter.capacity(&key).unwrap().in_flight > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "holds never given back"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let refused = limiter.try_acquire(&key).unwrap();
    assert!(!refused.is_allowed());
    let limit = refused.limit().expect("the limit that refused");
    assert_eq!((limit.per_unit, limit.unit), (3, Unit::Minute));
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(15)));
    clock.set_ms(T0 + 60_000);
    assert!(limiter.try_acquire(&key).unwrap().is_allowed());
    // Another key has limits of its own.
    let other = Descriptor::new("llm").entry("api_key", "k2");
    assert!(limiter.try_acquire(&other).unwrap().is_allowed());
}

/// A release travels on the limiter's own thread: a caller sees it within moments.
fn until_allowed(limiter: &RateLimiter, key: &Descriptor) -> sluice::Decision {
    let started = Instant::now();
    loop {
        let decision = limiter.try_acquire(key).unwrap();
        if decision.is_allowed() {
            return decision;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a hold given back was never seen"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_descriptor_no_rule_matches_passes_with_no_limit() {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = limiter_at(&clock, LLM);
    for descriptor in [
        Descriptor::new("llm").entry("team", "a"),
        Descriptor::new("unknown").entry("api_key", "k1"),
    ] {
        let decision = limiter.try_acquire(&descriptor).unwrap();
        assert!(decision.is_allowed());
        assert_eq!(decision.why(), Why::NoLimit);
        assert!(decision.limit().is_none());
    }
}

#[test]
fn a_malformed_descriptor_is_an_error_not_a_decision() {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = limiter_at(&clock, LLM);
    let empty = Descriptor::new("llm");
    let error = limiter.try_acquire(&empty).unwrap_err();
    assert!(
        matches!(error, sluice::AcquireError::Invalid(_)),
        "{error:?}"
    );
    let only_reserved = Descriptor::new("llm").entry("sluice.report", "tokens");
    let error = limiter.try_acquire(&only_reserved).unwrap_err().to_string();
    assert!(error.contains("needs an entry besides"), "{error}");
    let unknown = Descriptor::new("llm")
        .entry("api_key", "k1")
        .entry("sluice.bogus", "1");
    let error = limiter.try_acquire(&unknown).unwrap_err().to_string();
    assert!(error.contains("sluice.bogus=1"), "{error}");
}

#[test]
fn broken_rules_name_their_file_line_and_field() {
    let error = RateLimiter::builder()
        .rules_yaml("domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n")
        .build()
        .unwrap_err()
        .to_string();
    assert!(error.contains("<rules_yaml #1>:4"), "{error}");
    assert!(error.contains("unit"), "{error}");
    assert!(error.contains("fortnight"), "{error}");
}

#[test]
fn a_rules_file_is_read_at_build_and_a_missing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llm.yaml");
    std::fs::write(&path, LLM).unwrap();
    let limiter = RateLimiter::builder().rules_file(&path).build().unwrap();
    let key = Descriptor::new("llm").entry("api_key", "k1");
    assert_eq!(limiter.capacity(&key).unwrap().total, Some(3));
    let missing = dir.path().join("missing.yaml");
    let error = RateLimiter::builder()
        .rules_file(&missing)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("missing.yaml") && error.contains("cannot read"),
        "{error}"
    );
}

#[test]
fn tokens_reported_spend_the_budget_and_an_estimate_is_settled_by_its_report() {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = limiter_at(&clock, LLM);
    let key = Descriptor::new("llm").entry("api_key", "k1");
    limiter.report_tokens(&key, 700).unwrap();
    // A call reserving 400 tokens does not fit in the 300 left.
    let reserving = key.clone().estimate_tokens(400);
    let refused = limiter.try_acquire(&reserving).unwrap();
    assert!(!refused.is_allowed(), "{refused:?}");
    // One reserving 200 does; its report of 50 gives 150 back: 250 left, so 250 fits, 251 not.
    let small = key.clone().estimate_tokens(200);
    let mut admitted = limiter.try_acquire(&small).unwrap();
    assert!(admitted.is_allowed(), "{admitted:?}");
    admitted.take_hold().unwrap().release();
    limiter.report_tokens(&small, 50).unwrap();
    let capacity = limiter.capacity(&key).unwrap();
    assert_eq!(capacity.in_flight_limit, Some(2));
    let over = key.clone().estimate_tokens(251);
    assert!(!until_refused_or_allowed(&limiter, &over));
    let fits = key.clone().estimate_tokens(250);
    assert!(until_refused_or_allowed(&limiter, &fits));
}

/// The decision on `descriptor` once the limiter's thread has given back earlier holds.
fn until_refused_or_allowed(limiter: &RateLimiter, descriptor: &Descriptor) -> bool {
    // Holds are given back on the limiter's thread; a concurrency refusal may be stale.
    let started = Instant::now();
    loop {
        let decision = limiter.try_acquire(descriptor).unwrap();
        let by_concurrency = decision
            .limit()
            .is_some_and(|l| l.unit == Unit::Minute && l.per_unit == 2);
        if decision.is_allowed() || !by_concurrency || started.elapsed() > Duration::from_secs(5) {
            return decision.is_allowed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_capacity_set_in_code_is_a_rule_that_can_change_and_keeps_its_counts() {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = RateLimiter::builder().clock(clock.clone()).build().unwrap();
    let openai = Descriptor::resource("openai");
    assert_eq!(limiter.try_acquire(&openai).unwrap().why(), Why::NoLimit);
    let two = NonZeroU32::new(2).unwrap();
    limiter
        .set_capacity("openai", two, Duration::from_secs(90))
        .unwrap();
    assert!(limiter.try_acquire(&openai).unwrap().is_allowed());
    assert!(limiter.try_acquire(&openai).unwrap().is_allowed());
    let refused = limiter.try_acquire(&openai).unwrap();
    assert!(!refused.is_allowed());
    assert_eq!(refused.limit().unwrap().per_unit, 2);
    let capacity = limiter.capacity(&openai).unwrap();
    assert_eq!(
        (capacity.total, capacity.available, capacity.in_flight),
        (Some(2), Some(0), 0)
    );
    // Raised to 3 in the same window: one more passes, as the two counted stay counted.
    let three = NonZeroU32::new(3).unwrap();
    limiter
        .set_capacity("openai", three, Duration::from_secs(90))
        .unwrap();
    assert!(limiter.try_acquire(&openai).unwrap().is_allowed());
    assert!(!limiter.try_acquire(&openai).unwrap().is_allowed());
    // Bad input is refused with a reason.
    let bad_name = limiter.set_capacity("open ai", two, Duration::from_secs(60));
    assert!(matches!(bad_name, Err(sluice::CapacityError::Name(_))));
    let bad_window = limiter.set_capacity("openai", two, Duration::from_millis(1500));
    assert!(matches!(bad_window, Err(sluice::CapacityError::Window(_))));
}

#[test]
fn a_reduction_announced_lowers_the_limit_and_tells_the_listeners() {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = RateLimiter::builder().clock(clock.clone()).build().unwrap();
    let ten = NonZeroU32::new(10).unwrap();
    limiter
        .set_capacity("anthropic", ten, Duration::from_secs(60))
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let told = seen.clone();
    limiter.on_capacity_change(move |change| told.lock().unwrap().push(change.clone()));
    let anthropic = Descriptor::resource("anthropic");
    let factor = limiter
        .announce_reduced(&anthropic, 0.5, "upstream answered 429")
        .unwrap();
    assert_eq!(factor, 0.5);
    let started = Instant::now();
    while seen.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no listener told"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let change = seen.lock().unwrap()[0].clone();
    assert_eq!((change.domain.as_str(), change.factor), ("anthropic", 0.5));
    assert_eq!(limiter.capacity(&anthropic).unwrap().total, Some(5));
    let admitted = (0..10)
        .filter(|_| limiter.try_acquire(&anthropic).unwrap().is_allowed())
        .count();
    assert_eq!(admitted, 5);
    let no_rule = limiter.announce_reduced(&Descriptor::resource("none"), 0.5, "test");
    assert!(matches!(no_rule, Err(sluice::CapacityError::NoRule { .. })));
    let bad = limiter.announce_reduced(&anthropic, 1.5, "test");
    assert!(matches!(bad, Err(sluice::CapacityError::Factor(_))));
}

#[tokio::test]
async fn acquire_waits_for_capacity_in_arrival_order_and_gives_up_at_its_deadline() {
    // A real clock: the wait is for a token bucket refilling 20 a second (one every 50 ms).
    let limiter = RateLimiter::builder()
        .rules_yaml(
            "domain: d\ndescriptors:\n  - key: k\n    limits:\n      - { unit: second, requests: 20, algorithm: token_bucket, burst: 1 }\n",
        )
        .build()
        .unwrap();
    let key = Descriptor::new("d").entry("k", "v");
    assert!(
        limiter
            .acquire(&key, Duration::ZERO)
            .await
            .unwrap()
            .is_allowed()
    );
    assert!(!limiter.try_acquire(&key).unwrap().is_allowed());
    // Waited for: admitted within the refill's 50 ms (and a margin for a busy machine).
    let started = Instant::now();
    let waited = limiter.acquire(&key, Duration::from_secs(2)).await.unwrap();
    assert!(waited.is_allowed(), "{waited:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Three waiters at once share the refills in turn; a wait too short to see one gives up.
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (limiter, key) = (limiter.clone(), key.clone());
        waiting.spawn(async move { limiter.acquire(&key, Duration::from_secs(3)).await });
    }
    let mut admitted = 0;
    while let Some(done) = waiting.join_next().await {
        admitted += usize::from(done.unwrap().unwrap().is_allowed());
    }
    assert_eq!(admitted, 3);
    let short = limiter
        .acquire(&key, Duration::from_millis(1))
        .await
        .unwrap();
    assert!(!short.is_allowed());
    assert!(short.retry_after().unwrap() <= Duration::from_millis(50));
}

#[tokio::test]
async fn an_acquire_given_up_on_leaves_its_queue_and_takes_nothing() {
    let limiter = RateLimiter::builder()
        .rules_yaml("domain: d\ndescriptors:\n  - key: k\n    limits:\n      - { concurrency: 1, hold_ttl: 1m }\n")
        .build()
        .unwrap();
    let key = Descriptor::new("d").entry("k", "v");
    let mut first = limiter.try_acquire(&key).unwrap();
    let hold = first.take_hold().expect("a hold");
    // Waits for the slot; its caller gives up after 50 ms.
    let waiting = limiter.acquire(&key, Duration::from_secs(30));
    let gave_up = tokio::time::timeout(Duration::from_millis(50), waiting).await;
    assert!(gave_up.is_err(), "the call was not kept waiting");
    // The slot comes back. A waiter still queued would wake on it and take it for a caller
    // that is gone; given up, it took nothing.
    hold.release();
    let started = Instant::now();
    while limiter.capacity(&key).unwrap().in_flight > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut next = limiter.try_acquire(&key).unwrap();
    assert!(next.is_allowed(), "{next:?}");
    drop(next.take_hold());
}

#[test]
fn a_rules_directory_reloads_and_the_capacities_set_in_code_stay() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.yaml");
    let rule = |n: u32| {
        format!(
            "domain: d\ndescriptors:\n  - key: k\n    limits:\n      - {{ unit: minute, requests: {n} }}\n"
        )
    };
    std::fs::write(&file, rule(1)).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = RateLimiter::builder()
        .rules_dir(dir.path())
        .watch(true)
        .clock(clock.clone())
        .build()
        .unwrap();
    let one = NonZeroU32::new(1).unwrap();
    limiter
        .set_capacity("openai", one, Duration::from_secs(60))
        .unwrap();
    let key = Descriptor::new("d").entry("k", "v");
    assert!(limiter.try_acquire(&key).unwrap().is_allowed());
    assert!(!limiter.try_acquire(&key).unwrap().is_allowed());
    std::fs::write(&file, rule(5)).unwrap();
    let started = Instant::now();
    while limiter.capacity(&key).unwrap().total != Some(5) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reloaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The count carried on (1 of 5 used), and the domain set in code is still there.
    assert_eq!(limiter.capacity(&key).unwrap().available, Some(4));
    let openai = Descriptor::resource("openai");
    assert_eq!(limiter.capacity(&openai).unwrap().total, Some(1));
    // A broken file never replaces a good one.
    std::fs::write(&file, "domain: d\ndescriptors: [").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(limiter.capacity(&key).unwrap().total, Some(5));
}

#[test]
fn clones_share_one_limiter_across_threads_and_admit_exactly_the_limit() {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = RateLimiter::builder()
        .rules_yaml("domain: d\ndescriptors:\n  - key: k\n    limits:\n      - { unit: minute, requests: 1000 }\n")
        .clock(clock)
        .build()
        .unwrap();
    let admitted = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (limiter, admitted) = (limiter.clone(), admitted.clone());
            std::thread::spawn(move || {
                let key = Descriptor::new("d").entry("k", "v");
                for _ in 0..250 {
                    if limiter.try_acquire(&key).unwrap().is_allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 1000);
}

/// Admitted calls per window of a second, from each call's send and answer times and the
/// reset it was told: decided at t in [sent, answered] with t + reset at its window's end.
#[derive(Default)]
struct Tally {
    admitted: BTreeMap<u64, u64>,
    by_side: [u64; 2],
    calls: u64,
    failures: u64,
    /// Answers whose round trip spanned two window ends: their window cannot be told.
    untold: u64,
}

impl Tally {
    fn record(&mut self, side: usize, sent: u64, answered: u64, allowed: Option<(bool, u64)>) {
        self.calls += 1;
        let Some((allowed, reset_ms)) = allowed else {
            self.failures += 1;
            return;
        };
        let window = (sent + reset_ms).div_ceil(1000) - 1;
        if (window + 2) * 1000 <= answered + reset_ms {
            self.untold += 1;
        }
        let count = self.admitted.entry(window).or_default();
        if allowed {
            *count += 1;
            self.by_side[side] += 1;
        }
    }
}

/// [7/8] must-show 2: an embedded limiter and a server replica (its own process) on one Redis
/// and one rule of 200 a second enforce one limit between them, at the default settings
/// (sync every second): every full window admits at most the limit and at least 98 % of it
/// when offered more, as [4/8] asks of a fleet of servers. Offered 2x evenly, then 1.5x with
/// 80 % of the calls on the embedded limiter, then 1.5x with 80 % on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_embedded_limiter_and_a_server_replica_enforce_one_limit_together() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const LIMIT: u32 = 200;
    let dir = tempfile::tempdir().unwrap();
    let rule = format!(
        "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: second, requests_per_unit: {LIMIT} }}\n"
    );
    common::write_rules(dir.path(), &[("fleet.yaml", &rule)]);
    for (offered, on_embedded, what) in [
        (2.0, 0.5, "2x, even"),
        (1.5, 0.8, "1.5x, 80 % embedded"),
        (1.5, 0.2, "1.5x, 80 % on the server"),
    ] {
        let namespace = unique_namespace("embedded-and-server");
        let url = redis.url();
        let (mut server, client, _http) = common::spawn_sluice_with_http(
            &[
                "--config",
                dir.path().to_str().unwrap(),
                "--redis-url",
                &url,
                "--redis-namespace",
                &namespace,
            ],
            &[],
        )
        .await;
        let mut settings = Settings::local(dir.path().to_path_buf());
        settings.redis_url = Some(url.clone());
        settings.redis_namespace = Some(namespace.clone());
        let embedded = RateLimiter::builder()
            .rules_dir(dir.path())
            .settings(settings)
            .build()
            .unwrap();
        let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
        let rate = (f64::from(LIMIT) * offered) as u64;
        let (from, started) = (wall_ms(), tokio::time::Instant::now());
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..rate * 6 {
            tokio::time::sleep_until(started + Duration::from_nanos(n * 1_000_000_000 / rate))
                .await;
            // The calls of each ten go first to the embedded limiter, then to the server.
            let to_embedded = (n % 10) < (on_embedded * 10.0) as u64;
            let tally = tally.clone();
            if to_embedded {
                let (embedded, key) = (embedded.clone(), Descriptor::new("fleet").entry("k", "v"));
                calls.spawn(async move {
                    let sent = wall_ms();
                    let decided = embedded.acquire(&key, Duration::ZERO).await;
                    let answered = wall_ms();
                    let allowed = decided
                        .ok()
                        .map(|d| (d.is_allowed(), d.reset_after().as_millis() as u64));
                    tally.lock().unwrap().record(0, sent, answered, allowed);
                });
            } else {
                let mut client = client.clone();
                calls.spawn(async move {
                    let request = common::request("fleet", &[&[("k", "v")]]);
                    let sent = wall_ms();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.should_rate_limit(request),
                    )
                    .await;
                    let answered = wall_ms();
                    let allowed = match answer {
                        Ok(Ok(response)) => {
                            let response = response.into_inner();
                            let reset = response.statuses[0]
                                .duration_until_reset
                                .as_ref()
                                .map_or(0, |d| {
                                    d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000
                                });
                            Some((common::is_ok(&response), reset))
                        }
                        _ => None,
                    };
                    tally.lock().unwrap().record(1, sent, answered, allowed);
                });
            }
        }
        while calls.join_next().await.is_some() {}
        let to = wall_ms();
        let tally = std::mem::take(&mut *tally.lock().unwrap());
        let windows: Vec<(u64, u64)> = tally
            .admitted
            .iter()
            .filter(|(w, _)| **w * 1000 >= from && (**w + 1) * 1000 <= to)
            .map(|(w, n)| (*w, *n))
            .collect();
        println!(
            "{what}: {} calls, {} failed; admitted by the embedded limiter {}, by the server {}; admitted per full window (limit {LIMIT}): {:?}",
            tally.calls,
            tally.failures,
            tally.by_side[0],
            tally.by_side[1],
            windows.iter().map(|(_, n)| n).collect::<Vec<_>>()
        );
        assert_eq!(tally.failures, 0, "{what}");
        assert_eq!(
            tally.untold, 0,
            "{what}: the machine is too loaded to tell windows apart"
        );
        assert!(
            tally.by_side.iter().all(|&n| n > 0),
            "{what}: {:?}",
            tally.by_side
        );
        assert!(windows.len() >= 4, "{what}: {windows:?}");
        for (w, admitted) in &windows {
            let ratio = *admitted as f64 / f64::from(LIMIT);
            assert!(
                (0.98..=1.0).contains(&ratio),
                "{what}: window {w} admitted {admitted} of {LIMIT} ({ratio:.3})"
            );
        }
        drop(embedded);
        common::signal(&server, "TERM");
        let _ = tokio::time::timeout(Duration::from_secs(15), server.wait()).await;
    }
}

#[allow(dead_code)] // its main() is the example's, not this test's
#[path = "../examples/embedded.rs"]
mod embedded_example;

/// `examples/embedded.rs`, run: the worker pool never runs more than its 4 slots at once,
/// finishes every job, and once it has announced the provider's saturation (a reduction to
/// half) the provider refuses nothing more.
#[test]
fn the_embedded_example_keeps_its_slots_and_backs_off_when_the_provider_is_saturated() {
    let summary = embedded_example::run(150);
    println!("{summary:?}");
    assert_eq!(summary.done, 150);
    assert!(summary.peak_in_flight <= 4, "{summary:?}");
    assert!(summary.refused_by_provider > 0, "{summary:?}");
    assert_eq!(summary.factors.first(), Some(&0.5), "{summary:?}");
    assert_eq!(summary.refused_after_reduction, 0, "{summary:?}");
}

/// `examples/swarm.rs`, run against a real Redis: three processes share one limit of 100 a
/// second set in code, one announces a reduction halfway, and the example checks the swarm's
/// totals itself (no second over its limit, steady seconds at 98 % or more, the reduction
/// heard by all) and exits 1 if any fails. Built here if `cargo test` was not given
/// `--all-targets` (which builds the examples first).
#[test]
fn the_swarm_example_shares_one_limit_across_processes_and_hears_the_reduction() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let swarm = common::example_binary("swarm");
    let out = common::runs(&swarm, &[redis.url().as_str(), "3", "6"], &[]);
    println!("{out}");
    assert!(out.contains("3 of 3 members heard the reduction"), "{out}");
    let seconds = out.lines().filter(|l| l.starts_with("second ")).count();
    assert!(seconds >= 4, "{out}");
    assert!(
        out.contains("limit 50") && out.contains("limit 100"),
        "{out}"
    );
}

/// With a fleet store, holds in flight are the fleet's: a slot one embedded limiter holds is
/// seen by another on the same Redis, in its `capacity` and in its decisions, and comes back
/// to both when released.
#[test]
fn holds_in_flight_are_shared_by_limiters_on_one_store() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let namespace = unique_namespace("embedded-holds");
    let limiter = || {
        let mut settings = Settings::local("config".into());
        settings.redis_url = Some(redis.url());
        settings.redis_namespace = Some(namespace.clone());
        RateLimiter::builder()
            .rules_yaml("domain: llm\ndescriptors:\n  - key: api_key\n    limits:\n      - { concurrency: 1, hold_ttl: 1m }\n")
            .settings(settings)
            .build()
            .unwrap()
    };
    let (a, b) = (limiter(), limiter());
    let stream = Descriptor::new("llm").entry("api_key", "k1");
    let mut first = a.try_acquire(&stream).unwrap();
    assert!(first.is_allowed(), "{first:?}");
    let hold = first.take_hold().expect("a hold");
    let seen = b.capacity(&stream).unwrap();
    assert_eq!((seen.in_flight, seen.in_flight_limit), (1, Some(1)));
    assert!(!b.try_acquire(&stream).unwrap().is_allowed());
    hold.release();
    let started = Instant::now();
    while b.capacity(&stream).unwrap().in_flight > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the hold never came back"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut second = b.try_acquire(&stream).unwrap();
    assert!(second.is_allowed(), "{second:?}");
    drop(second.take_hold());
}
