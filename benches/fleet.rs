//! The fleet's accuracy and its Redis cost, measured (not a test): three sluice replicas at the
//! default settings on one redis-server, offered a per-minute limit evenly: 1 counter at 1.5x
//! its limit, 100,000 at 1.5x (each at its limit), and 100,000 far from theirs. For every minute window wholly inside the run it prints what was admitted
//! against the limit (in all, the most and least of any one counter, and how many counters
//! admitted less than their limit: "short"), and for each of those windows the share of
//! decisions that leased on the request path and Redis commands per second.
//!
//!     cargo bench --bench fleet
//!     FLEET_RUNS=1/6000/1.5,100000/3/1.5 FLEET_SECONDS=190 cargo bench --bench fleet
//!
//! (`FLEET_RUNS`: counters/limit a minute/offered as a multiple of the limit, per run;
//! `SLUICE=path/to/sluice`: the replicas' binary, when not this build's;
//! `FLEET_ALGORITHM=sliding_window`: the limit's algorithm, fixed_window by default;
//! `FLEET_BURST=100`: a token bucket's burst, the limit by default. A bucket offered more than
//! it refills admits its rate, so a full minute admits about its limit: at most its burst and
//! a second's refill more, by its bound.)
//!
//! redis-server comes from `SLUICE_REDIS_SERVER` or the PATH; the replicas are the sluice
//! binary of this build. Everything listens on loopback and is stopped by its pid at the end.

mod common;

use common::free_port;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

const REPLICAS: usize = 3;

/// A process this bench started, killed by its pid when dropped.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn redis_info(port: u16, field: &str) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut connection = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut connection)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What the replicas had counted when a mark was taken: request-path leases, calls answered,
/// Redis commands.
#[derive(Clone, Copy)]
struct Mark {
    leased: f64,
    calls: f64,
    commands: u64,
    at: Instant,
}

fn mark(http: &[u16], redis_port: u16) -> Mark {
    Mark {
        leased: scraped(http, "sluice_lease_request_path_calls_total"),
        calls: scraped(http, "sluice_requests_total"),
        commands: redis_info(redis_port, "total_commands_processed"),
        at: Instant::now(),
    }
}

/// The sum of a counter over the replicas' scrapes, every label set of it.
fn scraped(http: &[u16], name: &str) -> f64 {
    http.iter()
        .map(|port| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
            use std::io::{Read, Write};
            write!(
                stream,
                "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            text.lines()
                .filter_map(|l| {
                    let rest = l.strip_prefix(name)?;
                    if !(rest.starts_with(' ') || rest.starts_with('{')) {
                        return None;
                    }
                    rest.rsplit(' ').next()?.trim().parse::<f64>().ok()
                })
                .sum::<f64>()
        })
        .sum()
}

fn request(key: usize) -> RateLimitRequest {
    RateLimitRequest {
        domain: "fleet".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "k".into(),
                value: format!("key-{key}"),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// Admitted calls per (counter, minute window).
type Tally = Arc<Mutex<HashMap<(u32, u64), u32>>>;

async fn drive(
    clients: &[RateLimitServiceClient<Channel>],
    keys: usize,
    rate: f64,
    run: Duration,
    tally: Tally,
    by_reset: bool,
) -> (u64, u64) {
    const TICK: Duration = Duration::from_millis(10);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (started, mut owed, mut n) = (Instant::now(), 0.0, 0usize);
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut calls = tokio::task::JoinSet::new();
    while started.elapsed() < run {
        ticker.tick().await;
        owed += rate * TICK.as_secs_f64();
        while owed >= 1.0 {
            owed -= 1.0;
            let (key, replica) = (n % keys, n % clients.len());
            n += 1;
            let mut client = clients[replica].clone();
            let (tally, failures) = (tally.clone(), failures.clone());
            calls.spawn(async move {
                match client.should_rate_limit(request(key)).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        let reset = answer.statuses[0]
                            .duration_until_reset
                            .as_ref()
                            .map_or(0, |d| d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000);
                        // A window's answer says when it ends; a token bucket's, when it
                        // is full: its calls are counted in the minute they were answered.
                        let window = if by_reset {
                            (now_ms() + reset + 500) / 60_000 - 1
                        } else {
                            now_ms() / 60_000
                        };
                        if answer.overall_code == 1 {
                            *tally
                                .lock()
                                .unwrap()
                                .entry((key as u32, window))
                                .or_default() += 1;
                        }
                    }
                    Err(_) => {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
    (
        n as u64,
        failures.load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn main() {
    // `cargo test --all-targets` builds benches and runs them with no arguments: do nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // Each run: counters / limit a minute / offered load as a multiple of the limit.
    let runs: Vec<(usize, u32, f64)> = std::env::var("FLEET_RUNS")
        .unwrap_or_else(|_| "1/6000/1.5,100000/3/1.5,100000/60/0.075".into())
        .split(',')
        .map(|run| {
            let parts: Vec<&str> = run.trim().split('/').collect();
            let [k, limit, offered] = parts[..] else {
                panic!("FLEET_RUNS: counters/limit/offered, comma-separated: {run}")
            };
            (
                k.parse().expect("FLEET_RUNS: counters"),
                limit.parse().expect("FLEET_RUNS: limit"),
                offered.parse().expect("FLEET_RUNS: offered"),
            )
        })
        .collect();
    let seconds: u64 = std::env::var("FLEET_SECONDS")
        .ok()
        .map_or(190, |s| s.parse().expect("FLEET_SECONDS: a number"));
    let redis_server =
        std::env::var("SLUICE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    // Another build of sluice, to compare two side by side.
    let sluice = std::env::var("SLUICE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice").into());
    let algorithm = std::env::var("FLEET_ALGORITHM").unwrap_or_else(|_| "fixed_window".into());
    let burst = std::env::var("FLEET_BURST").map_or(String::new(), |b| format!(", burst: {b}"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "fleet: {REPLICAS} replicas at the default settings on one redis-server, a per-minute {algorithm}{burst} limit offered evenly, {seconds} s a run"
    );
    println!(
        "{:>8} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}",
        "counters",
        "limit",
        "offered",
        "window",
        "admitted",
        "/limit",
        "max/lim",
        "min/lim",
        "leased%",
        "redis/s",
        "short"
    );
    for &(k, limit, offered) in &runs {
        let redis_port = free_port();
        let _redis = Started(
            Command::new(&redis_server)
                .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server (set SLUICE_REDIS_SERVER)"),
        );
        wait_port(redis_port);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("fleet.yaml"),
            format!(
                "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: minute, requests_per_unit: {limit}, algorithm: {algorithm}{burst} }}\n"
            ),
        )
        .unwrap();
        let mut replicas = Vec::new();
        let mut grpc = Vec::new();
        let mut http = Vec::new();
        for _ in 0..REPLICAS {
            let (g, h) = (free_port(), free_port());
            replicas.push(Started(
                Command::new(&sluice)
                    .arg("serve")
                    .args(["--config", dir.path().to_str().unwrap()])
                    .args(["--redis-url", &format!("redis://127.0.0.1:{redis_port}")])
                    .args(["--redis-namespace", "bench"])
                    .args(["--grpc-addr", &format!("127.0.0.1:{g}")])
                    .args(["--http-addr", &format!("127.0.0.1:{h}")])
                    .args(["--log-level", "warn"])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            ));
            wait_port(g);
            grpc.push(g);
            http.push(h);
        }
        let rate = f64::from(limit) * k as f64 * offered / 60.0;
        let tally: Tally = Arc::default();
        // Start a second into a minute, so the first (partial) window is nearly whole and what
        // the full windows measure does not depend on when the run began: leases taken ahead
        // of them come from the window before, and a first window of a few seconds leased
        // little ahead (one 130 s run read 54 % leased on the request path where a 190 s run
        // of the same build read 16 %).
        let into_minute = now_ms() % 60_000;
        std::thread::sleep(Duration::from_millis((61_000 - into_minute) % 60_000));
        let (from, commands_before) =
            (now_ms(), redis_info(redis_port, "total_commands_processed"));
        let started = Instant::now();
        // Leases and commands are counted over each full window: the first, partial window
        // has no lease taken ahead of it, and a replica's first call to a counter always asks
        // the store, so the first windows of sparse keys show how the fleet warms up and the
        // later ones how it runs.
        let (first, last) = (
            (from / 60_000 + 1) * 60_000,
            (from + seconds * 1000) / 60_000 * 60_000,
        );
        let marks = {
            let http = http.clone();
            std::thread::spawn(move || {
                let mut marks = Vec::new();
                for at in (first..=last).step_by(60_000) {
                    if last <= first {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(at.saturating_sub(now_ms())));
                    marks.push(mark(&http, redis_port));
                }
                marks
            })
        };
        let (calls, failures) = runtime.block_on(async {
            let mut clients = Vec::new();
            for port in &grpc {
                clients.push(
                    RateLimitServiceClient::connect(format!("http://127.0.0.1:{port}"))
                        .await
                        .unwrap(),
                );
            }
            drive(
                &clients,
                k,
                rate,
                Duration::from_secs(seconds),
                tally.clone(),
                algorithm != "token_bucket",
            )
            .await
        });
        let elapsed = started.elapsed().as_secs_f64();
        let to = now_ms();
        let commands = redis_info(redis_port, "total_commands_processed") - commands_before;
        let leased = scraped(&http, "sluice_lease_request_path_calls_total");
        let lease_failures = scraped(&http, "sluice_lease_request_path_failures_total");
        let marks = marks.join().unwrap();
        // Per full window (by its start, ms): the share of decisions leased on the request
        // path, and Redis commands a second.
        let per_window: HashMap<u64, (f64, f64)> = marks
            .windows(2)
            .zip((first..).step_by(60_000))
            .map(|(pair, start)| {
                let (a, b) = (pair[0], pair[1]);
                (
                    start,
                    (
                        100.0 * (b.leased - a.leased) / (b.calls - a.calls).max(1.0),
                        (b.commands - a.commands) as f64 / (b.at - a.at).as_secs_f64(),
                    ),
                )
            })
            .collect();
        let tally = tally.lock().unwrap();
        let full: Vec<u64> = (from / 60_000 + 1..to / 60_000).collect();
        if full.is_empty() {
            println!("{k:>8}: no full minute window in {seconds} s; run longer");
        }
        for window in full {
            let mut total = 0u64;
            let (mut most, mut least, mut short) = (0u32, u32::MAX, 0usize);
            for key in 0..k as u32 {
                let n = tally.get(&(key, window)).copied().unwrap_or(0);
                total += u64::from(n);
                most = most.max(n);
                least = least.min(n);
                short += usize::from(n < limit);
            }
            let budget = f64::from(limit) * k as f64;
            let (in_window, commands_per_s) = per_window
                .get(&(window * 60_000))
                .copied()
                .unwrap_or((f64::NAN, f64::NAN));
            println!(
                "{k:>8} {limit:>7} {offered:>7} {window:>10} {total:>10} {:>9.4} {:>9.3} {:>9.3} {:>9.3}% {:>9.0} {short:>8}",
                total as f64 / budget,
                f64::from(most) / f64::from(limit),
                f64::from(least) / f64::from(limit),
                in_window,
                commands_per_s,
            );
        }
        println!(
            "{k:>8}: {calls} calls ({:.0}/s) in {elapsed:.0} s, {failures} failed; {leased:.0} leased on the request path, {lease_failures:.0} of those failed (timeout or error); {commands} Redis commands",
            calls as f64 / elapsed
        );
    }
}
