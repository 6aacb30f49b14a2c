//! [8/8]'s chaos under load: three replica processes and a real Redis under steady load while
//! Redis is made slow, not dead (SIGSTOP), slower than the timeout (`DEBUG SLEEP`), or full
//! (`maxmemory` with `noeviction`: every write refused). In each: no ShouldRateLimit call
//! fails, the slowest answers stay within a stated bound, the counts made meanwhile reach
//! Redis once Redis is back, none twice, and each replica tells of the trouble a few times,
//! not once a call. (A Redis killed and restarted under load: `tests/fleet.rs`.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, unique_namespace, wall_ms};
use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

const RULES: &str = "domain: chaos\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 200 }\n  - key: tally\n    rate_limit: { unit: hour, requests_per_unit: 100000000 }\n";

/// Replica processes' stops are by pid; their logs are files this test reads.
struct Replica {
    child: tokio::process::Child,
    client: RateLimitServiceClient<Channel>,
    log: std::path::PathBuf,
}

async fn replica(
    config: &std::path::Path,
    redis: &RedisServer,
    namespace: &str,
    log: std::path::PathBuf,
) -> Replica {
    let (url, config) = (redis.url(), config.to_str().unwrap());
    let args = [
        "--config",
        config,
        "--redis-url",
        &url,
        "--redis-namespace",
        namespace,
        "--redis-timeout",
        "100ms",
    ];
    let (child, client, _, _) = spawn_logged(&args, &[], &log).await;
    Replica { child, client, log }
}

/// What one scenario's load saw.
#[derive(Default)]
struct Seen {
    calls: u64,
    failed: u64,
    admitted: u64,
    /// (sent at, ms since the epoch; took)
    latencies: Vec<(u64, Duration)>,
}

/// The p99 of the calls sent within `[from, to)`.
fn p99(seen: &Seen, from: u64, to: u64) -> Duration {
    let mut took: Vec<Duration> = seen
        .latencies
        .iter()
        .filter(|(at, _)| (from..to).contains(at))
        .map(|(_, took)| *took)
        .collect();
    took.sort();
    took.get(took.len() * 99 / 100).copied().unwrap_or_default()
}

/// Sends 300 calls a second (1.5 x the limit) in turn to the replicas for `seconds`, each
/// carrying the per-second descriptor and the scenario's hourly tally.
async fn load(clients: Vec<RateLimitServiceClient<Channel>>, what: &str, seconds: u64) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let call = request("chaos", &[&[("k", "shared")], &[("tally", what)]]);
    let started = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..300 * seconds {
        tokio::time::sleep_until(started + Duration::from_nanos(n * 1_000_000_000 / 300)).await;
        let (mut client, call, seen) = (
            clients[n as usize % clients.len()].clone(),
            call.clone(),
            seen.clone(),
        );
        calls.spawn(async move {
            let (sent, began) = (wall_ms(), Instant::now());
            let answer =
                tokio::time::timeout(Duration::from_secs(5), client.should_rate_limit(call)).await;
            let took = began.elapsed();
            let mut seen = seen.lock().unwrap();
            seen.calls += 1;
            seen.latencies.push((sent, took));
            match answer {
                Ok(Ok(response)) => seen.admitted += u64::from(is_ok(&response.into_inner())),
                _ => seen.failed += 1,
            }
        });
    }
    while calls.join_next().await.is_some() {}
    std::mem::take(&mut *seen.lock().unwrap())
}

/// The fleet's count of the scenario's tally in Redis.
fn tallied(redis: &RedisServer, namespace: &str, what: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let path = format!("tally_{what}");
    let hash: String = Sha256::digest(path.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let hour = wall_ms() / 3_600_000 * 3_600;
    let key = format!("{namespace}:ratelimit:chaos:{{{hash}}}:hour:{hour}");
    let used: Option<u64> = redis.query(::redis::cmd("HGET").arg(&key).arg("used"));
    used.unwrap_or(0)
}

/// Warnings and errors in a replica's log.
fn troubles(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_slow_stalled_or_full_under_load_fails_no_call_and_loses_no_count() {
    let Some(redis) = RedisServer::start_with(&["--enable-debug-command", "yes"]) else {
        return;
    };
    // The tallies are hourly: keep the run clear of an hour's end.
    clear_of_boundary(3_600_000, Duration::from_secs(90)).await;
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("chaos.yaml", RULES)]);
    let namespace = unique_namespace("chaos");
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(
            replica(
                dir.path(),
                &redis,
                &namespace,
                dir.path().join(format!("log{i}")),
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let clients: Vec<_> = replicas.iter().map(|r| r.client.clone()).collect();
    type Trouble = fn(&RedisServer, bool);
    let scenarios: [(&str, Trouble); 3] = [
        ("paused", |redis, on| redis.pause(on)),
        ("sleeping", |redis, on| {
            if on {
                // Busy in a command for 1.5 s, fifteen times the Redis timeout, twice.
                for _ in 0..2 {
                    let _: () = redis.query(::redis::cmd("DEBUG").arg("SLEEP").arg("1.5"));
                }
            }
        }),
        ("full", |redis, on| {
            let (policy, bytes) = if on {
                ("noeviction", "1")
            } else {
                ("noeviction", "0")
            };
            let _: () = redis.query(
                ::redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory-policy")
                    .arg(policy),
            );
            let _: () = redis.query(
                ::redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(bytes),
            );
        }),
    ];
    let redis = Arc::new(redis);
    for (what, trouble) in scenarios {
        let before: Vec<usize> = replicas.iter().map(|r| troubles(&r.log).len()).collect();
        let loading = tokio::spawn(load(clients.clone(), what, 9));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let from = wall_ms();
        let r = redis.clone();
        tokio::task::spawn_blocking(move || trouble(&r, true))
            .await
            .unwrap();
        if what != "sleeping" {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        let r = redis.clone();
        tokio::task::spawn_blocking(move || trouble(&r, false))
            .await
            .unwrap();
        let to = wall_ms();
        let seen = loading.await.unwrap();
        // Back: what the replicas counted meanwhile reaches Redis, once.
        let started = Instant::now();
        let mut stored = tallied(&redis, &namespace, what);
        while stored != seen.admitted && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stored = tallied(&redis, &namespace, what);
        }
        let lines: Vec<Vec<String>> = replicas
            .iter()
            .zip(&before)
            .map(|(r, b)| troubles(&r.log).split_off(*b))
            .collect();
        let told: Vec<usize> = lines.iter().map(Vec::len).collect();
        // What the first replica said, each message once (its fields left out).
        let mut said: Vec<String> = lines[0]
            .iter()
            .map(|l| l.split_once(": ").map_or(l.as_str(), |(_, m)| m))
            .map(|m| m.split(" error=").next().unwrap_or(m).to_string())
            .collect();
        said.dedup();
        println!("{what}: the first replica said {said:#?}");
        let (p99_before, p99_during) = (p99(&seen, 0, from), p99(&seen, from, to));
        println!(
            "{what}: {} calls, {} failed, {} admitted, {stored} in Redis; p99 before {p99_before:?}, during {p99_during:?} ({} ms of trouble); warnings per replica {told:?}",
            seen.calls,
            seen.failed,
            seen.admitted,
            to - from
        );
        assert_eq!(seen.failed, 0, "{what}: calls failed");
        assert_eq!(
            stored, seen.admitted,
            "{what}: Redis holds {stored} of {} admitted",
            seen.admitted
        );
        // A call waits on Redis at most its timeout (100 ms), twice (a lease, then a retry):
        // measured 102-104 ms stalled, 3 ms full (refused at once), 2-8 ms before.
        assert!(
            p99_during <= Duration::from_millis(300),
            "{what}: p99 {p99_during:?}"
        );
        // Told as it starts and as it clears, not once a call (each replica took ~900).
        assert!(
            told.iter().all(|&n| n <= 6),
            "{what}: warnings per replica {told:?}"
        );
    }
    for replica in &mut replicas {
        signal(&replica.child, "TERM");
        let _ = tokio::time::timeout(Duration::from_secs(15), replica.child.wait()).await;
    }
}
