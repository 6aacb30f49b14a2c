//! The soak: one sluice synced through a real Redis, under half of its saturation load for
//! `SOAK_MINUTES` (30), with 100,000 API keys a minute, each minute's keys new (the last
//! minute's expire), and its rule file rewritten every minute (a hot reload each time).
//! Every minute it prints what would show a leak or a slow drift: resident memory (its peak and
//! low of a reading every second, and the reading at the minute's end), open file
//! descriptors, active counters, Redis's memory and keys, latency percentiles and server CPU.
//!
//!     scripts/soak.sh        (builds the release binary, then runs this)
//!
//! Writes `target/soak/soak.csv` and `target/soak/soak.svg` (the plot BENCHMARKS.md shows).
//! The server runs on core 0, the load and Redis on core 1 (`LOAD_PIN=0`: unpinned).
//! `SOAK_RATE` sets the offered calls a second instead of half the measured saturation.

mod common;
use common::{Pinning, Server, cpu_seconds, free_port, start_redis, start_writing};

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

const CONNECTIONS: usize = 4;
const KEYS_PER_MINUTE: u64 = 100_000;
/// Calls in flight at most; past it the pacer waits, and the wait shows in the latencies
/// (each measured from when its call was due, not from when it was sent).
const MAX_IN_FLIGHT: usize = 2048;
/// Minutes before memory is expected to level: the first minute's keys, counters of two
/// windows (the current and the one being swept), the allocator's pools.
const WARM_UP_MINUTES: usize = 5;

/// The rule file for `minute`: the same `api_key` limit every time, and an exact-value rule
/// that names the minute, so each rewrite is a real change that compiles and swaps.
fn rules(minute: usize, limit: u64) -> String {
    format!(
        "domain: soak\ndescriptors:\n  - key: api_key\n    rate_limit: {{ unit: minute, requests_per_unit: {limit} }}\n  - key: written\n    value: minute-{minute}\n    rate_limit: {{ unit: second, requests_per_unit: 5 }}\n"
    )
}

/// The call for key `i` of the keys of the epoch minute `minute`.
fn request(minute: u64, i: u64) -> RateLimitRequest {
    RateLimitRequest {
        domain: "soak".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "api_key".into(),
                value: format!("m{minute}-k{i}"),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

fn epoch_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
}

/// What the calls of one minute came to.
#[derive(Default)]
struct Calls {
    latencies: Option<hdrhistogram::Histogram<u64>>,
    over_limit: u64,
    failed: u64,
}

impl Calls {
    fn record(&mut self, micros: u64, over_limit: bool, failed: bool) {
        let latencies = self.latencies.get_or_insert_with(latency_histogram);
        latencies.saturating_record(micros);
        self.over_limit += u64::from(over_limit);
        self.failed += u64::from(failed);
    }
}

/// Microseconds up to a minute, three significant figures (a histogram that only grows as
/// values need would clamp them under `saturating_record`).
fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// One row of the soak's table.
struct Minute {
    minute: usize,
    calls: u64,
    over_limit: u64,
    failed: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rss_mib: f64,
    fds: u64,
    counters: f64,
    reloads: f64,
    server_cpu: f64,
    redis_mib: f64,
    redis_keys: u64,
    /// Calls that leased on the request path this minute (a Redis round trip in the call).
    path_leases: f64,
    /// Resident memory at its highest and lowest of the minute's samples (one a second).
    rss_peak_mib: f64,
    rss_low_mib: f64,
}

/// The table's columns in the CSV's order: the CSV's name, the printed heading, width and
/// decimals. Request-path leases are printed as a share of the calls, in %.
const COLUMNS: [(&str, &str, usize, usize); 17] = [
    ("minute", "minute", 6, 0),
    ("calls", "calls", 9, 0),
    ("over_limit", "denied", 8, 0),
    ("failed", "failed", 6, 0),
    ("p50_ms", "p50 ms", 7, 2),
    ("p99_ms", "p99 ms", 7, 2),
    ("max_ms", "max ms", 8, 1),
    ("rss_mib", "RSS MiB", 8, 1),
    ("fds", "fds", 5, 0),
    ("active_counters", "counters", 9, 0),
    ("reloads", "reloads", 7, 0),
    ("server_cpu_share", "CPU", 6, 2),
    ("redis_mib", "Redis MiB", 8, 1),
    ("redis_keys", "keys", 8, 0),
    ("request_path_leases", "path %", 6, 1),
    ("rss_peak_mib", "RSS peak", 8, 1),
    ("rss_low_mib", "RSS low", 8, 1),
];

fn csv_header() -> String {
    let names: Vec<&str> = COLUMNS.iter().map(|(name, ..)| *name).collect();
    names.join(",")
}

fn show_header() {
    let cells: Vec<String> = COLUMNS
        .iter()
        .map(|(_, heading, width, _)| format!("{heading:>width$}"))
        .collect();
    println!("{}", cells.join(" "));
}

impl Minute {
    /// The row's figures in [`COLUMNS`]' order.
    fn values(&self) -> [f64; 17] {
        [
            self.minute as f64,
            self.calls as f64,
            self.over_limit as f64,
            self.failed as f64,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.rss_mib,
            self.fds as f64,
            self.counters,
            self.reloads,
            self.server_cpu,
            self.redis_mib,
            self.redis_keys as f64,
            self.path_leases,
            self.rss_peak_mib,
            self.rss_low_mib,
        ]
    }

    fn csv(&self) -> String {
        let cells: Vec<String> = self.values().iter().map(f64::to_string).collect();
        cells.join(",")
    }

    /// A row as [`Minute::csv`] wrote it.
    fn from_csv(line: &str) -> Option<Minute> {
        let f: Vec<&str> = line.split(',').collect();
        let n = |i: usize| f.get(i)?.parse::<f64>().ok();
        // Soaks before the per-second samples had only the reading at each minute's end.
        let rss_mib = n(7)?;
        Some(Minute {
            minute: n(0)? as usize,
            calls: n(1)? as u64,
            over_limit: n(2)? as u64,
            failed: n(3)? as u64,
            p50_ms: n(4)?,
            p99_ms: n(5)?,
            max_ms: n(6)?,
            rss_mib,
            fds: n(8)? as u64,
            counters: n(9)?,
            reloads: n(10)?,
            server_cpu: n(11)?,
            redis_mib: n(12)?,
            redis_keys: n(13)? as u64,
            path_leases: n(14).unwrap_or(0.0),
            rss_peak_mib: n(15).unwrap_or(rss_mib),
            rss_low_mib: n(16).unwrap_or(rss_mib),
        })
    }

    fn show(&self) {
        let values = self.values();
        let cells: Vec<String> = values
            .iter()
            .zip(COLUMNS)
            .map(|(&value, (name, _, width, decimals))| {
                let value = if name == "request_path_leases" {
                    value / self.calls.max(1) as f64 * 100.0
                } else {
                    value
                };
                format!("{value:>width$.decimals$}")
            })
            .collect();
        println!("{}", cells.join(" "));
    }
}

/// A figure of `/proc/<pid>/status` in kB (`VmRSS`), as MiB.
fn resident_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident memory's highest and lowest since the last minute's row was taken (none yet: the
/// default).
#[derive(Clone, Copy)]
struct ResidentRange {
    peak: f64,
    low: f64,
}

impl Default for ResidentRange {
    fn default() -> Self {
        Self {
            peak: f64::NEG_INFINITY,
            low: f64::INFINITY,
        }
    }
}

impl ResidentRange {
    fn with(self, mib: f64) -> Self {
        Self {
            peak: self.peak.max(mib),
            low: self.low.min(mib),
        }
    }
}

/// Reads `pid`'s resident memory every second into `range` until `stop`: within each minute
/// the live heap climbs as the minute's new keys arrive and falls when the last minute's are
/// swept, so one reading a minute lands anywhere on that climb.
async fn sample_resident(
    pid: u32,
    range: Arc<Mutex<ResidentRange>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let mib = resident_mib(pid);
        let mut range = range.lock().unwrap();
        *range = range.with(mib);
    }
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// sluice's `/metrics` text ("" if it did not answer).
async fn metrics_text(http_port: u16) -> String {
    let url = format!("http://127.0.0.1:{http_port}/metrics");
    match reqwest::get(url).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// A metric's value in `/metrics` text (its first series), 0 if absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Redis's memory in use (MiB) and its number of keys.
fn redis_figures(port: u16) -> (f64, u64) {
    let Ok(mut connection) =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).and_then(|c| c.get_connection())
    else {
        return (0.0, 0);
    };
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut connection)
        .unwrap_or_default();
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let keys: u64 = redis::cmd("DBSIZE")
        .query(&mut connection)
        .unwrap_or_default();
    (used / (1024.0 * 1024.0), keys)
}

async fn connect(port: u16) -> Vec<RateLimitServiceClient<Channel>> {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        clients.push(RateLimitServiceClient::new(
            endpoint.connect().await.unwrap(),
        ));
    }
    clients
}

/// Closed-loop saturation for `duration`: 64 callers as fast as the server answers, on keys of
/// their own (which the sweep clears before the soak's first minutes are counted).
async fn saturation(server: &Server, duration: Duration) -> f64 {
    let clients = connect(server.port).await;
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for c in 0..64u64 {
        let mut client = clients[c as usize % CONNECTIONS].clone();
        let done = done.clone();
        callers.push(tokio::spawn(async move {
            let mut i = c;
            while started.elapsed() < duration {
                let answer = client.should_rate_limit(request(0, i)).await;
                assert!(answer.is_ok(), "{answer:?}");
                done.fetch_add(1, Ordering::Relaxed);
                i = (i + 64) % KEYS_PER_MINUTE;
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Calls at `rate` a second (open loop) until `stop`, each recorded into `calls` by when it was
/// due. The key of call n is key n mod 100,000 of the current epoch minute.
async fn pace(
    port: u16,
    rate: f64,
    calls: Arc<Mutex<Calls>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let clients = connect(port).await;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let due_by_now = (started.elapsed().as_secs_f64() * rate) as u64;
        let minute = epoch_minute();
        while sent < due_by_now {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            let mut client = clients[sent as usize % CONNECTIONS].clone();
            let request = request(minute, sent % KEYS_PER_MINUTE);
            let calls = calls.clone();
            tokio::spawn(async move {
                let answer = client.should_rate_limit(request).await;
                let micros = due.elapsed().as_micros() as u64;
                let (over, failed) = match &answer {
                    Ok(response) => (response.get_ref().overall_code == 2, false),
                    Err(_) => (false, true),
                };
                calls.lock().unwrap().record(micros, over, failed);
                drop(permit);
            });
            sent += 1;
        }
    }
    // Let the last calls finish.
    let _ = in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
}

fn spread(values: &[f64]) -> (f64, f64, f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let within = (max - mean).max(mean - min) / mean.max(f64::MIN_POSITIVE) * 100.0;
    (min, max, mean, within)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` builds benches and runs them with no arguments: do nothing.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    // SOAK_PLOT=soak.csv: the summary and plot of a finished soak, again (SOAK_RATE: its rate).
    if let Ok(csv) = std::env::var("SOAK_PLOT") {
        let text = std::fs::read_to_string(&csv).unwrap();
        let rows: Vec<Minute> = text.lines().skip(1).filter_map(Minute::from_csv).collect();
        let rate = std::env::var("SOAK_RATE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        summarize(&rows, rows.len());
        print!("{}", plot(&rows, rate));
        return;
    }
    let minutes: usize = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let sluice = std::env::var("SLUICE_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/sluice").into());
    let redis = std::env::var("SLUICE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let out = std::env::var("SOAK_OUT").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak"),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&out).unwrap();
    let pinning = Pinning::from_env();
    pinning.pin_self();

    let (_redis, redis_port) = start_redis(pinning.load, &redis);
    let rules_dir = tempfile::tempdir().unwrap();
    let rules_file = rules_dir.path().join("soak.yaml");
    // Until the rate is known, a limit no call reaches.
    std::fs::write(&rules_file, rules(0, 1_000_000)).unwrap();
    let (port, http_port) = (free_port(), free_port());
    let log = std::fs::File::create(out.join("sluice.log")).unwrap();
    // Default settings but the addresses and Redis: the sync interval, the sweep, the failure
    // policy and HTTP/2 limits are the ones a user gets.
    let mut command = Pinning::command(pinning.server, &sluice);
    command.args([
        "serve",
        "--config",
        rules_dir.path().to_str().unwrap(),
        "--grpc-addr",
        &format!("127.0.0.1:{port}"),
        "--http-addr",
        &format!("127.0.0.1:{http_port}"),
        "--log-level",
        "info",
    ]);
    // SOAK_REDIS=0: alone, no sync (to tell the sync's share of what the soak shows).
    if std::env::var("SOAK_REDIS").map_or(true, |v| v != "0") {
        command.args(["--redis-url", &format!("redis://127.0.0.1:{redis_port}")]);
    }
    // The server's log is kept, to count what it said.
    let mut server = start_writing(&mut command, port, log);
    server.http_port = http_port;
    let pid = server.child.id();

    let runtime = match pinning.load {
        Some(_) => tokio::runtime::Builder::new_current_thread(),
        None => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .unwrap();

    runtime.block_on(async {
        let saturated = saturation(&server, Duration::from_secs(10)).await;
        let rate = std::env::var("SOAK_RATE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(saturated / 2.0);
        // Each key is offered about 1.25 times its limit a minute, so every key crosses its
        // limit before its minute ends: denials are part of the soak, not only admissions.
        let per_key = rate * 60.0 / KEYS_PER_MINUTE as f64;
        let limit = ((per_key / 1.25).floor() as u64).max(1);
        std::fs::write(&rules_file, rules(0, limit)).unwrap();
        println!(
            "soak: {minutes} min at {rate:.0} calls/s (saturation {saturated:.0}/s, closed loop, 64 callers), \
             {KEYS_PER_MINUTE} new keys a minute ({per_key:.1} calls each), limit {limit} a key a minute, rules rewritten every minute, \
             Redis sync at the default interval; {}",
            match pinning.server {
                Some(cpu) => format!("server on core {cpu}, load and Redis on the other"),
                None => "unpinned".into(),
            }
        );
        show_header();
        let calls = Arc::new(Mutex::new(Calls::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pacer = tokio::spawn(pace(server.port, rate, calls.clone(), stop.clone()));
        let resident = Arc::new(Mutex::new(ResidentRange::default()));
        let sampler = tokio::spawn(sample_resident(pid, resident.clone(), stop.clone()));
        let mut rows: Vec<Minute> = Vec::new();
        let mut csv = format!("{}\n", csv_header());
        let started = Instant::now();
        let mut cpu_before = cpu_seconds(pid);
        let path_leases = "sluice_lease_request_path_calls_total";
        let mut leased_before = metric(&metrics_text(http_port).await, path_leases);
        for minute in 1..=minutes {
            tokio::time::sleep_until((started + Duration::from_secs(60 * minute as u64)).into())
                .await;
            let taken = std::mem::take(&mut *calls.lock().unwrap());
            let cpu = cpu_seconds(pid);
            let (redis_mib, redis_keys) = redis_figures(redis_port);
            let metrics = metrics_text(http_port).await;
            let latencies = taken.latencies.unwrap_or_else(latency_histogram);
            let rss_mib = resident_mib(pid);
            let range = std::mem::take(&mut *resident.lock().unwrap()).with(rss_mib);
            let row = Minute {
                minute,
                calls: latencies.len(),
                over_limit: taken.over_limit,
                failed: taken.failed,
                p50_ms: latencies.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: latencies.value_at_quantile(0.99) as f64 / 1000.0,
                max_ms: latencies.max() as f64 / 1000.0,
                rss_mib,
                fds: open_fds(pid),
                counters: metric(&metrics, "sluice_active_counters"),
                reloads: metric(&metrics, "sluice_config_reloads_total"),
                server_cpu: (cpu - cpu_before) / 60.0,
                redis_mib,
                redis_keys,
                path_leases: metric(&metrics, path_leases) - leased_before,
                rss_peak_mib: range.peak,
                rss_low_mib: range.low,
            };
            cpu_before = cpu;
            leased_before += row.path_leases;
            row.show();
            csv.push_str(&row.csv());
            csv.push('\n');
            std::fs::write(out.join("soak.csv"), &csv).unwrap();
            rows.push(row);
            // The next minute's rules: a hot reload while the calls go on (SOAK_RELOADS=0: none).
            if std::env::var("SOAK_RELOADS").map_or(true, |v| v != "0") {
                std::fs::write(&rules_file, rules(minute, limit)).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        pacer.await.unwrap();
        sampler.await.unwrap();
        summarize(&rows, minutes);
        std::fs::write(out.join("soak.svg"), plot(&rows, rate)).unwrap();
        println!("wrote {}", out.join("soak.svg").display());
    });
    drop(server);
    let log = std::fs::read_to_string(out.join("sluice.log")).unwrap_or_default();
    let said = |level: &str| log.lines().filter(|l| l.contains(level)).count();
    println!(
        "server log: {} lines, {} WARN, {} ERROR ({})",
        log.lines().count(),
        said("WARN"),
        said("ERROR"),
        out.join("sluice.log").display()
    );
}

fn summarize(rows: &[Minute], minutes: usize) {
    let settled: Vec<&Minute> = rows.iter().filter(|r| r.minute > WARM_UP_MINUTES).collect();
    if settled.is_empty() {
        println!("(no minutes past the {WARM_UP_MINUTES}-minute warm-up: no spread to report)");
        return;
    }
    let of = |f: fn(&Minute) -> f64| settled.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let mut report = String::new();
    for (name, values) in [
        ("resident memory, peak", of(|r| r.rss_peak_mib)),
        ("resident memory, low", of(|r| r.rss_low_mib)),
        ("resident at minute end", of(|r| r.rss_mib)),
        ("open fds", of(|r| r.fds as f64)),
        ("active counters", of(|r| r.counters)),
        ("Redis memory, MiB", of(|r| r.redis_mib)),
        ("Redis keys", of(|r| r.redis_keys as f64)),
        ("p99, ms", of(|r| r.p99_ms)),
        ("server CPU share", of(|r| r.server_cpu)),
    ] {
        let (min, max, mean, within) = spread(&values);
        let _ = writeln!(
            report,
            "{name:<22} min {min:>10.2}  max {max:>10.2}  mean {mean:>10.2}  within ±{within:.1} % of the mean"
        );
    }
    let calls: u64 = rows.iter().map(|r| r.calls).sum();
    let failed: u64 = rows.iter().map(|r| r.failed).sum();
    let denied: u64 = rows.iter().map(|r| r.over_limit).sum();
    let reloads = rows.last().map_or(0.0, |r| r.reloads);
    let leased: f64 = rows.iter().map(|r| r.path_leases).sum();
    println!(
        "calls that leased on the request path (a Redis round trip in the call): {leased:.0}, {:.1} % of all",
        leased / calls.max(1) as f64 * 100.0
    );
    println!(
        "\nafter the {WARM_UP_MINUTES}-minute warm-up (minutes {}-{minutes}):\n{report}\
         calls {calls}, denied {denied}, failed {failed}; {reloads} reloads of the {minutes} rule \
         rewrites before the last reading (the limit set once the rate was known, then one a minute)",
        WARM_UP_MINUTES + 1,
    );
}

/// Four panels over the soak's minutes: resident memory (each minute's peak, and its low in
/// grey), open fds, active counters (thousands) and p99 (ms), each from 0, the warm-up shaded.
fn plot(rows: &[Minute], rate: f64) -> String {
    let of = |f: fn(&Minute) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let panels: [(&str, Vec<Vec<f64>>); 4] = [
        (
            "resident memory (MiB): each minute's peak, and its low (grey)",
            vec![of(|r| r.rss_peak_mib), of(|r| r.rss_low_mib)],
        ),
        ("open file descriptors", vec![of(|r| r.fds as f64)]),
        (
            "active counters (thousands)",
            vec![of(|r| r.counters / 1000.0)],
        ),
        ("p99 latency (ms)", vec![of(|r| r.p99_ms)]),
    ];
    let (w, panel_h, left, right, top) = (760.0, 130.0, 64.0, 20.0, 34.0);
    let h = top + panel_h * panels.len() as f64 + 30.0;
    let n = rows.len().max(1) as f64;
    let x = |minute: f64| left + (minute / n) * (w - left - right);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="16">sluice soak: {} minutes at {rate:.0} calls/s, 100k new keys a minute, a reload a minute, Redis sync on</text>"#,
        rows.len()
    );
    for (p, (title, lines)) in panels.iter().enumerate() {
        let y_top = top + p as f64 * panel_h;
        let (y0, y1) = (y_top + panel_h - 24.0, y_top + 14.0);
        let max = lines
            .iter()
            .flatten()
            .copied()
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE)
            * 1.15;
        let y = |v: f64| y0 - (v / max) * (y0 - y1);
        let (x0, x1) = (x(0.0), x(n));
        let warm = x(WARM_UP_MINUTES.min(rows.len()) as f64);
        let _ = writeln!(
            out,
            r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="#f2f2f2"/><path d="M{x0} {y1} V{y0} H{x1}" stroke="#333" fill="none"/><text x="{}" y="{}">{title}</text>"##,
            warm - x0,
            y0 - y1,
            x0 + 6.0,
            y1 + 2.0
        );
        for tick in [0.0, max / 2.3, max / 1.15] {
            let (yt, label) = (
                y(tick),
                if tick >= 100.0 {
                    format!("{tick:.0}")
                } else {
                    format!("{tick:.1}")
                },
            );
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{}" text-anchor="end">{label}</text><line x1="{}" y1="{yt}" x2="{x0}" y2="{yt}" stroke="#333"/>"##,
                x0 - 6.0,
                yt + 4.0,
                x0 - 3.0
            );
        }
        for (values, colour) in lines.iter().zip(["#1f77b4", "#999999"]) {
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, &v)| format!("{:.1},{:.1}", x((i + 1) as f64), y(v)))
                .collect();
            let _ = writeln!(
                out,
                r##"<polyline points="{}" stroke="{colour}" stroke-width="2" fill="none"/>"##,
                points.join(" ")
            );
        }
    }
    let last_y = top + panel_h * panels.len() as f64 - 24.0;
    for minute in (0..=rows.len()).step_by(5) {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{minute}</text>"#,
            x(minute as f64),
            last_y + 16.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">minutes (warm-up shaded)</text>"#,
        (x(0.0) + x(n)) / 2.0,
        last_y + 34.0
    );
    out.push_str("</svg>\n");
    out
}
