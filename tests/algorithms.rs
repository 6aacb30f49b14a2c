//! How a limit counts: sliding windows and token buckets in the limiter, under concurrency and
//! at a window boundary, and over gRPC with windows of any length; what each admits, counted
//! exactly, with a manual clock.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::T0;
use sluice::{
    Algorithm, CounterRef, Counts, Demand, Enforcement, Limiter, Limits, ManualClock, Outcome, Unit,
};

const THREADS: usize = 8;
const ONE: Counts = Counts {
    requests: 1,
    tokens: 0,
};

fn requests(limit: u32, algorithm: Algorithm) -> Limits {
    Limits {
        requests: Some(limit),
        tokens: None,
        algorithm,
        wide: false,
        leased: false,
        refill_ms: 0,
    }
}

fn demand<'a>(limits: Limits, unit: Unit, parts: &'a [&'a str]) -> Demand<'a> {
    Demand {
        counter: CounterRef {
            scope: 7,
            unit,
            parts,
        },
        limits,
        charge: ONE,
        refund: false,
        hold_taken_ms: None,
        enforcement: Enforcement::Enforce,
    }
}

/// `THREADS` threads each try `attempts` calls at once; returns how many passed.
fn burst(limiter: &Limiter, demand: Demand<'_>, attempts: usize) -> u64 {
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
    admitted.into_inner()
}

/// Calls made one by one at `at`, until `n` tried; returns how many passed.
fn one_by_one(limiter: &Limiter, clock: &ManualClock, demand: Demand<'_>, at: u64, n: u64) -> u64 {
    clock.set_ms(at);
    let mut outcome = [Outcome::default()];
    (0..n)
        .filter(|_| limiter.settle(&[demand], &mut outcome).allowed)
        .count() as u64
}

#[test]
fn eight_threads_on_a_token_bucket_take_exactly_its_burst_then_its_refill() {
    // 600 a minute refills 10 a second, 1 every 100 ms; the bucket holds 250.
    let algorithm = Algorithm::TokenBucket { burst: 250 };
    let clock = Arc::new(ManualClock::new(T0 + 5));
    let limiter = Limiter::new(clock.clone());
    let parts = ["k"];
    let demand = demand(requests(600, algorithm), Unit::Minute, &parts);
    // 8 threads x 100 attempts = 800 against a full bucket of 250.
    assert_eq!(burst(&limiter, demand, 100), 250, "the burst, exactly");
    let mut total = 250;
    for period in 1..=60u64 {
        // 1.23 s later: 12 whole calls refilled, and 30 ms toward the next carried over.
        clock.set_ms(T0 + 5 + period * 1_230);
        let expected = (period * 1_230 * 600 / 60_000) - (total - 250);
        let admitted = burst(&limiter, demand, 20);
        assert_eq!(admitted, expected, "period {period}");
        total += admitted;
    }
    // Over 73.8 s: the burst plus the rate's 738, never a call more.
    assert_eq!(total, 250 + 738);
}

#[test]
fn eight_threads_on_a_sliding_window_take_exactly_what_the_estimate_leaves() {
    // 1,000 a second; every burst comes 250 ms into its window, so 3/4 of the previous
    // window still weighs: the windows admit 1000, 250, 813, 391, ... toward 571.
    const LIMIT: u64 = 1_000;
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = Limiter::new(clock.clone());
    let parts = ["k"];
    let demand = demand(
        requests(LIMIT as u32, Algorithm::SlidingWindow),
        Unit::Second,
        &parts,
    );
    let mut previous = 0u64;
    for w in 0..40u64 {
        clock.set_ms(T0 + w * 1_000 + 250);
        // n fits while (n + 1) x 1000 + previous x 750 <= 1000 x 1000.
        let expected = (LIMIT * 1_000 - previous * 750) / 1_000;
        let admitted = burst(&limiter, demand, 300);
        assert_eq!(admitted, expected, "window {w}");
        previous = admitted;
    }
    assert!(
        (560..=580).contains(&previous),
        "settles near 571: {previous}"
    );
}

#[test]
fn across_a_boundary_a_fixed_window_lets_twice_its_limit_through_and_the_others_do_not() {
    // A limit of 60 a minute. The client sends all it can in the last second of one minute
    // and then in the first second of the next.
    let boundary = (T0 / 60_000 + 10) * 60_000;
    let through = |algorithm| {
        let clock = ManualClock::new(boundary - 1_000);
        let clock = Arc::new(clock);
        let limiter = Limiter::new(clock.clone());
        let parts = ["k"];
        let demand = demand(requests(60, algorithm), Unit::Minute, &parts);
        let mut admitted = 0;
        for ms in (0..=2_000).step_by(10) {
            admitted += one_by_one(&limiter, &clock, demand, boundary - 1_000 + ms, 100);
        }
        admitted
    };
    // Fixed: 60 before the boundary and 60 after, 120 in two seconds.
    assert_eq!(through(Algorithm::FixedWindow), 120);
    // Sliding: the 60 before still weigh 59/60 one second into the next minute, so one more
    // passes then: 61 = 60 x (1 + 1/60). (With calls d ms into the next window it is
    // 60 x (1 + d / 60,000): ε = d / W.)
    assert_eq!(through(Algorithm::SlidingWindow), 61);
    // Token bucket (burst = the limit): 60 at once, then one a second refilled over the two
    // seconds: burst + rate x t = 62.
    assert_eq!(through(Algorithm::TokenBucket { burst: 60 }), 62);
}

#[test]
fn a_token_bucket_never_admits_more_than_its_burst_plus_its_rate_over_any_interval() {
    // Calls at pseudo-random times over 5 minutes, against 120 a minute with a burst of 30;
    // every admitted call's time kept, then every interval between two of them checked.
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = Limiter::new(clock.clone());
    let parts = ["k"];
    let demand = demand(
        requests(120, Algorithm::TokenBucket { burst: 30 }),
        Unit::Minute,
        &parts,
    );
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut now = T0;
    let mut admitted = Vec::new();
    while now < T0 + 300_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        now += seed % 700; // 0 to 0.7 s apart: ~170 a minute offered
        let calls = 1 + seed % 5;
        admitted.extend(std::iter::repeat_n(
            now,
            one_by_one(&limiter, &clock, demand, now, calls) as usize,
        ));
    }
    assert!(
        admitted.len() > 600,
        "the limit was met: {}",
        admitted.len()
    );
    // Over [t_i, t_j]: at most 30 + 120 x (t_j - t_i) / 60,000 calls.
    for i in 0..admitted.len() {
        for j in i..admitted.len() {
            let span = admitted[j] - admitted[i];
            let bound = 30 + span * 120 / 60_000;
            assert!(
                (j - i + 1) as u64 <= bound,
                "{} calls in {span} ms, bound {bound}",
                j - i + 1
            );
        }
    }
}

// Over real gRPC: what Envoy and an OpenAI client are told by each algorithm.

use common::{code, is_ok, remaining, request, start};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as ProtoUnit;

const RULES: &str = "domain: llm
descriptors:
  - key: bucket
    limits:
      - { unit: minute, requests: 60, algorithm: token_bucket, burst: 10 }
  - key: sliding
    rate_limit: { unit: minute, requests_per_unit: 60, algorithm: sliding_window }
  - key: fixed
    rate_limit: { unit: minute, requests_per_unit: 60 }
";

fn reset_ms(r: &RateLimitResponse, i: usize) -> u64 {
    let d = r.statuses[i]
        .duration_until_reset
        .as_ref()
        .expect("reset reported");
    d.seconds as u64 * 1_000 + d.nanos as u64 / 1_000_000
}

fn header<'a>(r: &'a RateLimitResponse, key: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

#[tokio::test]
async fn a_token_bucket_reports_what_it_holds_when_it_is_full_and_when_to_retry() {
    let server = start(&[("llm.yaml", RULES)]).await;
    let start_ms = (T0 / 60_000 + 1) * 60_000 + 30_000; // half a minute into a window
    server.clock.set_ms(start_ms);
    let call = request("llm", &[&[("bucket", "k1")]]);
    let first = server.ok(call.clone()).await;
    assert!(is_ok(&first));
    // The limit is the rate; what remains is what the bucket of 10 holds; the reset is when it
    // is full again (one call refills in a second).
    let limit = first.statuses[0].current_limit.as_ref().expect("limit");
    assert_eq!(limit.requests_per_unit, 60);
    assert_eq!(remaining(&first, 0), 9);
    assert_eq!(reset_ms(&first, 0), 1_000);
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), Some("9"));
    assert_eq!(server.admitted(12, &call).await, 9, "the rest of the burst");
    let denied = server.ok(call.clone()).await;
    assert_eq!(code(&denied, 0), Code::OverLimit);
    assert_eq!(denied.overall_code, Code::OverLimit as i32);
    assert_eq!(remaining(&denied, 0), 0);
    // Denied: the reset is when this call would fit (a second), and so is retry-after.
    assert_eq!(reset_ms(&denied, 0), 1_000);
    assert_eq!(header(&denied, "retry-after"), Some("1"));
    // 2.5 s later, two have refilled.
    server.clock.set_ms(start_ms + 2_500);
    assert_eq!(server.admitted(5, &call).await, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_sliding_window_reports_its_estimate_and_when_a_denied_call_fits() {
    let server = start(&[("llm.yaml", RULES)]).await;
    let boundary = (T0 / 60_000 + 1) * 60_000;
    server.clock.set_ms(boundary - 1_000);
    let call = request("llm", &[&[("sliding", "k1")]]);
    assert_eq!(server.admitted(70, &call).await, 60);
    // 15 s into the next minute 3/4 of the 60 still weigh: 15 pass, the status counting them.
    server.clock.set_ms(boundary + 15_000);
    let first = server.ok(call.clone()).await;
    assert!(is_ok(&first));
    assert_eq!(remaining(&first, 0), 14);
    assert_eq!(reset_ms(&first, 0), 45_000, "the window's end");
    assert_eq!(server.admitted(20, &call).await, 14);
    let denied = server.ok(call.clone()).await;
    assert_eq!(code(&denied, 0), Code::OverLimit);
    // The 60 of the last minute fade one a second: the next call fits 1 s on.
    assert_eq!(reset_ms(&denied, 0), 1_000);
    assert_eq!(header(&denied, "retry-after"), Some("1"));
    server.stop().await;
}

#[tokio::test]
async fn across_a_boundary_over_grpc_only_the_fixed_window_lets_the_double_through() {
    let server = start(&[("llm.yaml", RULES)]).await;
    let boundary = (T0 / 60_000 + 1) * 60_000;
    let mut through = [0usize; 3];
    for (i, key) in ["fixed", "sliding", "bucket"].into_iter().enumerate() {
        let call = request("llm", &[&[(key, "k1")]]);
        server.clock.set_ms(boundary - 500);
        through[i] += server.admitted(80, &call).await;
        server.clock.set_ms(boundary + 500);
        through[i] += server.admitted(80, &call).await;
    }
    // Fixed 60 + 60; sliding 60 + 0 (59.5 of the 60 still weigh); bucket 10 + 1 (its burst,
    // then a second's refill).
    assert_eq!(through, [120, 60, 11]);
    server.stop().await;
}

#[test]
fn eight_threads_reserving_tokens_from_a_bucket_take_exactly_what_it_holds() {
    // 6,000 tokens a minute (100 a second), a bucket of 1,000; each call reserves 7 tokens.
    let clock = Arc::new(ManualClock::new(T0 + 3));
    let limiter = Limiter::new(clock.clone());
    let parts = ["k"];
    let tokens = Limits {
        requests: None,
        tokens: Some(6_000),
        algorithm: Algorithm::TokenBucket { burst: 1_000 },
        wide: false,
        leased: false,
        refill_ms: 0,
    };
    let reserve = Demand {
        charge: Counts {
            requests: 0,
            tokens: 7,
        },
        ..demand(tokens, Unit::Minute, &parts)
    };
    // 142 x 7 = 994 of 1,000.
    assert_eq!(burst(&limiter, reserve, 50), 142);
    let mut held = 1_000 - 142 * 7; // 6 left
    for period in 1..=30u64 {
        // 0.35 s refills 35 tokens.
        clock.set_ms(T0 + 3 + period * 350);
        held += 35;
        let admitted = burst(&limiter, reserve, 10);
        assert_eq!(admitted, held / 7, "period {period}");
        held -= admitted * 7;
    }
}

const TOKENS: &str = "domain: llm
descriptors:
  - key: bucket
    limits:
      - { unit: minute, tokens: 6000, algorithm: token_bucket, burst: 1000 }
  - key: sliding
    limits:
      - { unit: minute, tokens: 1000, algorithm: sliding_window }
";

fn report(
    pairs: &[(&str, &str)],
    tokens: u32,
) -> envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
    let mut with_report = pairs.to_vec();
    with_report.push(("sluice.report", "tokens"));
    let mut r = request("llm", &[&with_report]);
    r.hits_addend = tokens;
    r
}

#[tokio::test]
async fn token_limits_count_usage_reports_under_both_algorithms() {
    let server = start(&[("llm.yaml", TOKENS)]).await;
    let boundary = (T0 / 60_000 + 1) * 60_000;
    server.clock.set_ms(boundary + 10_000);
    // A bucket of 1,000 tokens refilled at 100 a second: a report of 1,500 drains it past
    // empty (a report is never denied); a call needs one token, so it waits for 501 to
    // drain: 5.01 s.
    let bucket = &[("bucket", "k1")][..];
    let call = request("llm", &[bucket]);
    let r = server.ok(call.clone()).await;
    assert!(is_ok(&r));
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("1000"));
    let r = server.ok(report(bucket, 1_500)).await;
    assert!(is_ok(&r), "reports are never denied");
    let denied = server.ok(call.clone()).await;
    assert_eq!(code(&denied, 0), Code::OverLimit);
    assert_eq!(reset_ms(&denied, 0), 5_010);
    assert_eq!(header(&denied, "retry-after"), Some("6"));
    server.clock.set_ms(boundary + 10_000 + 5_009);
    assert!(!is_ok(&server.ok(call.clone()).await));
    server.clock.set_ms(boundary + 10_000 + 5_010);
    assert!(is_ok(&server.ok(call.clone()).await));

    // A sliding window of 1,000 tokens a minute: 800 reported in one minute weigh 400 half
    // way through the next; 700 more leave it over, until the 800's weight has faded to 299:
    // 37.575 s into the minute.
    let sliding = &[("sliding", "k1")][..];
    let call = request("llm", &[sliding]);
    server.clock.set_ms(boundary + 50_000);
    server.ok(report(sliding, 800)).await;
    server.clock.set_ms(boundary + 90_000);
    let r = server.ok(call.clone()).await;
    assert!(is_ok(&r));
    assert_eq!(remaining(&r, 0), 600);
    server.ok(report(sliding, 700)).await;
    let denied = server.ok(call.clone()).await;
    assert_eq!(code(&denied, 0), Code::OverLimit);
    assert_eq!(reset_ms(&denied, 0), 7_575);
    server.clock.set_ms(boundary + 97_574);
    assert!(!is_ok(&server.ok(call.clone()).await));
    server.clock.set_ms(boundary + 97_575);
    assert!(is_ok(&server.ok(call.clone()).await));
    server.stop().await;
}

#[tokio::test]
async fn a_window_of_ninety_seconds_is_aligned_to_the_epoch_and_reported_as_a_minute() {
    let rules = "domain: llm
descriptors:
  - key: key
    rate_limit: { window: 90s, requests_per_unit: 3 }
  - key: sliding
    rate_limit: { window: 90s, requests_per_unit: 3, algorithm: sliding_window }
";
    let server = start(&[("llm.yaml", rules)]).await;
    let start_ms = (T0 / 90_000 + 1) * 90_000; // a 90 s window starts
    server.clock.set_ms(start_ms + 20_000);
    let call = request("llm", &[&[("key", "k1")]]);
    let first = server.ok(call.clone()).await;
    let limit = first.statuses[0].current_limit.as_ref().expect("limit");
    // The API names no 90 s unit: the nearest it has, with the exact time to the window's end.
    assert_eq!(limit.unit, ProtoUnit::Minute as i32);
    assert_eq!(limit.requests_per_unit, 3);
    assert_eq!(reset_ms(&first, 0), 70_000);
    assert_eq!(server.admitted(5, &call).await, 2);
    server.clock.set_ms(start_ms + 89_999);
    assert_eq!(server.admitted(1, &call).await, 0, "still the same 90 s");
    server.clock.set_ms(start_ms + 90_000);
    assert_eq!(server.admitted(5, &call).await, 3, "a new window");
    // A sliding window of 90 s: the 3 of one window weigh 2 a third of the way into the next.
    let sliding = request("llm", &[&[("sliding", "k1")]]);
    server.clock.set_ms(start_ms + 90_000);
    assert_eq!(server.admitted(5, &sliding).await, 3);
    server.clock.set_ms(start_ms + 180_000 + 30_000);
    assert_eq!(server.admitted(5, &sliding).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_calendar_month_rolls_over_at_midnight_in_its_zone() {
    let rules = "domain: llm
descriptors:
  - key: tenant
    limits:
      - { period: calendar_month, timezone: Asia/Tokyo, requests: 3 }
";
    // 2026-03-31 14:59:59 UTC is 23:59:59 on March 31st in Tokyo (UTC+9, no summer time).
    let march_end = 1_774_969_199_000;
    let server =
        common::start_at(march_end - 10 * 86_400_000, &[("llm.yaml", rules)], |_| {}).await;
    let call = request("llm", &[&[("tenant", "acme")]]);
    assert_eq!(server.admitted(5, &call).await, 3);
    server.clock.set_ms(march_end);
    let denied = server.ok(call.clone()).await;
    assert_eq!(code(&denied, 0), Code::OverLimit);
    let limit = denied.statuses[0].current_limit.as_ref().expect("limit");
    assert_eq!(limit.unit, ProtoUnit::Month as i32);
    assert_eq!(reset_ms(&denied, 0), 1_000, "a second to midnight in Tokyo");
    // April 1st, 00:00 in Tokyo: a new month, whose end is April 30th's midnight (30 days on).
    server.clock.set_ms(march_end + 1_000);
    let first = server.ok(call.clone()).await;
    assert!(is_ok(&first));
    assert_eq!(reset_ms(&first, 0), 30 * 86_400_000);
    assert_eq!(server.admitted(5, &call).await, 2);
    server.stop().await;
}

#[test]
fn a_request_denied_by_another_limit_leaves_a_bucket_and_a_sliding_window_as_they_were() {
    // Each call touches a bucket (or a sliding window) first and then a fixed window of 2 a
    // minute on another counter: once the fixed window is spent, the first charge is given
    // back, so calls denied there take nothing from the bucket or the window.
    for algorithm in [
        Algorithm::TokenBucket { burst: 10 },
        Algorithm::SlidingWindow,
    ] {
        let clock = Arc::new(ManualClock::new(T0 + 1_000));
        let limiter = Limiter::new(clock.clone());
        let (a, b) = (["a"], ["b"]);
        let first = demand(requests(10, algorithm), Unit::Minute, &a);
        let second = Demand {
            counter: CounterRef {
                scope: 8,
                unit: Unit::Minute,
                parts: &b,
            },
            ..demand(requests(2, Algorithm::FixedWindow), Unit::Minute, &b)
        };
        let mut outcomes = [Outcome::default(), Outcome::default()];
        let passed = (0..6)
            .filter(|_| limiter.settle(&[first, second], &mut outcomes).allowed)
            .count();
        assert_eq!(passed, 2, "{algorithm:?}");
        // Four denied calls later, the first limit has counted only the two that passed.
        let mut alone = [Outcome::default()];
        limiter.assess(&[first], &mut alone);
        assert_eq!(alone[0].counts.requests, 2, "{algorithm:?}");
        assert_eq!(
            (0..20)
                .filter(|_| limiter.settle(&[first], &mut alone).allowed)
                .count(),
            8,
            "{algorithm:?}: the rest of the 10"
        );
    }
}

#[test]
fn eight_threads_on_a_ten_billion_token_budget_take_exactly_it_in_every_window() {
    // Tokens reserved a billion at a time, each window a day, the budget past 32 bits.
    const BUDGET: u64 = 10_000_000_000;
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = Limiter::new(clock.clone());
    let parts = ["tenant"];
    let budget = Limits {
        tokens: Some(BUDGET),
        wide: true,
        ..Default::default()
    };
    let reserve = Demand {
        charge: Counts {
            requests: 1,
            tokens: 999_999_999,
        },
        ..demand(budget, Unit::Day, &parts)
    };
    for day in 0..20u64 {
        clock.set_ms(T0 + day * 86_400_000);
        let admitted = burst(&limiter, reserve, 4);
        // 10 reservations of 999,999,999 fit (9,999,999,990); the 11th would not.
        assert_eq!(admitted, 10, "day {day}");
        let left = Demand {
            charge: Counts {
                requests: 1,
                tokens: 10,
            },
            ..reserve
        };
        let mut outcome = [Outcome::default()];
        assert!(
            limiter.settle(&[left], &mut outcome).allowed,
            "day {day}: the last 10"
        );
        assert_eq!(outcome[0].counts.tokens, BUDGET);
        assert!(
            !limiter
                .settle(
                    &[Demand {
                        charge: ONE,
                        ..left
                    }],
                    &mut outcome
                )
                .allowed
        );
    }
}

#[tokio::test]
async fn a_ten_billion_token_month_is_counted_exactly_and_reported_within_the_api() {
    // A monthly budget of 10 billion tokens beside 1,000 requests a month, and one alone.
    let rules = "domain: llm
descriptors:
  - key: tenant
    limits:
      - { period: calendar_month, tokens: 10000000000 }
      - { period: calendar_month, requests: 1000 }
  - key: budget
    limits:
      - { period: calendar_month, tokens: 10000000000 }
";
    // 2026-04-01 00:00 UTC: the month's end is 10 days after the start.
    let april = 1_775_001_600_000;
    let server = common::start_at(april - 10 * 86_400_000, &[("llm.yaml", rules)], |_| {}).await;

    // Envoy's fields are 32-bit: the budget and what is left of it are clamped there, while
    // the OpenAI headers carry them whole.
    let alone = &[("budget", "acme")][..];
    let first = server.ok(request("llm", &[alone])).await;
    assert!(is_ok(&first));
    let limit = first.statuses[0].current_limit.as_ref().expect("limit");
    assert_eq!(limit.requests_per_unit, u32::MAX);
    assert_eq!(limit.unit, ProtoUnit::Month as i32);
    assert_eq!(remaining(&first, 0), u32::MAX);
    assert_eq!(
        header(&first, "x-ratelimit-limit-tokens"),
        Some("10000000000")
    );
    assert_eq!(
        header(&first, "x-ratelimit-remaining-tokens"),
        Some("10000000000")
    );

    // Reports (each at most 32 bits, as hits_addend is) add up past 4,294,967,295.
    let tenant = &[("tenant", "acme")][..];
    let call = request("llm", &[tenant]);
    for _ in 0..3 {
        assert!(is_ok(&server.ok(report(tenant, 3_000_000_000)).await));
    }
    let r = server.ok(call.clone()).await;
    assert!(is_ok(&r));
    // The budget is the nearest its end (9 of 10 billion used): the status is its, and what
    // is left fits 32 bits again.
    assert_eq!(remaining(&r, 0), 1_000_000_000);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        Some("1000000000")
    );
    // The requests limit shares the month but not the counter: one call so far (reports
    // count no request).
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("999"));
    server.ok(report(tenant, 999_999_999)).await;
    let r = server.ok(call.clone()).await;
    assert!(is_ok(&r), "one token left");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("1"));
    server.ok(report(tenant, 1)).await;
    let denied = server.ok(call.clone()).await;
    assert_eq!(code(&denied, 0), Code::OverLimit);
    assert_eq!(remaining(&denied, 0), 0);
    assert_eq!(header(&denied, "x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(reset_ms(&denied, 0), 10 * 86_400_000);

    // A new month: the whole budget again.
    server.clock.set_ms(april);
    let r = server.ok(call.clone()).await;
    assert!(is_ok(&r));
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        Some("10000000000")
    );
    server.stop().await;
}

/// A ten-billion-token month on three replicas on one real Redis, default settings: a budget
/// above 32 bits is settled in the store call by call (its leases are 32-bit), so reports sent
/// to any replica add up in 64 bits, and every replica refuses once the fleet has spent it.
/// The manual clocks run at wall-clock time (the store's keys expire by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_billion_token_month_is_counted_exactly_across_three_replicas() {
    use common::redis::{RedisServer, replicas, wall_ms};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rules = "domain: llm
descriptors:
  - key: tenant
    limits:
      - { period: calendar_month, tokens: 10000000000 }
";
    let replicas = replicas(&redis, "wide", 3, wall_ms(), &[("llm.yaml", rules)]).await;
    let tenant = &[("tenant", "acme")][..];
    let call = request("llm", &[tenant]);
    for r in &replicas {
        assert!(is_ok(&r.ok(report(tenant, 3_000_000_000)).await));
    }
    // 9 of 10 billion spent, on three replicas: what is left fits 32 bits again.
    let r = replicas[0].ok(call.clone()).await;
    assert!(is_ok(&r));
    assert_eq!(remaining(&r, 0), 1_000_000_000);
    replicas[1].ok(report(tenant, 999_999_999)).await;
    let r = replicas[2].ok(call.clone()).await;
    assert!(is_ok(&r), "one token left: {r:?}");
    assert_eq!(remaining(&r, 0), 1);
    replicas[0].ok(report(tenant, 1)).await;
    for (i, replica) in replicas.iter().enumerate() {
        let denied = replica.ok(call.clone()).await;
        assert_eq!(code(&denied, 0), Code::OverLimit, "replica {i}");
        assert_eq!(remaining(&denied, 0), 0);
    }
    // `/v1/usage` reads the fleet's count whole.
    let app = &replicas[1].running.as_ref().unwrap().app;
    let usage = sluice::counters::usage(app, "llm", tenant)
        .await
        .expect("a rule matches");
    assert_eq!(
        usage.windows[0].fleet.map(|c| c.tokens),
        Some(10_000_000_000),
        "{usage:?}"
    );
    for r in replicas {
        r.stop().await;
    }
}
