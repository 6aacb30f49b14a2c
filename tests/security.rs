//! [8/8]'s security checks: an API key a client sends never shows where others can read it.

mod common;

use std::time::Duration;

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
    let log = dir.path().join("log");
    let url = redis.url();
    let namespace = unique_namespace("planted");
    let config = dir.path().to_str().unwrap();
    let args = [
        "--config",
        config,
        "--redis-url",
        &url,
        "--redis-namespace",
        &namespace,
        "--log-level",
        "trace",
    ];
    let envs = [("SLUICE_ADMIN_TOKEN", "admin-secret-token")];
    let (mut child, mut client, http, _) = spawn_logged(&args, &envs, &log).await;
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
    let metrics = common::metrics::text_of(&format!("http://{http}/metrics")).await;
    let rules = common::metrics::text_of(&format!("http://{http}/v1/rules")).await;
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
    let logged = std::fs::read_to_string(&log).unwrap();
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
