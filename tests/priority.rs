//! Priority classes over real gRPC against a real sluice server: a rule's `reserve` keeps a
//! share of its limits for named classes, picked by a descriptor entry.

mod common;

use common::redis::{RedisServer, replicas, wall_ms};
use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

const SHARED: &str = r#"
domain: provider
descriptors:
  - key: upstream
    rate_limit: { unit: minute, requests: 10 }
    reserve: { high: 20% }
"#;

/// Calls on the shared limit with `class` (none: an ordinary call), in `entry` entries.
async fn calls(server: &mut TestServer, key: &str, class: Option<&str>, n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        let mut entries = vec![("upstream", "openai")];
        entries.extend(class.map(|c| (key, c)));
        let answer = server
            .client
            .should_rate_limit(request("provider", &[&entries]))
            .await
            .expect("answer")
            .into_inner();
        admitted += usize::from(code(&answer, 0) == Code::Ok);
    }
    admitted
}

#[tokio::test]
async fn low_priority_floods_get_the_limit_less_the_reserve_and_high_priority_the_rest() {
    let mut server = start(&[("provider.yaml", SHARED)]).await;
    // Batch traffic at 10x the limit, as a class with no reserve and as no class at all.
    assert_eq!(
        calls(&mut server, "sluice.priority", Some("low"), 60).await,
        8
    );
    assert_eq!(calls(&mut server, "sluice.priority", None, 40).await, 0);
    // Production traffic at 0.2x: never refused while the reserve lasts.
    assert_eq!(
        calls(&mut server, "sluice.priority", Some("high"), 2).await,
        2
    );
    // The limit is spent now, for every class.
    assert_eq!(
        calls(&mut server, "sluice.priority", Some("high"), 3).await,
        0
    );
}

#[tokio::test]
async fn the_status_reports_the_share_a_class_may_use() {
    let mut server = start(&[("provider.yaml", SHARED)]).await;
    let answer = |class: &'static str| {
        request(
            "provider",
            &[&[("upstream", "openai"), ("sluice.priority", class)]],
        )
    };
    let low = server
        .client
        .should_rate_limit(answer("low"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((limit_of(&low, 0), remaining(&low, 0)), (Some(8), 7));
    let high = server
        .client
        .should_rate_limit(answer("high"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((limit_of(&high, 0), remaining(&high, 0)), (Some(10), 8));
    // The answer names the class whose share decided (dynamic metadata `sluice.priority`):
    // a class the reserve does not name is an ordinary call.
    assert_eq!(class_of(&low).as_deref(), Some("ordinary"));
    assert_eq!(class_of(&high).as_deref(), Some("high"));
}

/// The `sluice.priority` metadata of an answer.
fn class_of(
    answer: &envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse,
) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let fields = &answer.dynamic_metadata.as_ref()?.fields;
    match fields.get("sluice.priority")?.kind.as_ref()? {
        Kind::StringValue(text) => Some(text.clone()),
        other => panic!("sluice.priority is not text: {other:?}"),
    }
}

#[tokio::test]
async fn a_configured_priority_key_takes_a_plain_entry() {
    let mut server = start_with(&[("provider.yaml", SHARED)], |settings| {
        settings.request_bounds.priority_key = "priority".into();
    })
    .await;
    assert_eq!(calls(&mut server, "priority", Some("low"), 20).await, 8);
    assert_eq!(calls(&mut server, "priority", Some("high"), 5).await, 2);
}

/// Three replicas on one real Redis at the default settings: batch traffic at 10x a shared
/// limit of 50 a minute and production traffic at 0.2x, sent at once to every replica, in one
/// window (manual clocks at wall-clock time, alike). A rule with a reserve is settled in the
/// store call by call, so the fleet keeps the shares as one replica does: every production
/// call passes, and batch calls get exactly the limit less the reserve (40).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_keep_the_reserve_fleet_wide() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rules = r#"
domain: provider
descriptors:
  - key: upstream
    rate_limit: { unit: minute, requests: 50 }
    reserve: { high: 20% }
"#;
    // 5 s into a minute: every call of the test is decided in that minute.
    let start_ms = wall_ms() / 60_000 * 60_000 + 5_000;
    let replicas = replicas(&redis, "reserve", 3, start_ms, &[("provider.yaml", rules)]).await;
    // Each replica: 167 batch calls (500 in all) with a production call after every 50th
    // (10 in all), all three replicas at once.
    let mut sent = tokio::task::JoinSet::new();
    for (r, replica) in replicas.iter().enumerate() {
        let mut client = replica.client.clone();
        sent.spawn(async move {
            let (mut low, mut high, mut high_sent) = (0, 0, 0);
            for i in 0..167 {
                let class = if i % 50 == 49 || (r == 0 && i == 166) {
                    high_sent += 1;
                    "high"
                } else {
                    "low"
                };
                let entries = [("upstream", "openai"), ("sluice.priority", class)];
                let answer = client
                    .should_rate_limit(request("provider", &[&entries]))
                    .await
                    .expect("answer")
                    .into_inner();
                let admitted = usize::from(code(&answer, 0) == Code::Ok);
                if admitted == 0 {
                    // A denial settled in the store says why, as a replica's own does.
                    let body = String::from_utf8_lossy(&answer.raw_body);
                    assert!(
                        body.contains("Rate limit reached for requests per minute"),
                        "{body}"
                    );
                    assert!(
                        answer
                            .response_headers_to_add
                            .iter()
                            .any(|h| h.key == "retry-after"),
                        "{answer:?}"
                    );
                }
                match class {
                    "high" => high += admitted,
                    _ => low += admitted,
                }
            }
            (low, high, high_sent)
        });
    }
    let (mut low, mut high, mut high_sent) = (0, 0, 0);
    while let Some(result) = sent.join_next().await {
        let (l, h, s) = result.expect("replica's calls");
        (low, high, high_sent) = (low + l, high + h, high_sent + s);
    }
    println!(
        "batch admitted {low} of {}; production {high} of {high_sent}",
        501 - high_sent
    );
    assert_eq!(high_sent, 10);
    assert_eq!(
        high, 10,
        "a production call refused while the reserve lasted"
    );
    assert_eq!(
        low, 40,
        "batch calls get the limit less the reserve, fleet-wide"
    );
    for r in replicas {
        r.stop().await;
    }
}

/// A sliding window with a reserve on three replicas on one real Redis, default settings: the
/// shares are kept on the fleet's one sliding estimate, settled in the store call by call. In
/// a first minute batch calls take 40 and production 10 (50 in all); half-way through the next
/// minute the previous one still weighs 25, so batch calls get 40 - 25 = 15 and production
/// the 10 left up to 50, whichever replica each call reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_keep_the_reserve_of_a_sliding_window() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rules = r#"
domain: provider
descriptors:
  - key: upstream
    rate_limit: { unit: minute, requests: 50, algorithm: sliding_window }
    reserve: { high: 20% }
"#;
    let start_ms = wall_ms() / 60_000 * 60_000 + 5_000;
    let mut replicas = replicas(
        &redis,
        "reserve-sliding",
        3,
        start_ms,
        &[("provider.yaml", rules)],
    )
    .await;
    assert_eq!(round_robin(&mut replicas, "low", 100).await, 40);
    assert_eq!(round_robin(&mut replicas, "high", 12).await, 10);
    // 30 s into the next minute (90 s on): the previous minute's 50 weigh 25.
    for r in &replicas {
        r.clock.advance_ms(90_000 - 5_000);
    }
    let low = round_robin(&mut replicas, "low", 100).await;
    let high = round_robin(&mut replicas, "high", 12).await;
    println!("next minute, half-way: batch {low} of 100, production {high} of 12");
    assert_eq!(low, 15, "batch: 40 less the previous minute's weight");
    assert_eq!(high, 10, "production: the rest of 50");
    for r in replicas {
        r.stop().await;
    }
}

/// A token bucket with a reserve on three replicas on one real Redis, default settings: one
/// bucket in the store, checked and taken call by call, refilling at the rule's rate (one a
/// second), of which batch calls may fill 15 of its 20 and production calls all of it. At
/// first batch calls get 15 and production the 5 left; ten seconds later 10 have drained, and
/// batch calls get 5 more (up to 15) and production 5 (up to 20), whichever replica each call
/// reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_keep_the_reserve_of_a_token_bucket() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rules = r#"
domain: provider
descriptors:
  - key: upstream
    rate_limit: { unit: minute, requests: 60, algorithm: token_bucket, burst: 20 }
    reserve: { high: 25% }
"#;
    let mut replicas = replicas(
        &redis,
        "reserve-bucket",
        3,
        wall_ms(),
        &[("provider.yaml", rules)],
    )
    .await;
    assert_eq!(round_robin(&mut replicas, "low", 60).await, 15);
    assert_eq!(round_robin(&mut replicas, "high", 10).await, 5);
    for r in &replicas {
        r.clock.advance_ms(10_000);
    }
    let low = round_robin(&mut replicas, "low", 60).await;
    let high = round_robin(&mut replicas, "high", 10).await;
    println!("ten seconds on: batch {low} of 60, production {high} of 10");
    assert_eq!((low, high), (5, 5));
    // `/v1/usage` on any replica reads the fleet's bucket: full.
    let app = &replicas[1].running.as_ref().unwrap().app;
    let usage = sluice::counters::usage(app, "provider", &[("upstream", "openai")])
        .await
        .expect("a rule matches");
    assert_eq!(
        usage.windows[0].fleet.map(|c| c.requests),
        Some(20),
        "{usage:?}"
    );
    for r in replicas {
        r.stop().await;
    }
}

/// `n` calls of `class` on the shared limit, one replica after the other: how many passed.
async fn round_robin(replicas: &mut [TestServer], class: &str, n: usize) -> usize {
    let mut admitted = 0;
    for i in 0..n {
        let entries = [("upstream", "openai"), ("sluice.priority", class)];
        let answer = replicas[i % replicas.len()]
            .client
            .should_rate_limit(request("provider", &[&entries]))
            .await
            .expect("answer")
            .into_inner();
        admitted += usize::from(code(&answer, 0) == Code::Ok);
    }
    admitted
}
