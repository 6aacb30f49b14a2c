//! Limits on streams in flight (`concurrency: N`) over real gRPC against a real sluice server
//! with a manual clock: a call takes a hold, the answer says when (dynamic metadata
//! `sluice.hold`), and the stream-done call sends that back in a `sluice.release` entry.

mod common;

use common::redis::{RedisServer, replicas, wall_ms};
use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::google::protobuf::value::Kind;

const STREAMS: &str = r#"
domain: llm
descriptors:
  - key: api_key
    limits:
      - { concurrency: 3, hold_ttl: 10s }
      - { requests: 100, unit: minute }
"#;

/// The `sluice.hold` metadata of an answer: when its holds were taken.
fn hold_of(response: &RateLimitResponse) -> Option<String> {
    let fields = &response.dynamic_metadata.as_ref()?.fields;
    match fields.get("sluice.hold")?.kind.as_ref()? {
        Kind::StringValue(text) => Some(text.clone()),
        other => panic!("sluice.hold is not text: {other:?}"),
    }
}

/// A response header an answer asks Envoy to add.
fn header_of(response: &RateLimitResponse, name: &str) -> Option<String> {
    response
        .response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.clone())
}

async fn call(server: &mut TestServer, key: &str) -> RateLimitResponse {
    server
        .client
        .should_rate_limit(request("llm", &[&[("api_key", key)]]))
        .await
        .expect("answer")
        .into_inner()
}

/// The stream-done call of a stream whose answer said `hold`.
async fn release(server: &mut TestServer, key: &str, hold: &str) -> RateLimitResponse {
    server
        .client
        .should_rate_limit(request(
            "llm",
            &[&[("api_key", key), ("sluice.release", hold)]],
        ))
        .await
        .expect("answer")
        .into_inner()
}

#[tokio::test]
async fn three_streams_pass_the_fourth_waits_for_one_to_end() {
    let mut server = start(&[("llm.yaml", STREAMS)]).await;
    let mut holds = Vec::new();
    for i in 0..3 {
        let answer = call(&mut server, "k1").await;
        assert!(is_ok(&answer), "stream {i}: {answer:?}");
        assert_eq!(remaining(&answer, 0), 2 - i, "slots left after stream {i}");
        // Beside OpenAI's headers, streams in flight have their own.
        assert_eq!(
            header_of(&answer, "x-ratelimit-limit-concurrency").as_deref(),
            Some("3")
        );
        assert_eq!(
            header_of(&answer, "x-ratelimit-remaining-concurrency"),
            Some((2 - i).to_string())
        );
        holds.push(hold_of(&answer).expect("an admitted stream is told its hold"));
    }
    for _ in 0..2 {
        let refused = call(&mut server, "k1").await;
        assert_eq!(code(&refused, 0), Code::OverLimit);
        // Envoy sends a stream-done call for refused streams too; with no hold metadata its
        // release descriptor is not built, so nothing is given back for them.
        assert_eq!(hold_of(&refused), None);
        // The 429 says why, and asks for a retry in a second (holds free as streams end).
        let header = |name: &str| {
            refused
                .response_headers_to_add
                .iter()
                .find(|h| h.key == name)
                .map(|h| h.value.clone())
        };
        assert_eq!(header("retry-after").as_deref(), Some("1"));
        let body = String::from_utf8_lossy(&refused.raw_body);
        assert!(
            body.contains("Too many requests in flight: at most 3 at once"),
            "{body}"
        );
    }
    // Another key has slots of its own.
    assert!(is_ok(&call(&mut server, "k2").await));

    server.clock.advance_ms(1_500);
    let released = release(&mut server, "k1", &holds[0]).await;
    assert!(is_ok(&released), "a release is never refused");
    assert_eq!(hold_of(&released), None, "a release takes no hold");
    let answer = call(&mut server, "k1").await;
    assert!(is_ok(&answer), "the freed slot is taken: {answer:?}");
    assert_eq!(code(&call(&mut server, "k1").await, 0), Code::OverLimit);
}

#[tokio::test]
async fn a_hold_whose_release_never_comes_lapses_and_its_late_release_frees_nothing() {
    let mut server = start(&[("llm.yaml", STREAMS)]).await;
    // Taken 1 s into a 10 s window of the hold's time to live.
    server.clock.advance_ms(1_000);
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(hold_of(&call(&mut server, "k1").await).expect("held"));
    }
    // Still held in the next window (10.9 s later), lapsed once the window after begins.
    server.clock.advance_ms(10_900);
    assert_eq!(code(&call(&mut server, "k1").await, 0), Code::OverLimit);
    server.clock.advance_ms(8_100);
    let mut second = Vec::new();
    for i in 0..3 {
        let answer = call(&mut server, "k1").await;
        assert!(
            is_ok(&answer),
            "slot {i} free again after the lapse: {answer:?}"
        );
        second.push(hold_of(&answer).expect("held"));
    }
    // The lost streams' releases arrive at last: their holds lapsed, so the live ones stay.
    for hold in &first {
        assert!(is_ok(&release(&mut server, "k1", hold).await));
    }
    assert_eq!(code(&call(&mut server, "k1").await, 0), Code::OverLimit);
    // A live stream's release frees its slot.
    release(&mut server, "k1", &second[1]).await;
    assert!(is_ok(&call(&mut server, "k1").await));
}

#[tokio::test]
async fn a_malformed_release_is_invalid_argument() {
    let mut server = start(&[("llm.yaml", STREAMS)]).await;
    let bad = server
        .client
        .should_rate_limit(request(
            "llm",
            &[&[("api_key", "k1"), ("sluice.release", "soon")]],
        ))
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message()
            .contains("sluice.release must be when the hold was taken"),
        "{}",
        bad.message()
    );
    let mixed = server
        .client
        .should_rate_limit(request(
            "llm",
            &[&[
                ("api_key", "k1"),
                ("sluice.report", "tokens"),
                ("sluice.release", "5"),
            ]],
        ))
        .await
        .expect_err("refused");
    assert_eq!(mixed.code(), tonic::Code::InvalidArgument);
    assert!(
        mixed.message().contains("stands alone"),
        "{}",
        mixed.message()
    );
}

#[tokio::test]
async fn holds_taken_and_released_are_counted_per_rule() {
    // A domain of its own: the metrics registry is shared by the tests of this process.
    let rules = STREAMS.replace("domain: llm", "domain: counted_streams");
    let other = "domain: no_streams\ndescriptors:\n  - key: api_key\n    rate_limit: { requests: 5, unit: minute }\n";
    let mut server = start(&[("llm.yaml", &rules), ("other.yaml", other)]).await;
    let ask = |key: &str| request("counted_streams", &[&[("api_key", key)]]);
    let mut holds = Vec::new();
    for _ in 0..4 {
        let answer = server.client.should_rate_limit(ask("k1")).await.unwrap();
        holds.extend(hold_of(&answer.into_inner()));
    }
    assert_eq!(holds.len(), 3, "the fourth is refused and takes no hold");
    let release = request(
        "counted_streams",
        &[&[("api_key", "k1"), ("sluice.release", &holds[0])]],
    );
    server.client.should_rate_limit(release).await.unwrap();
    server
        .client
        .should_rate_limit(request("no_streams", &[&[("api_key", "k1")]]))
        .await
        .unwrap();
    let samples = common::metrics::scrape(&server).await;
    let of = |name: &str, domain: &str| {
        common::metrics::sample(&samples, name, &[("domain", domain), ("rule", "api_key")])
    };
    assert_eq!(of("sluice_rule_holds_taken_total", "counted_streams"), 3.0);
    assert_eq!(
        of("sluice_rule_holds_released_total", "counted_streams"),
        1.0
    );
    // A rule without a concurrency limit has no such series.
    assert!(
        !samples
            .iter()
            .any(|(name, labels, _)| name.starts_with("sluice_rule_holds")
                && labels
                    .iter()
                    .any(|(k, v)| k == "domain" && v == "no_streams")),
        "holds series for a rule without holds"
    );
}

/// Three replicas on one real Redis at the default settings, manual clocks set alike (to
/// wall-clock time, so the store's expiries are ahead): holds in flight are taken and given
/// back in the store, so the fleet admits 3 streams in all, whichever replica each call
/// reaches; a stream's release frees its slot though it reaches another replica than its
/// take did; and holds whose release never comes lapse fleet-wide after their time to live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_admit_three_streams_in_all() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // 1 s into a window of the holds' 10 s time to live.
    let start_ms = wall_ms() / 10_000 * 10_000 + 1_000;
    let mut replicas = replicas(&redis, "streams", 3, start_ms, &[("llm.yaml", STREAMS)]).await;
    let mut holds = Vec::new();
    for (i, replica) in replicas.iter_mut().enumerate() {
        let answer = call(replica, "k1").await;
        assert!(is_ok(&answer), "stream {i}: {answer:?}");
        assert_eq!(remaining(&answer, 0), 2 - i as u32, "slots left fleet-wide");
        assert_eq!(
            header_of(&answer, "x-ratelimit-remaining-concurrency"),
            Some((2 - i).to_string()),
            "fleet-wide, in the headers too"
        );
        holds.push(hold_of(&answer).expect("an admitted stream is told its hold"));
    }
    // `/v1/usage` on any replica reads the fleet's holds.
    let app = &replicas[2].running.as_ref().unwrap().app;
    let usage = sluice::counters::usage(app, "llm", &[("api_key", "k1")])
        .await
        .expect("a rule matches");
    let in_flight = usage
        .windows
        .iter()
        .find(|w| w.algorithm() == Some(sluice::Algorithm::InFlight))
        .expect("the concurrency window");
    assert_eq!(in_flight.fleet.map(|c| c.requests), Some(3), "{usage:?}");
    // `/v1/explain` judges the holds by the store's count: spent, on a replica that took none.
    let explained: serde_json::Value = common::metrics::http()
        .post(format!(
            "{}/v1/explain",
            common::metrics::base(&replicas[2])
        ))
        .json(&serde_json::json!({"domain": "llm", "descriptors": [
            {"entries": [{"key": "api_key", "value": "k1"}]}]}))
        .send()
        .await
        .expect("explain answers")
        .json()
        .await
        .expect("JSON");
    let slots = explained["descriptors"][0]["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .find(|w| w["algorithm"]["name"] == "concurrency")
        .map(|w| w["requests"].clone())
        .expect("the concurrency window");
    assert_eq!(
        (
            &slots["used"],
            &slots["remaining"],
            &slots["settled_in_store"]
        ),
        (
            &serde_json::json!(3),
            &serde_json::json!(0),
            &serde_json::json!(true)
        ),
        "{explained}"
    );
    for (i, replica) in replicas.iter_mut().enumerate() {
        let refused = call(replica, "k1").await;
        assert_eq!(
            code(&refused, 0),
            Code::OverLimit,
            "replica {i}: {refused:?}"
        );
        assert_eq!(hold_of(&refused), None);
        let retry = refused
            .response_headers_to_add
            .iter()
            .find(|h| h.key == "retry-after");
        assert_eq!(retry.map(|h| h.value.as_str()), Some("1"), "replica {i}");
        let body = String::from_utf8_lossy(&refused.raw_body);
        assert!(
            body.contains("Too many requests in flight: at most 3 at once"),
            "replica {i}: {body}"
        );
    }
    // The stream taken on replica 0 ends; its stream-done call reaches replica 2.
    for r in &replicas {
        r.clock.advance_ms(1_500);
    }
    assert!(is_ok(&release(&mut replicas[2], "k1", &holds[0]).await));
    let answer = call(&mut replicas[1], "k1").await;
    assert!(
        is_ok(&answer),
        "the freed slot, on another replica: {answer:?}"
    );
    assert_eq!(
        code(&call(&mut replicas[0], "k1").await, 0),
        Code::OverLimit
    );
    // No other release comes: once the window after the holds' has begun, they have lapsed.
    for r in &replicas {
        r.clock.advance_ms(20_000);
    }
    for (i, replica) in replicas.iter_mut().enumerate() {
        let answer = call(replica, "k1").await;
        assert!(is_ok(&answer), "replica {i} after the lapse: {answer:?}");
    }
    assert_eq!(
        code(&call(&mut replicas[0], "k1").await, 0),
        Code::OverLimit
    );
    for r in replicas {
        r.stop().await;
    }
}

/// With a store, a call refused by a concurrency limit of a rule with `wait:` waits for a
/// slot as it does on one replica, though the slot's release reaches another replica (it asks
/// the store again every 50 ms; a replica's own releases wake it at once): the waiter on
/// replica B is admitted once the stream held on replica A ends, and refused at its deadline
/// when none does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_for_a_slot_released_on_another_replica() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rules = "domain: llm\ndescriptors:\n  - key: api_key\n    wait: 1s\n    rate_limit: { concurrency: 1, hold_ttl: 10s }\n";
    let start_ms = wall_ms() / 10_000 * 10_000 + 1_000;
    let mut replicas = replicas(&redis, "wait-streams", 2, start_ms, &[("llm.yaml", rules)]).await;
    let hold = hold_of(&call(&mut replicas[0], "k1").await).expect("the slot");
    let mut b = replicas[1].client.clone();
    let started = std::time::Instant::now();
    let waiter = tokio::spawn(async move {
        let answer = b
            .should_rate_limit(request("llm", &[&[("api_key", "k1")]]))
            .await
            .expect("answer")
            .into_inner();
        (answer, started.elapsed())
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(is_ok(&release(&mut replicas[0], "k1", &hold).await));
    let (answer, waited) = waiter.await.unwrap();
    assert!(
        is_ok(&answer),
        "admitted once the slot was released: {answer:?}"
    );
    let second = hold_of(&answer).expect("the waiter holds the slot now");
    println!("released after 200 ms on replica A: the waiter on B admitted after {waited:?}");
    assert!(
        waited >= std::time::Duration::from_millis(200)
            && waited < std::time::Duration::from_secs(1),
        "waited {waited:?}"
    );
    // Nobody releases the waiter's slot: the next call waits its second out, and is refused.
    let started = std::time::Instant::now();
    let refused = call(&mut replicas[0], "k1").await;
    let waited = started.elapsed();
    assert_eq!(code(&refused, 0), Code::OverLimit);
    println!("no release: refused after {waited:?} (wait: 1s)");
    assert!(
        waited >= std::time::Duration::from_secs(1) && waited < std::time::Duration::from_secs(3),
        "refused after {waited:?}"
    );
    assert!(is_ok(&release(&mut replicas[1], "k1", &second).await));
    for r in replicas {
        r.stop().await;
    }
}
