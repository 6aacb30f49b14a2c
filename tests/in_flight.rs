//! Limits on streams in flight (`concurrency: N`) over real gRPC against a real sluice server
//! with a manual clock: a call takes a hold, the answer says when (dynamic metadata
//! `sluice.hold`), and the stream-done call sends that back in a `sluice.release` entry.

mod common;

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
        holds.push(hold_of(&answer).expect("an admitted stream is told its hold"));
    }
    for _ in 0..2 {
        let refused = call(&mut server, "k1").await;
        assert_eq!(code(&refused, 0), Code::OverLimit);
        // Envoy sends a stream-done call for refused streams too; with no hold metadata its
        // release descriptor is not built, so nothing is given back for them.
        assert_eq!(hold_of(&refused), None);
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
