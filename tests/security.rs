//! [8/8]'s security checks: an API key a client sends never shows where others can read it.

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisServer, unique_namespace};
use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;

/// The key planted in every call: it must be found nowhere a client's key must not be.
const PLANTED: &str = "sk-planted-7f3a9c2e5b1d4e6a";

const RULES: &str = r#"
domain: llm
descriptors:
  - key: api_key
    limits:
      - { unit: minute, requests: 2 }
      - { unit: minute, tokens: 1000 }
      - { concurrency: 5, hold_ttl: 1m }
    descriptors:
      - key: model
        rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: tenant
    consistency: strict
    rate_limit: { unit: minute, requests_per_unit: 1 }
"#;

fn call(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitRequest {
    let mut request = request("llm", &[entries]);
    request.descriptors[0].hits_addend = hits.map(|value| UInt64Value { value });
    request
}

/// A server process (its own, logging everything at trace level to files this test reads)
/// with a Redis store, sent calls that carry the planted key every way a client can: admitted
/// and refused (429 with OpenAI's body), usage reports, a stream's release, a strict rule
/// settled in Redis, and malformed calls. Then its logs, its metrics, every Redis key and
/// value, every error message it answered, and `/v1/rules` are searched: the key is in none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_api_key_is_in_no_log_metric_redis_key_error_or_rules_output() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("llm.yaml", RULES)]);
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("out"), logs.path().join("err"));
    let (grpc, http) = (free_port(), free_port());
    let url = redis.url();
    let namespace = unique_namespace("planted");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", dir.path().to_str().unwrap()])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--redis-url", &url, "--redis-namespace", &namespace])
        .args(["--log-level", "trace"])
        .env("SLUICE_ADMIN_TOKEN", "admin-secret-token")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .timeout(Duration::from_secs(5));
    let started = Instant::now();
    let channel = loop {
        if let Ok(channel) = endpoint.connect().await {
            break channel;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sluice never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut client = envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(channel);
    let mut answered = String::new();
    let key = ("api_key", PLANTED);
    let calls = [
        call(&[key], None),
        call(&[key], None),
        call(&[key], None), // refused: 429 with OpenAI's body
        call(&[key, ("model", "gpt-4o")], None),
        call(&[key, ("model", "gpt-4o")], None), // refused by the nested rule
        call(&[key, ("sluice.report", "tokens")], Some(300)),
        call(&[key, ("sluice.release", "1")], None),
        call(&[("tenant", PLANTED)], None),
        call(&[("tenant", PLANTED)], None), // refused in Redis (strict)
        call(&[key, ("sluice.estimate", "lots")], None), // malformed
        call(&[key, ("sluice.nonsense", "1")], None), // malformed
        call(&[("", PLANTED)], None),       // malformed: empty key
        call(&[(PLANTED, "v")], None),      // the key sent as an entry key
    ];
    for request in calls {
        match client.should_rate_limit(request).await {
            Ok(response) => {
                let (metadata, response, _) = response.into_parts();
                answered.push_str(&format!("{:?}\n{response:?}\n", metadata.into_headers()));
            }
            Err(status) => answered.push_str(&format!("{status:?}\n")),
        }
    }
    // Past a sync interval: the counts are in Redis.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let base = format!("http://127.0.0.1:{http}");
    let web = reqwest::Client::new();
    let metrics = web
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rules = web
        .get(format!("{base}/v1/rules"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut stored = String::new();
    let keys: Vec<String> = redis.query(::redis::cmd("KEYS").arg("*"));
    assert!(
        keys.iter().any(|k| k.contains(&namespace)),
        "no count reached Redis: {keys:?}"
    );
    for key in &keys {
        stored.push_str(key);
        stored.push('\n');
        let kind: String = redis.query(::redis::cmd("TYPE").arg(key));
        let value: ::redis::Value = match kind.as_str() {
            "hash" => redis.query(::redis::cmd("HGETALL").arg(key)),
            "string" => redis.query(::redis::cmd("GET").arg(key)),
            "set" => redis.query(::redis::cmd("SMEMBERS").arg(key)),
            "zset" => redis.query(::redis::cmd("ZRANGE").arg(key).arg(0).arg(-1)),
            "list" => redis.query(::redis::cmd("LRANGE").arg(key).arg(0).arg(-1)),
            _ => ::redis::Value::Nil,
        };
        stored.push_str(&format!("{value:?}\n"));
    }
    signal(&child, "TERM");
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let logged =
        std::fs::read_to_string(&out_path).unwrap() + &std::fs::read_to_string(&err_path).unwrap();
    assert!(
        logged.lines().count() > 100,
        "the trace log is too short to say anything: {} lines",
        logged.lines().count()
    );
    assert!(answered.contains("InvalidArgument"), "{answered}");
    assert!(
        answered.contains("OverLimit") || answered.contains("over_limit"),
        "{answered}"
    );
    println!(
        "searched {} log lines, {} bytes of metrics, {} Redis keys, {} bytes of answers, {} bytes of /v1/rules",
        logged.lines().count(),
        metrics.len(),
        keys.len(),
        answered.len(),
        rules.len()
    );
    for (what, text) in [
        ("the logs", &logged),
        ("the metrics", &metrics),
        ("Redis", &stored),
        ("the answers", &answered),
        ("/v1/rules", &rules),
    ] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(PLANTED))
            .take(3)
            .collect();
        assert!(lines.is_empty(), "the planted key is in {what}: {lines:#?}");
    }
}
