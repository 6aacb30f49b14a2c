//! Operations over real HTTP: Prometheus metrics (parsed with a text-format parser), health and
//! readiness, and every admin endpoint, with its authentication and its bad input.

mod common;

use std::time::{Duration, Instant};

use common::metrics::*;
use common::redis::{RedisServer, unique_namespace};
use common::*;

use serde_json::{Value, json};

const OPS: &str = r#"
domain: ops_metrics
descriptors:
  - key: api_key
    rate_limit:
      unit: minute
      requests_per_unit: 5
  - key: legacy
    shadow_mode: true
    rate_limit:
      unit: minute
      requests_per_unit: 1
  - key: user
    limits:
      - unit: minute
        tokens: 1000
  - key: region
    value_to_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 100
"#;

#[tokio::test]
async fn metrics_move_with_traffic_and_never_carry_api_keys() {
    let server = start(&[("ops.yaml", OPS)]).await;
    let key = request("ops_metrics", &[&[("api_key", "secret-key-123")]]);
    // 5 a minute: calls 1-3 within, 4-5 near (>= 80 %), 6-7 over.
    assert_eq!(server.admitted(7, &key).await, 5);
    let legacy = request("ops_metrics", &[&[("legacy", "old-key-456")]]);
    assert_eq!(server.admitted(3, &legacy).await, 3);
    server.ok(request("nowhere_domain", &[&[("a", "b")]])).await;
    server
        .call(request("", &[&[("a", "b")]]))
        .await
        .expect_err("invalid");
    let mut report = request(
        "ops_metrics",
        &[&[("user", "u"), ("sluice.report", "tokens")]],
    );
    report.hits_addend = 250;
    server.ok(report).await;

    let samples = scrape(&server).await;
    let rule =
        |name: &str, r: &str| sample(&samples, name, &[("domain", "ops_metrics"), ("rule", r)]);
    assert_eq!(rule("sluice_rule_hits_total", "api_key"), 7.0);
    assert_eq!(rule("sluice_rule_within_limit_total", "api_key"), 3.0);
    assert_eq!(rule("sluice_rule_near_limit_total", "api_key"), 2.0);
    assert_eq!(rule("sluice_rule_over_limit_total", "api_key"), 2.0);
    assert_eq!(
        rule("sluice_rule_shadow_mode_total", "legacy"),
        2.0,
        "over in shadow mode, twice"
    );
    assert_eq!(rule("sluice_rule_tokens_total", "user"), 250.0);
    assert!(sample(&samples, "sluice_unknown_domain_total", &[]) >= 1.0);
    assert!(sample(&samples, "sluice_invalid_requests_total", &[]) >= 1.0);
    assert!(sample(&samples, "sluice_usage_reports_total", &[]) >= 1.0);
    assert!(sample(&samples, "sluice_reported_tokens_total", &[]) >= 250.0);
    assert!(sample(&samples, "sluice_requests_total", &[("code", "over_limit")]) >= 2.0);
    assert!(sample(&samples, "sluice_request_duration_seconds_count", &[]) >= 10.0);
    assert!(sample(&samples, "sluice_config_generation", &[]) >= 1.0);
    assert!(sample(&samples, "sluice_active_counters", &[]) >= 2.0);
    // No label anywhere holds a descriptor value sent by a caller.
    for (name, labels, _) in &samples {
        for (_, value) in labels {
            assert!(
                !value.contains("secret-key-123") && !value.contains("old-key-456"),
                "{name} {labels:?}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn shorthand_api_keys_are_labelled_by_a_short_hash() {
    let rules = "domain: ops_hash\napi_keys:\n  tiers:\n    t: { rpm: 5 }\n  keys:\n    - key: partner-secret-789\n      tier: t\n";
    let server = start(&[("h.yaml", rules)]).await;
    server
        .ok(request("ops_hash", &[&[("api_key", "partner-secret-789")]]))
        .await;
    let samples = scrape(&server).await;
    let hits: Vec<_> = samples
        .iter()
        .filter(|(n, l, _)| n == "sluice_rule_hits_total" && l.iter().any(|(_, v)| v == "ops_hash"))
        .collect();
    assert_eq!(hits.len(), 1);
    let label = &hits[0].1.iter().find(|(k, _)| k == "rule").unwrap().1;
    assert!(
        label.starts_with("api_key_sha256_") && !label.contains("partner-secret"),
        "{label}"
    );
    server.stop().await;
}

const ADMIN: &str = r#"
domain: ops_admin
descriptors:
  - key: api_key
    rate_limit:
      name: per_key
      unit: minute
      requests_per_unit: 3
  - key: tenant
    descriptors:
      - key: user
        rate_limit:
          name: tenant_user
          replaces:
            - name: per_key
          unit: minute
          requests_per_unit: 10
"#;

/// A GET of the admin API, read as JSON.
async fn get_json(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn the_admin_api_reads_and_resets_a_token_bucket() {
    let rules = "domain: ops_bucket
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 60, algorithm: token_bucket, burst: 5 }
";
    let server = start_with(&[("bucket.yaml", rules)], |s| {
        s.admin_token = Some("t0ken".into())
    })
    .await;
    let (client, url) = (http(), base(&server));
    let call = request("ops_bucket", &[&[("api_key", "k")]]);
    assert_eq!(server.admitted(3, &call).await, 3);
    let listed = get_json(&client, format!("{url}/v1/rules")).await;
    let limit = &listed["domains"][0]["rules"][0]["limits"][0];
    assert_eq!(
        limit["algorithm"],
        json!({"name": "token_bucket", "burst": 5}),
        "{listed}"
    );
    // Usage: 3 of the bucket's 5 taken; it is full again in 3 s at one a second.
    let usage = get_json(
        &client,
        format!("{url}/v1/usage?domain=ops_bucket&descriptor=api_key=k"),
    )
    .await;
    let window = &usage["windows"][0];
    assert_eq!(window["algorithm"]["name"], "token_bucket", "{usage}");
    assert_eq!(window["requests"]["used"], 3, "{usage}");
    assert_eq!(window["requests"]["remaining"], 2, "{usage}");
    assert_eq!(window["reset_ms"], 3_000, "{usage}");
    // A reset refills it.
    let cleared: Value = client
        .post(format!("{url}/v1/reset"))
        .bearer_auth("t0ken")
        .json(&json!({"domain": "ops_bucket", "entries": [{"key": "api_key", "value": "k"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["local_counters"], 1);
    assert_eq!(server.admitted(6, &call).await, 5);
    server.stop().await;
}

#[tokio::test]
async fn admin_endpoints_answer_and_guard_what_mutates() {
    let server = start_with(&[("admin.yaml", ADMIN)], |s| {
        s.admin_token = Some("t0ken".into())
    })
    .await;
    let (client, url) = (http(), base(&server));
    assert_eq!(
        client
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Rules, generation, hash, files.
    let rules: Value = client
        .get(format!("{url}/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rules["generation"], 1);
    assert_eq!(rules["files_hash"].as_str().unwrap().len(), 16);
    assert_eq!(rules["domains"][0]["domain"], "ops_admin");
    assert_eq!(rules["domains"][0]["rules"].as_array().unwrap().len(), 2);
    assert_eq!(rules["files"][0]["errors"].as_array().unwrap().len(), 0);

    // Check: a dry run needs no token and counts nothing.
    let body = json!({"domain": "ops_admin", "descriptors": [{"entries": [{"key": "api_key", "value": "k"}]}]});
    let dry = json!({"domain": "ops_admin", "dry_run": true, "descriptors": [{"entries": [{"key": "api_key", "value": "k"}]}]});
    for _ in 0..2 {
        let r: Value = client
            .post(format!("{url}/v1/check"))
            .json(&dry)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["overall_code"], "OK");
        assert_eq!(r["statuses"][0]["limit_remaining"], 3);
    }
    // Counting needs the token: missing and wrong are refused.
    let missing = client
        .post(format!("{url}/v1/check"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = client
        .post(format!("{url}/v1/check"))
        .bearer_auth("nope")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let counted: Value = client
        .post(format!("{url}/v1/check"))
        .bearer_auth("t0ken")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counted["statuses"][0]["limit_remaining"], 2);
    assert_eq!(counted["statuses"][0]["current_limit"]["name"], "per_key");
    assert_eq!(
        counted["response_headers_to_add"]["x-ratelimit-remaining-requests"],
        "2"
    );

    // Usage of one descriptor.
    let usage: Value = client
        .get(format!(
            "{url}/v1/usage?domain=ops_admin&descriptor=api_key=k"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["windows"][0]["requests"]["used"], 1);
    assert_eq!(usage["windows"][0]["requests"]["remaining"], 2);
    assert_eq!(usage["windows"][0]["unit"], "minute");

    // Explain: the rule, its counters, and what replaced what.
    let explain = json!({"domain": "ops_admin", "descriptors": [
        {"entries": [{"key": "api_key", "value": "k"}]},
        {"entries": [{"key": "tenant", "value": "t"}, {"key": "user", "value": "u"}]},
        {"entries": [{"key": "nothing", "value": "x"}]}]});
    let why: Value = client
        .post(format!("{url}/v1/explain"))
        .json(&explain)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let d = &why["descriptors"];
    assert_eq!(d[0]["rule"]["path"], "api_key");
    assert_eq!(d[0]["windows"][0]["requests"]["local"], 1);
    assert_eq!(
        d[0]["windows"][0]["requests"]["replaced"], true,
        "tenant_user replaces per_key"
    );
    assert_eq!(d[1]["rule"]["path"], "tenant.user");
    assert!(d[2]["rule"].is_null() && d[2]["why"].as_str().unwrap().contains("no rule matches"));

    // Reset: guarded; then the key starts over.
    let reset = json!({"domain": "ops_admin", "entries": [{"key": "api_key", "value": "k"}]});
    assert_eq!(
        client
            .post(format!("{url}/v1/reset"))
            .json(&reset)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let cleared: Value = client
        .post(format!("{url}/v1/reset"))
        .bearer_auth("t0ken")
        .json(&reset)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["local_counters"], 1);
    let r: Value = client
        .post(format!("{url}/v1/check"))
        .json(&dry)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["statuses"][0]["limit_remaining"], 3);

    // Bad input: 400 with a message.
    for (path, bad) in [
        ("/v1/check", "{not json"),
        (
            "/v1/check",
            r#"{"domain": "d", "descriptors": [], "bogus": 1}"#,
        ),
        ("/v1/explain", "[]"),
        ("/v1/reset", "{"),
    ] {
        let r = client
            .post(format!("{url}{path}"))
            .bearer_auth("t0ken")
            .header("content-type", "application/json")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path} {bad}");
        let message: Value = r.json().await.unwrap();
        assert!(
            message["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{message}"
        );
    }
    let empty: reqwest::Response = client
        .post(format!("{url}/v1/check"))
        .json(&json!({"domain": "", "dry_run": true, "descriptors": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 400);
    let no_rule = client
        .get(format!(
            "{url}/v1/usage?domain=ops_admin&descriptor=nothing=x"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(no_rule.status(), 404);
    let bad_query = client
        .get(format!(
            "{url}/v1/usage?domain=ops_admin&descriptor=novalue"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_query.status(), 400);
    server.stop().await;

    // Without a configured token, mutating endpoints are disabled, not open.
    let open = start(&[("admin.yaml", ADMIN)]).await;
    let r = http()
        .post(format!("{}/v1/reset", base(&open)))
        .bearer_auth("anything")
        .json(&reset)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http()
        .post(format!("{}/v1/check", base(&open)))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    open.stop().await;
}

async fn ready(server: &TestServer) -> u16 {
    http()
        .get(format!("{}/readyz", base(server)))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn until_ready(server: &TestServer, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready(server).await != want {
        assert!(Instant::now() < deadline, "readyz never answered {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn readyz_fails_without_rules_and_while_a_required_redis_is_down() {
    // No rules yet: live, not ready; a rule file arriving makes it ready.
    let server = start_with(&[], |s| s.reload_debounce = Duration::from_millis(50)).await;
    assert_eq!(
        http()
            .get(format!("{}/healthz", base(&server)))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(ready(&server).await, 503);
    write_rules(server.dir.path(), &[("admin.yaml", ADMIN)]);
    until_ready(&server, 200).await;
    server.stop().await;

    // Redis required (policy deny): not ready while it is down.
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (url, ns) = (redis.url(), unique_namespace("ready"));
    let server = start_at(T0, &[("admin.yaml", ADMIN)], move |s| {
        s.redis_url = Some(url);
        s.redis_namespace = Some(ns);
        s.sync_interval = Duration::from_millis(20);
        s.redis_timeout = Duration::from_millis(100);
        s.redis_failure_policy = sluice::FailurePolicy::Deny;
    })
    .await;
    until_ready(&server, 200).await;
    redis.kill();
    until_ready(&server, 503).await;
    redis.restart();
    until_ready(&server, 200).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_reduction_reaches_every_replica_and_recovers() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules = "domain: cap\ndescriptors:\n  - key: endpoint\n    value: openai\n    rate_limit:\n      unit: minute\n      requests_per_unit: 100\n";
    write_rules(dir.path(), &[("cap.yaml", rules)]);
    let (url, ns) = (redis.url(), unique_namespace("capacity"));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let args = [
            "--config",
            dir.path().to_str().unwrap(),
            "--redis-url",
            &url,
            "--redis-namespace",
            &ns,
            "--sync-interval",
            "50ms",
            "--admin-token",
            "t0ken",
            "--capacity-recovery-interval",
            "2s",
            "--capacity-recovery-factor",
            "2",
        ];
        let (child, client, http_addr) = spawn_sluice_with_http(&args, &[]).await;
        replicas.push((child, client, format!("http://{http_addr}")));
    }
    let limit_on = |client: &envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            let mut check = request("cap", &[&[("endpoint", "openai")]]);
            check.descriptors[0].hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
            limit_of(&client.should_rate_limit(check).await.unwrap().into_inner(), 0)
        }
    };
    let until = |want: u32| {
        let replicas = &replicas;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            for (_, client, _) in replicas {
                while limit_on(client).await != Some(want) {
                    assert!(Instant::now() < deadline, "a replica never reached {want}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    until(100).await;
    clear_of_boundary(MINUTE_MS, Duration::from_secs(12)).await;
    // The global view for routing: 3 of 100 used fleet-wide, counted on both replicas.
    for (_, client, _) in &replicas {
        let mut client = client.clone();
        client
            .should_rate_limit(request("cap", &[&[("endpoint", "openai")]]))
            .await
            .unwrap();
    }
    let mut first = replicas[0].1.clone();
    first
        .should_rate_limit(request("cap", &[&[("endpoint", "openai")]]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u: Value = http()
            .get(format!("{}/v1/utilization", replicas[1].2))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if u["openai"].as_f64() == Some(0.03) {
            break;
        }
        assert!(Instant::now() < deadline, "utilization {u}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Announced on one replica: both halve.
    let reduce = json!({"domain": "cap", "rule": "endpoint_openai", "factor": 0.5});
    let r = http()
        .post(format!("{}/v1/capacity/reduce", replicas[0].2))
        .bearer_auth("t0ken")
        .json(&reduce)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let announced = Instant::now();
    until(50).await;
    let seen: Value = http()
        .get(format!("{}/v1/capacity", replicas[1].2))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["reduced"][0]["factor"], 0.5);
    assert_eq!(seen["reduced"][0]["limits"][0]["effective"], 50);
    // Both recover to the configured limit (x2 every 2 s here).
    until(100).await;
    assert!(
        announced.elapsed() >= Duration::from_millis(1_500),
        "recovered after its interval"
    );
    let seen: Value = http()
        .get(format!("{}/v1/capacity", replicas[0].2))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["reduced"].as_array().unwrap().len(), 0);
    for (child, _, _) in replicas {
        signal(&child, "TERM");
        let mut child = child;
        tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .unwrap()
            .unwrap();
    }
}

/// [8/8]: `--admin-addr` takes the admin API to a listener of its own (loopback here), while
/// health and metrics stay on `--http-addr`, which then answers no admin route.
#[tokio::test]
async fn the_admin_api_can_listen_apart_from_health_and_metrics() {
    let server = start_with(&[("ops.yaml", OPS)], |s| {
        s.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let running = server.running.as_ref().unwrap();
    let (main, admin) = (
        format!("http://{}", running.http_addr),
        format!("http://{}", running.admin_addr.expect("an admin listener")),
    );
    assert_ne!(main, admin);
    let client = http();
    let status = |url: String| {
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    for path in ["/healthz", "/readyz", "/metrics", "/healthcheck"] {
        assert_eq!(
            status(format!("{main}{path}")).await,
            200,
            "{path} on the main listener"
        );
        assert_eq!(
            status(format!("{admin}{path}")).await,
            404,
            "{path} on the admin listener"
        );
    }
    for path in ["/v1/rules", "/v1/capacity", "/rlconfig"] {
        assert_eq!(
            status(format!("{main}{path}")).await,
            404,
            "{path} on the main listener"
        );
        assert_eq!(
            status(format!("{admin}{path}")).await,
            200,
            "{path} on the admin listener"
        );
    }
    server.stop().await;
}

/// [8/8]: the admin API reads no body over 1 MiB: a larger one is refused with a reason
/// before it is read, on the JSON endpoints and on envoyproxy/ratelimit's `/json` alike.
#[tokio::test]
async fn the_admin_api_refuses_bodies_over_a_mebibyte() {
    let server = start(&[("ops.yaml", OPS)]).await;
    let base = base(&server);
    let big = format!(
        r#"{{"domain":"d","descriptors":[{{"entries":[{{"key":"k","value":"{}"}}]}}]}}"#,
        "v".repeat(3 << 19) // 1.5 MiB: under axum's 2 MB default, over the admin limit
    );
    for path in ["/v1/explain", "/json"] {
        let response = http()
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert!(matches!(status, 400 | 413), "{path}: {status} {text}");
        assert!(text.contains("length limit"), "{path}: {status} {text}");
    }
    // Under the limit, the same endpoint answers.
    let small = r#"{"domain":"d","descriptors":[{"entries":[{"key":"k","value":"v"}]}]}"#;
    let response = http()
        .post(format!("{base}/v1/explain"))
        .header("content-type", "application/json")
        .body(small)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    server.stop().await;
}
