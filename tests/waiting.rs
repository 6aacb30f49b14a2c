//! Waiting instead of a 429 (a rule's `wait:`) over real gRPC against a real sluice server.
//! Waiting takes real time, so the server's manual clock is driven from real time by a task
//! of the test (every 2 ms): the limiter refills as the waiters sleep.

mod common;

use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

/// A bucket of 10 that refills 5 a second (one every 200 ms); a call may wait 1.1 s.
const BUCKET: &str = r#"
domain: llm
descriptors:
  - key: api_key
    rate_limit: { unit: second, requests: 5, algorithm: token_bucket, burst: 10 }
    wait: 1100ms
"#;

/// How much later than its `wait` a refused call may be answered: the scheduler's and the
/// loopback's share, on a loaded two-core machine.
const SLACK: Duration = Duration::from_millis(250);

/// Keeps the server's clock at real time since `start` (from `T0`), until dropped.
struct RealTime(tokio::task::JoinHandle<()>);

impl RealTime {
    fn drive(server: &TestServer) -> RealTime {
        let (clock, start) = (server.clock.clone(), Instant::now());
        RealTime(tokio::spawn(async move {
            loop {
                clock.set_ms(T0 + start.elapsed().as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }))
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_calls_on_a_bucket_of_ten_admit_fifteen_in_arrival_order() {
    let server = start(&[("llm.yaml", BUCKET)]).await;
    let _time = RealTime::drive(&server);
    let client = server.client.clone();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut client = client.clone();
        calls.spawn(async move {
            let sent = Instant::now();
            let answer = client
                .should_rate_limit(request("llm", &[&[("api_key", "k1")]]))
                .await
                .expect("answer")
                .into_inner();
            (i, code(&answer, 0), sent.elapsed())
        });
        // Arrivals a millisecond apart, so that their order is the order sent.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut answers = calls.join_all().await;
    answers.sort_by_key(|(i, ..)| *i);
    let admitted: Vec<usize> = answers
        .iter()
        .filter(|(_, code, _)| *code == Code::Ok)
        .map(|(i, ..)| *i)
        .collect();
    // Ten at once, then one each refill to the first five waiting, by arrival.
    assert_eq!(admitted, (0..15).collect::<Vec<_>>(), "{answers:?}");
    let longest = answers.iter().map(|(.., took)| *took).max().unwrap();
    let refused_after: Vec<_> = answers[15..].iter().map(|(.., took)| *took).collect();
    println!(
        "admitted calls {admitted:?}; longest answer {longest:?}; refused after {refused_after:?}"
    );
    assert!(
        longest <= Duration::from_millis(1100) + SLACK,
        "a call waited {longest:?}"
    );
    // The refused waited their whole wait first.
    for (i, _, took) in &answers[15..] {
        assert!(
            *took >= Duration::from_millis(1000),
            "call {i} refused after {took:?}"
        );
    }
    let samples = common::metrics::scrape(&server).await;
    let waits = |outcome: &str| {
        common::metrics::sample(&samples, "sluice_waits_total", &[("outcome", outcome)])
    };
    assert!(waits("admitted") >= 5.0 && waits("refused") >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_its_client_gave_up_on_leaves_its_place() {
    // One call a second, waiting up to 1.5 s.
    let rules = r#"
domain: llm
descriptors:
  - key: api_key
    rate_limit: { unit: second, requests: 1, algorithm: token_bucket, burst: 1 }
    wait: 1500ms
"#;
    let server = start(&[("llm.yaml", rules)]).await;
    let _time = RealTime::drive(&server);
    let mut client = server.client.clone();
    let ask = || request("llm", &[&[("api_key", "k1")]]);
    assert_eq!(
        code(
            &client.should_rate_limit(ask()).await.unwrap().into_inner(),
            0
        ),
        Code::Ok
    );
    // A waits, and its client gives up after 200 ms.
    let mut impatient = tonic::Request::new(ask());
    impatient.set_timeout(Duration::from_millis(200));
    let gave_up = client.should_rate_limit(impatient).await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    // B, queued after it: the bucket's next unit (about 1 s in) is B's, as A left.
    let answer = client.should_rate_limit(ask()).await.unwrap().into_inner();
    assert_eq!(code(&answer, 0), Code::Ok);
}
