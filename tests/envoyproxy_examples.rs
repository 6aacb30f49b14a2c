//! envoyproxy/ratelimit's documented examples (its README, "Examples"), rewritten with our own
//! names and values, all loaded at once from tests/fixtures/envoyproxy-examples, behaving as
//! documented there.

mod common;

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

async fn server() -> TestServer {
    start_on_dir(&fixture("envoyproxy-examples")).await
}

#[tokio::test]
async fn every_example_file_loads_and_validates() {
    let set = sluice::load_dir(&fixture("envoyproxy-examples")).expect("examples load");
    assert_eq!(set.domains().count(), 10);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["validate", fixture("envoyproxy-examples").to_str().unwrap()])
        .output()
        .expect("run sluice validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn example_1_each_value_has_its_limit() {
    let s = server().await;
    assert_eq!(
        s.admitted(45, &request("warehouse_qps", &[&[("table", "orders")]]))
            .await,
        40
    );
    assert_eq!(
        s.admitted(45, &request("warehouse_qps", &[&[("table", "audit_log")]]))
            .await,
        40
    );
    // A value the file does not list has no limit.
    assert_eq!(
        s.admitted(45, &request("warehouse_qps", &[&[("table", "users")]]))
            .await,
        45
    );
    s.stop().await;
}

#[tokio::test]
async fn example_2_nested_and_multiple_descriptors() {
    let s = server().await;
    // Every phone number gets its own 4 promos a day.
    let promo = |n: &str| request("notifications", &[&[("kind", "promo"), ("phone", n)]]);
    assert_eq!(s.admitted(6, &promo("555-0101")).await, 4);
    assert_eq!(s.admitted(6, &promo("555-0102")).await, 4);
    // Both descriptors in one call: the answer is the OR of both limits. 555-0103 has
    // 4 promos and 30 texts; the promo limit binds first.
    let both = request(
        "notifications",
        &[
            &[("kind", "promo"), ("phone", "555-0103")],
            &[("phone", "555-0103")],
        ],
    );
    assert_eq!(s.admitted(6, &both).await, 4);
    // 555-0103 spent 4 of its 30 texts; 26 remain for non-promo texts.
    let texts = request("notifications", &[&[("phone", "555-0103")]]);
    assert_eq!(s.admitted(30, &texts).await, 26);
    s.stop().await;
}

#[tokio::test]
async fn example_3_the_most_specific_match_wins() {
    let s = server().await;
    assert_eq!(
        s.admitted(
            10,
            &request("edge_per_client", &[&[("client_ip", "198.51.100.1")]])
        )
        .await,
        8
    );
    let blocked = request("edge_per_client", &[&[("client_ip", "203.0.113.9")]]);
    assert_eq!(s.admitted(3, &blocked).await, 0, "limit 0 blocks");
    s.stop().await;
}

#[tokio::test]
async fn example_4_depth_must_match() {
    let s = server().await;
    let two_entries = |domain| request(domain, &[&[("account", "acme"), ("project", "p1")]]);
    assert_eq!(
        s.admitted(10, &two_entries("depth_one")).await,
        10,
        "no match: no limit"
    );
    assert_eq!(s.admitted(10, &two_entries("depth_two")).await, 7);
    // The one-level request still matches the one-level rule.
    assert_eq!(
        s.admitted(10, &request("depth_one", &[&[("account", "acme")]]))
            .await,
        7
    );
    s.stop().await;
}

#[tokio::test]
async fn example_5_unlimited() {
    let s = server().await;
    let r = s
        .ok(request("backoffice", &[&[("directory", "lookup")]]))
        .await;
    assert_eq!(code(&r, 0), Code::Ok);
    assert_eq!(remaining(&r, 0), u32::MAX);
    assert_eq!(
        s.admitted(20, &request("backoffice", &[&[("billing", "x")]]))
            .await,
        12
    );
    s.stop().await;
}

#[tokio::test]
async fn example_6_shadow_mode() {
    let s = server().await;
    let user = |u| request("auth_calls", &[&[("service", "login"), ("user", u)]]);
    assert_eq!(
        s.admitted(20, &user("carol")).await,
        20,
        "shadow: never limited"
    );
    assert_eq!(s.admitted(20, &user("dave")).await, 9);
    s.stop().await;
}

#[tokio::test]
async fn example_7_replaces() {
    let s = server().await;
    let finance = &[("team", "finance"), ("user", "erin")][..];
    let emea = &[("region", "emea"), ("user", "erin")][..];
    // Alone, each rule gives its own limit.
    assert_eq!(s.admitted(5, &request("reports", &[finance])).await, 3);
    s.clock.advance_ms(1_000);
    assert_eq!(s.admitted(8, &request("reports", &[emea])).await, 6);
    s.clock.advance_ms(1_000);
    // Together, erin_finance is replaced: 6 a second apply, and erin_finance is not consumed.
    assert_eq!(
        s.admitted(8, &request("reports", &[finance, emea])).await,
        6
    );
    assert_eq!(s.admitted(5, &request("reports", &[finance])).await, 3);
    s.stop().await;
}

#[tokio::test]
async fn example_8_detailed_metric_limits_work_as_usual() {
    let s = server().await;
    assert_eq!(
        s.admitted(8, &request("search", &[&[("index", "docs")]]))
            .await,
        5
    );
    assert_eq!(
        s.admitted(8, &request("search", &[&[("index", "logs")]]))
            .await,
        5
    );
    assert_eq!(
        s.admitted(15, &request("search", &[&[("index", "products")]]))
            .await,
        11
    );
    s.stop().await;
}

#[tokio::test]
async fn example_9_wildcard_values() {
    let s = server().await;
    assert_eq!(
        s.admitted(6, &request("uploads", &[&[("bucket", "tenant-a")]]))
            .await,
        4
    );
    assert_eq!(
        s.admitted(6, &request("uploads", &[&[("bucket", "tenant-b")]]))
            .await,
        4
    );
    assert_eq!(
        s.admitted(6, &request("uploads", &[&[("bucket", "shared")]]))
            .await,
        6
    );
    s.stop().await;
}
