//! ShouldRateLimit semantics over real gRPC against a real sluice server.

mod common;

use common::metrics::counted;
use common::*;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as ProtoUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use envoy_types::pb::google::protobuf::value::Kind;

const API: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limit:
      name: per_key
      unit: minute
      requests_per_unit: 3
  - key: endpoint
    rate_limit:
      unit: minute
      requests_per_unit: 10
"#;

fn with_hits(
    mut request: envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest,
    hits: u32,
) -> envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
    request.hits_addend = hits;
    request
}

#[tokio::test]
async fn limits_are_enforced_per_key() {
    let server = start(&[("api.yaml", API)]).await;
    let k1 = request("api", &[&[("api_key", "k1")]]);
    let k2 = request("api", &[&[("api_key", "k2")]]);
    assert_eq!(server.admitted(5, &k1).await, 3);
    assert_eq!(server.admitted(5, &k2).await, 3);
    let denied = server.ok(k1).await;
    assert_eq!(code(&denied, 0), Code::OverLimit);
    assert_eq!(denied.overall_code, Code::OverLimit as i32);
    server.stop().await;
}

#[tokio::test]
async fn windows_roll_over_on_the_clock() {
    let server = start(&[("api.yaml", API)]).await;
    let k1 = request("api", &[&[("api_key", "k1")]]);
    assert_eq!(server.admitted(4, &k1).await, 3);
    server.clock.advance_ms(59_999);
    assert_eq!(server.admitted(1, &k1).await, 0, "still the same minute");
    server.clock.advance_ms(1);
    assert_eq!(server.admitted(4, &k1).await, 3, "a new minute");
    server.stop().await;
}

#[tokio::test]
async fn statuses_report_limit_remaining_and_reset() {
    let server = start(&[("api.yaml", API)]).await;
    server.clock.set_ms(T0 + 15_250);
    let response = server
        .ok(request(
            "api",
            &[
                &[("api_key", "k1")],
                &[("nothing", "here")],
                &[("endpoint", "e")],
            ],
        ))
        .await;
    assert!(is_ok(&response));
    assert_eq!(
        response.statuses.len(),
        3,
        "one status per descriptor, in order"
    );
    let first = &response.statuses[0];
    let limit = first.current_limit.as_ref().expect("limit reported");
    assert_eq!(limit.name, "per_key");
    assert_eq!(limit.requests_per_unit, 3);
    assert_eq!(limit.unit, ProtoUnit::Minute as i32);
    assert_eq!(first.limit_remaining, 2);
    let reset = first.duration_until_reset.as_ref().expect("reset reported");
    assert_eq!((reset.seconds, reset.nanos), (44, 750_000_000));
    // A descriptor no rule matches: OK, no limit.
    assert_eq!(code(&response, 1), Code::Ok);
    assert!(response.statuses[1].current_limit.is_none());
    assert_eq!(limit_of(&response, 2), Some(10));
    assert_eq!(remaining(&response, 2), 9);
    server.stop().await;
}

#[tokio::test]
async fn hits_addend_request_and_descriptor_level() {
    let server = start(&[("api.yaml", API)]).await;
    // Request level: 0 means 1.
    let r = server
        .ok(with_hits(request("api", &[&[("endpoint", "e")]]), 0))
        .await;
    assert_eq!(remaining(&r, 0), 9);
    let r = server
        .ok(with_hits(request("api", &[&[("endpoint", "e")]]), 4))
        .await;
    assert_eq!(remaining(&r, 0), 5);
    // Descriptor level wins over request level.
    let mut req = with_hits(request("api", &[&[("endpoint", "e")]]), 4);
    req.descriptors[0].hits_addend = Some(UInt64Value { value: 2 });
    assert_eq!(remaining(&server.ok(req).await, 0), 3);
    // Descriptor level 0: check without counting.
    let mut check = with_hits(request("api", &[&[("endpoint", "e")]]), 4);
    check.descriptors[0].hits_addend = Some(UInt64Value { value: 0 });
    let r = server.ok(check.clone()).await;
    assert!(is_ok(&r));
    assert_eq!(remaining(&r, 0), 3, "a check counts nothing");
    // More hits than remain: denied, nothing consumed.
    let r = server
        .ok(with_hits(request("api", &[&[("endpoint", "e")]]), 4))
        .await;
    assert!(!is_ok(&r));
    assert_eq!(remaining(&r, 0), 3);
    let r = server
        .ok(with_hits(request("api", &[&[("endpoint", "e")]]), 3))
        .await;
    assert!(is_ok(&r));
    assert_eq!(remaining(&r, 0), 0);
    // Budget spent: a check answers OVER_LIMIT.
    let r = server.ok(check).await;
    assert!(!is_ok(&r));
    assert_eq!(code(&r, 0), Code::OverLimit);
    server.stop().await;
}

#[tokio::test]
async fn a_descriptor_limit_overrides_the_configured_one() {
    let server = start(&[("api.yaml", API)]).await;
    let mut req = request("api", &[&[("api_key", "k1")]]);
    req.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: ProtoUnit::Second as i32,
    });
    let first = server.ok(req.clone()).await;
    assert!(is_ok(&first));
    let limit = first.statuses[0].current_limit.clone().expect("limit");
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (1, ProtoUnit::Second as i32)
    );
    assert!(!is_ok(&server.ok(req.clone()).await));
    server.clock.advance_ms(1_000);
    assert!(
        is_ok(&server.ok(req.clone()).await),
        "the override's own window"
    );
    // Also on a descriptor no rule matches, as long as the domain exists.
    let mut free = request("api", &[&[("tenant", "t1")]]);
    free.descriptors[0].limit = req.descriptors[0].limit;
    assert!(is_ok(&server.ok(free.clone()).await));
    assert!(!is_ok(&server.ok(free.clone()).await));
    // An unknown domain stays unknown, override or not.
    free.domain = "nowhere".into();
    assert!(is_ok(&server.ok(free.clone()).await));
    assert!(is_ok(&server.ok(free).await));
    server.stop().await;
}

#[tokio::test]
async fn negative_hits_give_back_and_never_go_below_zero() {
    let server = start(&[("api.yaml", API)]).await;
    let k1 = request("api", &[&[("api_key", "k1")]]);
    assert_eq!(server.admitted(4, &k1).await, 3);
    let mut refund = with_hits(k1.clone(), 2);
    refund.descriptors[0].is_negative_hits = true;
    let r = server.ok(refund.clone()).await;
    assert!(is_ok(&r));
    assert_eq!(remaining(&r, 0), 2);
    assert_eq!(server.admitted(4, &k1).await, 2);
    refund.hits_addend = 100;
    assert_eq!(
        remaining(&server.ok(refund).await, 0),
        3,
        "never below zero"
    );
    assert_eq!(server.admitted(5, &k1).await, 3);
    server.stop().await;
}

const SHADOW: &str = r#"
domain: shadow
descriptors:
  - key: user
    shadow_mode: true
    rate_limit:
      unit: minute
      requests_per_unit: 2
  - key: team
    rate_limit:
      unit: minute
      requests_per_unit: 2
"#;

#[tokio::test]
async fn shadow_mode_counts_and_reports_but_allows() {
    let server = start(&[("shadow.yaml", SHADOW)]).await;
    let user = request("shadow", &[&[("user", "u")]]);
    assert_eq!(server.admitted(5, &user).await, 5);
    let r = server.ok(user).await;
    assert_eq!(code(&r, 0), Code::Ok);
    assert_eq!(remaining(&r, 0), 0, "counted all the same");
    assert_eq!(
        server
            .admitted(3, &request("shadow", &[&[("team", "t")]]))
            .await,
        2
    );
    server.stop().await;

    let global = start_with(&[("shadow.yaml", SHADOW)], |s| s.shadow_mode = true).await;
    let team = request("shadow", &[&[("team", "t")]]);
    assert_eq!(
        global.admitted(5, &team).await,
        5,
        "global shadow mode never denies"
    );
    assert_eq!(remaining(&global.ok(team).await, 0), 0);
    global.stop().await;
}

#[tokio::test]
async fn unlimited_answers_ok_with_max_remaining() {
    let rules =
        "domain: internal\ndescriptors:\n  - key: ldap\n    rate_limit:\n      unlimited: true\n";
    let server = start(&[("internal.yaml", rules)]).await;
    let ldap = request("internal", &[&[("ldap", "x")]]);
    assert_eq!(server.admitted(50, &ldap).await, 50);
    let r = server.ok(ldap).await;
    assert_eq!(code(&r, 0), Code::Ok);
    assert_eq!(remaining(&r, 0), u32::MAX);
    assert!(r.statuses[0].current_limit.is_none());
    server.stop().await;
}

const SEVERAL: &str = r#"
domain: llm
descriptors:
  - key: api_key
    limits:
      - name: rpm
        unit: minute
        requests: 2
      - name: tpm
        unit: minute
        tokens: 100
      - name: rpd
        unit: day
        requests: 3
"#;

fn report(domain: &str, pairs: &[(&str, &str)], tokens: u32) -> RateLimitRequest {
    let mut with_report = pairs.to_vec();
    with_report.push(("sluice.report", "tokens"));
    with_hits(request(domain, &[&with_report]), tokens)
}

#[tokio::test]
async fn several_limits_on_one_rule_with_tokens_from_usage_reports() {
    let server = start(&[("llm.yaml", SEVERAL)]).await;
    let key = &[("api_key", "k")][..];
    let call = || request("llm", &[key]);
    // A call counts one request and only checks the token budget.
    let r = server.ok(call()).await;
    assert!(is_ok(&r));
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "rpm");
    assert_eq!(remaining(&r, 0), 1);
    // A usage report counts tokens, not requests.
    let r = server.ok(report("llm", key, 60)).await;
    assert!(is_ok(&r));
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "tpm");
    assert_eq!(remaining(&r, 0), 40);
    assert!(
        is_ok(&server.ok(call()).await),
        "60 of 100 tokens: still room"
    );
    // Reports are never denied, even past the limit.
    let r = server.ok(report("llm", key, 60)).await;
    assert!(is_ok(&r));
    assert_eq!(code(&r, 0), Code::Ok);
    // 120 of 100 tokens and 2 of 2 requests: the tokens are further over.
    let r = server.ok(call()).await;
    assert!(!is_ok(&r));
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "tpm");
    assert_eq!(remaining(&r, 0), 0);
    // Next minute: one more request fits the day's 3.
    server.clock.advance_ms(60_000);
    assert!(is_ok(&server.ok(call()).await));
    let r = server.ok(call()).await;
    assert!(!is_ok(&r));
    let limit = r.statuses[0].current_limit.clone().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.unit),
        ("rpd", ProtoUnit::Day as i32)
    );
    server.stop().await;
}

#[tokio::test]
async fn reservations_are_checked_up_front_and_settled_by_the_report() {
    let tokens_only = "domain: llm\ndescriptors:\n  - key: api_key\n    limits:\n      - unit: minute\n        tokens: 100\n";
    let server = start(&[("llm.yaml", tokens_only)]).await;
    let reserve = |n: &str| request("llm", &[&[("api_key", "k"), ("sluice.estimate", n)]]);
    let r = server.ok(reserve("70")).await;
    assert!(is_ok(&r), "70 of 100 tokens reserved");
    assert!(
        !is_ok(&server.ok(reserve("40")).await),
        "40 more would not fit"
    );
    // The report says 30 were used: the 40 reserved beyond that come back.
    let mut settle = report("llm", &[("api_key", "k")], 30);
    settle.descriptors[0].entries.push(
        envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry {
            key: "sluice.estimate".into(),
            value: "70".into(),
        },
    );
    let r = server.ok(settle).await;
    assert_eq!(remaining(&r, 0), 70, "30 of 100 tokens used");
    assert!(is_ok(&server.ok(reserve("40")).await));
    server.stop().await;
}

#[tokio::test]
async fn bad_reserved_entries_get_invalid_argument() {
    let server = start(&[("llm.yaml", SEVERAL)]).await;
    for (what, pairs) in [
        ("only reserved entries", vec![("sluice.report", "tokens")]),
        (
            "an estimate that is no number",
            vec![("api_key", "k"), ("sluice.estimate", "lots")],
        ),
        (
            "an unknown reserved entry",
            vec![("api_key", "k"), ("sluice.bogus", "1")],
        ),
        (
            "an entry after a reserved one",
            vec![
                ("api_key", "k"),
                ("sluice.report", "tokens"),
                ("model", "m"),
            ],
        ),
    ] {
        let status = server
            .call(request("llm", &[&pairs]))
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_denied_request_consumes_nothing_anywhere() {
    let server = start(&[("api.yaml", API)]).await;
    let both = request("api", &[&[("api_key", "k1")], &[("endpoint", "shared")]]);
    assert_eq!(server.admitted(10, &both).await, 3);
    // The endpoint counted only the 3 admitted requests, not the 7 denied ones.
    let endpoint = request("api", &[&[("endpoint", "shared")]]);
    assert_eq!(remaining(&server.ok(endpoint.clone()).await, 0), 6);
    // And the other way round: the endpoint over its limit leaves a key's budget untouched.
    assert_eq!(server.admitted(10, &endpoint).await, 6);
    let other = request("api", &[&[("api_key", "k2")], &[("endpoint", "shared")]]);
    assert_eq!(server.admitted(5, &other).await, 0);
    let k2 = request("api", &[&[("api_key", "k2")]]);
    assert_eq!(
        remaining(&server.ok(k2).await, 0),
        2,
        "k2 was charged only now"
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_domains_are_allowed_and_counted() {
    let server = start(&[("api.yaml", API)]).await;
    // No other test of this file asks for an unknown domain.
    let before = counted(&server, "sluice_unknown_domain_total").await;
    let r = server
        .ok(request("elsewhere", &[&[("api_key", "k1")], &[("x", "y")]]))
        .await;
    assert!(is_ok(&r));
    assert_eq!(r.statuses.len(), 2);
    assert!(
        r.statuses
            .iter()
            .all(|s| s.code == Code::Ok as i32 && s.current_limit.is_none())
    );
    let unknown_domains = counted(&server, "sluice_unknown_domain_total").await - before;
    assert_eq!(unknown_domains, 1);
    server.stop().await;
}

const QUOTA: &str = r#"
domain: quota
descriptors:
  - key: plan
    value: free
    quota_mode: true
    rate_limit:
      unit: minute
      requests_per_unit: 1
  - key: plan
    value: bonus
    quota_mode: true
    rate_limit:
      unit: minute
      requests_per_unit: 2
  - key: region
    metadata:
      tier: regional
      weight: 2
    rate_limit:
      unit: minute
      requests_per_unit: 100
"#;

#[tokio::test]
async fn quota_mode_allows_until_every_quota_is_spent() {
    let server = start(&[("quota.yaml", QUOTA)]).await;
    let both = request("quota", &[&[("plan", "free")], &[("plan", "bonus")]]);
    // Each admitted request draws from every quota with room: free has 1, bonus 2.
    let first = server.ok(both.clone()).await;
    assert!(is_ok(&first));
    let second = server.ok(both.clone()).await;
    assert!(is_ok(&second), "bonus still has room");
    assert_eq!(
        code(&second, 0),
        Code::OverLimit,
        "free is spent and says so"
    );
    assert_eq!(code(&second, 1), Code::Ok);
    let r = server.ok(both).await;
    assert!(!is_ok(&r), "every quota is spent");
    assert_eq!(code(&r, 0), Code::OverLimit);
    assert_eq!(code(&r, 1), Code::OverLimit);
    server.stop().await;
}

#[tokio::test]
async fn matched_rule_metadata_is_returned() {
    let server = start(&[("quota.yaml", QUOTA)]).await;
    let r = server.ok(request("quota", &[&[("region", "eu")]])).await;
    let metadata = r.dynamic_metadata.expect("metadata");
    let Some(Kind::StructValue(rules)) = &metadata.fields["metadata"].kind else {
        panic!("the rule's metadata sits under `metadata`: {metadata:?}");
    };
    assert!(rules.fields.contains_key("tier"));
    assert!(rules.fields.contains_key("weight"));
    let r = server.ok(request("quota", &[&[("plan", "free")]])).await;
    assert!(r.dynamic_metadata.is_none());
    server.stop().await;
}

const WILDCARDS: &str = r#"
domain: models
descriptors:
  - key: model
    value: gpt-4*
    rate_limit:
      unit: minute
      requests_per_unit: 2
  - key: model
    value: "*-mini"
    share_threshold: true
    rate_limit:
      unit: minute
      requests_per_unit: 3
  - key: model
    value: gpt-4o
    rate_limit:
      unit: minute
      requests_per_unit: 1
"#;

#[tokio::test]
async fn wildcard_values_match_and_share_when_asked() {
    let server = start(&[("models.yaml", WILDCARDS)]).await;
    let model = |m: &str| request("models", &[&[("model", m)]]);
    // Each value matching gpt-4* has its own counter of 2.
    assert_eq!(server.admitted(3, &model("gpt-4-turbo")).await, 2);
    assert_eq!(server.admitted(3, &model("gpt-4.1")).await, 2);
    // The exact value wins over the wildcard.
    assert_eq!(server.admitted(3, &model("gpt-4o")).await, 1);
    // share_threshold: every *-mini model draws from one counter of 3.
    assert_eq!(server.admitted(2, &model("o3-mini")).await, 2);
    assert_eq!(server.admitted(2, &model("o4-mini")).await, 1);
    // No match at all.
    assert_eq!(server.admitted(5, &model("claude")).await, 5);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_invalid_argument() {
    let server = start_with(&[("api.yaml", API)], |s| {
        s.request_bounds.max_descriptors = 4;
        s.request_bounds.max_entries = 3;
        s.request_bounds.max_value_bytes = 64;
    })
    .await;
    let good = request("api", &[&[("api_key", "k1")]]);
    let mut cases = Vec::new();
    let mut r = good.clone();
    r.domain.clear();
    cases.push(("empty domain", r));
    let mut r = good.clone();
    r.descriptors.clear();
    cases.push(("no descriptors", r));
    cases.push((
        "an entry with an empty key",
        request("api", &[&[("", "v")]]),
    ));
    cases.push((
        "too many descriptors",
        request(
            "api",
            &[
                &[("a", "1")],
                &[("a", "2")],
                &[("a", "3")],
                &[("a", "4")],
                &[("a", "5")],
            ],
        ),
    ));
    cases.push((
        "too many entries",
        request("api", &[&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]]),
    ));
    let long = "x".repeat(65);
    cases.push((
        "an oversized value",
        request("api", &[&[("api_key", &long)]]),
    ));
    cases.push(("an oversized key", request("api", &[&[(&long, "v")]])));
    let mut r = good.clone();
    r.domain = long.clone();
    cases.push(("an oversized domain", r));
    let mut r = good.clone();
    r.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 5,
        unit: ProtoUnit::Unknown as i32,
    });
    cases.push(("an override with no unit", r));
    let mut r = good.clone();
    r.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 5,
        unit: 99,
    });
    cases.push(("an override with an unknown unit", r));
    for (what, bad) in cases {
        let status = server.call(bad).await.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(!status.message().is_empty(), "{what}: message");
    }
    // The server is still fine.
    assert!(is_ok(&server.ok(good).await));
    server.stop().await;
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    let server = start(&[("api.yaml", API)]).await;
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        assert_eq!(
            grpc_health(&server, service).await,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    server.stop().await;
}

/// ShouldRateLimit is dispatched on its exact path before tonic's router; every other path
/// still goes through the router: another method of the service, and a service not served,
/// are answered UNIMPLEMENTED (as tonic's router answers them), and the health service too.
#[tokio::test]
async fn calls_other_than_should_rate_limit_still_reach_the_router() {
    let server = start(&[("api.yaml", API)]).await;
    let addr = server.running.as_ref().expect("running").grpc_addr;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    for path in [
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimitNot",
        "/envoy.service.ratelimit.v3.RateLimitService/",
        "/no.such.Service/ShouldRateLimit",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.expect("ready");
        let request = RateLimitRequest {
            domain: "api".into(),
            ..Default::default()
        };
        let answer: Result<tonic::Response<RateLimitResponse>, _> = grpc
            .unary(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        let status = answer.expect_err(path);
        assert_eq!(
            status.code(),
            tonic::Code::Unimplemented,
            "{path}: {status:?}"
        );
    }
    assert_eq!(
        grpc_health(&server, "envoy.service.ratelimit.v3.RateLimitService").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

fn header<'a>(
    r: &'a envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse,
    key: &str,
) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

#[tokio::test]
async fn openai_headers_body_and_endpoint_utilization() {
    let rules = "domain: llm\ndescriptors:\n  - key: api_key\n    limits:\n      - unit: minute\n        requests: 2\n      - unit: minute\n        tokens: 1000\n  - key: endpoint\n    limits:\n      - unit: minute\n        requests: 10\n";
    let server = start(&[("llm.yaml", rules)]).await;
    server.clock.set_ms(T0 + 20_000);
    let call = request("llm", &[&[("api_key", "k")], &[("endpoint", "openai")]]);
    let r = server.ok(call.clone()).await;
    assert!(is_ok(&r));
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), Some("40s"));
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("1000"));
    assert_eq!(header(&r, "retry-after"), None);
    assert!(r.raw_body.is_empty());
    let utilization = &r.dynamic_metadata.as_ref().unwrap().fields["endpoint_utilization"];
    let Some(envoy_types::pb::google::protobuf::value::Kind::StructValue(per_endpoint)) =
        &utilization.kind
    else {
        panic!("{utilization:?}")
    };
    assert_eq!(
        per_endpoint.fields["openai"].kind,
        Some(envoy_types::pb::google::protobuf::value::Kind::NumberValue(
            0.1
        ))
    );
    assert!(is_ok(&server.ok(call.clone()).await));
    let denied = server.ok(call).await;
    assert!(!is_ok(&denied));
    assert_eq!(header(&denied, "retry-after"), Some("40"));
    assert_eq!(header(&denied, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(header(&denied, "content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&denied.raw_body).unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("requests per minute")
            && message.contains("limit 2")
            && message.contains("40s"),
        "{message}"
    );
    server.stop().await;

    let quiet = start_with(&[("llm.yaml", rules)], |s| s.openai_headers = false).await;
    let r = quiet.ok(request("llm", &[&[("api_key", "k")]])).await;
    assert!(r.response_headers_to_add.is_empty());
    quiet.stop().await;
}

fn shorthand(unknown: &str) -> String {
    format!(
        r#"
domain: llm_gateway
api_keys:
  tiers:
    free: {{ rpm: 2, tpm: 1000 }}
    pro: {{ rpm: 50, tpm: 100000, rpd: 1000 }}
  default_tier: free
  {unknown}
  keys:
    - key: plain-pro-key
      tier: pro
    - sha256: {hash}
      tier: pro
    - key: custom-key
      rate_limit_rpm: 7
      rate_limit_tpm: 700
endpoints:
  - id: openai
    rpm_limit: 3000
    tpm_limit: 2000000
  - id: local-mock
    rpm_limit: 10
    tpm_limit: 999999999999
"#,
        hash = "4e598f5daafc2fda61641ddbb5956deb23fde6616366dc9dd5a7c9f47da4d787"
    )
}

#[tokio::test]
async fn llm_shorthand_tiers_hashed_keys_and_endpoints() {
    let rules = shorthand("");
    let server = start(&[("llm.yaml", &rules)]).await;
    let limit = |r: &RateLimitRequest| {
        let r = r.clone();
        let server = &server;
        async move { limit_of(&server.ok(r).await, 0) }
    };
    let key = |k: &str| request("llm_gateway", &[&[("api_key", k)]]);
    assert_eq!(limit(&key("plain-pro-key")).await, Some(50));
    // Given as a SHA-256 in the file, matched by hashing the key sent.
    assert_eq!(limit(&key("hashed-secret")).await, Some(50));
    assert_eq!(limit(&key("custom-key")).await, Some(7));
    // Unknown keys get the default tier.
    assert_eq!(server.admitted(3, &key("stranger")).await, 2);
    let endpoint = |e: &str| request("llm_gateway", &[&[("endpoint", e)]]);
    assert_eq!(limit(&endpoint("openai")).await, Some(3000));
    // A TPM limit above the threshold: the endpoint is unlimited.
    let r = server.ok(endpoint("local-mock")).await;
    assert_eq!(remaining(&r, 0), u32::MAX);
    server.stop().await;

    let deny = shorthand("unknown_keys: deny");
    let server = start(&[("llm.yaml", &deny)]).await;
    assert_eq!(server.admitted(1, &key("stranger")).await, 0);
    assert_eq!(server.admitted(1, &key("plain-pro-key")).await, 1);
    server.stop().await;
}

#[test]
fn llm_shorthand_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "domain: d\napi_keys:\n  tiers:\n    free: { rpm: 1 }\n  keys:\n    - key: a\n      tier: gold\n    - sha256: nothex\n    - key: b\n      sha256: abc\nendpoints:\n  - id: big\n    tpm_limit: 5000000000\n    rpm_limit: 1\n";
    std::fs::write(
        dir.path().join("bad.yaml"),
        format!("{bad}unlimited_tpm_above: 9000000000\n"),
    )
    .unwrap();
    let errors = sluice::load_dir(dir.path()).unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let expect = [
        ("api_keys.keys[0].tier", 7),
        ("api_keys.keys[1].sha256", 8),
        ("api_keys.keys[2]", 9),
        ("endpoints[0].tpm_limit", 13),
    ];
    for (field, line) in expect {
        assert!(
            errors
                .iter()
                .any(|e| e.field.as_deref() == Some(field) && e.line == Some(line)),
            "{field} at line {line}: {text:#?}"
        );
    }
}

const ONE_LIMIT: &str = "domain: d\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 12 }\n";

/// Calls over `connections` connections of their own, four each, in turn: how many of them
/// were admitted.
async fn admitted_over_connections(server: &TestServer, connections: usize) -> usize {
    let request = request("d", &[&[("api_key", "k1")]]);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(connect(server.running.as_ref().unwrap().grpc_addr).await);
    }
    let mut admitted = 0;
    for _ in 0..4 {
        for client in &mut clients {
            let answer = client.should_rate_limit(request.clone()).await;
            if is_ok(&answer.expect("answered").into_inner()) {
                admitted += 1;
            }
        }
    }
    admitted
}

/// The default layout serves each connection on one of several threads, each with a runtime of
/// its own; the threads share one set of counters, so a limit holds across connections whichever
/// thread took them.
#[tokio::test]
async fn per_core_threads_share_one_limit_across_connections() {
    let server = start_with(&[("d.yaml", ONE_LIMIT)], |s| s.grpc_threads = 3).await;
    // 6 connections over 3 threads, 24 calls against a limit of 12.
    assert_eq!(admitted_over_connections(&server, 6).await, 12);
    server.stop().await;
}

/// `--runtime multi-thread` serves on the caller's runtime, with the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_multi_threaded_layout_answers_alike() {
    let server = start_with(&[("d.yaml", ONE_LIMIT)], |s| {
        s.runtime = sluice::settings::RuntimeShape::MultiThread
    })
    .await;
    assert_eq!(admitted_over_connections(&server, 3).await, 12);
    server.stop().await;
}

/// [8/8]: the gRPC listener's HTTP/2 limits hold. A call whose headers pass
/// `--grpc-max-header-bytes` is refused before it is read, one under it is answered; with
/// `--grpc-call-timeout`, a call kept waiting (here by `wait:`) longer than the timeout is
/// answered CANCELLED ("Timeout expired") at the timeout, not at the end of its wait.
#[tokio::test]
async fn the_grpc_listeners_header_and_call_limits_hold() {
    const WAITING: &str = "domain: d\ndescriptors:\n  - key: api_key\n    wait: 5s\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n";
    let server = start_with(&[("d.yaml", WAITING)], |s| {
        s.grpc_max_header_bytes = 4096;
        s.grpc_call_timeout = Some(std::time::Duration::from_millis(300));
    })
    .await;
    let call = || request("d", &[&[("api_key", "k1")]]);
    let with_header = |bytes: usize| {
        let mut request = tonic::Request::new(call());
        request
            .metadata_mut()
            .insert("x-padding", "p".repeat(bytes).parse().unwrap());
        request
    };
    let mut client = server.client.clone();
    let small = client.should_rate_limit(with_header(1000)).await;
    assert!(small.is_ok(), "{small:?}");
    let large = server
        .client
        .clone()
        .should_rate_limit(with_header(8000))
        .await;
    assert!(
        large.is_err(),
        "a header block of 8,000 bytes was read: {large:?}"
    );
    // The hour's one call is spent: the next waits, up to 5 s, and is cut at 300 ms.
    let started = std::time::Instant::now();
    let waited = server.client.clone().should_rate_limit(call()).await;
    let status = waited.expect_err("a call past the timeout");
    // tonic's own answer to a call past its server timeout.
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    server.stop().await;
}
