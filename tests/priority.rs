//! Priority classes over real gRPC against a real sluice server: a rule's `reserve` keeps a
//! share of its limits for named classes, picked by a descriptor entry.

mod common;

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
