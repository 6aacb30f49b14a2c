//! sluice as a drop-in for envoyproxy/ratelimit: the peer's documented behaviour, over real
//! gRPC, in our own rules and values. Each test names the peer test (or code) it follows, so a
//! reviewer can hold the two side by side:
//! - `src/service/ratelimit.go` and `test/service/ratelimit_test.go` (the service),
//! - `src/config/config_impl.go` and `test/config/config_test.go` (loading rules),
//! - `src/limiter/base_limiter.go` (a rule's shadow mode),
//! - `test/server/health_test.go` (health).

mod common;

use common::*;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::google::protobuf::{Struct, UInt64Value, Value, value::Kind};
use prost::Message;

/// Routing rules in the style of the peer's README example ("metadata: … name"): each
/// backend's rule names the service its traffic should go to.
const ROUTING: &str = r#"
domain: routing
descriptors:
  - key: backend
    value: primary
    metadata:
      name: svc-primary
      weights: { primary: 9 }
    rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: backend
    value: fallback
    metadata:
      name: svc-fallback
      zone: b
      weights: { primary: 1, fallback: 5 }
    rate_limit: { unit: minute, requests_per_unit: 50 }
  - key: backend
    value: spare
    quota_mode: true
    metadata:
      spare: true
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: backend
    value: internal
    metadata:
      name: never-shown
    rate_limit: { unlimited: true }
"#;

fn routed(backends: &[&str]) -> Vec<[(&'static str, String); 1]> {
    backends
        .iter()
        .map(|b| [("backend", b.to_string())])
        .collect()
}

fn routing_request(
    backends: &[&str],
) -> envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
    let owned = routed(backends);
    let pairs: Vec<Vec<(&str, &str)>> = owned
        .iter()
        .map(|d| d.iter().map(|(k, v)| (*k, v.as_str())).collect())
        .collect();
    let slices: Vec<&[(&str, &str)]> = pairs.iter().map(Vec::as_slice).collect();
    request("routing", &slices)
}

fn field<'a>(s: &'a Struct, key: &str) -> Option<&'a Kind> {
    s.fields.get(key).and_then(|v| v.kind.as_ref())
}

fn sub<'a>(s: &'a Struct, key: &str) -> &'a Struct {
    match field(s, key) {
        Some(Kind::StructValue(inner)) => inner,
        other => panic!("`{key}` is not a struct: {other:?}"),
    }
}

fn string<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match field(s, key) {
        Some(Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}

fn rules_metadata(r: &RateLimitResponse) -> &Struct {
    sub(
        r.dynamic_metadata.as_ref().expect("dynamic metadata"),
        "metadata",
    )
}

// ratelimit_test.go: TestMetadataReturnedForPassedDescriptors, and the peer's README routing
// example. An over-limit descriptor adds nothing, so `metadata.name` names a service that
// still has room.
#[tokio::test]
async fn metadata_comes_only_from_descriptors_that_passed() {
    let s = start(&[("routing.yaml", ROUTING)]).await;
    let both = routing_request(&["primary", "fallback"]);
    let first = s.ok(both.clone()).await;
    assert_eq!(string(rules_metadata(&first), "name"), Some("svc-primary"));
    s.ok(both.clone()).await;
    // primary (2 a minute) is spent now: the third call names the fallback.
    let third = s.ok(both).await;
    assert_eq!(code(&third, 0), Code::OverLimit);
    assert_eq!(code(&third, 1), Code::Ok);
    assert_eq!(string(rules_metadata(&third), "name"), Some("svc-fallback"));
    assert_eq!(string(rules_metadata(&third), "zone"), Some("b"));
    s.stop().await;
}

// ratelimit_test.go: TestOverlappingMetadataReturnsTheFirstValue and
// TestMetadataReturnedForAllPassedDescriptors; ratelimit.go mergeMetadata (nested structs merge,
// the first value of a key wins).
#[tokio::test]
async fn metadata_merges_with_the_first_value_winning_and_structs_merged() {
    let s = start(&[("routing.yaml", ROUTING)]).await;
    let r = s.ok(routing_request(&["primary", "fallback"])).await;
    let merged = rules_metadata(&r);
    assert_eq!(string(merged, "name"), Some("svc-primary"), "first wins");
    assert_eq!(
        string(merged, "zone"),
        Some("b"),
        "keys only the second has"
    );
    let weights = sub(merged, "weights");
    assert_eq!(
        field(weights, "primary"),
        Some(&Kind::NumberValue(9.0)),
        "the first descriptor's nested value wins"
    );
    assert_eq!(field(weights, "fallback"), Some(&Kind::NumberValue(5.0)));
    // In the other order the fallback's values come first.
    let r = s.ok(routing_request(&["fallback", "primary"])).await;
    assert_eq!(string(rules_metadata(&r), "name"), Some("svc-fallback"));
    assert_eq!(
        field(sub(rules_metadata(&r), "weights"), "primary"),
        Some(&Kind::NumberValue(1.0))
    );
    s.stop().await;
}

// ratelimit.go shouldRateLimitWorker: an unlimited descriptor is answered before it can pass
// metadata on, and a quota descriptor over its limit adds nothing either.
#[tokio::test]
async fn unlimited_and_spent_quota_descriptors_add_no_metadata() {
    let s = start(&[("routing.yaml", ROUTING)]).await;
    let r = s.ok(routing_request(&["internal"])).await;
    assert!(
        r.dynamic_metadata.is_none(),
        "unlimited: {:?}",
        r.dynamic_metadata
    );
    let spare = routing_request(&["spare", "fallback"]);
    assert_eq!(
        field(rules_metadata(&s.ok(spare.clone()).await), "spare"),
        Some(&Kind::BoolValue(true))
    );
    let r = s.ok(spare).await;
    assert_eq!(code(&r, 0), Code::OverLimit);
    assert!(!is_ok(&r), "its only quota is spent: denied");
    assert!(field(rules_metadata(&r), "spare").is_none());
    assert_eq!(string(rules_metadata(&r), "name"), Some("svc-fallback"));
    s.stop().await;
}

// ratelimit.go ratelimitToMetadata (RESPONSE_DYNAMIC_METADATA=true): the request's domain, its
// descriptors as `key=value` lists with their override, and hitsAddend when not zero.
#[tokio::test]
async fn response_dynamic_metadata_describes_the_request() {
    let s = start_with(&[("routing.yaml", ROUTING)], |s| {
        s.response_dynamic_metadata = true
    })
    .await;
    let mut r = routing_request(&["fallback", "elsewhere"]);
    r.hits_addend = 3;
    r.descriptors[1]
        .entries
        .push(entries(&[("zone", "")])[0].clone());
    r.descriptors[1].limit = Some(RateLimitOverride {
        requests_per_unit: 40,
        unit: Unit::Hour as i32,
    });
    r.descriptors[1].hits_addend = Some(UInt64Value { value: 2 });
    let response = s.ok(r).await;
    let metadata = response.dynamic_metadata.expect("dynamic metadata");
    assert_eq!(string(&metadata, "domain"), Some("routing"));
    assert_eq!(
        field(&metadata, "hitsAddend"),
        Some(&Kind::NumberValue(3.0))
    );
    let Some(Kind::ListValue(descriptors)) = field(&metadata, "descriptors") else {
        panic!("descriptors: {metadata:?}")
    };
    let as_struct = |v: &Value| match &v.kind {
        Some(Kind::StructValue(s)) => s.clone(),
        other => panic!("{other:?}"),
    };
    let first = as_struct(&descriptors.values[0]);
    let second = as_struct(&descriptors.values[1]);
    let texts = |s: &Struct| match field(s, "entries") {
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(Kind::StringValue(t)) => t.clone(),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(texts(&first), ["backend=fallback"]);
    assert!(field(&first, "limit").is_none() && field(&first, "hitsAddend").is_none());
    assert_eq!(texts(&second), ["backend=elsewhere", "zone="]);
    assert_eq!(
        string(&second, "limit"),
        Some("requests_per_unit:40 unit:HOUR")
    );
    assert_eq!(field(&second, "hitsAddend"), Some(&Kind::NumberValue(2.0)));
    assert_eq!(
        string(sub(&metadata, "metadata"), "name"),
        Some("svc-fallback")
    );
    s.stop().await;

    // Without the setting, only the rules' metadata is written.
    let plain = start(&[("routing.yaml", ROUTING)]).await;
    let metadata = plain
        .ok(routing_request(&["fallback"]))
        .await
        .dynamic_metadata
        .expect("dynamic metadata");
    assert_eq!(metadata.fields.keys().collect::<Vec<_>>(), ["metadata"]);
    plain.stop().await;
}

const LIMITS: &str = r#"
domain: shadowing
descriptors:
  - key: team
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: trial
    shadow_mode: true
    rate_limit: { unit: minute, requests_per_unit: 1 }
"#;

// ratelimit_test.go: TestServiceGlobalShadowMode. Each descriptor keeps its own code; only the
// overall code turns OK.
#[tokio::test]
async fn global_shadow_mode_keeps_each_descriptor_code() {
    let s = start_with(&[("limits.yaml", LIMITS)], |s| s.shadow_mode = true).await;
    let team = request("shadowing", &[&[("team", "red")], &[("team", "blue")]]);
    s.ok(team.clone()).await;
    let r = s.ok(team).await;
    assert!(is_ok(&r), "the overall code is OK");
    assert_eq!(
        code(&r, 0),
        Code::OverLimit,
        "the descriptor says it is over"
    );
    assert_eq!(code(&r, 1), Code::OverLimit);
    assert_eq!(limit_of(&r, 0), Some(1));
    s.stop().await;
}

// base_limiter.go GetResponseDescriptorStatus: a rule in shadow_mode answers OK for its
// descriptor even when over, and the request passes unless another limit denies it.
#[tokio::test]
async fn a_rules_own_shadow_mode_answers_ok_for_its_descriptor() {
    let s = start(&[("limits.yaml", LIMITS)]).await;
    let trial = request("shadowing", &[&[("trial", "t1")]]);
    s.ok(trial.clone()).await;
    let r = s.ok(trial).await;
    assert!(is_ok(&r));
    assert_eq!(code(&r, 0), Code::Ok);
    assert_eq!(remaining(&r, 0), 0);
    // Beside an enforced limit that is over, the request is denied.
    let both = request("shadowing", &[&[("trial", "t2")], &[("team", "green")]]);
    s.ok(both.clone()).await;
    let r = s.ok(both).await;
    assert!(!is_ok(&r));
    assert_eq!((code(&r, 0), code(&r, 1)), (Code::Ok, Code::OverLimit));
    s.stop().await;
}

// health_test.go / the peer's grpc health registration: probes ask for `ratelimit`.
#[tokio::test]
async fn grpc_health_answers_for_the_peers_service_name() {
    let s = start(&[("limits.yaml", LIMITS)]).await;
    for name in [
        "ratelimit",
        "",
        "envoy.service.ratelimit.v3.RateLimitService",
    ] {
        assert_eq!(
            grpc_health(&s, name).await,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "`{name}`"
        );
    }
    s.stop().await;
}

// config_impl.go GetLimit: a descriptor with no entries matches nothing, so it has no limit and
// the request is answered (not refused); an empty value is looked up like any other value.
#[tokio::test]
async fn empty_descriptors_have_no_limit_and_empty_values_match() {
    let rules = "domain: shapes\ndescriptors:\n  - key: colour\n    rate_limit: { unit: minute, requests_per_unit: 2 }\n  - key: size\n    value: \"\"\n    rate_limit: { unit: minute, requests_per_unit: 1 }\n";
    let s = start(&[("shapes.yaml", rules)]).await;
    let mut r = request("shapes", &[&[("colour", "red")]]);
    r.descriptors.insert(0, Default::default());
    let response = s.ok(r.clone()).await;
    assert!(is_ok(&response));
    assert_eq!(response.statuses.len(), 2);
    assert_eq!(
        (code(&response, 0), limit_of(&response, 0)),
        (Code::Ok, None)
    );
    assert_eq!(limit_of(&response, 1), Some(2));
    // An empty value: the key-only rule counts it, in a counter of its own.
    let blank = request("shapes", &[&[("colour", "")]]);
    assert_eq!(s.admitted(3, &blank).await, 2);
    assert_eq!(
        s.admitted(3, &request("shapes", &[&[("colour", "red")]]))
            .await,
        1
    );
    // `value: ""` in a file is the key alone, as in the peer.
    assert_eq!(
        s.admitted(3, &request("shapes", &[&[("size", "xl")]]))
            .await,
        1
    );
    s.stop().await;
}

/// Sends `body` as the ShouldRateLimit request message, whatever it holds.
async fn send_raw(addr: std::net::SocketAddr, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    #[derive(Default)]
    struct Raw;
    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
            let n = bytes::Buf::remaining(src);
            Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    );
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(tonic::Response::into_inner)
}

// Not in the peer (Go's gRPC answers INTERNAL too): a body that is not a RateLimitRequest is
// the caller's fault, so it gets INVALID_ARGUMENT with the decoder's message.
#[tokio::test]
async fn undecodable_bodies_get_invalid_argument() {
    let s = start(&[("limits.yaml", LIMITS)]).await;
    let addr = s.running.as_ref().unwrap().grpc_addr;
    let good = request("shadowing", &[&[("team", "red")]]).encode_to_vec();
    let truncated = good[..good.len() - 3].to_vec();
    let mut wrong_wire_type = good.clone();
    wrong_wire_type[0] = (1 << 3) | 5; // field 1 (domain) as a fixed32
    let not_utf8 = {
        let mut r = request("shadowing", &[&[("team", "red")]]).encode_to_vec();
        let at = r.iter().position(|b| *b == b'r').unwrap();
        r[at] = 0xff;
        r
    };
    for (what, body) in [
        ("garbage", vec![0xff; 40]),
        ("truncated", truncated),
        ("a wrong wire type", wrong_wire_type),
        ("a string that is not UTF-8", not_utf8),
    ] {
        let status = send_raw(addr, body).await.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status
                .message()
                .starts_with("not a valid RateLimitRequest: "),
            "{what}: {}",
            status.message()
        );
    }
    let answer = send_raw(addr, good).await.expect("a good body is answered");
    assert!(is_ok(&RateLimitResponse::decode(&answer[..]).unwrap()));
    s.stop().await;
}

const TEAM_A: &str = "domain: shared\ndescriptors:\n  - key: team\n    value: a\n    rate_limit: { unit: minute, requests_per_unit: 1 }\n";
const TEAM_B: &str = "domain: shared\ndescriptors:\n  - key: team\n    value: b\n    rate_limit: { unit: minute, requests_per_unit: 2 }\n";

// config_impl.go loadConfig with MERGE_DOMAIN_CONFIG (config_test.go: merge_domain_key1.yaml,
// merge_domain_key2.yaml): one domain defined in two files is merged.
#[tokio::test]
async fn merge_domain_config_joins_the_files_of_one_domain() {
    let s = start_with(&[("a.yaml", TEAM_A), ("b.yaml", TEAM_B)], |s| {
        s.merge_domain_config = true
    })
    .await;
    assert_eq!(
        s.admitted(3, &request("shared", &[&[("team", "a")]])).await,
        1
    );
    assert_eq!(
        s.admitted(3, &request("shared", &[&[("team", "b")]])).await,
        2
    );
    s.stop().await;
}

// config_impl.go loadDescriptors ("duplicate descriptor composite key"), across merged files;
// and the default, one domain per file (config_test.go: duplicate domain).
#[tokio::test]
async fn merged_files_may_not_define_one_descriptor_twice() {
    let dir = tempfile::tempdir().unwrap();
    write_rules(
        dir.path(),
        &[("a.yaml", TEAM_A), ("b.yaml", TEAM_B), ("c.yaml", TEAM_A)],
    );
    let errors = sluice::load_dir_with(dir.path(), sluice::DomainFiles::Merged).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let message = errors[0].to_string();
    assert!(
        message.contains("c.yaml") && message.contains("a.yaml"),
        "{message}"
    );
    assert!(message.contains("`team=a`"), "{message}");
    // Without merging, the second file of a domain is refused.
    let errors = sluice::load_dir(dir.path()).unwrap_err();
    assert!(
        errors.iter().all(|e| e.message.contains("already defined")),
        "{errors:?}"
    );
    // `sluice validate --merge-domain-config` says the same.
    std::fs::remove_file(dir.path().join("c.yaml")).unwrap();
    let validate = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("validate")
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(validate(&["--merge-domain-config"]));
    assert!(!validate(&[]));
}

// config_test.go: replaces_self.yaml ("replaces should not contain name of same descriptor").
#[tokio::test]
async fn a_limit_that_replaces_itself_is_a_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let rules = "domain: loop\ndescriptors:\n  - key: k\n    rate_limit:\n      name: mine\n      unit: hour\n      requests_per_unit: 5\n      replaces:\n        - name: mine\n";
    write_rules(dir.path(), &[("loop.yaml", rules)]);
    let errors = sluice::load_dir(dir.path()).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(9));
    assert!(
        errors[0].message.contains("must not replace itself"),
        "{}",
        errors[0]
    );
}

// config_test.go, the loading errors, each in our own file: the peer's fixture named beside
// each case. sluice refuses every one, naming file, line and field.
#[test]
fn files_the_peer_refuses_are_refused() {
    let cases: [(&str, &str, &str); 8] = [
        (
            "duplicate_key.yaml",
            "domain: d\ndescriptors:\n  - key: zone\n    value: eu\n    rate_limit: { unit: second, requests_per_unit: 1 }\n  - key: zone\n    value: eu\n    rate_limit: { unit: minute, requests_per_unit: 2 }\n",
            "duplicate descriptor `zone=eu`",
        ),
        (
            "misspelled_key.yaml",
            "domain: d\ndescriptors:\n  - key: zone\n    ratelimit: { unit: second, requests_per_unit: 1 }\n",
            "unknown field `ratelimit`",
        ),
        (
            "non_map_list.yaml",
            "domain: d\ndescriptors:\n  - just a string\n",
            "descriptors[0]",
        ),
        (
            "non_string_key.yaml",
            "domain: d\ndescriptors:\n  - key: zone\n    metadata: { 7: seven }\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
            "metadata keys must be strings",
        ),
        (
            "unlimited_with_unit.yaml",
            "domain: d\ndescriptors:\n  - key: zone\n    rate_limit: { unlimited: true, unit: day }\n",
            "unlimited limit must not set a unit",
        ),
        (
            "replaces_empty.yaml",
            "domain: d\ndescriptors:\n  - key: zone\n    rate_limit:\n      unit: day\n      requests_per_unit: 1\n      replaces: [{ name: \"\" }]\n",
            "name must not be empty",
        ),
        (
            "empty domain (TestEmptyDomain)",
            "domain: \"\"\ndescriptors:\n  - key: zone\n    rate_limit: { unit: day, requests_per_unit: 1 }\n",
            "domain must not be empty",
        ),
        (
            "empty key (TestEmptyKey)",
            "domain: d\ndescriptors:\n  - key: \"\"\n    rate_limit: { unit: day, requests_per_unit: 1 }\n",
            "key must not be empty",
        ),
    ];
    for (peer, text, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_rules(dir.path(), &[("rules.yaml", text)]);
        let errors = sluice::load_dir(dir.path()).expect_err(peer);
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            all.iter()
                .any(|e| e.contains(expected) && e.contains("rules.yaml:")),
            "{peer}: {all:?}"
        );
    }
}

// ratelimit_test.go TestServiceGlobalQuotaMode / TestServicePerDescriptorQuotaMode with
// QUOTA_MODE: every limit is a quota, so a request passes while any of its limits has room.
#[tokio::test]
async fn global_quota_mode_denies_only_when_every_limit_is_spent() {
    let rules = "domain: pools\ndescriptors:\n  - key: pool\n    value: small\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n  - key: pool\n    value: large\n    rate_limit: { unit: hour, requests_per_unit: 3 }\n";
    let s = start_with(&[("pools.yaml", rules)], |s| s.quota_mode = true).await;
    let both = request("pools", &[&[("pool", "small")], &[("pool", "large")]]);
    assert_eq!(
        s.admitted(5, &both).await,
        3,
        "until the large pool is spent too"
    );
    let r = s.ok(both).await;
    assert_eq!(
        (code(&r, 0), code(&r, 1)),
        (Code::OverLimit, Code::OverLimit)
    );
    s.stop().await;
    let plain = start(&[("pools.yaml", rules)]).await;
    let both = request("pools", &[&[("pool", "small")], &[("pool", "large")]]);
    assert_eq!(
        plain.admitted(5, &both).await,
        1,
        "without it, the small pool denies"
    );
    plain.stop().await;
}

// ratelimit_test.go TestServiceWithCustomRatelimitHeaders (LIMIT_RESPONSE_HEADERS_ENABLED with
// LIMIT_*_HEADER names): the limit nearest its end, an OVER_LIMIT one first.
#[tokio::test]
async fn limit_response_headers_with_custom_names() {
    let rules = "domain: hdr\ndescriptors:\n  - key: a\n    rate_limit: { unit: minute, requests_per_unit: 10 }\n  - key: b\n    rate_limit: { unit: hour, requests_per_unit: 2 }\n";
    let s = start_with(&[("hdr.yaml", rules)], |s| {
        s.limit_response_headers = true;
        s.limit_limit_header = "X-Quota".into();
        s.limit_remaining_header = "X-Quota-Left".into();
        s.limit_reset_header = "X-Quota-Reset".into();
        s.openai_headers = false;
    })
    .await;
    let header = |r: &RateLimitResponse, key: &str| {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.clone())
    };
    let both = request("hdr", &[&[("a", "1")], &[("b", "1")]]);
    let r = s.ok(both.clone()).await;
    assert_eq!(
        header(&r, "X-Quota").as_deref(),
        Some("2"),
        "b has the least left"
    );
    assert_eq!(header(&r, "X-Quota-Left").as_deref(), Some("1"));
    // The test clock stands at the start of an hour: the whole hour is left.
    assert_eq!(header(&r, "X-Quota-Reset").as_deref(), Some("3600"));
    s.ok(both.clone()).await;
    let over = s.ok(both).await;
    assert_eq!(header(&over, "X-Quota").as_deref(), Some("2"));
    assert_eq!(header(&over, "X-Quota-Left").as_deref(), Some("0"));
    assert_eq!(over.response_headers_to_add.len(), 3, "no OpenAI headers");
    s.stop().await;
}

// ratelimit.go NewService with FORCE_START_WITHOUT_INITIAL_CONFIG, and the peer's
// HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED (TestServiceHealthStatus): a broken start serves
// no rules and reports unhealthy until a good file loads.
#[tokio::test]
async fn force_start_and_health_follow_the_rules_loaded() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let broken = "domain: late\ndescriptors:\n  - key: k\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n";
    let s = start_with(&[("late.yaml", broken)], |s| {
        s.force_start_without_initial_config = true;
        s.healthy_with_at_least_one_config_loaded = true;
        s.reload_debounce = std::time::Duration::from_millis(20);
    })
    .await;
    let http = common::metrics::http();
    let healthcheck = format!("{}/healthcheck", common::metrics::base(&s));
    assert_eq!(
        grpc_health(&s, "ratelimit").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(http.get(&healthcheck).send().await.unwrap().status(), 500);
    let late = request("late", &[&[("k", "v")]]);
    assert_eq!(limit_of(&s.ok(late.clone()).await, 0), None, "no rules yet");
    // The file is fixed: it loads, and health follows.
    let fixed = broken.replace("fortnight", "hour");
    write_rules(s.dir.path(), &[("late.yaml", &fixed)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while grpc_health(&s, "ratelimit").await != ServingStatus::Serving as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "health never followed the reload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(http.get(&healthcheck).send().await.unwrap().status(), 200);
    assert_eq!(limit_of(&s.ok(late).await, 0), Some(1));
    s.stop().await;
}
