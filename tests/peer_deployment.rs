//! A Deployment written for envoyproxy/ratelimit runs sluice unchanged: the real binary,
//! started with nothing but the peer's environment variables (the environment is cleared
//! first), against a real password-protected Redis. Two replicas enforce one limit through it;
//! `/healthcheck`, `/json`, the peer's metric names on `PROMETHEUS_ADDR`, its `RateLimit-*`
//! headers, its dynamic metadata and its debug port's `/rlconfig` all answer as the peer's.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

const RULES: &str = r#"
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit:
      unit: hour
      requests_per_unit: 10
"#;

const PASSWORD: &str = "peer-s3cret";

struct Replica {
    child: tokio::process::Child,
    client: RateLimitServiceClient<Channel>,
    http: String,
    metrics: String,
    debug: String,
    log: std::path::PathBuf,
}

/// One `sluice serve` with only the peer's variables in its environment.
async fn replica(root: &std::path::Path, redis_port: u16, name: &str) -> Replica {
    let (grpc, http, metrics, debug) = (free_port(), free_port(), free_port(), free_port());
    let log = root.join(format!("{name}.log"));
    let vars = [
        ("RUNTIME_ROOT", root.to_str().unwrap().to_string()),
        ("RUNTIME_SUBDIRECTORY", "ratelimit".into()),
        ("RUNTIME_APPDIRECTORY", "config".into()),
        ("GRPC_HOST", "127.0.0.1".into()),
        ("GRPC_PORT", grpc.to_string()),
        ("HOST", "127.0.0.1".into()),
        ("PORT", http.to_string()),
        ("DEBUG_HOST", "127.0.0.1".into()),
        ("DEBUG_PORT", debug.to_string()),
        ("REDIS_SOCKET_TYPE", "tcp".into()),
        ("REDIS_URL", format!("127.0.0.1:{redis_port}")),
        ("REDIS_AUTH", PASSWORD.into()),
        ("USE_PROMETHEUS", "true".into()),
        ("PROMETHEUS_ADDR", format!("127.0.0.1:{metrics}")),
        ("LIMIT_RESPONSE_HEADERS_ENABLED", "true".into()),
        ("RESPONSE_DYNAMIC_METADATA", "true".into()),
        ("USE_STATSD", "false".into()),
        ("LOG_LEVEL", "info".into()),
    ];
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("serve")
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sluice serve");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .timeout(CALL_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        if let Ok(channel) = endpoint.connect().await {
            break RateLimitServiceClient::new(channel);
        }
        assert!(
            Instant::now() < deadline,
            "sluice did not listen on GRPC_PORT: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Replica {
        child,
        client,
        http: format!("http://127.0.0.1:{http}"),
        metrics: format!("http://127.0.0.1:{metrics}/metrics"),
        debug: format!("http://127.0.0.1:{debug}"),
        log,
    }
}

async fn ask(replica: &Replica) -> RateLimitResponse {
    let mut client = replica.client.clone();
    let request = request("mongo_cps", &[&[("database", "users")]]);
    tokio::time::timeout(CALL_TIMEOUT, client.should_rate_limit(request))
        .await
        .expect("answered in time")
        .expect("call succeeds")
        .into_inner()
}

fn header<'a>(r: &'a RateLimitResponse, key: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

#[tokio::test]
async fn a_peer_deployment_environment_runs_sluice_unchanged() {
    let Some(store) = RedisServer::start_with(&["--requirepass", PASSWORD]) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("ratelimit/config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mongo.yaml"), RULES).unwrap();
    let a = replica(root.path(), store.port, "a").await;
    let b = replica(root.path(), store.port, "b").await;

    // B sees the counter first; then A spends the rest of the hour's 10, and B, which takes no
    // more traffic, learns through Redis that they are spent.
    let first = ask(&b).await;
    assert_eq!(first.overall_code, Code::Ok as i32);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut admitted_by_a = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = ask(&a).await;
        if r.overall_code == Code::Ok as i32 {
            admitted_by_a += 1;
        } else if admitted_by_a >= 9 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A admitted {admitted_by_a} of 9 in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(admitted_by_a, 9, "the fleet's 10, one taken by B");
    // B's view of the fleet, asked with a dry run (it counts nothing), until B's sync has
    // read A's counts back from Redis: a counter this far from its limit on B is refreshed
    // every --sync-quiet-refresh (8 s by default).
    let http = reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .build()
        .unwrap();
    let dry_run = serde_json::json!({"domain": "mongo_cps", "dry_run": true,
        "descriptors": [{"entries": [{"key": "database", "value": "users"}]}]});
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let check: serde_json::Value = http
            .post(format!("{}/v1/check", b.http))
            .json(&dry_run)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if check["overall_code"] == "OVER_LIMIT" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never read A's counts: {check}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let denied = ask(&b).await;
    assert_eq!(
        denied.overall_code,
        Code::OverLimit as i32,
        "B denies what A spent"
    );
    // The peer's RateLimit-* headers and its dynamic metadata.
    assert_eq!(header(&denied, "RateLimit-Limit"), Some("10"));
    assert_eq!(header(&denied, "RateLimit-Remaining"), Some("0"));
    let reset: u64 = header(&denied, "RateLimit-Reset").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&reset), "{reset}");
    let metadata = denied.dynamic_metadata.expect("dynamic metadata");
    assert!(metadata.fields.contains_key("domain") && metadata.fields.contains_key("descriptors"));
    // The counts live in the password-protected Redis.
    let mut redis_connection =
        ::redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{}", store.port))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*mongo_cps*")
        .query(&mut redis_connection)
        .unwrap();
    assert!(!keys.is_empty(), "no counter in Redis");

    // /healthcheck, as the peer: 200 OK.
    let health = http
        .get(format!("{}/healthcheck", a.http))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "OK");
    // /json: the request in protobuf's JSON form; 429 once the limit is spent.
    let json = http
        .post(format!("{}/json", a.http))
        .body(r#"{"domain":"mongo_cps","descriptors":[{"entries":[{"key":"database","value":"users"}]}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 429);
    let body: serde_json::Value = json.json().await.unwrap();
    assert_eq!(body["overallCode"], "OVER_LIMIT");
    assert_eq!(body["statuses"][0]["currentLimit"]["requestsPerUnit"], 10);
    assert_eq!(body["statuses"][0]["currentLimit"]["unit"], "HOUR");
    let other = http
        .post(format!("{}/json", a.http))
        .body(r#"{"domain":"mongo_cps","descriptors":[{"entries":[{"key":"database","value":"orders"}]}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "no limit on orders");
    // The peer's metric names on PROMETHEUS_ADDR.
    let scrape = http
        .get(&a.metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parsed =
        prometheus_parse::Scrape::parse(scrape.lines().map(|l| Ok(l.to_string()))).unwrap();
    let total_hits: f64 = parsed
        .samples
        .iter()
        .filter(|s| {
            s.metric == "ratelimit_service_rate_limit_total_hits"
                && s.labels.get("domain") == Some("mongo_cps")
                && s.labels.get("key1") == Some("database_users")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(total_hits >= 10.0, "total_hits {total_hits}:\n{scrape}");
    assert!(
        scrape.contains("ratelimit_service_rate_limit_over_limit{"),
        "{scrape}"
    );
    // The debug port's /rlconfig.
    let rlconfig = http
        .get(format!("{}/rlconfig", a.debug))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        rlconfig,
        "mongo_cps.database_users: unit=HOUR requests_per_unit=10, shadow_mode: false\n"
    );
    // Each replica said what it took from the peer's environment, and what it ignored.
    let log = std::fs::read_to_string(&a.log).unwrap();
    for expected in [
        "GRPC_HOST/GRPC_PORT → --grpc-addr 127.0.0.1:",
        "RUNTIME_ROOT, RUNTIME_SUBDIRECTORY, RUNTIME_APPDIRECTORY → --config",
        "--redis-url redis://***@127.0.0.1:",
        "USE_STATSD: ignored",
    ] {
        assert!(
            log.contains(expected),
            "`{expected}` not in the log:\n{log}"
        );
    }
    assert!(
        !log.contains(PASSWORD),
        "the Redis password is logged:\n{log}"
    );
    for mut replica in [a, b] {
        signal(&replica.child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(15), replica.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}
