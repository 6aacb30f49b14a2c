//! Fleet-wide limits against a real redis-server the test starts on a free loopback port:
//! accuracy across 3 sluice processes, a lone replica, Redis dying under load, namespaces and
//! key expiry, strict rules, and Redis Cluster.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::redis::{RedisServer, unique_namespace};
use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What a load run saw, per one-second window (the window each answer was decided in,
/// from its `duration_until_reset`).
#[derive(Default, Debug)]
struct Tally {
    admitted: BTreeMap<u64, u64>,
    /// (replica, window) -> admitted by that replica.
    by_replica: BTreeMap<(usize, u64), u64>,
    calls: u64,
    failures: u64,
}

impl Tally {
    /// Windows that lie wholly inside `[from_ms, to_ms)`.
    fn full_windows(&self, from_ms: u64, to_ms: u64) -> Vec<(u64, u64)> {
        self.admitted
            .iter()
            .filter(|(w, _)| **w * 1000 >= from_ms && (**w + 1) * 1000 <= to_ms)
            .map(|(w, n)| (*w, *n))
            .collect()
    }
}

/// Sends `rate` calls a second for `duration`, spread over `clients` in turn. Bounded in time
/// and count; every call is bounded by the client's timeout.
async fn drive(
    clients: &[RateLimitServiceClient<Channel>],
    request: &RateLimitRequest,
    rate: u64,
    duration: Duration,
    tally: Arc<Mutex<Tally>>,
) {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (rate * TICK.as_millis() as u64 / 1000).max(1);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut n = 0usize;
    while started.elapsed() < duration {
        ticker.tick().await;
        for _ in 0..per_tick {
            let replica = n % clients.len();
            n += 1;
            let mut client = clients[replica].clone();
            let request = request.clone();
            let tally = tally.clone();
            calls.spawn(async move {
                let answer = client.should_rate_limit(request).await;
                let mut tally = tally.lock().await;
                tally.calls += 1;
                match answer {
                    Ok(response) => {
                        let response = response.into_inner();
                        let reset = response.statuses[0]
                            .duration_until_reset
                            .as_ref()
                            .map_or(0, |d| d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000);
                        let window = (now_ms() + reset + 500) / 1000 - 1;
                        if is_ok(&response) {
                            *tally.admitted.entry(window).or_default() += 1;
                            *tally.by_replica.entry((replica, window)).or_default() += 1;
                        } else {
                            tally.admitted.entry(window).or_default();
                        }
                    }
                    Err(_) => tally.failures += 1,
                }
            });
        }
    }
    while calls.join_next().await.is_some() {}
}

fn per_second_rules(limit: u32) -> String {
    format!(
        "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      requests_per_unit: {limit}\n  - key: tally\n    rate_limit:\n      unit: hour\n      requests_per_unit: 1000000\n"
    )
}

async fn replicas(
    n: usize,
    redis: &RedisServer,
    namespace: &str,
    config: &std::path::Path,
    extra: &[&str],
) -> (
    Vec<tokio::process::Child>,
    Vec<RateLimitServiceClient<Channel>>,
) {
    let (mut children, mut clients) = (Vec::new(), Vec::new());
    let url = redis.url();
    for _ in 0..n {
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--redis-url",
            &url,
            "--redis-namespace",
            namespace,
            "--sync-interval",
            "20ms",
        ];
        args.extend_from_slice(extra);
        let (child, client) = spawn_sluice(&args, &[]).await;
        children.push(child);
        clients.push(client);
    }
    (children, clients)
}

async fn stop_all(children: Vec<tokio::process::Child>) {
    for mut child in children {
        signal(&child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("sluice stops")
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
}

const LIMIT: u32 = 200;

fn assert_within_5_percent(windows: &[(u64, u64)], what: &str) {
    assert!(
        windows.len() >= 5,
        "{what}: only {} full windows",
        windows.len()
    );
    for (w, admitted) in windows {
        let ratio = *admitted as f64 / f64::from(LIMIT);
        assert!(
            (0.95..=1.05).contains(&ratio),
            "{what}: window {w} admitted {admitted} of {LIMIT} ({ratio:.3})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hold_one_limit_and_a_lone_one_is_not_starved() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("fleet.yaml", &per_second_rules(LIMIT))]);
    let call = request("fleet", &[&[("k", "shared-key")]]);

    // Three replicas, load at 3x the limit spread over them, 7 seconds.
    let namespace = unique_namespace("accuracy");
    let (children, clients) = replicas(3, &redis, &namespace, dir.path(), &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // heartbeats: all three see each other
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (from, started) = (now_ms(), Instant::now());
    drive(
        &clients,
        &call,
        3 * u64::from(LIMIT),
        Duration::from_secs(7),
        tally.clone(),
    )
    .await;
    let to = now_ms();
    let tally = tally.lock().await;
    let windows = tally.full_windows(from, to);
    println!(
        "3 replicas, {} calls in {:?}, {} failed; admitted per window (limit {LIMIT}): {:?}",
        tally.calls,
        started.elapsed(),
        tally.failures,
        windows
    );
    assert_eq!(tally.failures, 0);
    assert_within_5_percent(&windows, "3 replicas");
    stop_all(children).await;

    // One replica alone under the same load: the fleet size follows, it is not starved.
    let namespace = unique_namespace("lone");
    let (children, clients) = replicas(1, &redis, &namespace, dir.path(), &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let from = now_ms();
    drive(
        &clients,
        &call,
        3 * u64::from(LIMIT),
        Duration::from_secs(7),
        tally.clone(),
    )
    .await;
    let to = now_ms();
    let tally = tally.lock().await;
    let windows = tally.full_windows(from, to);
    println!("1 replica: admitted per window (limit {LIMIT}): {windows:?}");
    assert_eq!(tally.failures, 0);
    assert_within_5_percent(&windows, "lone replica");
    stop_all(children).await;
}
