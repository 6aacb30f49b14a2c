//! Load over real gRPC: sluice against a no-op ShouldRateLimit server on the same tonic stack
//! (the ceiling), in one run, at fixed concurrency. Reports requests/s, p50/p99/p999 latency and
//! server CPU seconds per 100k requests; one key and 100k distinct keys; with and without Redis;
//! 10 rules against 10,000, and ten descriptors a request.
//!
//!     scripts/bench-load.sh            (builds the release binary, then runs this)
//!
//! Servers run as their own processes (the no-op one is this program, re-run with --noop), so
//! their CPU time is read from /proc apart from the load generator's.

mod common;
use common::{Pinning, Server, cpu_seconds, free_port, start, start_redis};

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

const CONCURRENCY: usize = 64;
const CONNECTIONS: usize = 4;

struct Noop;

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let statuses = request
            .into_inner()
            .descriptors
            .iter()
            .map(|_| Default::default())
            .collect();
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: 1,
            statuses,
            ..Default::default()
        }))
    }
}

/// The no-op server, laid out as sluice serves gRPC by default: one current-thread runtime per
/// core (here one thread, when pinned to one core), else tokio's multi-threaded scheduler.
fn noop_server(port: u16, one_thread: bool) {
    let mut runtime = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = runtime.enable_all().build().unwrap();
    runtime.block_on(async move {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(RateLimitServiceServer::new(Noop))
            .serve(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
    });
}

/// A synced server's rounds so far, from its metrics: how many, and their seconds in all.
async fn sync_rounds(server: &Server) -> (f64, f64) {
    let url = format!("http://127.0.0.1:{}/metrics", server.http_port);
    let text = match reqwest::get(url).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (
        value("sluice_sync_duration_seconds_count "),
        value("sluice_sync_duration_seconds_sum "),
    )
}

/// Commands Redis has processed so far.
fn redis_commands(port: u16) -> u64 {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return 0;
    };
    let Ok(mut connection) = client.get_connection() else {
        return 0;
    };
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut connection)
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A request of one descriptor per entry, each descriptor of that one entry.
fn request_of(entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: entries
            .iter()
            .map(|(key, value)| RateLimitDescriptor {
                entries: vec![Entry {
                    key: key.to_string(),
                    value: value.to_string(),
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

fn request(key: &str) -> RateLimitRequest {
    request_of(&[("api_key", key)])
}

/// The rules every sluice here loads: one on `api_key` (a counter per key), one on each of ten
/// keys `d0`..`d9` (for requests of ten descriptors), and `tenants` exact-value rules
/// `tenant: tN`.
fn rules(tenants: usize) -> String {
    let (keys, tenants) = (common::key_rules(10), common::tenant_rules(tenants));
    format!("{}{keys}{tenants}", common::API_KEY_RULE)
}

/// Each round's figure, as `0.912, 0.874, 0.951`.
fn listed(values: &[f64]) -> String {
    let shown: Vec<String> = values.iter().map(|r| format!("{r:.3}")).collect();
    shown.join(", ")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

struct Run {
    requests: u64,
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    /// The slowest answer, ms.
    max: f64,
    cpu_per_100k: f64,
}

async fn clients(server: &Server) -> Vec<RateLimitServiceClient<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port))
                .unwrap();
        channels.push(RateLimitServiceClient::new(
            endpoint.connect().await.unwrap(),
        ));
    }
    channels
}

/// Requests are built before the clock starts: one per API key.
fn requests(keys: usize) -> Arc<Vec<RateLimitRequest>> {
    Arc::new((0..keys).map(|i| request(&format!("key-{i}"))).collect())
}

/// One request per tenant rule, `tenant=t0` .. `tenant=t{n-1}`.
fn tenant_requests(n: usize) -> Arc<Vec<RateLimitRequest>> {
    Arc::new(
        (0..n)
            .map(|i| request_of(&[("tenant", &format!("t{i}"))]))
            .collect(),
    )
}

/// One request of ten descriptors, `d0=v` .. `d9=v`, each matching its own rule.
fn ten_descriptors() -> Arc<Vec<RateLimitRequest>> {
    let keys: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
    let entries: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
    Arc::new(vec![request_of(&entries)])
}

fn summary(all: &hdrhistogram::Histogram<u64>, elapsed: f64, cpu: f64) -> Run {
    let requests = all.len();
    Run {
        requests,
        rps: requests as f64 / elapsed,
        p50: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99: all.value_at_quantile(0.99) as f64 / 1000.0,
        p999: all.value_at_quantile(0.999) as f64 / 1000.0,
        max: all.max() as f64 / 1000.0,
        cpu_per_100k: cpu / requests as f64 * 100_000.0,
    }
}

/// How h2load drives a server.
#[derive(Clone, Copy)]
enum H2Load {
    /// 4 connections of up to 16 streams each, as fast as they go: saturation.
    Saturate,
    /// Calls in flight fixed at connections × streams, each sent as the last one answers:
    /// the fixed-concurrency load, at a lower level.
    Fixed { connections: u32, streams: u32 },
    /// 4 connections of up to 16 streams, started at `rate` calls a second in all (open loop).
    Paced(f64),
}

/// Load from h2load (nghttp2's HTTP/2 benchmark, written in C), on one thread: a load
/// generator this cheap leaves the shared cores to the server, so its latencies are the ones
/// to read. Returns `None` when h2load is not installed.
fn h2load(server: &Server, duration: Duration, load: H2Load) -> Option<Run> {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let message = request("key-0").encode_to_vec();
    // One gRPC frame: uncompressed, its length, the message.
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let (body_path, log_path) = (dir.path().join("body"), dir.path().join("log"));
    std::fs::write(&body_path, body).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        server.port
    );
    let mut command = Command::new("h2load");
    let (connections, streams) = match load {
        H2Load::Fixed {
            connections,
            streams,
        } => (connections, streams),
        H2Load::Saturate | H2Load::Paced(_) => (4, 16),
    };
    command
        .arg(format!("--clients={connections}"))
        .arg(format!("--max-concurrent-streams={streams}"))
        .args(["-t", "1", "-D"])
        .arg(duration.as_secs().to_string())
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&body_path)
        .arg(format!("--log-file={}", log_path.display()));
    if let H2Load::Paced(rate) = load {
        command.arg(format!(
            "--rps={}",
            (rate / f64::from(connections)).round() as u64
        ));
    }
    let cpu_before = cpu_seconds(server.child.id());
    let status = command
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    assert!(status.success(), "h2load failed: {status}");
    let cpu = cpu_seconds(server.child.id()) - cpu_before;
    // Each line: start time (µs), HTTP status, duration (µs).
    let mut all = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for line in std::fs::read_to_string(&log_path).unwrap().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.get(1), Some(&"200"), "{line}");
        all.record(fields[2].parse().unwrap()).unwrap();
    }
    Some(summary(&all, duration.as_secs_f64(), cpu))
}

/// How long callers keep calling.
#[derive(Clone)]
enum Calls {
    /// For this long, each caller walking its slice of the requests and round again.
    For(Duration),
    /// Every request in the range once, each caller its own slice of it: with one key per
    /// request, every key met exactly once.
    EachOnce(std::ops::Range<usize>),
}

/// Runs taken in slices, between slices of another run, and summed: latencies merged, time
/// and server CPU added. The machine's speed drifts within seconds; two runs compared slice by
/// slice see the same drift.
#[derive(Default)]
struct Tally {
    latencies: Option<hdrhistogram::Histogram<u64>>,
    elapsed: f64,
    cpu: f64,
}

impl Tally {
    async fn add(&mut self, server: &Server, requests: &Arc<Vec<RateLimitRequest>>, calls: Calls) {
        let (latencies, elapsed, cpu) = drive_raw(server, requests, calls).await;
        match &mut self.latencies {
            Some(all) => all.add(latencies).unwrap(),
            None => self.latencies = Some(latencies),
        }
        self.elapsed += elapsed;
        self.cpu += cpu;
    }

    fn run(&self) -> Run {
        summary(self.latencies.as_ref().unwrap(), self.elapsed, self.cpu)
    }
}

/// `CONCURRENCY` callers over `CONNECTIONS` HTTP/2 connections, each as fast as it can (closed
/// loop): the saturation throughput.
async fn load(server: &Server, requests: &Arc<Vec<RateLimitRequest>>, duration: Duration) -> Run {
    drive(server, requests, Calls::For(duration)).await
}

/// Every request of `requests` once (see [`Calls::EachOnce`]).
async fn load_each_once(server: &Server, requests: &Arc<Vec<RateLimitRequest>>) -> Run {
    drive(server, requests, Calls::EachOnce(0..requests.len())).await
}

async fn drive(server: &Server, requests: &Arc<Vec<RateLimitRequest>>, calls: Calls) -> Run {
    let (latencies, elapsed, cpu) = drive_raw(server, requests, calls).await;
    summary(&latencies, elapsed, cpu)
}

/// The latencies, seconds and server CPU seconds of one closed-loop run.
async fn drive_raw(
    server: &Server,
    requests: &Arc<Vec<RateLimitRequest>>,
    calls: Calls,
) -> (hdrhistogram::Histogram<u64>, f64, f64) {
    let channels = clients(server).await;
    let cpu_before = cpu_seconds(server.child.id());
    let started = Instant::now();
    let mut callers = Vec::new();
    for c in 0..CONCURRENCY {
        let mut client: RateLimitServiceClient<Channel> = channels[c % CONNECTIONS].clone();
        let requests = requests.clone();
        let calls = calls.clone();
        callers.push(tokio::spawn(async move {
            let mut latencies = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            // Each caller walks its own slice of the keys, so together they reach every key
            // rather than trailing one another through the same few.
            let range = match &calls {
                Calls::For(_) => 0..requests.len(),
                Calls::EachOnce(range) => range.clone(),
            };
            let len = range.len();
            let (mut i, end) = (
                range.start + c * len / CONCURRENCY,
                range.start + (c + 1) * len / CONCURRENCY,
            );
            loop {
                match calls {
                    Calls::For(duration) if started.elapsed() >= duration => break,
                    Calls::For(_) => i = (i + 1) % len,
                    Calls::EachOnce(_) if i >= end => break,
                    Calls::EachOnce(_) => {}
                }
                let sent = Instant::now();
                let answer = client.should_rate_limit(requests[i].clone()).await;
                assert!(answer.is_ok(), "{answer:?}");
                latencies.record(sent.elapsed().as_micros() as u64).unwrap();
                if let Calls::EachOnce(_) = calls {
                    i += 1;
                }
            }
            latencies
        }));
    }
    let mut all = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for caller in callers {
        all.add(caller.await.unwrap()).unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.child.id()) - cpu_before;
    (all, elapsed, cpu)
}

/// The closed-loop rounds' ratios (median and each round's) and Redis commands per request.
fn closed_loop_summary(ratios: &[Vec<f64>; 8], rounds: usize, ops: [f64; 3], total: u64) {
    let [one_ops, many_ops, warm_ops] = ops;
    println!("ratios, median over {rounds} rounds (each round's in brackets):");
    let names = [
        "sluice / no-op throughput, 1 key",
        "sluice / no-op throughput, 100k keys",
        "with Redis / without, 1 key",
        "with Redis / without, 100k keys, cold",
        "with Redis / without, 100k keys, warm",
        "sluice 10,000 rules / 10 rules",
        "sluice / no-op, 10 descriptors",
        "sluice 10 descriptors / 1 descriptor",
    ];
    for (name, list) in names.iter().zip(ratios) {
        println!("{name:<42} {:.3}  [{}]", median(list), listed(list));
    }
    println!(
        "Redis commands per request, mean over rounds: 1 key {:.4}, 100k keys cold {:.4}, warm {:.4}",
        one_ops / rounds as f64,
        many_ops / rounds as f64,
        warm_ops / rounds as f64
    );
    println!("requests in the closed-loop runs: {total}");
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(port) = args
        .iter()
        .position(|a| a == "--noop")
        .and_then(|i| args.get(i + 1))
    {
        let one_thread = args.iter().any(|a| a == "--one-thread");
        return noop_server(port.parse().unwrap(), one_thread);
    }
    // `cargo test --all-targets` builds benches and runs them with no arguments: do nothing.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let duration = Duration::from_secs(seconds);
    let sluice = std::env::var("SLUICE_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/sluice").into());
    let redis = std::env::var("SLUICE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let pinning = Pinning::from_env();
    pinning.pin_self();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.yaml"), rules(10)).unwrap();
    let many_rules_dir = tempfile::tempdir().unwrap();
    std::fs::write(many_rules_dir.path().join("bench.yaml"), rules(10_000)).unwrap();
    // Pinned to one core, the load runs on one thread. Two workers on one core preempted each
    // other for a scheduler slice (up to 12 ms, `perf sched`), which landed on the slowest
    // answer of whichever server was measured, and their hand-offs capped the load: one thread
    // drives 110-130k calls a second where two drove 72k.
    let mut runtime = match pinning.load {
        Some(_) => tokio::runtime::Builder::new_current_thread(),
        None => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
    };
    let runtime = runtime.enable_all().build().unwrap();

    let (redis_server, redis_port) = start_redis(pinning.load, &redis);
    // NOOP_BIN=target/release/examples/noop: the no-op built with sluice's release profile,
    // when this bench is built with another (its own no-op is this program, as built).
    let noop = {
        let port = free_port();
        match std::env::var("NOOP_BIN") {
            Ok(noop) => start(
                Pinning::command(pinning.server, noop)
                    .args(["serve".to_string(), format!("127.0.0.1:{port}")]),
                port,
            ),
            Err(_) => start(
                Pinning::command(pinning.server, std::env::current_exe().unwrap())
                    .args(["--noop", &port.to_string()])
                    .args(pinning.server.map(|_| "--one-thread")),
                port,
            ),
        }
    };
    let sluice_server_of = |config: &std::path::Path, with_redis: bool| {
        let (port, http_port) = (free_port(), free_port());
        let mut command = Pinning::command(pinning.server, &sluice);
        command.args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--grpc-addr",
            &format!("127.0.0.1:{port}"),
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
            "--log-level",
            "warn",
        ]);
        if with_redis {
            command.args([
                "--redis-url",
                &format!("redis://127.0.0.1:{redis_port}"),
                "--redis-namespace",
                "bench",
                "--sync-interval",
                "1s",
            ]);
        }
        let mut server = start(&mut command, port);
        server.http_port = http_port;
        server
    };
    let sluice_server = |with_redis: bool| sluice_server_of(dir.path(), with_redis);
    let alone = sluice_server(false);
    let many_rules = sluice_server_of(many_rules_dir.path(), false);
    let (one_key, many_keys) = (requests(1), requests(100_000));
    let (ten_tenants, all_tenants) = (tenant_requests(10), tenant_requests(10_000));
    let ten = ten_descriptors();

    println!(
        "load: {CONCURRENCY} callers over {CONNECTIONS} connections, {seconds} s per run, on {} cores; {}",
        pinning.cores,
        match pinning.server {
            Some(cpu) => format!("servers pinned to core {cpu}, load and Redis to the other"),
            None => "unpinned".into(),
        }
    );
    println!(
        "{:<34} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>14}",
        "run", "req/s", "req/CPU-s", "p50 ms", "p99 ms", "p999 ms", "max ms", "CPU s/100k"
    );
    let show = |name: &str, run: &Run| {
        println!(
            "{name:<34} {:>10.0} {:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>14.3}",
            run.rps,
            100_000.0 / run.cpu_per_100k.max(f64::MIN_POSITIVE),
            run.p50,
            run.p99,
            run.p999,
            run.max,
            run.cpu_per_100k
        );
    };
    let rounds: usize = std::env::var("LOAD_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let slices: usize = std::env::var("LOAD_SLICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(10);
    // A closed-loop run of `duration`, its figures printed under `name`.
    let measured = async |server: &Server, requests: &Arc<Vec<RateLimitRequest>>, name: &str| {
        let run = load(server, requests, duration).await;
        show(name, &run);
        run
    };
    // LOAD_KEYS=N: only the many-keys and many-descriptors runs, on a fresh server each round:
    // 1 key, then N keys each new to the server (every key met once), the same N again
    // (they exist now), 10 descriptors a request and 1; then the no-op server on 1 key and on
    // the N keys, for the slowest answer the stack and the machine give without sluice.
    if let Some(keys) = std::env::var("LOAD_KEYS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let many = requests(keys);
        runtime.block_on(async {
            let mut ratios: [Vec<f64>; 3] = Default::default();
            let (mut slowest, mut noop_slowest): (f64, f64) = (0.0, 0.0);
            for round in 1..=rounds {
                println!("round {round} of {rounds}");
                let fresh = sluice_server(false);
                load(&fresh, &one_key, Duration::from_secs(1)).await;
                // Each run in LOAD_SLICES slices, taken in turn with the 1-key run it is
                // compared with: the new keys a tenth at a time between tenths of a 1-key run,
                // then (the keys existing now) the same with the 10-descriptor run as well.
                let chunk = |s: usize| s * keys / slices..(s + 1) * keys / slices;
                let slice = duration / slices as u32;
                let (mut one, mut new) = (Tally::default(), Tally::default());
                for s in 0..slices {
                    one.add(&fresh, &one_key, Calls::For(slice)).await;
                    new.add(&fresh, &many, Calls::EachOnce(chunk(s))).await;
                }
                let (mut one_again, mut existing, mut ten_run) =
                    (Tally::default(), Tally::default(), Tally::default());
                for s in 0..slices {
                    one_again.add(&fresh, &one_key, Calls::For(slice)).await;
                    existing.add(&fresh, &many, Calls::EachOnce(chunk(s))).await;
                    ten_run.add(&fresh, &ten, Calls::For(slice)).await;
                }
                let (one, new) = (one.run(), new.run());
                let (one_again, existing, ten_run) =
                    (one_again.run(), existing.run(), ten_run.run());
                show("sluice, 1 key (beside new keys)", &one);
                show(&format!("sluice, {keys} keys, each new"), &new);
                show("sluice, 1 key (beside the rest)", &one_again);
                show(&format!("sluice, {keys} keys, existing"), &existing);
                show("sluice, 10 descriptors", &ten_run);
                let per_cpu = |run: &Run| 100_000.0 / run.cpu_per_100k;
                ratios[0].push(per_cpu(&new) / per_cpu(&one));
                ratios[1].push(per_cpu(&existing) / per_cpu(&one_again));
                ratios[2].push(ten_run.cpu_per_100k / one_again.cpu_per_100k);
                slowest = slowest.max(new.max).max(existing.max);
                // The same stream of calls to the no-op server: what the machine and the load
                // tool's own pauses put on the slowest answer, with no table behind it.
                let noop_one = measured(&noop, &one_key, "no-op server, 1 key").await;
                let noop_many = load_each_once(&noop, &many).await;
                show(&format!("no-op server, {keys} keys, once each"), &noop_many);
                noop_slowest = noop_slowest.max(noop_one.max).max(noop_many.max);
                println!(
                    "round {round}: slowest answer, sluice {:.3} ms (1 key {:.3}), no-op {:.3} ms (1 key {:.3})",
                    new.max.max(existing.max),
                    one.max.max(one_again.max),
                    noop_many.max,
                    noop_one.max
                );
                println!(
                    "round {round}: per CPU-second, new keys / 1 key {:.3}, existing / 1 key {:.3}; CPU of 10 descriptors / 1 {:.3}",
                    ratios[0][round - 1],
                    ratios[1][round - 1],
                    ratios[2][round - 1]
                );
            }
            println!(
                "medians over {rounds} rounds: new keys / 1 key {:.3} [{}], existing / 1 key {:.3} [{}], 10 descriptors / 1 (CPU) {:.3} [{}]; slowest answer {slowest:.3} ms (the no-op's on the same calls {noop_slowest:.3} ms)",
                median(&ratios[0]),
                listed(&ratios[0]),
                median(&ratios[1]),
                listed(&ratios[1]),
                median(&ratios[2]),
                listed(&ratios[2])
            );
        });
        return;
    }
    runtime.block_on(async {
        // Every configuration runs once per round, one after another, so each round's ratios
        // compare runs minutes apart at most; the median over rounds damps the machine's noise.
        let mut ratios: [Vec<f64>; 8] = Default::default();
        let (mut one_ops, mut many_ops, mut warm_ops) = (0.0, 0.0, 0.0);
        let mut total = 0;
        // LOAD_ONLY=latency: the h2load latency runs alone.
        let closed_loop_rounds = if std::env::var("LOAD_ONLY").is_ok_and(|v| v == "latency") {
            0
        } else {
            rounds
        };
        for round in 1..=closed_loop_rounds {
            println!("round {round} of {rounds}");
            // A fresh synced replica each round: the 1-key run must not sync the 100k
            // counters of the round before.
            let synced = sluice_server(true);
            // A new process pays for its first calls (page faults, buffers, connections): a
            // second of load on one key, not measured, so the synced replica is compared warm
            // like the others. Its 100k counters are still new to it in the cold run.
            load(&synced, &one_key, Duration::from_secs(1)).await;
            let ceiling = measured(&noop, &one_key, "no-op server (ceiling)").await;
            let one = measured(&alone, &one_key, "sluice, 1 key").await;
            let many = measured(&alone, &many_keys, "sluice, 100k keys").await;
            // A synced run, and the Redis commands it caused per request.
            let synced_run = async |requests: &Arc<Vec<RateLimitRequest>>, label: &str| {
                let commands = redis_commands(redis_port);
                let redis_cpu = cpu_seconds(redis_server.child.id());
                let rounds_before = sync_rounds(&synced).await;
                let run = measured(&synced, requests, &format!("sluice + Redis sync, {label}")).await;
                let ops = (redis_commands(redis_port) - commands) as f64;
                // Redis runs on the same cores as sluice and the load: its CPU is taken from them.
                let redis_cpu = cpu_seconds(redis_server.child.id()) - redis_cpu;
                let rounds_after = sync_rounds(&synced).await;
                let sync_rounds = rounds_after.0 - rounds_before.0;
                println!(
                    "{:<34} {:>10.0} commands/s, {:.4} per request; {sync_rounds} sync rounds, {:.3} s each; Redis CPU {:.3} s/100k",
                    format!("  Redis, {label}"),
                    ops / duration.as_secs_f64(),
                    ops / run.requests as f64,
                    (rounds_after.1 - rounds_before.1) / sync_rounds.max(1.0),
                    redis_cpu / run.requests as f64 * 100_000.0
                );
                (ops / run.requests as f64, run)
            };
            let (ops, redis_one) = synced_run(&one_key, "1 key").await;
            one_ops += ops;
            // First contact: every counter is new to this replica, so each one's first sync
            // is immediate. Then the same load again on the same replica: the steady state,
            // where counters far from their limits push on their turn.
            let (ops, redis_many) = synced_run(&many_keys, "100k keys, cold").await;
            many_ops += ops;
            let (ops, redis_warm) = synced_run(&many_keys, "100k keys, warm").await;
            warm_ops += ops;
            // Scaling: 10 rules against 10,000 (each request hits one, all of them in turn),
            // and ten descriptors a request against the no-op server given the same request.
            let few_rules = measured(&alone, &ten_tenants, "sluice, 10 rules").await;
            let all_rules = measured(&many_rules, &all_tenants, "sluice, 10,000 rules").await;
            let noop_ten = measured(&noop, &ten, "no-op server, 10 descriptors").await;
            let sluice_ten = measured(&alone, &ten, "sluice, 10 descriptors").await;
            for (list, ratio) in ratios.iter_mut().zip([
                one.rps / ceiling.rps,
                many.rps / ceiling.rps,
                redis_one.rps / one.rps,
                redis_many.rps / many.rps,
                redis_warm.rps / many.rps,
                all_rules.rps / few_rules.rps,
                sluice_ten.rps / noop_ten.rps,
                sluice_ten.rps / one.rps,
            ]) {
                list.push(ratio);
            }
            total += ceiling.requests
                + one.requests
                + many.requests
                + redis_one.requests
                + redis_many.requests
                + redis_warm.requests
                + few_rules.requests
                + all_rules.requests
                + noop_ten.requests
                + sluice_ten.requests;
        }
        println!();
        if closed_loop_rounds > 0 {
            closed_loop_summary(&ratios, rounds, [one_ops, many_ops, warm_ops], total);
        }
        if std::env::var("LOAD_LATENCY").is_ok_and(|v| v == "0") {
            return;
        }
        // Latency at half of saturation, from h2load, for sluice and the no-op server alike.
        // Saturation first, in rounds as above: h2load's ratio and the rate to halve.
        let mut saturated_ratios = Vec::new();
        let mut saturated_rates = Vec::new();
        for round in 1..=rounds {
            let Some(saturated) = h2load(&alone, duration, H2Load::Saturate) else {
                println!("h2load is not installed (Debian: nghttp2-client): latency runs skipped");
                return;
            };
            show(&format!("h2load: sluice, saturated ({round})"), &saturated);
            let noop_saturated = h2load(&noop, duration, H2Load::Saturate).unwrap();
            show(&format!("h2load: no-op, saturated ({round})"), &noop_saturated);
            saturated_ratios.push(saturated.rps / noop_saturated.rps);
            saturated_rates.push(saturated.rps);
        }
        let saturation = median(&saturated_rates);
        let half_rate = saturation / 2.0;
        // Fixed concurrency, as the rest of this benchmark: the fewest calls in flight whose
        // throughput reaches half of saturation.
        let mut fixed = None;
        for (connections, streams) in [(1, 1), (1, 2), (1, 4), (2, 4), (4, 4), (4, 8)] {
            let level = H2Load::Fixed {
                connections,
                streams,
            };
            let run = h2load(&alone, duration, level).unwrap();
            show(
                &format!("h2load: sluice, {} in flight", connections * streams),
                &run,
            );
            if run.rps >= half_rate {
                fixed = Some((level, connections * streams, run));
                break;
            }
        }
        let fixed_noop = fixed.as_ref().map(|(level, in_flight, _)| {
            let run = h2load(&noop, duration, *level).unwrap();
            show(&format!("h2load: no-op, {in_flight} in flight"), &run);
            run
        });
        // Open loop: calls started at half the saturation rate whether or not earlier ones
        // have answered, so queueing behind h2load's bursts counts too.
        let paced = h2load(&alone, duration, H2Load::Paced(half_rate)).unwrap();
        show("h2load: sluice, paced at half", &paced);
        let noop_paced = h2load(&noop, duration, H2Load::Paced(half_rate)).unwrap();
        show("h2load: no-op, paced at the same rate", &noop_paced);
        println!();
        println!(
            "h2load sluice / no-op throughput, median of {rounds}: {:.3}  [{}]",
            median(&saturated_ratios),
            listed(&saturated_ratios)
        );
        match (&fixed, &fixed_noop) {
            (Some((_, in_flight, run)), Some(noop_run)) => println!(
                "p99 at half saturation, fixed concurrency ({in_flight} in flight, {:.0} req/s = {:.2} of saturation): sluice {:.3} ms, no-op {:.3} ms",
                run.rps,
                run.rps / saturation,
                run.p99,
                noop_run.p99
            ),
            _ => println!("no fixed concurrency up to 32 in flight reached half of saturation"),
        }
        println!(
            "p99 at half saturation, paced ({:.0} req/s): sluice {:.3} ms, no-op {:.3} ms",
            paced.rps, paced.p99, noop_paced.p99
        );
    });
    drop((alone, many_rules, noop));
}
