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
use rcgen::ExtendedKeyUsagePurpose;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// The tests of this file take turns: each measures how replicas keep a limit between sync
/// rounds, and replicas of another test on the same two cores delay those rounds.
static TURNS: Mutex<()> = Mutex::const_new(());

/// A counter's key in Redis, as sluice names it: the descriptor path hashed (SHA-256, its
/// first 128 bits in hex), so Redis holds no caller's value in clear.
fn redis_key(namespace: &str, domain: &str, path: &str, unit: &str, window_start: u64) -> String {
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(path.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{namespace}:ratelimit:{domain}:{{{hash}}}:{unit}:{window_start}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What a load run saw, per one-second window (the window each answer was decided in, from
/// its `duration_until_reset` and the times the call was sent and answered: exact while the
/// round trip is under a second).
#[derive(Default, Debug)]
struct Tally {
    admitted: BTreeMap<u64, u64>,
    /// Per window, how far into it (ms, from `duration_until_reset`) each admitted call was
    /// decided.
    admitted_at: BTreeMap<u64, Vec<u64>>,
    /// (replica, window) -> admitted by that replica.
    by_replica: BTreeMap<(usize, u64), u64>,
    calls: u64,
    failures: u64,
    /// When each failed call was sent (ms since the epoch).
    failed_sent: Vec<u64>,
    /// Answers whose round trip spanned two window ends: their window cannot be told.
    untold: u64,
    /// Each admitted call's (sent, answered) times, ms since the epoch: it was decided
    /// between the two.
    admitted_spans: Vec<(u64, u64)>,
    /// Each refused call: its replica, when it was sent (ms since the epoch), its round trip
    /// and the reset it was answered (ms): what a failing assertion prints.
    refused: Vec<(usize, u64, u64, u64)>,
    slowest_ms: u64,
}

impl Tally {
    /// Windows that lie wholly inside `[from_ms, to_ms)`. Refuses to count when an answer's
    /// window could not be told: a machine that slow says nothing of the fleet's accuracy.
    fn full_windows(&self, from_ms: u64, to_ms: u64) -> Vec<(u64, u64)> {
        assert_eq!(
            self.untold, 0,
            "{} answers took so long ({} ms the slowest) that their window cannot be told: the \
             machine is too loaded to measure the fleet",
            self.untold, self.slowest_ms
        );
        self.admitted
            .iter()
            .filter(|(w, _)| **w * 1000 >= from_ms && (**w + 1) * 1000 <= to_ms)
            .map(|(w, n)| (*w, *n))
            .collect()
    }
}

/// How calls are spread over the replicas.
#[derive(Debug, Clone, Copy)]
enum Spread {
    /// In turn.
    Even,
    /// 80 % to the first replica, the rest in turn over the others.
    Skewed,
}

impl Spread {
    fn pick(self, n: usize, replicas: usize) -> usize {
        match self {
            Spread::Even => n % replicas,
            Spread::Skewed if replicas == 1 || n % 10 < 8 => 0,
            Spread::Skewed => 1 + (n / 10) % (replicas - 1),
        }
    }
}

/// When the calls of a load go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrivals {
    /// Each at its own time, evenly spaced: a paced load, as the issues' scenarios send.
    Paced,
    /// In bursts every 10 ms (2 to 6 calls at once at these rates): a replica meets several
    /// calls at the same moment, as it does behind Envoy's workers and clients that fan out.
    Bursts,
}

/// Sends `rate` calls a second for `duration`, in bursts every 10 ms, spread over `clients` as
/// `spread` says. Bounded in time and count; every call is bounded by the client's timeout.
async fn drive(
    clients: &[RateLimitServiceClient<Channel>],
    request: &RateLimitRequest,
    rate: u64,
    duration: Duration,
    spread: Spread,
    tally: Arc<Mutex<Tally>>,
) {
    let load = (rate, duration, spread, Arrivals::Bursts);
    drive_arriving(clients, request, load, tally).await;
}

/// [`drive`], the calls going out as `arrivals` says.
async fn drive_arriving(
    clients: &[RateLimitServiceClient<Channel>],
    request: &RateLimitRequest,
    (rate, duration, spread, arrivals): (u64, Duration, Spread, Arrivals),
    tally: Arc<Mutex<Tally>>,
) {
    const TICK: Duration = Duration::from_millis(10);
    let started = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut n = 0usize;
    while started.elapsed() < duration {
        let at = match arrivals {
            Arrivals::Paced => Duration::from_nanos(n as u64 * 1_000_000_000 / rate.max(1)),
            // The calls of the tick their paced time falls in, all at its start.
            Arrivals::Bursts => {
                let paced = n as u64 * 1_000_000_000 / rate.max(1);
                Duration::from_nanos(paced - paced % TICK.as_nanos() as u64)
            }
        };
        tokio::time::sleep_until(started + at).await;
        let replica = spread.pick(n, clients.len());
        n += 1;
        let mut client = clients[replica].clone();
        let request = request.clone();
        let tally = tally.clone();
        calls.spawn(async move {
            let sent = now_ms();
            let answer =
                tokio::time::timeout(Duration::from_secs(5), client.should_rate_limit(request))
                    .await;
            let answered = now_ms();
            let mut tally = tally.lock().await;
            tally.calls += 1;
            match answer {
                Ok(Ok(response)) => {
                    let response = response.into_inner();
                    let reset = response.statuses[0]
                        .duration_until_reset
                        .as_ref()
                        .map_or(0, |d| d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000);
                    // Decided at t in [sent, answered], with t + reset at the window's
                    // end (to the ms): the one window end in [sent, answered] + reset.
                    // Two there (a round trip of a second or more) and it cannot be told.
                    let window = (sent + reset).div_ceil(1000) - 1;
                    if (window + 2) * 1000 <= answered + reset {
                        tally.untold += 1;
                    }
                    tally.slowest_ms = tally.slowest_ms.max(answered - sent);
                    if is_ok(&response) {
                        tally.admitted_spans.push((sent, answered));
                        *tally.admitted.entry(window).or_default() += 1;
                        let into = 1000u64.saturating_sub(reset);
                        tally.admitted_at.entry(window).or_default().push(into);
                        *tally.by_replica.entry((replica, window)).or_default() += 1;
                    } else {
                        tally.admitted.entry(window).or_default();
                        tally.refused.push((replica, sent, answered - sent, reset));
                    }
                }
                _ => {
                    tally.failures += 1;
                    tally.failed_sent.push(sent);
                }
            }
        });
    }
    while calls.join_next().await.is_some() {}
}

fn per_second_rules(limit: u32) -> String {
    format!(
        "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      requests_per_unit: {limit}\n  - key: tally\n    rate_limit:\n      unit: hour\n      requests_per_unit: 1000000\n"
    )
}

/// Replica processes started by a test: stopped by their pids at the end.
struct Replicas {
    children: Vec<tokio::process::Child>,
    clients: Vec<RateLimitServiceClient<Channel>>,
    /// Each one's HTTP address (metrics, admin API).
    http: Vec<String>,
}

async fn replicas(
    n: usize,
    redis: &RedisServer,
    namespace: &str,
    config: &std::path::Path,
    extra: &[&str],
) -> Replicas {
    let mut fleet = Replicas {
        children: Vec::new(),
        clients: Vec::new(),
        http: Vec::new(),
    };
    for _ in 0..n {
        let (child, client, http) = replica(redis, namespace, config, extra).await;
        fleet.children.push(child);
        fleet.clients.push(client);
        fleet.http.push(http);
    }
    fleet
}

async fn replica(
    redis: &RedisServer,
    namespace: &str,
    config: &std::path::Path,
    extra: &[&str],
) -> (
    tokio::process::Child,
    RateLimitServiceClient<Channel>,
    String,
) {
    let url = redis.url();
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--redis-url",
        &url,
        "--redis-namespace",
        namespace,
    ];
    args.extend_from_slice(extra);
    spawn_sluice_with_http(&args, &[]).await
}

/// The sum of an unlabelled counter over the replicas' scrapes.
async fn summed(http: &[String], name: &str) -> u64 {
    let mut total = 0.0;
    for addr in http {
        let samples = common::metrics::scrape_at(&format!("http://{addr}")).await;
        total += common::metrics::sample(&samples, name, &[]);
    }
    total as u64
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

/// The fleet's guarantee: never more than the limit in a window, and when offered more, no
/// less than 98 % of it.
fn assert_exact(windows: &[(u64, u64)], limit: u32, what: &str) {
    assert!(
        windows.len() >= 4,
        "{what}: only {} full windows",
        windows.len()
    );
    for (w, admitted) in windows {
        let ratio = *admitted as f64 / f64::from(limit);
        assert!(
            (0.98..=1.0).contains(&ratio),
            "{what}: window {w} admitted {admitted} of {limit} ({ratio:.3})"
        );
    }
}

/// A sliding window's guarantee, checked at every admitted call: what the fleet admitted in
/// its one-second window so far, plus the previous window's count weighed by the share of that
/// window still within the last second, is within the limit (`count × 1000 + previous ×
/// (1000 − ms into the window) ≤ limit × 1000`, exact in integers, as the server decides).
/// Calls decided in the same millisecond all count as before each other.
fn assert_sliding(tally: &Tally, limit: u32, what: &str) {
    for (w, at) in &tally.admitted_at {
        let previous = tally.admitted.get(&(w - 1)).copied().unwrap_or(0);
        let mut at = at.clone();
        at.sort_unstable();
        for &e in &at {
            let so_far = at.iter().filter(|&&x| x <= e).count() as u64;
            assert!(
                so_far * 1000 + previous * (1000 - e) <= u64::from(limit) * 1000,
                "{what}: window {w}, {e} ms in: {so_far} admitted and {previous} the window before \
                 (estimate {:.1} of {limit})",
                so_far as f64 + previous as f64 * (1000 - e) as f64 / 1000.0
            );
        }
    }
}

/// What one exact sliding window of `limit` a second admits per window of the calls sent at
/// `sent` (ms since the epoch), each decided as it comes: admitted while the count in its
/// window so far plus the previous window's, weighed by the share of it still within the last
/// second, stays within the limit (in integers, as the server decides). The yardstick for a
/// fleet's sliding window: at these arrivals the algorithm itself admits under the limit.
fn one_exact_sliding_window(mut sent: Vec<u64>, limit: u32) -> BTreeMap<u64, u64> {
    sent.sort_unstable();
    let mut admitted = BTreeMap::<u64, u64>::new();
    for t in sent {
        let (w, e) = (t / 1000, t % 1000);
        let previous = admitted.get(&(w - 1)).copied().unwrap_or(0);
        let so_far = admitted.get(&w).copied().unwrap_or(0);
        if (so_far + 1) * 1000 + previous * (1000 - e) <= u64::from(limit) * 1000 {
            *admitted.entry(w).or_default() += 1;
        }
    }
    admitted
}

/// `n` replicas at the default settings (sync every second) in a namespace of their own,
/// offered `offered` times the limit for 6 s as `spread` says: no call fails, and every full
/// window admits between 98 % of the limit and the limit.
async fn accuracy_phase(
    n: usize,
    redis: &RedisServer,
    config: &std::path::Path,
    limit: u32,
    load: (f64, Spread, Arrivals),
    what: &str,
) {
    let (tally, (from, to)) = offer_arriving(n, redis, config, limit, load, what).await;
    let windows = tally.full_windows(from, to);
    println!("{what}: admitted per full window {windows:?}");
    assert_exact(&windows, limit, what);
}

/// [`accuracy_phase`]'s run: no call fails and every replica with traffic gets some; the
/// full windows and the tally go back to the caller for the limit's own checks.
async fn offer(
    n: usize,
    redis: &RedisServer,
    config: &std::path::Path,
    limit: u32,
    (offered, spread): (f64, Spread),
    what: &str,
) -> (Vec<(u64, u64)>, Tally) {
    let (tally, (from, to)) = offer_for(n, redis, config, limit, (offered, spread), what).await;
    (tally.full_windows(from, to), tally)
}

/// [`offer`] without windows (a token bucket has none): the tally, and when the load began
/// and ended (ms since the epoch).
async fn offer_for(
    n: usize,
    redis: &RedisServer,
    config: &std::path::Path,
    limit: u32,
    (offered, spread): (f64, Spread),
    what: &str,
) -> (Tally, (u64, u64)) {
    let load = (offered, spread, Arrivals::Bursts);
    offer_arriving(n, redis, config, limit, load, what).await
}

/// [`offer_for`], the calls going out as `arrivals` says.
async fn offer_arriving(
    n: usize,
    redis: &RedisServer,
    config: &std::path::Path,
    limit: u32,
    (offered, spread, arrivals): (f64, Spread, Arrivals),
    what: &str,
) -> (Tally, (u64, u64)) {
    let namespace = unique_namespace(&what.replace([' ', ','], "-"));
    let fleet = replicas(n, redis, &namespace, config, &[]).await;
    let clients = &fleet.clients;
    let call = request("fleet", &[&[("k", "shared-key")]]);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (from, started) = (now_ms(), Instant::now());
    let rate = (f64::from(limit) * offered) as u64;
    let load = (rate, Duration::from_secs(6), spread, arrivals);
    drive_arriving(clients, &call, load, tally.clone()).await;
    let to = now_ms();
    let tally = std::mem::take(&mut *tally.lock().await);
    let served: Vec<u64> = (0..n)
        .map(|r| {
            tally
                .by_replica
                .iter()
                .filter(|((replica, _), _)| *replica == r)
                .map(|(_, admitted)| admitted)
                .sum()
        })
        .collect();
    let requests = summed(&fleet.http, "sluice_lease_request_path_calls_total").await;
    let mut by_second = BTreeMap::<u64, u64>::new();
    for (sent, _) in &tally.admitted_spans {
        *by_second.entry(sent / 1000).or_default() += 1;
    }
    println!(
        "{what}: {} calls in {:?}, {} failed; admitted per second sent (limit {limit}): {:?}; \
         admitted per replica {served:?}; request-path lease calls {requests} ({:.2} % of \
         calls); slowest answer {} ms",
        tally.calls,
        started.elapsed(),
        tally.failures,
        by_second.values().collect::<Vec<_>>(),
        100.0 * requests as f64 / tally.calls.max(1) as f64,
        tally.slowest_ms,
    );
    assert_eq!(tally.failures, 0);
    // Every replica with traffic got some.
    assert!(served.iter().all(|&s| s > 0), "{what}: {served:?}");
    stop_all(fleet.children).await;
    (tally, (from, to))
}

/// [5/8] over [4/8]'s leases: a sliding window kept fleet-wide at the default settings holds
/// its estimate within the limit at every admitted call, offered 3x evenly over 3 and over 10
/// replicas, and 1.5x with 80 % on one replica. Offered more, a sliding window's estimate
/// reaches the limit by each window's end, so a full window admits nearly the limit. Budget
/// opens until the window's end: a refused call asks the store once the view of a spent
/// fleet is a 64th of the window old per replica, and at every refusal in the window's last
/// moments (`limiter::opened_since_asked`), and a grant leaves a replica no more than a 64th
/// of the limit unused. Full windows admitted 196 to 199 of 200 (3 replicas evenly and 10
/// replicas) and 195 to 199 (skewed) in four runs; before those two steps 196 to 200, 196 to
/// 199 and 174 to 199 (no call was refused in the last moments there, each replica still
/// holding lease, and views of a spent fleet were trusted up to 400 ms). At these arrivals the
/// algorithm itself admits under the limit, so each full window is set beside what one exact
/// sliding window admits of the same calls ([`one_exact_sliding_window`]): measured 197-199
/// of 197-198 evenly, 194-198 of 198-199 skewed (0.9798 at least: short of 98 % by a fraction
/// of a unit), 195-199 of 198-199 over 10 replicas; three later runs 198-199, 192-198 (0.965)
/// and 197-198 of 199, the skewed loss being budget opened after the busy replica's last call
/// (the store's leases equalled what was admitted). The floor asserted, 96 % of it (CI read
/// 193 of 200 once, skewed, under its load), catches a fleet that strands or starves (the old
/// trust's 184 would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sliding_window_holds_fleet_wide_at_the_default_settings() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: second, requests_per_unit: {LIMIT}, algorithm: sliding_window }}\n"
    );
    write_rules(dir.path(), &[("fleet.yaml", &rules)]);
    for (n, offered, spread, what) in [
        (3, 3.0, Spread::Even, "sliding, 3 replicas, 3x"),
        (
            3,
            1.5,
            Spread::Skewed,
            "sliding, 3 replicas, 1.5x, 80 % on one",
        ),
        (10, 3.0, Spread::Even, "sliding, 10 replicas, 3x"),
    ] {
        let (windows, tally) = offer(n, &redis, dir.path(), LIMIT, (offered, spread), what).await;
        assert_sliding(&tally, LIMIT, what);
        assert!(
            windows.len() >= 4,
            "{what}: only {} full windows",
            windows.len()
        );
        let sent = (tally.admitted_spans.iter().map(|&(sent, _)| sent))
            .chain(tally.refused.iter().map(|&(_, sent, _, _)| sent))
            .collect();
        let exact = one_exact_sliding_window(sent, LIMIT);
        let shares: Vec<String> = windows
            .iter()
            .map(|(w, admitted)| format!("{admitted}/{}", exact.get(w).copied().unwrap_or(0)))
            .collect();
        println!("{what}: full windows, admitted / one exact sliding window's: {shares:?}");
        for (w, admitted) in &windows {
            let exact = exact.get(w).copied().unwrap_or(0);
            assert!(
                *admitted <= u64::from(LIMIT) && *admitted * 100 >= exact * 96,
                "{what}: window {w} admitted {admitted} of {LIMIT}, one exact sliding window \
                 {exact}"
            );
        }
    }
}

/// A token bucket's guarantee kept in leases: over any span of `t` ms, the fleet admits no
/// more than `burst + rate × (t + 1 s)` (a lease is spent within the second it was granted in,
/// or lost). Checked over every span from one admitted call's sending to another's answer:
/// each call was decided between the two, so the span holds every call sent and answered
/// within it.
fn assert_bucket(spans: &[(u64, u64)], burst: u64, rate_per_s: u64, what: &str) {
    let mut spans = spans.to_vec();
    spans.sort_unstable();
    for (i, &(from, _)) in spans.iter().enumerate() {
        let mut ends: Vec<u64> = spans[i..].iter().map(|&(_, answered)| answered).collect();
        ends.sort_unstable();
        for (k, &to) in ends.iter().enumerate() {
            let admitted = k as u64 + 1;
            let bound_x1000 = burst * 1000 + rate_per_s * (to - from + 1000);
            assert!(
                admitted * 1000 <= bound_x1000,
                "{what}: {admitted} admitted within {} ms (bound {:.1})",
                to - from,
                bound_x1000 as f64 / 1000.0
            );
        }
    }
}

/// What one exact bucket of `burst` refilling at [`LIMIT`] a second, full at the start and
/// offered more than it refills, admits over `span_ms` (its burst and its rate over the span),
/// and `admitted` as a share of it.
fn against_one_bucket(admitted: u64, burst: u64, span_ms: u64) -> (u64, f64) {
    let exact = burst + u64::from(LIMIT) * span_ms / 1000;
    (exact, admitted as f64 / exact as f64)
}

/// [5/8] over [4/8]'s leases: a token bucket kept fleet-wide at the default settings (sync
/// every second) never admits more than its bound over any span, offered 1.5x evenly and 3x
/// with 80 % on one of 3 replicas, and 3x over 10 (and half its rate, when it refuses
/// nothing), and admits most of
/// what one exact bucket would: its burst and its rate over the run. Measured 0.988 to 1.000
/// of it, but for one 3x skewed run in 17 at 0.968: the floor asserted, 0.95, catches a fleet
/// that strands or starves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_bucket_holds_fleet_wide_at_the_default_settings() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const BURST: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: second, requests_per_unit: {LIMIT}, algorithm: token_bucket, burst: {BURST} }}\n"
    );
    write_rules(dir.path(), &[("fleet.yaml", &rules)]);
    for (n, offered, spread, what) in [
        (3, 0.5, Spread::Even, "bucket, 3 replicas, 0.5x"),
        (3, 1.5, Spread::Even, "bucket, 3 replicas, 1.5x"),
        (
            3,
            3.0,
            Spread::Skewed,
            "bucket, 3 replicas, 3x, 80 % on one",
        ),
        (10, 3.0, Spread::Even, "bucket, 10 replicas, 3x"),
    ] {
        let (tally, (from, to)) =
            offer_for(n, &redis, dir.path(), LIMIT, (offered, spread), what).await;
        assert_bucket(&tally.admitted_spans, BURST, LIMIT.into(), what);
        let admitted = tally.admitted_spans.len() as u64;
        if offered < 1.0 {
            // Offered half its rate, the bucket never runs dry: all pass.
            assert_eq!(
                admitted, tally.calls,
                "{what}: refused (replica, sent ms, round trip ms, reset ms): {:?}",
                tally.refused
            );
            continue;
        }
        let (exact, ratio) = against_one_bucket(admitted, BURST, to - from);
        println!("{what}: admitted {admitted}, one exact bucket {exact}: {ratio:.3}");
        assert!(
            ratio >= 0.95,
            "{what}: admitted {admitted} of {exact} ({ratio:.3})"
        );
    }
}

/// [4/8] at the defaults: a limit of 200 a second over three replicas (3x evenly, 1.5x with
/// 80 % on one, paced and in bursts) and on a replica alone; no call fails and every full
/// window admits 98 % to 100 % of the limit. The share of calls that waited on the store is
/// printed, not asserted (it follows the machine's speed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_admits_the_limit_exactly_at_the_default_settings() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("fleet.yaml", &per_second_rules(LIMIT))]);
    let config = dir.path();
    let paced = |offered, spread| (offered, spread, Arrivals::Paced);
    let (even, skewed) = (Spread::Even, Spread::Skewed);
    accuracy_phase(3, &redis, config, LIMIT, paced(3.0, even), "3 replicas, 3x").await;
    let what = "3 replicas, 1.5x, 80 % on one";
    accuracy_phase(3, &redis, config, LIMIT, paced(1.5, skewed), what).await;
    accuracy_phase(1, &redis, config, LIMIT, paced(2.0, even), "lone replica").await;
    // The skewed load again, in bursts: the busy replica meets two to four calls at once, more
    // than the 3 units (a 64th of 200) it may hold unused, so some wait on the store.
    let what = "3 replicas, 1.5x, 80 % on one, in 10 ms bursts";
    let bursts = (1.5, skewed, Arrivals::Bursts);
    accuracy_phase(3, &redis, config, LIMIT, bursts, what).await;
}

/// What a churn run saw: every call's tally merged, when it ran, and when the replicas were
/// killed, stopped and joined (ms since the epoch).
struct Churn {
    all: Tally,
    from: u64,
    to: u64,
    killed_at: u64,
    stopped_at: u64,
    joined_at: u64,
    /// Request-path leases that failed on the live replicas: each switched that replica to the
    /// failure policy, which does not keep the fleet's limit (the README's accuracy model holds
    /// with Redis answering).
    lease_failures: u64,
    /// Calls to the killed replica sent before the kill that got no answer: each may have been
    /// admitted there, its answer lost with the process (the client cannot tell).
    unanswered_at_kill: u64,
}

/// Four replicas on `rules` (domain `fleet`, key `k`, a limit of [`LIMIT`] a second): replicas
/// 0 and 1 take 2x the limit throughout; replica 2 is stopped (TERM) and replica 3 killed
/// (KILL) mid-run; a new one joins. No call to a live replica fails. Every replica is stopped
/// by its pid at the end.
async fn churn(redis: &RedisServer, rules: &str, prefix: &str) -> Churn {
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("fleet.yaml", rules)]);
    let namespace = unique_namespace(prefix);
    let mut fleet = replicas(4, redis, &namespace, dir.path(), &[]).await;
    let call = request("fleet", &[&[("k", "shared-key")]]);
    let steady = Arc::new(Mutex::new(Tally::default()));
    let [a, b, c] = [(); 3].map(|()| Arc::new(Mutex::new(Tally::default())));
    let from = now_ms();
    let load = |clients: Vec<RateLimitServiceClient<Channel>>, rate, millis, tally| {
        let call = call.clone();
        tokio::spawn(async move {
            let run = Duration::from_millis(millis);
            drive(&clients, &call, rate, run, Spread::Even, tally).await
        })
    };
    let rate = u64::from(LIMIT) / 2;
    let both = load(fleet.clients[..2].to_vec(), 4 * rate, 9_000, steady.clone());
    let to_kill = load(vec![fleet.clients[3].clone()], rate, 3_000, a.clone());
    let to_stop = load(vec![fleet.clients[2].clone()], rate, 4_500, b.clone());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let killed_at = now_ms();
    fleet.children[3].start_kill().unwrap();
    to_kill.await.unwrap();
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(1_500)).await;
    let stopped_at = now_ms();
    signal(&fleet.children[2], "TERM");
    to_stop.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (joined, client, joined_http) = replica(redis, &namespace, dir.path(), &[]).await;
    let joined_at = now_ms();
    // Its calls end with the others': a replica whose calls stop mid-window keeps its lease
    // until its next sync (see the README's accuracy model).
    let left = 9_000u64.saturating_sub(joined_at - from);
    let joining = load(vec![client], rate, left, c.clone());
    both.await.unwrap();
    joining.await.unwrap();
    let to = now_ms();
    let mut all = Tally::default();
    for tally in [&steady, &a, &b, &c] {
        let tally = tally.lock().await;
        for (w, n) in &tally.admitted {
            *all.admitted.entry(*w).or_default() += n;
        }
        all.admitted_spans.extend_from_slice(&tally.admitted_spans);
        for (w, at) in &tally.admitted_at {
            all.admitted_at.entry(*w).or_default().extend_from_slice(at);
        }
        all.untold += tally.untold;
        all.slowest_ms = all.slowest_ms.max(tally.slowest_ms);
    }
    let unanswered_at_kill = a
        .lock()
        .await
        .failed_sent
        .iter()
        .filter(|&&sent| sent < killed_at)
        .count() as u64;
    let live = [fleet.http[0].clone(), fleet.http[1].clone(), joined_http];
    let lease_failures = summed(&live, "sluice_lease_request_path_failures_total").await;
    assert_eq!(
        steady.lock().await.failures,
        0,
        "no call to a live replica failed"
    );
    assert_eq!(
        c.lock().await.failures,
        0,
        "the new replica served every call"
    );
    let mut children = fleet.children;
    let _ = children[3].wait().await;
    let mut stopped = children.remove(2);
    let status = tokio::time::timeout(Duration::from_secs(15), stopped.wait())
        .await
        .expect("stops")
        .unwrap();
    assert!(status.success(), "{status:?}");
    children.truncate(2);
    children.push(joined);
    stop_all(children).await;
    Churn {
        all,
        from,
        to,
        killed_at,
        stopped_at,
        joined_at,
        lease_failures,
        unanswered_at_kill,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_joining_leaving_and_killed_mid_window_keep_the_limit() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let run = churn(&redis, &per_second_rules(LIMIT), "churn").await;
    let windows = run.all.full_windows(run.from, run.to);
    let window_of = |ms: u64| ms / 1000;
    println!(
        "churn: killed in window {}, stopped in {}, joined in {}; admitted per window (limit {LIMIT}): {windows:?}; calls in flight to the killed replica, unanswered: {}; request-path lease failures {}",
        window_of(run.killed_at),
        window_of(run.stopped_at),
        window_of(run.joined_at),
        run.unanswered_at_kill,
        run.lease_failures
    );
    assert!(windows.len() >= 6, "{windows:?}");
    for (w, admitted) in &windows {
        assert!(*admitted <= u64::from(LIMIT), "window {w}: {admitted}");
        // The window of the kill too: what the killed replica held unused is lost with it,
        // and a replica in a fleet holds no more than a 64th of the limit unused. A call it
        // admitted whose answer died with it was admitted all the same (Envoy, seeing the
        // error, lets it through unless told to fail closed), but the client counts only
        // answers: there the calls in flight at the kill are counted as the admissions they
        // may have been.
        let unseen = if *w == window_of(run.killed_at) {
            run.unanswered_at_kill
        } else {
            0
        };
        assert!(
            admitted + unseen >= u64::from(LIMIT) * 98 / 100,
            "window {w}: {admitted} of {LIMIT} answered, {unseen} in flight at the kill"
        );
    }
}

/// [5/8] over [4/8]'s churn: a sliding window kept fleet-wide through a replica killed, one
/// stopped and one joining mid-run holds its estimate within the limit at every admitted call,
/// and every full window admits at least 95 % of the limit (198 in every window of two runs;
/// 197 to 199 before a spent view was trusted no longer than a 64th of the window per
/// replica, 182 to 197 before a refused call asked the store in a window's last moments).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sliding_window_holds_through_replicas_joining_leaving_and_killed() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rules = format!(
        "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: second, requests_per_unit: {LIMIT}, algorithm: sliding_window }}\n"
    );
    let run = churn(&redis, &rules, "sliding-churn").await;
    let what = "sliding churn";
    assert_sliding(&run.all, LIMIT, what);
    let windows = run.all.full_windows(run.from, run.to);
    println!(
        "{what}: killed at {} ms, stopped at {} ms, joined at {} ms; admitted per window (limit {LIMIT}): {windows:?}; request-path lease failures {}",
        run.killed_at - run.from,
        run.stopped_at - run.from,
        run.joined_at - run.from,
        run.lease_failures
    );
    assert!(windows.len() >= 6, "{windows:?}");
    for (w, admitted) in &windows {
        let ratio = *admitted as f64 / f64::from(LIMIT);
        assert!(
            (0.95..=1.0).contains(&ratio),
            "{what}: window {w} admitted {admitted} of {LIMIT} ({ratio:.3})"
        );
    }
}

/// [5/8] over [4/8]'s churn: a token bucket kept fleet-wide through a replica killed, one
/// stopped and one joining mid-run never admits more than its bound over any span, and admits
/// most of what one exact bucket would (what a killed replica held unused in its second is
/// lost with it; the floor is the accuracy test's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_bucket_keeps_its_bound_through_replicas_joining_leaving_and_killed() {
    const BURST: u64 = 100;
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rules = format!(
        "domain: fleet\ndescriptors:\n  - key: k\n    rate_limit: {{ unit: second, requests_per_unit: {LIMIT}, algorithm: token_bucket, burst: {BURST} }}\n"
    );
    let run = churn(&redis, &rules, "bucket-churn").await;
    let what = "bucket churn";
    assert_bucket(&run.all.admitted_spans, BURST, LIMIT.into(), what);
    let admitted = run.all.admitted_spans.len() as u64;
    let (exact, ratio) = against_one_bucket(admitted, BURST, run.to - run.from);
    println!(
        "{what}: killed at {} ms, stopped at {} ms, joined at {} ms; admitted {admitted}, one exact bucket {exact}: {ratio:.3}; request-path lease failures {}",
        run.killed_at - run.from,
        run.stopped_at - run.from,
        run.joined_at - run.from,
        run.lease_failures
    );
    assert!(
        ratio >= 0.95,
        "{what}: admitted {admitted} of {exact} ({ratio:.3})"
    );
}

/// The next window is leased in the last round of this one, when a window is ten sync
/// intervals or longer: per-second windows with a sync every 50 ms stand for per-minute
/// windows at the default second (the same ratio), so the test needs no minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_window_is_leased_before_it_begins() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("fleet.yaml", &per_second_rules(LIMIT))]);
    let namespace = unique_namespace("ahead");
    let fleet = replicas(
        2,
        &redis,
        &namespace,
        dir.path(),
        &["--sync-interval", "50ms"],
    )
    .await;
    let call = request("fleet", &[&[("k", "busy-key")]]);
    let tally = Arc::new(Mutex::new(Tally::default()));
    // Half the limit, evenly: every call fits, so no lease runs out at the budget's end.
    let (from, run) = (now_ms(), Duration::from_secs(8));
    let offered = u64::from(LIMIT) / 2;
    let load = {
        let (clients, call, tally) = (fleet.clients.clone(), call.clone(), tally.clone());
        tokio::spawn(async move { drive(&clients, &call, offered, run, Spread::Even, tally).await })
    };
    // The first window leases as it goes (nothing was active before it). Request-path leases
    // are read late in a window (200 ms before it ends, when no window is starting), five
    // windows apart: exactly five window starts lie between the two readings.
    const STARTS: u64 = 5;
    let first = (from + 1_500).div_ceil(1_000) * 1_000 - 200;
    let metric = "sluice_lease_request_path_calls_total";
    let read_at = |at: u64| {
        let http = fleet.http.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
            summed(&http, metric).await
        }
    };
    let leased_before = read_at(first).await;
    let leased = read_at(first + STARTS * 1_000).await - leased_before;
    load.await.unwrap();
    let to = now_ms();
    let tally = tally.lock().await;
    let windows = tally.full_windows(from, to);
    println!(
        "lease ahead: {windows:?} admitted a window, {} calls, {leased} leased on the request path over {STARTS} window starts",
        tally.calls
    );
    assert_eq!(tally.failures, 0);
    assert!(windows.len() >= 5, "{windows:?}");
    for (w, admitted) in &windows {
        assert!(
            (offered * 95 / 100..=offered * 105 / 100).contains(admitted),
            "window {w}: {admitted} of {offered} offered"
        );
    }
    // Leasing as each window comes costs each replica at least one call a window (its lease
    // is empty when the window begins): 2 a window start here, 10 in all. Leased ahead, the
    // calls left are those of a lease that ran out between two rounds, and with a replica
    // holding at most a 64th of the limit unused (3 units here, 2.5 used a round) that
    // happens now and then: fewer than leasing as each window comes (measured: 7 in one CI
    // run, at most 5 in the others).
    assert!(
        leased < 2 * STARTS,
        "{leased} request-path leases over {STARTS} window starts"
    );
    stop_all(fleet.children).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_replicas_admit_the_limit_exactly() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("fleet.yaml", &per_second_rules(100))]);
    let even = (10.0, Spread::Even, Arrivals::Bursts);
    accuracy_phase(10, &redis, dir.path(), 100, even, "10 replicas, 10x").await;
    write_rules(dir.path(), &[("fleet.yaml", &per_second_rules(200))]);
    let skewed = (1.5, Spread::Skewed, Arrivals::Bursts);
    let what = "10 replicas, 1.5x, 80 % on one";
    accuracy_phase(10, &redis, dir.path(), 200, skewed, what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_dying_under_load_fails_no_call_and_counts_come_back() {
    let _turn = TURNS.lock().await;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("fleet.yaml", &per_second_rules(LIMIT))]);
    let namespace = unique_namespace("outage");
    let Replicas {
        children, clients, ..
    } = replicas(
        3,
        &redis,
        &namespace,
        dir.path(),
        &["--redis-timeout", "100ms"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let call = request("fleet", &[&[("k", "shared-key")]]);
    let tally = Arc::new(Mutex::new(Tally::default()));
    // The load may end before the restart (the wait below for an hour's boundary can take up
    // to 20 s): only windows the load filled count as outage windows.
    let load_ends = now_ms() + 8_000;
    let load = {
        let (clients, tally) = (clients.clone(), tally.clone());
        tokio::spawn(async move {
            drive(
                &clients,
                &call,
                3 * u64::from(LIMIT),
                Duration::from_secs(8),
                Spread::Even,
                tally,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.kill();
    let killed = now_ms();

    // While Redis is down: counted calls on an hourly descriptor, all answered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    clear_of_boundary(3_600_000, Duration::from_secs(20)).await;
    let tally_call = request("fleet", &[&[("tally", "during-outage")]]);
    let mut counted = 0u32;
    for client in &clients {
        for _ in 0..30 {
            let answer = client.clone().should_rate_limit(tally_call.clone()).await;
            assert!(is_ok(
                &answer.expect("answered during the outage").into_inner()
            ));
            counted += 1;
        }
    }
    let hour_start = now_ms() / 3_600_000 * 3_600;

    tokio::time::sleep(Duration::from_millis(3_500)).await;
    redis.restart();
    let restarted = now_ms();
    load.await.unwrap();

    let tally = tally.lock().await;
    assert_eq!(tally.failures, 0, "no call failed");
    // Windows wholly inside the outage (after a second to notice it): each replica enforces
    // its local share, ceil(200 / 3) = 67, and together they stay near the limit.
    let outage = tally.full_windows(killed + 1_000, restarted.min(load_ends));
    assert!(outage.len() >= 2, "outage windows: {outage:?}");
    for (w, admitted) in &outage {
        let per_replica: Vec<u64> = (0..3)
            .map(|r| tally.by_replica.get(&(r, *w)).copied().unwrap_or(0))
            .collect();
        println!("outage window {w}: admitted {admitted}, per replica {per_replica:?}");
        assert!(per_replica.iter().all(|n| *n <= 67), "{per_replica:?}");
        assert!((190..=201).contains(admitted), "window {w}: {admitted}");
    }

    // After the restart, the counts made during the outage reach Redis.
    let key = redis_key(
        &namespace,
        "fleet",
        "tally_during-outage",
        "hour",
        hour_start,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pushed: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("used"));
        if pushed == Some(counted) {
            println!("{counted} calls counted during the outage are in Redis after its restart");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis holds {pushed:?} of {counted}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_all(children).await;
}

/// `per_replica` calls of `call` through each replica in turn, every one answered OK.
async fn all_admitted(
    clients: &[RateLimitServiceClient<Channel>],
    call: &RateLimitRequest,
    per_replica: u32,
) -> u32 {
    for client in clients {
        for _ in 0..per_replica {
            let answer = client.clone().should_rate_limit(call.clone()).await;
            assert!(is_ok(&answer.expect("answered").into_inner()));
        }
    }
    per_replica * clients.len() as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_paused_under_load_fails_no_call_and_counts_nothing_twice() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("fleet.yaml", &per_second_rules(LIMIT))]);
    let namespace = unique_namespace("paused");
    clear_of_boundary(3_600_000, Duration::from_secs(40)).await;
    let hour_start = now_ms() / 3_600_000 * 3_600;
    let fleet = replicas(
        3,
        &redis,
        &namespace,
        dir.path(),
        &["--redis-timeout", "100ms"],
    )
    .await;
    let call = request("fleet", &[&[("k", "shared-key")]]);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let from = now_ms();
    let load = {
        let (clients, call, tally) = (fleet.clients.clone(), call.clone(), tally.clone());
        tokio::spawn(async move {
            let (rate, run) = (3 * u64::from(LIMIT), Duration::from_secs(9));
            drive(&clients, &call, rate, run, Spread::Even, tally).await
        })
    };
    // Calls on an hourly descriptor before, during and after the pause: Redis must end up
    // holding each exactly once, though pushes were in flight when it stopped.
    let counting = request("fleet", &[&[("tally", "through-a-pause")]]);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let mut counted = all_admitted(&fleet.clients, &counting, 10).await;
    redis.pause(true);
    let paused_at = now_ms();
    tokio::time::sleep(Duration::from_millis(300)).await;
    counted += all_admitted(&fleet.clients, &counting, 10).await;
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(1_000)).await;
    redis.pause(false);
    let resumed_at = now_ms();
    counted += all_admitted(&fleet.clients, &counting, 10).await;
    load.await.unwrap();
    let to = now_ms();

    let tally = tally.lock().await;
    assert_eq!(tally.failures, 0, "no call failed");
    let before = tally.full_windows(from, paused_at);
    let after = tally.full_windows(resumed_at + 1_000, to);
    let during = tally.full_windows(paused_at, resumed_at + 1_000);
    println!(
        "pause: admitted per window before {before:?}, while paused {during:?}, after {after:?} (limit {LIMIT})"
    );
    assert!(
        !before.is_empty() && after.len() >= 3,
        "{before:?} {after:?}"
    );
    for (w, admitted) in before.iter().chain(&after) {
        assert!(
            (u64::from(LIMIT) * 98 / 100..=u64::from(LIMIT)).contains(admitted),
            "window {w}: {admitted} of {LIMIT}"
        );
    }
    let key = redis_key(
        &namespace,
        "fleet",
        "tally_through-a-pause",
        "hour",
        hour_start,
    );
    let used = || -> Option<u32> { redis.query(::redis::cmd("HGET").arg(&key).arg("used")) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while used() != Some(counted) {
        assert!(
            Instant::now() < deadline,
            "Redis holds {:?} of {counted}",
            used()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And stays so: nothing in flight at the pause lands a second time.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(used(), Some(counted), "counted once each");
    println!("{counted} calls made around a pause are in Redis once each");
    stop_all(fleet.children).await;
}

const PER_MINUTE: &str = "domain: ns\ndescriptors:\n  - key: user\n    rate_limit:\n      unit: minute\n      requests_per_unit: 10\n";

async fn in_process(redis: &RedisServer, namespace: &str) -> TestServer {
    synced_in_process(redis.url(), namespace, ("ns.yaml", PER_MINUTE), |_| {}).await
}

/// A server in this process syncing to Redis at `url` every 20 ms, on one rules file, with
/// anything else `configure` sets.
async fn synced_in_process(
    url: String,
    namespace: &str,
    rules: (&str, &str),
    configure: impl FnOnce(&mut sluice::settings::Settings),
) -> TestServer {
    let namespace = namespace.to_string();
    start_at(now_ms(), &[rules], move |s| {
        s.redis_url = Some(url);
        s.redis_namespace = Some(namespace);
        s.sync_interval = Duration::from_millis(20);
        configure(s);
    })
    .await
}

/// Two replicas in this process on manual clocks, in a namespace of their own named after
/// `prefix`, on one rules file of domain `ns`, once both have synced.
async fn two_synced(redis: &RedisServer, prefix: &str, rules: &str) -> (TestServer, TestServer) {
    two_synced_in(redis, &unique_namespace(prefix), rules).await
}

/// Sets every server's manual clock to `ms` (ms since the epoch), alike.
fn set_clocks(servers: &[&TestServer], ms: u64) {
    for s in servers {
        s.clock.set_ms(ms);
    }
}

/// [`two_synced`] in `namespace`.
async fn two_synced_in(
    redis: &RedisServer,
    namespace: &str,
    rules: &str,
) -> (TestServer, TestServer) {
    let a = synced_in_process(redis.url(), namespace, ("ns.yaml", rules), |_| {}).await;
    let b = synced_in_process(redis.url(), namespace, ("ns.yaml", rules), |_| {}).await;
    for s in [&a, &b] {
        wait_synced(s).await;
    }
    (a, b)
}

/// [4/8]'s kill window, on the lease script and the sync: in a fleet, what a replica holds of
/// its requests lease unused, once the call waiting on it has taken its need, stays within a
/// 64th of the limit (at least one unit), so a replica killed strands no more than that. 6,400
/// a minute (a 64th is 100) over two replicas on manual clocks. Right after the clocks jump a
/// minute, each sees the other's last heartbeat as a minute old and itself alone, until the
/// other beats again by the new clock: a replica alone leases unbounded (it strands nothing of
/// anyone's), and the first 100 calls left one holding 177 to 564 (8 runs). Once both see
/// each other, its sync lowers that to the bound (without that step: 149 to 164 unused after
/// it). Then it admits 1,400 more one by one (its sync rounds, every 20 ms here, top its lease
/// up meanwhile), and after every 100 the store's record of what it holds is read: never more
/// than 100 past what it admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_unused_lease_stays_within_a_64th_of_the_limit() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // A sliding window's grants keep the same bound: its previous minute is empty here, so
    // the whole budget is open, as a fixed window's.
    for (algorithm, keys) in [
        ("", "minute"),
        (", algorithm: sliding_window", "sliding.minute"),
    ] {
        unused_lease_within_a_64th(&redis, algorithm, keys).await;
    }
}

async fn unused_lease_within_a_64th(redis: &RedisServer, algorithm: &str, keys: &str) {
    let rules = format!(
        "domain: ns\ndescriptors:\n  - key: user\n    rate_limit: {{ unit: minute, requests_per_unit: 6400{algorithm} }}\n"
    );
    let namespace = unique_namespace("a64th");
    let (a, b) = two_synced_in(redis, &namespace, &rules).await;
    let minute = (now_ms() / MINUTE_MS + 1) * MINUTE_MS;
    let key = redis_key(&namespace, "ns", "user_u1", keys, minute / 1_000);
    let held = || -> i64 {
        // Text: a replica's last grant (`g:`) is its call's id and what it granted.
        let fields: std::collections::HashMap<String, String> =
            redis.query(::redis::cmd("HGETALL").arg(&key));
        let held = fields
            .iter()
            .filter(|(field, _)| field.starts_with("h:"))
            .map(|(_, held)| held.parse::<i64>().expect("a count"))
            .max();
        held.unwrap_or_else(|| panic!("{key} holds no lease: {fields:?}"))
    };
    let call = request("ns", &[&[("user", "u1")]]);
    set_clocks(&[&a, &b], minute + 1_000);
    let mut admitted = a.admitted(100, &call).await;
    let held_alone = held();
    see_each_other(&[&a, &b]).await;
    // A few sync rounds, in which the lease taken alone is lowered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut most_unused = held() - admitted as i64;
    assert!(
        most_unused <= 100,
        "{key}: a replica holds {} unused having seen the other ({held_alone} held for \
         {admitted} admitted before)",
        most_unused
    );
    for _ in 0..14 {
        admitted += a.admitted(100, &call).await;
        let held = held();
        let unused = held - admitted as i64;
        most_unused = most_unused.max(unused);
        assert!(
            unused <= 100,
            "{key}: a replica holds {held} having admitted {admitted}: {unused} unused"
        );
    }
    assert_eq!(admitted, 1_500, "all within the limit");
    println!(
        "{keys}: held alone after 100 calls: {held_alone}; most held unused since: \
         {most_unused} (bound 100)"
    );
    a.stop().await;
    b.stop().await;
}

/// [4/8]'s request path: an admission that takes a lease to its low water (half of a 64th of
/// the limit; 50 of 6,400 a minute here) at a pace that spends the rest before the next sync
/// has it topped up in the background, so the calls after it find lease and none waits on the
/// store. The replica's sync waits an hour here, so only the top-ups can keep its lease: the
/// first grants of a fresh counter are small (the ramp, taken on the request path), and after
/// them 1,500 calls, one after the other, take (almost) none there. Before top-ups the lease was
/// leased afresh on the request path each time it ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_running_low_is_topped_up_before_a_call_must_wait_on_the_store() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    clear_of_boundary(MINUTE_MS, Duration::from_secs(20)).await;
    let rules = "domain: ns\ndescriptors:\n  - key: user\n    rate_limit: { unit: minute, requests_per_unit: 6400 }\n";
    let server = synced_in_process(
        redis.url(),
        &unique_namespace("top-up"),
        ("ns.yaml", rules),
        |s| s.sync_interval = Duration::from_secs(3_600),
    )
    .await;
    wait_synced(&server).await;
    let call = request("ns", &[&[("user", "u1")]]);
    let counted = |name: &'static str| common::metrics::counted(&server, name);
    let waited = || counted("sluice_lease_request_path_calls_total");
    let topped = || counted("sluice_lease_top_up_calls_total");
    assert_eq!(server.admitted(300, &call).await, 300);
    let (ramp, ramp_top_ups) = (waited().await, topped().await);
    assert!(
        ramp > 0,
        "a fresh counter's first call leases on the request path"
    );
    assert_eq!(server.admitted(1_500, &call).await, 1_500);
    let (after, top_ups) = (waited().await - ramp, topped().await - ramp_top_ups);
    println!(
        "first 300 calls: {ramp} on the request path, {ramp_top_ups} top-ups; next 1,500: \
         {after} on the request path, {top_ups} top-ups"
    );
    // A top-up is a Redis call in the background; on a host busy with other tests one may
    // finish after the 50 calls of low water are spent, and that call then leases on the
    // request path. What must hold: top-ups did the work (several for every call that
    // waited), and at least 99 % of decisions made no Redis call. Without top-ups, every
    // lease spent was leased again on the request path and no top-up was counted.
    assert!(top_ups > 0, "no top-up in 1,500 calls");
    assert!(
        after * 4 <= top_ups && after * 100 <= 1_500,
        "{after} of 1,500 calls leased on the request path beside {top_ups} top-ups"
    );
    server.stop().await;
}

/// [4/8]'s leases ahead, on manual clocks: a key two replicas each called once, then no one,
/// is leased ahead of the next minute by each (what it admitted), and then no more. Before,
/// a replica leased a unit ahead for a key it did not see while "the rest of the fleet did",
/// read from the fleet's leases: each replica's idle unit was the other's reason, and the
/// pair leased the key ahead every minute for as long as they ran (six minutes here, in a
/// probe), a Redis call per key and replica a minute for every key ever called twice. Now the
/// reason is what the others admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_no_one_calls_is_no_longer_leased_ahead() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let namespace = unique_namespace("quiet-ahead");
    let (a, b) = two_synced_in(&redis, &namespace, PER_MINUTE).await;
    let minute = (now_ms() / MINUTE_MS + 1) * MINUTE_MS;
    let call = request("ns", &[&[("user", "u1")]]);
    set_clocks(&[&a, &b], minute + 1_000);
    // Each sees the other's heartbeat a minute old until it beats again by the new clock:
    // alone, the first would lease the whole minute.
    see_each_other(&[&a, &b]).await;
    assert_eq!(a.admitted(1, &call).await, 1);
    assert_eq!(b.admitted(1, &call).await, 1);
    let mut leased_ahead = Vec::new();
    for i in 0..4u64 {
        let start = minute + i * MINUTE_MS;
        // Rounds mid-minute (a lease ahead is claimed, the key read on its turn), then in
        // the minute's last three rounds (20 ms each here), where leases ahead are taken.
        set_clocks(&[&a, &b], start + 30_000);
        tokio::time::sleep(Duration::from_millis(300)).await;
        set_clocks(&[&a, &b], start + MINUTE_MS - 50);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let next = redis_key(
            &namespace,
            "ns",
            "user_u1",
            "minute",
            (start + MINUTE_MS) / 1_000,
        );
        let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&next).arg("requests"));
        leased_ahead.push(leased.unwrap_or(0));
    }
    println!("leased ahead of each next minute: {leased_ahead:?}");
    assert_eq!(
        leased_ahead[0], 2,
        "each replica leases ahead what it admitted"
    );
    assert_eq!(
        &leased_ahead[1..],
        &[0, 0, 0],
        "and then nothing: no one called"
    );
    a.stop().await;
    b.stop().await;
}

/// [4/8]'s leases ahead, on manual clocks: a key another replica admitted late in a window,
/// after this replica last read it. Its turns are kept out of it (`--sync-quiet-refresh` of an
/// hour): only the window's last round reads it, finds it admitted elsewhere, and leases its
/// unit of the next window in the same round, so its first call there needs no call to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_admitted_elsewhere_late_in_a_window_is_leased_ahead_in_its_last_round() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let namespace = unique_namespace("late-elsewhere");
    let no_turns = |s: &mut sluice::settings::Settings| {
        s.sync_quiet_refresh = Some(Duration::from_secs(3_600));
    };
    let a = synced_in_process(redis.url(), &namespace, ("ns.yaml", PER_MINUTE), no_turns).await;
    let b = synced_in_process(redis.url(), &namespace, ("ns.yaml", PER_MINUTE), no_turns).await;
    for s in [&a, &b] {
        wait_synced(s).await;
    }
    let minute = (now_ms() / MINUTE_MS + 1) * MINUTE_MS;
    let call = request("ns", &[&[("user", "u1")]]);
    let rounds = || tokio::time::sleep(Duration::from_millis(200));
    // b meets the key in one minute and leases ahead of the next.
    set_clocks(&[&a, &b], minute + 1_000);
    assert_eq!(b.admitted(1, &call).await, 1);
    set_clocks(&[&a, &b], minute + MINUTE_MS - 10);
    rounds().await;
    // In the next, only a calls it, two seconds before its end; a's last round pushes it.
    let next = minute + MINUTE_MS;
    set_clocks(&[&a, &b], next + 1_000);
    rounds().await;
    set_clocks(&[&a, &b], next + 58_000);
    rounds().await;
    assert_eq!(a.admitted(1, &call).await, 1);
    a.clock.set_ms(next + MINUTE_MS - 10);
    let key = |start: u64| redis_key(&namespace, "ns", "user_u1", "minute", start / 1_000);
    until_stored(&redis, &key(next), 1).await;
    // b's last round of that minute.
    b.clock.set_ms(next + MINUTE_MS - 10);
    rounds().await;
    let fields: std::collections::HashMap<String, String> =
        redis.query(::redis::cmd("HGETALL").arg(key(next + MINUTE_MS)));
    println!("the minute after: {fields:?}");
    let holders = fields
        .iter()
        .filter(|(f, n)| f.starts_with("h:") && n.as_str() != "0")
        .count();
    assert_eq!(holders, 2, "a for its call, b for a's: {fields:?}");
    a.stop().await;
    b.stop().await;
}

/// A sliding window shared by two replicas, on manual clocks (both set alike): the store's
/// grants weigh the previous window by what is left of it. 60 a minute, all of them in the
/// last seconds of one minute; a quarter into the next, three quarters of those 60 still
/// weigh, so the two replicas together get 15 more, and at half way 15 more again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliding_windows_grants_weigh_the_previous_window_across_replicas() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const RULES: &str = "domain: ns\ndescriptors:\n  - key: user\n    rate_limit: { unit: minute, requests_per_unit: 60, algorithm: sliding_window }\n";
    let (a, b) = two_synced(&redis, "slide", RULES).await;
    // The store's keys expire by these clocks: the minute starts ahead of real time.
    let minute = (now_ms() / MINUTE_MS + 1) * MINUTE_MS;
    let at = |ms: u64| set_clocks(&[&a, &b], minute + ms);
    let call = request("ns", &[&[("user", "u1")]]);
    at(50_000);
    assert_eq!(a.admitted(61, &call).await, 60);
    // A quarter into the next minute: 60 × 3/4 = 45 still weigh.
    at(75_000);
    assert_eq!(a.admitted(10, &call).await, 10);
    // What a holds unused goes back at its next sync rounds (every 20 ms here).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.admitted(10, &call).await, 5, "b gets the rest of the 15");
    assert_eq!(a.admitted(3, &call).await, 0);
    // Half way: 30 weigh, 15 counted: 15 more. A minute is a long window: the call that
    // finds a's view stale is refused while a asks the store in the background (so may the
    // next, while that call is out), and the calls after it are admitted from what opened.
    at(90_000);
    let first = a.admitted(8, &call).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = b.admitted(10, &call).await;
    assert!((4..=8).contains(&first), "a admitted {first} of 8");
    assert_eq!(first + second, 15, "b gets the rest");
    for s in [a, b] {
        s.stop().await;
    }
}

/// [5/8] over [4/8]'s leases: a token bucket shared by two replicas, on manual clocks (both set
/// alike). 60 a minute with a burst of 30: the bucket refills one a second. The first replica
/// takes the whole burst; the second then gets nothing until the bucket refills; five seconds
/// later it gets five and the first none, which is told when one would fit; a second later,
/// one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_buckets_grants_follow_the_fleets_bucket_across_replicas() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const RULES: &str = "domain: ns\ndescriptors:\n  - key: user\n    rate_limit: { unit: minute, requests_per_unit: 60, algorithm: token_bucket, burst: 30 }\n";
    let namespace = unique_namespace("bucket");
    let (a, b) = two_synced_in(&redis, &namespace, RULES).await;
    let start = (now_ms() / 1_000 + 1) * 1_000;
    let at = |ms: u64| set_clocks(&[&a, &b], start + ms);
    let call = request("ns", &[&[("user", "u1")]]);
    at(100);
    assert_eq!(a.admitted(31, &call).await, 30, "a takes the whole burst");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.admitted(3, &call).await, 0, "the fleet's bucket is empty");
    // Five seconds on (another window of a second): five have refilled, for either replica.
    at(5_100);
    assert_eq!(b.admitted(6, &call).await, 5, "b gets the five");
    let refused = a.ok(call.clone()).await;
    assert!(!is_ok(&refused));
    assert_eq!(remaining(&refused, 0), 0);
    // One more fits a second after the bucket was emptied.
    let reset = refused.statuses[0].duration_until_reset.unwrap();
    let reset_ms = reset.seconds as u64 * 1_000 + reset.nanos as u64 / 1_000_000;
    assert!((1..=1_000).contains(&reset_ms), "reset {reset_ms} ms");
    // `/v1/usage` reads the fleet's bucket: all 30 taken; one fits again in a second.
    let app = &a.running.as_ref().unwrap().app;
    let usage = sluice::counters::usage(app, "ns", &[("user", "u1")])
        .await
        .unwrap();
    let window = &usage.windows[0];
    assert_eq!(window.fleet.map(|c| c.requests), Some(30));
    assert_eq!(window.until_reset, Duration::from_secs(1));
    // The fleet's bucket is one key beside the windows' of a second, expiring once it would be
    // full again (30 s from empty, plus the margin).
    let bucket = format!(
        "{}:bucket",
        redis_key(&namespace, "ns", "user_u1", "bucket.minute.second", 0)
            .rsplit_once(':')
            .unwrap()
            .0
    );
    let ttl: i64 = redis.query(::redis::cmd("PTTL").arg(&bucket));
    assert!(
        ttl > 30_000 && ttl <= 30_000 + 120_000,
        "{bucket}: pttl {ttl}"
    );
    // A second later, one more.
    at(6_100);
    assert_eq!(a.admitted(2, &call).await, 1);
    for s in [a, b] {
        s.stop().await;
    }
}

/// A tokens limit counted as a token bucket, shared by two replicas on manual clocks: 600
/// tokens a minute with a burst of 300 (ten refill a second). What calls report is taken from
/// the fleet's bucket, past the lease a check took as well: once 300 are reported between the
/// two, neither admits a call, and ten seconds later, when 100 have refilled, both do again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_bucket_is_spent_by_the_reports_of_every_replica() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const RULES: &str = "domain: ns\ndescriptors:\n  - key: user\n    limits:\n      - { unit: minute, tokens: 600, algorithm: token_bucket, burst: 300 }\n";
    let (a, b) = two_synced(&redis, "tokens-bucket", RULES).await;
    let start = (now_ms() / 1_000 + 1) * 1_000;
    let at = |ms: u64| set_clocks(&[&a, &b], start + ms);
    let check = request("ns", &[&[("user", "u1")]]);
    let report = |tokens: u32| {
        let mut report = request("ns", &[&[("user", "u1"), ("sluice.report", "tokens")]]);
        report.hits_addend = tokens;
        report
    };
    at(100);
    // Else the first to sync after the jump may find the other's heartbeat older than its
    // time to live, see itself alone and lease the whole bucket (so failed a CI run, loaded).
    see_each_other(&[&a, &b]).await;
    assert!(is_ok(&a.ok(check.clone()).await));
    a.ok(report(200)).await;
    assert!(is_ok(&b.ok(check.clone()).await));
    b.ok(report(100)).await;
    // Both push what they counted at their next syncs (every 20 ms here).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in [&a, &b] {
        let refused = s.ok(check.clone()).await;
        assert!(!is_ok(&refused), "300 reported: the bucket is empty");
        assert_eq!(remaining(&refused, 0), 0);
    }
    at(10_100);
    for s in [&a, &b] {
        assert!(is_ok(&s.ok(check.clone()).await), "100 have refilled");
    }
    for s in [a, b] {
        s.stop().await;
    }
}

/// Waits until Redis holds `want` requests admitted under `key`.
async fn until_stored(redis: &RedisServer, key: &str, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let count: Option<u32> = redis.query(::redis::cmd("HGET").arg(key).arg("used"));
        if count == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{key}: {count:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_synced(server: &TestServer) {
    let fleet = server
        .running
        .as_ref()
        .unwrap()
        .app
        .fleet
        .clone()
        .expect("fleet");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.status.load().reachable {
        assert!(Instant::now() < deadline, "never synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_keep_counts_apart_and_keys_expire() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (ns_a, ns_b) = (unique_namespace("a"), unique_namespace("b"));
    // The servers' manual clocks start now and stand still: all three in one minute.
    clear_of_boundary(MINUTE_MS, Duration::from_secs(15)).await;
    let a1 = in_process(&redis, &ns_a).await;
    let a2 = in_process(&redis, &ns_a).await;
    let b = in_process(&redis, &ns_b).await;
    for s in [&a1, &a2, &b] {
        wait_synced(s).await;
    }
    let call = request("ns", &[&[("user", "u1")]]);
    // Two replicas of namespace a share 10 a minute.
    assert_eq!(a1.admitted(5, &call).await, 5);
    // Paced past the sync interval, a2 gets what a1 left, and no more.
    let mut admitted = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        admitted += a2.admitted(1, &call).await;
    }
    assert_eq!(admitted, 5, "a2 sees a1's counts");
    // Namespace b counts alone.
    assert_eq!(b.admitted(12, &call).await, 10);

    let window_start = now_ms() / 60_000 * 60;
    for (ns, want) in [(&ns_a, 10u32), (&ns_b, 10)] {
        let key = redis_key(ns, "ns", "user_u1", "minute", window_start);
        until_stored(&redis, &key, want).await;
        // Expires at the window's end plus a margin of 30 s.
        let ttl: i64 = redis.query(::redis::cmd("PTTL").arg(&key));
        assert!(ttl > 30_000 && ttl <= 90_000, "{key}: pttl {ttl}");
    }

    // Usage and reset of one descriptor, here and in Redis.
    let app = a1.running.as_ref().unwrap().app.clone();
    let entries = [("user", "u1")];
    let usage = sluice::counters::usage(&app, "ns", &entries)
        .await
        .expect("matches a rule");
    assert_eq!(usage.path, "user_u1");
    assert_eq!(usage.windows[0].local.requests, 5);
    assert_eq!(usage.windows[0].fleet.map(|c| c.requests), Some(10));
    let cleared = sluice::counters::reset(&app, "ns", &entries)
        .await
        .expect("a rule matches, and Redis answers");
    assert_eq!((cleared.local_counters, cleared.fleet_keys), (1, 1));
    let usage = sluice::counters::usage(&app, "ns", &entries).await.unwrap();
    assert_eq!(usage.windows[0].local.requests, 0);
    assert_eq!(usage.windows[0].fleet.map(|c| c.requests), Some(0));
    let b_key = redis_key(&ns_b, "ns", "user_u1", "minute", window_start);
    let b_left: Option<u32> = redis.query(::redis::cmd("HGET").arg(&b_key).arg("used"));
    assert_eq!(b_left, Some(10), "namespace b untouched by a's reset");
    for s in [a1, a2, b] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_any_length_is_shared_by_the_fleet() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // A 90 s window, and a calendar day in Tokyo, each shared by two replicas.
    const NINETY: &str = "domain: ns\ndescriptors:\n  - key: user\n    rate_limit: { window: 90s, requests_per_unit: 10 }\n  - key: team\n    rate_limit: { period: calendar_day, timezone: Asia/Tokyo, requests_per_unit: 10 }\n";
    let namespace = unique_namespace("span");
    // Not near an hour (Tokyo's midnight is one in UTC), nor a 90 s boundary.
    clear_of_boundary(3_600_000, Duration::from_secs(20)).await;
    clear_of_boundary(90_000, Duration::from_secs(15)).await;
    let (a, b) = two_synced_in(&redis, &namespace, NINETY).await;
    let call = request("ns", &[&[("user", "u1")]]);
    assert_eq!(a.admitted(6, &call).await, 6);
    let mut admitted = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        admitted += b.admitted(1, &call).await;
    }
    assert_eq!(admitted, 4, "b gets what a left of the fleet's 10");
    // Named by its length and the window's start, and kept past the window's end.
    let key = redis_key(&namespace, "ns", "user_u1", "90s", now_ms() / 90_000 * 90);
    until_stored(&redis, &key, 10).await;
    let ttl: i64 = redis.query(::redis::cmd("PTTL").arg(&key));
    assert!(ttl > 30_000 && ttl <= 120_000, "{key}: pttl {ttl}");
    // The calendar day: named by its start, midnight in Tokyo (15:00 UTC the day before),
    // and kept until that day ends, plus the margin.
    let team = request("ns", &[&[("team", "t1")]]);
    assert_eq!(a.admitted(7, &team).await, 7);
    let mut admitted = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        admitted += b.admitted(1, &team).await;
    }
    assert_eq!(admitted, 3, "b gets what a left of the day's 10");
    let day_start = (now_ms() + 9 * 3_600_000) / 86_400_000 * 86_400 - 9 * 3_600;
    let key = redis_key(
        &namespace,
        "ns",
        "team_t1",
        "calendar_day@Asia/Tokyo",
        day_start,
    );
    until_stored(&redis, &key, 10).await;
    let ttl: i64 = redis.query(::redis::cmd("PTTL").arg(&key));
    let day_end_ms = (day_start + 86_400) * 1_000;
    assert!(
        ttl > 0 && (ttl as u64) <= day_end_ms - now_ms() + 120_000,
        "{key}: pttl {ttl}"
    );
    for s in [a, b] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lost_mid_window_gets_its_expiry_back_and_tokens_are_left_unwritten() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ns = unique_namespace("lost");
    clear_of_boundary(MINUTE_MS, Duration::from_secs(15)).await;
    let server = in_process(&redis, &ns).await;
    wait_synced(&server).await;
    let call = request("ns", &[&[("user", "u1")]]);
    let key = redis_key(&ns, "ns", "user_u1", "minute", now_ms() / 60_000 * 60);
    assert_eq!(server.admitted(2, &call).await, 2);
    until_stored(&redis, &key, 2).await;
    // A requests-only rule: the tokens field is never written.
    let tokens: bool = redis.query(::redis::cmd("HEXISTS").arg(&key).arg("tokens"));
    assert!(!tokens, "{key} has a tokens field");
    // The key goes (a flush, a failover to an empty replica). The replica sends what it has
    // counted, not what changed: the next sync gives the store back the 2 it lost and the
    // new 1, and what the replica holds.
    let _: i64 = redis.query(::redis::cmd("DEL").arg(&key));
    assert_eq!(server.admitted(1, &call).await, 1);
    until_stored(&redis, &key, 3).await;
    let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
    assert!(
        leased.is_some_and(|n| (3..=10).contains(&n)),
        "{key}: {leased:?} leased"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ttl: i64 = redis.query(::redis::cmd("PTTL").arg(&key));
        if ttl > 30_000 && ttl <= 90_000 {
            break;
        }
        assert!(Instant::now() < deadline, "{key}: pttl {ttl}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_to_a_paused_redis_count_nothing_twice_and_strand_no_grant() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ns = unique_namespace("paused");
    clear_of_boundary(MINUTE_MS, Duration::from_secs(20)).await;
    let rules = "domain: ns\ndescriptors:\n  - key: user\n    rate_limit: { unit: minute, requests_per_unit: 1000 }\n";
    let server = synced_in_process(redis.url(), &ns, ("ns.yaml", rules), |s| {
        s.redis_timeout = Duration::from_millis(100);
    })
    .await;
    wait_synced(&server).await;
    // In a fleet: a grant lost is taken from what is left, and a replica alone leases the
    // rest of the window at its rate, leaving nothing for the lost grant simulated below.
    with_a_peer(&server, &redis, &ns).await;
    let call = request("ns", &[&[("user", "u1")]]);
    let key = redis_key(&ns, "ns", "user_u1", "minute", now_ms() / 60_000 * 60);
    assert_eq!(server.admitted(50, &call).await, 50);
    until_stored(&redis, &key, 50).await;
    // 20 more, then Redis pauses while the next sync sends them: the push times out (past
    // --redis-timeout), and Redis applies it when it resumes, after the replica has given up
    // on its answer and sent it again.
    assert_eq!(server.admitted(20, &call).await, 20);
    redis.pause(true);
    let failures = || {
        let app = &server.running.as_ref().unwrap().app;
        app.fleet.as_ref().unwrap().status.load().failures
    };
    let before = failures();
    let deadline = Instant::now() + Duration::from_secs(10);
    while failures() == before {
        assert!(
            Instant::now() < deadline,
            "no sync failed while Redis was paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And calls past the lease while paused: the request path's lease call times out too.
    let started = Instant::now();
    let paused_admitted = server.admitted(400, &call).await;
    println!(
        "{paused_admitted} admitted while paused, in {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.pause(false);
    let admitted = 70 + paused_admitted as u32;
    until_stored(&redis, &key, admitted).await;
    // Rounds go by: the count stays what was admitted, not more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let used: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("used"));
    println!(
        "{} failed syncs while paused; Redis holds {used:?} of {admitted} admitted",
        failures() - before
    );
    assert_eq!(used, Some(admitted), "counted once");
    let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
    assert!(
        leased.is_some_and(|n| (admitted..=1000).contains(&n)),
        "{leased:?}"
    );
    // What the calls given up on while Redis was paused granted (the request path's call for
    // the calls past the lease, a sync's top-up sized by the rate) is taken back by the next
    // calls, which name them, whichever of them Redis ran last. A grant lost so that no call
    // names it (four more granted on the key before one named it) is simulated: Redis counts 100 more held by this replica than it knows
    // of. Those 100 stay leased, unused, and the replica is refused for nothing else: it
    // admits the rest of the limit.
    let fields: Vec<String> = redis.query(::redis::cmd("HKEYS").arg(&key));
    let mine = fields
        .iter()
        .find(|f| f.starts_with("h:"))
        .expect("a lease field");
    let _: i64 = redis.query(::redis::cmd("HINCRBY").arg(&key).arg(mine).arg(100));
    let _: i64 = redis.query(::redis::cmd("HINCRBY").arg(&key).arg("requests").arg(100));
    let more = server.admitted(1000, &call).await;
    let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
    println!("then {more} more admitted; Redis has {leased:?} leased");
    assert_eq!(
        more as u32,
        1000 - admitted - 100,
        "refused for nothing but the 100 lost"
    );
    assert_eq!(leased, Some(1000));
    server.stop().await;
}

/// The lease script as a replica calls it for a requests limit of 1,000 a minute, lone:
/// `counted` admitted, `holding` what it knows it holds, `target` what it asks to hold, the
/// call's id and the ids it names as given up on. Answers what the store then holds for the
/// replica, what the call granted, and what the fleet has leased.
fn lease_call(
    redis: &RedisServer,
    key: &str,
    (counted, holding, target): (i64, i64, i64),
    id: u64,
    given_up: &str,
) -> (i64, i64, i64) {
    let expires = now_ms() + 120_000;
    let answer: Vec<i64> = redis.query(
        ::redis::cmd("EVAL")
            .arg(sluice::LEASE_SCRIPT)
            .arg(1)
            .arg(key)
            .arg("r1")
            .arg(counted)
            .arg(-1)
            .arg(expires)
            .arg(1)
            .arg(0)
            // requests: limit, target, need, holding, give back
            .arg(1_000)
            .arg(target)
            .arg(0)
            .arg(holding)
            .arg(0)
            // no tokens limit
            .arg(-1)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(id)
            .arg(given_up),
    );
    (answer[0], answer[1], answer[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_of_calls_given_up_on_go_back_even_when_others_granted_after_them() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let key = format!("{}:lease-script", unique_namespace("given-up"));
    // The sync (id 1) and the request path (id 2) both ask while Redis is slow; the replica
    // gives up on both, and Redis runs both when it gets to them.
    let (_, first, _) = lease_call(&redis, &key, (0, 0, 100), 1, "");
    let (_, second, leased) = lease_call(&redis, &key, (0, 0, 100), 2, "");
    assert!(first > 0 && second > 0, "granted {first} and {second}");
    assert_eq!(leased, first + second);
    // An answered call (id 3) grants after them: the replica holds what it granted.
    let (_, third, _) = lease_call(&redis, &key, (0, 0, 10), 3, "");
    assert!(third > 0);
    // The next call names the two given up on: both grants go back, not only the last one's,
    // and the answered call's stays.
    let (held, granted, leased) = lease_call(&redis, &key, (5, third, 0), 4, "1,2");
    assert_eq!((held, granted, leased), (third, 0, third));
    // A call named, arriving late on another connection, changes nothing.
    let (held, granted, leased) = lease_call(&redis, &key, (0, 0, 100), 2, "");
    assert_eq!((held, granted, leased), (third, 0, third));
    // Only the newest grants are kept: one given up on behind four more is not found, and
    // stays held unused (never admitted twice).
    let (_, lost, _) = lease_call(&redis, &key, (5, third, third + 20), 10, "");
    assert!(lost > 0);
    let mut known = third;
    for id in 11..=14 {
        let (held, granted, _) = lease_call(&redis, &key, (5, known, known + 1), id, "");
        assert_eq!(granted, 1);
        known += 1;
        assert_eq!(held, known + lost);
    }
    let (held, _, _) = lease_call(&redis, &key, (5, known, 0), 15, "10");
    assert_eq!(
        held,
        known + lost,
        "a grant past the kept ones is not taken back"
    );
    // But one of the four kept is.
    let (held, _, _) = lease_call(&redis, &key, (5, known, 0), 16, "13");
    assert_eq!(held, known + lost - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_descriptor_value_in_clear() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ns = unique_namespace("clear");
    // The server's manual clock stands still from its start: one minute for all of it.
    clear_of_boundary(MINUTE_MS, Duration::from_secs(15)).await;
    let server = in_process(&redis, &ns).await;
    wait_synced(&server).await;
    let planted = "sk-live-PLANTED-4242";
    let call = request("ns", &[&[("user", planted)]]);
    assert_eq!(server.admitted(3, &call).await, 3);
    let key = redis_key(
        &ns,
        "ns",
        &format!("user_{planted}"),
        "minute",
        now_ms() / 60_000 * 60,
    );
    until_stored(&redis, &key, 3).await;
    // Every key (SCAN, as `redis-cli --scan`), and every field and value under each.
    let keys: Vec<String> = redis.query(::redis::cmd("KEYS").arg("*"));
    let mut seen = 0;
    for key in &keys {
        assert!(!key.contains("PLANTED"), "a key names the value: {key}");
        let kind: String = redis.query(::redis::cmd("TYPE").arg(key));
        if kind == "hash" {
            let all: Vec<String> = redis.query(::redis::cmd("HGETALL").arg(key));
            assert!(all.iter().all(|f| !f.contains("PLANTED")), "{key}: {all:?}");
            seen += 1;
        }
    }
    assert!(seen >= 1, "the counter's hash was read: {keys:?}");
    // The operator still finds it by its value.
    let app = server.running.as_ref().unwrap().app.clone();
    let usage = sluice::counters::usage(&app, "ns", &[("user", planted)])
        .await
        .expect("matches a rule");
    assert_eq!(usage.windows[0].fleet.map(|c| c.requests), Some(3));
    let cleared = sluice::counters::reset(&app, "ns", &[("user", planted)])
        .await
        .unwrap();
    assert_eq!(cleared.fleet_keys, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_client_certificates_holds_the_fleets_counts() {
    let _turn = TURNS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new("redis test ca");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let server_identity = ca.issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (cert, key) = common::certs::write_pair(dir.path(), "redis", server_identity);
    let client_identity = ca.issue(&["sluice"], ExtendedKeyUsagePurpose::ClientAuth);
    let client = common::certs::write_pair(dir.path(), "sluice", client_identity);
    let tls_port = free_port().to_string();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    // The plain port stays open for the test's own reads; sluice talks TLS only, and Redis
    // asks it for a client certificate.
    let Some(redis) = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &path(&cert),
        "--tls-key-file",
        &path(&key),
        "--tls-ca-cert-file",
        &path(&ca_file),
        "--tls-auth-clients",
        "yes",
    ]) else {
        return;
    };
    clear_of_boundary(MINUTE_MS, Duration::from_secs(15)).await;
    let ns = unique_namespace("tls");
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let over_tls = |s: &mut sluice::settings::Settings| {
        s.redis_ca_file = Some(ca_file.clone());
        s.redis_cert_file = Some(client.0.clone());
        s.redis_key_file = Some(client.1.clone());
    };
    let server = synced_in_process(url.clone(), &ns, ("ns.yaml", PER_MINUTE), over_tls).await;
    wait_synced(&server).await;
    let call = request("ns", &[&[("user", "u1")]]);
    assert_eq!(server.admitted(12, &call).await, 10);
    let key = redis_key(&ns, "ns", "user_u1", "minute", now_ms() / 60_000 * 60);
    until_stored(&redis, &key, 10).await;
    let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
    assert_eq!(leased, Some(10), "leased over TLS");

    // A reset on another replica reaches this one over the same TLS (its own subscription,
    // with the private CA and the client certificate): it forgets its 10.
    let other = synced_in_process(url, &ns, ("ns.yaml", PER_MINUTE), over_tls).await;
    wait_synced(&other).await;
    let entries = [("user", "u1")];
    let app = server.running.as_ref().unwrap().app.clone();
    let other_app = other.running.as_ref().unwrap().app.clone();
    sluice::counters::reset(&other_app, "ns", &entries)
        .await
        .unwrap();
    until_forgotten(&app, "ns", &entries).await;
    for s in [server, other] {
        s.stop().await;
    }
}

/// Waits (up to 5 s) until `app` no longer counts the descriptor in its window: a reset made
/// elsewhere has reached it.
async fn until_forgotten(app: &sluice::App, domain: &str, entries: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let usage = sluice::counters::usage(app, domain, entries).await.unwrap();
        if usage.windows[0].local.requests == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still counts {:?}",
            usage.windows[0].local
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_one_replica_reaches_the_others() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    clear_of_boundary(MINUTE_MS, Duration::from_secs(15)).await;
    let ns = unique_namespace("reset");
    let (a, b) = (in_process(&redis, &ns).await, in_process(&redis, &ns).await);
    for s in [&a, &b] {
        wait_synced(s).await;
    }
    let call = request("ns", &[&[("user", "u1")]]);
    assert_eq!(a.admitted(4, &call).await, 4);
    // b once a has given back what it holds unused (at its next sync).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.admitted(4, &call).await, 4);
    let key = redis_key(&ns, "ns", "user_u1", "minute", now_ms() / 60_000 * 60);
    until_stored(&redis, &key, 8).await;
    let entries = [("user", "u1")];
    let app_a = a.running.as_ref().unwrap().app.clone();
    let app_b = b.running.as_ref().unwrap().app.clone();
    let cleared = sluice::counters::reset(&app_a, "ns", &entries)
        .await
        .unwrap();
    assert_eq!((cleared.local_counters, cleared.fleet_keys), (1, 1));
    // Within one sync interval (20 ms here) the other replica has forgotten its 4 and its
    // lease, so its syncs give the store nothing back.
    let started = Instant::now();
    until_forgotten(&app_b, "ns", &entries).await;
    println!(
        "the other replica forgot the reset counter after {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let used: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("used"));
    assert!(
        used.is_none_or(|n| n == 0),
        "Redis holds {used:?} after the reset"
    );
    // Both admit the whole limit afresh between them (b once a has given back what it holds
    // unused, at its next sync).
    let first = a.admitted(6, &call).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(first + b.admitted(6, &call).await, 10);
    for s in [a, b] {
        s.stop().await;
    }
}

/// Calls of `command` Redis has served, from `INFO commandstats`.
fn calls_of(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis.query(::redis::cmd("INFO").arg("commandstats"));
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until every one of `servers` has synced twice more (so each has beaten by its clock
/// as it stands now) and sees all of them alive.
async fn see_each_other(servers: &[&TestServer]) {
    let from: Vec<u64> = servers.iter().map(|s| sync_rounds(s)).collect();
    let all = sluice::FleetView::Synced {
        replicas: servers.len() as u32,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while servers.iter().zip(&from).any(|(s, from)| {
        sync_rounds(s) < from + 2 || s.running.as_ref().unwrap().app.limiter.fleet().get() != all
    }) {
        assert!(
            Instant::now() < deadline,
            "the replicas never saw each other"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn sync_rounds(server: &TestServer) -> u64 {
    let app = &server.running.as_ref().unwrap().app;
    app.fleet.as_ref().expect("fleet").status.load().rounds
}

/// Waits for `n` more sync rounds, calling with `traffic` every 5 ms meanwhile; returns the
/// rounds that went by, the calls admitted, and the sync's lease calls Redis served (its
/// `EVALSHA`s, less those made on the request path).
async fn over_rounds(
    server: &TestServer,
    redis: &RedisServer,
    n: u64,
    traffic: Option<&RateLimitRequest>,
) -> (u64, usize, Syncs) {
    let request_path = || common::metrics::counted(server, "sluice_lease_request_path_calls_total");
    let (rounds, scripts, hmgets, taken) = (
        sync_rounds(server),
        calls_of(redis, "evalsha"),
        calls_of(redis, "hmget"),
        request_path().await,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admitted = 0;
    while sync_rounds(server) < rounds + n {
        assert!(Instant::now() < deadline, "sync rounds stalled");
        if let Some(call) = traffic {
            admitted += server.admitted(1, call).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let taken = request_path().await - taken;
    let scripts = calls_of(redis, "evalsha") - scripts;
    // Each call of the lease script on a fixed window runs one HMGET of its own.
    let reads = calls_of(redis, "hmget") - hmgets - scripts;
    (
        sync_rounds(server) - rounds,
        admitted,
        Syncs {
            scripts: scripts - taken,
            reads,
        },
    )
}

/// The sync's calls to the store for fixed windows: the lease script, and the plain reads
/// that stand in for a call asking nothing (`LeaseCall::reads_only`).
#[derive(Debug, Clone, Copy)]
struct Syncs {
    scripts: u64,
    reads: u64,
}

impl Syncs {
    fn all(self) -> u64 {
        self.scripts + self.reads
    }
}

async fn reads_over_rounds(server: &TestServer, redis: &RedisServer, n: u64) -> (u64, Syncs) {
    let (rounds, _, syncs) = over_rounds(server, redis, n, None).await;
    (rounds, syncs)
}

/// A server in this process synced to a Redis of its own every 20 ms, in a namespace named
/// after `prefix`, at least 15 s before a minute's end: the tests of one counter's syncs.
async fn one_counter_server(
    prefix: &str,
) -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    RedisServer,
    TestServer,
    String,
)> {
    let turn = TURNS.lock().await;
    let redis = RedisServer::start()?;
    clear_of_boundary(MINUTE_MS, Duration::from_secs(15)).await;
    let ns = unique_namespace(prefix);
    let server = in_process(&redis, &ns).await;
    wait_synced(&server).await;
    Some((turn, redis, server, ns))
}

/// Makes `server` see a second replica in `namespace`: a heartbeat, as another replica's,
/// that stays fresh an hour by the test's clocks. Returns once its sync counts two.
async fn with_a_peer(server: &TestServer, redis: &RedisServer, namespace: &str) {
    let _: () = redis.query(
        ::redis::cmd("ZADD")
            .arg(format!("{namespace}:sluice:replicas"))
            .arg(now_ms() + 3_600_000)
            .arg("a-peer-of-the-test"),
    );
    let two = sluice::FleetView::Synced { replicas: 2 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.running.as_ref().unwrap().app.limiter.fleet().get() != two {
        assert!(Instant::now() < deadline, "the peer was never seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A replica alone strands nothing another could use, so a quiet counter's first call in a
/// long window leases what the rest of the window would admit at the counter's rate: 1 call
/// 1 s into a minute, 60 at that rate, so the whole limit of 10; its next 9 calls need no
/// call to the store (with the fleet's target, a lease of 2, then 2, 1...: four or five
/// request-path calls a window for a counter met 8 times a minute). Once another replica is
/// seen, the sync lowers what it holds unused (given back, as any idle lease near the limit
/// in a fleet), and the two share the limit exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_alone_leases_a_quiet_counters_window_in_one_call() {
    let Some((_turn, redis, server, ns)) = one_counter_server("lone").await else {
        return;
    };
    let minute = (now_ms() / MINUTE_MS + 1) * MINUTE_MS;
    set_clocks(&[&server], minute + 1_000);
    // Rounds by the new clock: its own heartbeat a minute ahead, still alone.
    let _ = reads_over_rounds(&server, &redis, 3).await;
    assert_eq!(
        server.running.as_ref().unwrap().app.limiter.fleet().get(),
        sluice::FleetView::Synced { replicas: 1 }
    );
    let request_path =
        || common::metrics::counted(&server, "sluice_lease_request_path_calls_total");
    let before = request_path().await;
    let call = request("ns", &[&[("user", "early")]]);
    let key = redis_key(&ns, "ns", "user_early", "minute", minute / 1_000);
    assert_eq!(server.admitted(1, &call).await, 1);
    let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
    assert_eq!(leased, Some(10), "{key}: the whole limit");
    assert_eq!(server.admitted(2, &call).await, 2);
    assert_eq!(request_path().await - before, 1, "one call for 3 admitted");

    // Another replica shows up: within a few rounds the lease goes back to what this one
    // admitted (an idle lease of a fleet past half its limit goes back).
    with_a_peer(&server, &redis, &ns).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
        if leased.is_some_and(|l| l <= 3 + 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: still leased {leased:?} for 3 admitted with a peer seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The peer takes 5 of what went back; this replica admits the rest of the 10, no more.
    let _: () = redis.query(
        ::redis::cmd("HINCRBY")
            .arg(&key)
            .arg("h:a-peer-of-the-test")
            .arg(5),
    );
    let _: () = redis.query(::redis::cmd("HINCRBY").arg(&key).arg("requests").arg(5));
    assert_eq!(
        server.admitted(10, &call).await,
        2,
        "3 + 5 elsewhere + 2 = 10"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_counters_are_read_back_on_their_turn_and_a_spent_fleet_costs_no_call() {
    let Some((_turn, redis, server, ns)) = one_counter_server("quiet").await else {
        return;
    };
    // In a fleet: a replica alone leases for the rest of the window at once (below).
    with_a_peer(&server, &redis, &ns).await;
    let call = request("ns", &[&[("user", "u1")]]);
    let key = redis_key(&ns, "ns", "user_u1", "minute", now_ms() / 60_000 * 60);
    // 1 of 10, then nothing more here or elsewhere.
    assert_eq!(server.admitted(1, &call).await, 1);
    until_stored(&redis, &key, 1).await;
    let (rounds, syncs) = reads_over_rounds(&server, &redis, 48).await;
    // Idle: read on its turn, every 8th round, 6 in 48 rounds (one more may slip in at the
    // edges, and one gives back what it held unused), where every round would be 48. Asking
    // nothing, its turns are plain reads, not calls of the lease script.
    assert!(
        (rounds / 8 - 2..=rounds / 8 + 2).contains(&syncs.all()),
        "{syncs:?} in {rounds} rounds"
    );
    assert!(syncs.scripts <= 2, "{syncs:?} in {rounds} rounds");
    // Far from its limit, it holds no more than the 1 it admitted and one unit unused (a
    // 64th of the limit, at least one: what a replica killed would strand).
    let leased: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
    let leased = leased.expect("leased");
    assert!((1..=2).contains(&leased), "{key}: {leased}");

    // Another replica leases 8 more. This one learns of it at its turn at the latest, then
    // admits only what is left: 1 of 10 (its unused unit, or the store's last one).
    let _: () = redis.query(
        ::redis::cmd("HSET")
            .arg(&key)
            .arg("h:elsewhere")
            .arg(8)
            .arg("requests")
            .arg(leased + 8),
    );
    let _ = reads_over_rounds(&server, &redis, 9).await;
    assert_eq!(server.admitted(5, &call).await, 1, "sees the fleet's 9");
    // The fleet is spent: further calls are refused here, without asking Redis.
    let taken = common::metrics::counted(&server, "sluice_lease_request_path_calls_total").await;
    assert_eq!(server.admitted(20, &call).await, 0);
    let after = common::metrics::counted(&server, "sluice_lease_request_path_calls_total").await;
    assert_eq!(after, taken, "refused with no call to Redis");
    server.stop().await;

    // --sync-quiet-refresh equal to the interval: every counter read every round.
    let ns = unique_namespace("eager");
    let eager = synced_in_process(redis.url(), &ns, ("ns.yaml", PER_MINUTE), |s| {
        s.sync_quiet_refresh = Some(Duration::from_millis(20));
    })
    .await;
    wait_synced(&eager).await;
    assert_eq!(eager.admitted(1, &call).await, 1);
    let key = key.replace(
        &format!("{}:", key.split(':').next().unwrap()),
        &format!("{ns}:"),
    );
    until_stored(&redis, &key, 1).await;
    let (rounds, syncs) = reads_over_rounds(&eager, &redis, 30).await;
    assert!(syncs.all() + 2 >= rounds, "{syncs:?} in {rounds} rounds");
    eager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_counters_read_that_finds_its_counts_gone_pushes_them_again() {
    let Some((_turn, redis, server, ns)) = one_counter_server("lost").await else {
        return;
    };
    let call = request("ns", &[&[("user", "u1")]]);
    let key = redis_key(&ns, "ns", "user_u1", "minute", now_ms() / 60_000 * 60);
    assert_eq!(server.admitted(2, &call).await, 2);
    until_stored(&redis, &key, 2).await;
    let (_, syncs) = reads_over_rounds(&server, &redis, 24).await;
    assert!(syncs.reads >= 1, "idle, it is read: {syncs:?}");
    // The store loses the window (a restart without persistence, a key evicted): the next
    // read finds it other than this replica left it, and the script puts back what the
    // replica admitted and holds.
    let _: () = redis.query(::redis::cmd("DEL").arg(&key));
    until_stored(&redis, &key, 2).await;
    let held: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
    assert!(held.is_some_and(|h| h >= 2), "{key}: leased {held:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_counters_turns_follow_the_interval_not_the_rounds_denials_wake() {
    let Some((_turn, redis, server, ns)) = one_counter_server("woken").await else {
        return;
    };
    let window = now_ms() / 60_000 * 60;
    let (quiet, spent) = (
        request("ns", &[&[("user", "quiet")]]),
        request("ns", &[&[("user", "spent")]]),
    );
    assert_eq!(server.admitted(1, &quiet).await, 1);
    assert_eq!(server.admitted(12, &spent).await, 10);
    until_stored(
        &redis,
        &redis_key(&ns, "ns", "user_quiet", "minute", window),
        1,
    )
    .await;
    until_stored(
        &redis,
        &redis_key(&ns, "ns", "user_spent", "minute", window),
        10,
    )
    .await;
    let _ = reads_over_rounds(&server, &redis, 3).await;

    // Refused calls, one every few milliseconds: each wakes the sync early.
    let (rounds, scripts, hmgets) = (
        sync_rounds(&server),
        calls_of(&redis, "evalsha"),
        calls_of(&redis, "hmget"),
    );
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_millis(1_200) {
        refused += 1 - server.admitted(1, &spent).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let elapsed = started.elapsed();
    let rounds = sync_rounds(&server) - rounds;
    let scripts = calls_of(&redis, "evalsha") - scripts;
    let syncs = calls_of(&redis, "hmget") - hmgets;
    // The sync's interval is 20 ms: no more rounds of the interval than that allows.
    let ticks = (elapsed.as_millis() / 20) as u64 + 1;
    println!(
        "{refused} refused; {rounds} rounds, {ticks} of the interval at most; {syncs} syncs ({scripts} scripts)"
    );
    assert!(
        rounds > ticks * 3 / 2,
        "denials woke the sync: {rounds} rounds, {ticks} ticks"
    );
    // Two quiet counters, each on its turn once every 8 ticks (one more each at the edges).
    assert!(
        syncs <= 2 * (ticks / 8 + 2),
        "{syncs} syncs of two quiet counters in {ticks} ticks ({rounds} rounds)"
    );
    server.stop().await;
}

const BUSY: &str = "domain: busy\ndescriptors:\n  - key: far\n    rate_limit: { unit: minute, requests_per_unit: 1000000 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_counters_lease_ahead_and_sync_on_their_turn() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    clear_of_boundary(MINUTE_MS, Duration::from_secs(20)).await;
    let ns = unique_namespace("busy");
    let server = synced_in_process(redis.url(), &ns, ("busy.yaml", BUSY), |_| {}).await;
    wait_synced(&server).await;
    let window = now_ms() / 60_000 * 60;
    let key = redis_key(&ns, "busy", "far_f1", "minute", window);

    let far = request("busy", &[&[("far", "f1")]]);
    assert_eq!(server.admitted(1, &far).await, 1);
    until_stored(&redis, &key, 1).await;
    // Busy and far from its limit: it leases ahead (up to 8 rounds at its rate, no more than
    // three quarters of what the rest of the window needs at the rate so far), so it is
    // synced once every few rounds, not every round.
    let (rounds, admitted, syncs) = over_rounds(&server, &redis, 48, Some(&far)).await;
    assert!(
        admitted as u64 >= rounds,
        "{admitted} calls in {rounds} rounds"
    );
    println!("{syncs:?} in {rounds} rounds, {admitted} calls admitted");
    assert!(syncs.all() * 2 <= rounds, "{syncs:?} in {rounds} rounds");
    // Nothing is lost by waiting: the rest arrives in its turn.
    until_stored(&redis, &key, 1 + admitted as u32).await;
    server.stop().await;
}

const STRICT: &str = "domain: strict\ndescriptors:\n  - key: k\n    consistency: strict\n    rate_limit:\n      unit: minute\n      requests_per_unit: 50\n";

/// `per_replica` calls through each replica, all at once; returns how many passed.
async fn concurrently(
    clients: &[RateLimitServiceClient<Channel>],
    call: &RateLimitRequest,
    per_replica: usize,
) -> usize {
    let mut calls = tokio::task::JoinSet::new();
    for client in clients {
        for _ in 0..per_replica {
            let (mut client, call) = (client.clone(), call.clone());
            calls.spawn(async move {
                is_ok(
                    &client
                        .should_rate_limit(call)
                        .await
                        .expect("answered")
                        .into_inner(),
                )
            });
        }
    }
    let mut admitted = 0;
    while let Some(ok) = calls.join_next().await {
        admitted += usize::from(ok.unwrap());
    }
    admitted
}

/// 120 concurrent calls on one descriptor, 40 through each replica; returns how many passed.
async fn strict_round(clients: &[RateLimitServiceClient<Channel>], value: &str) -> usize {
    concurrently(clients, &request("strict", &[&[("k", value)]]), 40).await
}

/// Waits until every replica's strict calls land in Redis again.
async fn until_scripts_land(
    redis: &RedisServer,
    namespace: &str,
    clients: &[RateLimitServiceClient<Channel>],
    round: &str,
) {
    let window_start = now_ms() / 60_000 * 60;
    for (i, client) in clients.iter().enumerate() {
        let value = format!("warm-{round}-{i}");
        let key = redis_key(
            namespace,
            "strict",
            &format!("k_{value}"),
            "minute",
            window_start,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let call = request("strict", &[&[("k", &value)]]);
            client
                .clone()
                .should_rate_limit(call)
                .await
                .expect("answered");
            let seen: Option<u32> = redis.query(::redis::cmd("HGET").arg(&key).arg("requests"));
            if seen.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "replica {i} never reached Redis");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_rules_are_exact_across_replicas_and_survive_script_loss() {
    let _turn = TURNS.lock().await;
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("strict.yaml", STRICT)]);
    let namespace = unique_namespace("strict");
    let Replicas {
        children, clients, ..
    } = replicas(3, &redis, &namespace, dir.path(), &[]).await;
    clear_of_boundary(MINUTE_MS, Duration::from_secs(20)).await;
    until_scripts_land(&redis, &namespace, &clients, "start").await;
    let first = strict_round(&clients, "first").await;
    println!("strict, 120 concurrent calls over 3 replicas: {first} admitted of 50");
    assert_eq!(first, 50);

    let flushed: String = redis.query(::redis::cmd("SCRIPT").arg("FLUSH"));
    assert_eq!(flushed, "OK");
    let after_flush = strict_round(&clients, "after-flush").await;
    println!("after SCRIPT FLUSH: {after_flush} admitted of 50");
    assert_eq!(after_flush, 50);

    redis.restart();
    clear_of_boundary(MINUTE_MS, Duration::from_secs(20)).await;
    until_scripts_land(&redis, &namespace, &clients, "restart").await;
    let after_restart = strict_round(&clients, "after-restart").await;
    println!("after a Redis restart: {after_restart} admitted of 50");
    assert_eq!(after_restart, 50);
    stop_all(children).await;
}

/// Three masters on loopback ports, slots split between them, joined into one cluster.
fn start_cluster() -> Option<Vec<RedisServer>> {
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ])
        })
        .collect::<Option<_>>()?;
    let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
    for (node, (from, to)) in nodes.iter().zip(ranges) {
        let ok: String = node.query(
            ::redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(from)
                .arg(to),
        );
        assert_eq!(ok, "OK");
    }
    for other in &nodes[1..] {
        let ok: String = nodes[0].query(
            ::redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(other.port),
        );
        assert_eq!(ok, "OK");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        loop {
            let info: String = node.query(&::redis::cmd("CLUSTER").arg("INFO").clone());
            if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not form: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Some(nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_enforces_a_fleet_limit() {
    let _turn = TURNS.lock().await;
    let Some(nodes) = start_cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rules = "domain: cl\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: minute\n      requests_per_unit: 100\n  - key: s\n    consistency: strict\n    rate_limit:\n      unit: minute\n      requests_per_unit: 50\n";
    write_rules(dir.path(), &[("cl.yaml", rules)]);
    let seeds = format!(
        "redis://127.0.0.1:{},redis://127.0.0.1:{}",
        nodes[0].port, nodes[1].port
    );
    let namespace = unique_namespace("cluster");
    let (mut children, mut clients, mut admin) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        let args = [
            "--config",
            dir.path().to_str().unwrap(),
            "--redis-url",
            &seeds,
            "--redis-cluster",
            "--redis-namespace",
            &namespace,
            "--admin-token",
            "t0ken",
        ];
        let (child, client, http) = spawn_sluice_with_http(&args, &[]).await;
        children.push(child);
        clients.push(client);
        admin.push(format!("http://{http}"));
    }
    // 300 calls paced over ~1.5 s through both replicas, limit 100.
    tokio::time::sleep(Duration::from_millis(300)).await;
    clear_of_boundary(MINUTE_MS, Duration::from_secs(15)).await;
    let mut admitted = 0;
    for n in 0..300 {
        let call = request("cl", &[&[("k", "one-key")]]);
        let answer = clients[n % 2]
            .clone()
            .should_rate_limit(call)
            .await
            .expect("answered");
        admitted += usize::from(is_ok(&answer.into_inner()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("cluster: {admitted} admitted of 100");
    assert_eq!(admitted, 100);
    // The count lives in the cluster, in the node that owns its slot.
    let window_start = now_ms() / 60_000 * 60;
    let key = redis_key(&namespace, "cl", "k_one-key", "minute", window_start);
    let client =
        ::redis::cluster::ClusterClient::new(vec![format!("redis://127.0.0.1:{}", nodes[2].port)])
            .unwrap();
    let mut connection = client.get_connection().unwrap();
    let stored: Option<u32> = ::redis::cmd("HGET")
        .arg(&key)
        .arg("requests")
        .query(&mut connection)
        .unwrap();
    assert_eq!(stored, Some(100), "{key}: leased");

    // A reset on one replica reaches the other through the cluster's pub/sub: it forgets its
    // count of the key.
    let http = reqwest::Client::new();
    let local_at = |base: &str| {
        let http = http.clone();
        let url = format!("{base}/v1/usage?domain=cl&descriptor=k=one-key");
        async move {
            let usage: serde_json::Value =
                http.get(url).send().await.unwrap().json().await.unwrap();
            usage["windows"][0]["requests"]["local"]
                .as_u64()
                .unwrap_or(0)
        }
    };
    assert!(
        local_at(&admin[1]).await > 0,
        "the other replica counts the key"
    );
    let reset = serde_json::json!({"domain": "cl", "entries": [{"key": "k", "value": "one-key"}]});
    let status = http
        .post(format!("{}/v1/reset", admin[0]))
        .bearer_auth("t0ken")
        .json(&reset)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while local_at(&admin[1]).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the other replica still counts the key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Strict: exact, with 60 concurrent calls through both replicas.
    let strict = concurrently(&clients, &request("cl", &[&[("s", "one-key")]]), 30).await;
    println!("cluster, strict: {strict} admitted of 50");
    assert_eq!(strict, 50);
    stop_all(children).await;
    drop(nodes);
}

#[tokio::test]
async fn a_password_in_the_url_reaches_a_protected_redis() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start_with(&["--requirepass", "s3cret"]) else {
        return;
    };
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let namespace = unique_namespace("auth");
    let server = synced_in_process(url, &namespace, ("ns.yaml", PER_MINUTE), |_| {}).await;
    wait_synced(&server).await;
    assert_eq!(
        server
            .admitted(12, &request("ns", &[&[("user", "u")]]))
            .await,
        10
    );
    server.stop().await;
}

/// Tokens are reported when a call ends: each replica admits a call while the tokens it has
/// reported stay under its tokens lease, so the fleet goes past the limit only by what calls
/// already admitted report after the leases ran out. Here every call reports 100 tokens 30 ms after it was admitted,
/// and 12 sessions (4 a replica) have at most 12 calls in flight: 1,200 tokens. The same of a
/// sliding window's tokens limit ([5/8] over [4/8]'s leases): at each window's end the
/// previous window weighs nothing, so what a window's key holds is within the bound too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_go_past_the_limit_only_by_the_reports_in_flight() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for (algorithm, keys) in [
        ("", "second"),
        (", algorithm: sliding_window", "sliding-tokens.second"),
    ] {
        tokens_within_reports_in_flight(&redis, algorithm, keys).await;
    }
}

async fn tokens_within_reports_in_flight(redis: &RedisServer, algorithm: &str, keys: &str) {
    const TOKENS: u32 = 4_000;
    const PER_CALL: u64 = 100;
    const SESSIONS_PER_REPLICA: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let rules = format!(
        "domain: fleet\ndescriptors:\n  - key: t\n    limits:\n      - {{ unit: second, tokens: {TOKENS}{algorithm} }}\n"
    );
    write_rules(dir.path(), &[("tokens.yaml", &rules)]);
    let namespace = unique_namespace("tokens");
    let fleet = replicas(3, redis, &namespace, dir.path(), &[]).await;
    let check = request("fleet", &[&[("t", "shared")]]);
    let mut report = request("fleet", &[&[("t", "shared"), ("sluice.report", "tokens")]]);
    report.hits_addend = PER_CALL as u32;
    let (from, run) = (now_ms(), Duration::from_secs(6));
    let mut sessions = tokio::task::JoinSet::new();
    for client in &fleet.clients {
        for _ in 0..SESSIONS_PER_REPLICA {
            let (mut client, check, report) = (client.clone(), check.clone(), report.clone());
            sessions.spawn(async move {
                let (started, mut failures) = (Instant::now(), 0u32);
                while started.elapsed() < run {
                    let Ok(answer) = client.should_rate_limit(check.clone()).await else {
                        failures += 1;
                        continue;
                    };
                    if !is_ok(&answer.into_inner()) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    failures += u32::from(client.should_rate_limit(report.clone()).await.is_err());
                }
                failures
            });
        }
    }
    let mut failures = 0;
    while let Some(session) = sessions.join_next().await {
        failures += session.unwrap();
    }
    let to = now_ms();
    assert_eq!(failures, 0, "no call failed");
    // The last reports reach Redis at the replicas' next syncs.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let in_flight = 3 * SESSIONS_PER_REPLICA as u64 * PER_CALL;
    let windows: Vec<(u64, u64)> = (from / 1000 + 1..to / 1000)
        .map(|w| {
            let key = redis_key(&namespace, "fleet", "t_shared", keys, w);
            let tokens: Option<u64> = redis.query(::redis::cmd("HGET").arg(&key).arg("tokens"));
            (w, tokens.unwrap_or(0))
        })
        .collect();
    let most = windows.iter().map(|(_, t)| *t).max().unwrap_or(0);
    println!(
        "{keys}: tokens reported per window (limit {TOKENS}, at most {in_flight} in flight): {windows:?}; most past the limit: {}",
        most.saturating_sub(u64::from(TOKENS))
    );
    assert!(windows.len() >= 4, "{windows:?}");
    for (w, tokens) in &windows {
        assert!(
            *tokens <= u64::from(TOKENS) + in_flight,
            "{keys}: window {w}: {tokens} tokens, limit {TOKENS}, in flight at most {in_flight}"
        );
        // Offered far more than the limit, the fleet reports most of it.
        assert!(
            *tokens >= u64::from(TOKENS) * 3 / 4,
            "{keys}: window {w}: {tokens} of {TOKENS}"
        );
    }
    stop_all(fleet.children).await;
}

/// A capacity reduction announced on one replica holds the whole fleet to the reduced limit,
/// exactly: the sync leases against the limit in force, not the configured one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_capacity_reduction_holds_the_fleet_to_the_reduced_limit() {
    let _turn = TURNS.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (rules, secrets) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_rules(rules.path(), &[("fleet.yaml", &per_second_rules(LIMIT))]);
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, "capacity-test-token\n").unwrap();
    let namespace = unique_namespace("capacity");
    let token_arg = token_file.to_str().unwrap();
    let fleet = replicas(
        3,
        &redis,
        &namespace,
        rules.path(),
        &["--admin-token-file", token_arg],
    )
    .await;
    let http = reqwest::Client::new();
    let reduced = http
        .post(format!("http://{}/v1/capacity/reduce", fleet.http[0]))
        .bearer_auth("capacity-test-token")
        .json(&serde_json::json!({"domain": "fleet", "rule": "k", "factor": 0.5}))
        .send()
        .await
        .unwrap();
    assert!(reduced.status().is_success(), "{:?}", reduced.text().await);
    // Every replica hears of it (Redis pub/sub) before the load starts.
    for addr in &fleet.http {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen: serde_json::Value = http
                .get(format!("http://{addr}/v1/capacity"))
                .bearer_auth("capacity-test-token")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if seen.to_string().contains("\"effective\":100") {
                break;
            }
            assert!(Instant::now() < deadline, "{addr} never heard: {seen}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let call = request("fleet", &[&[("k", "shared-key")]]);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let from = now_ms();
    let rate = u64::from(LIMIT) * 3 / 2;
    drive(
        &fleet.clients,
        &call,
        rate,
        Duration::from_secs(6),
        Spread::Even,
        tally.clone(),
    )
    .await;
    let to = now_ms();
    let tally = tally.lock().await;
    let windows = tally.full_windows(from, to);
    println!(
        "capacity at 0.5: admitted per window (configured {LIMIT}, in force {}): {windows:?}",
        LIMIT / 2
    );
    assert_eq!(tally.failures, 0);
    assert_exact(&windows, LIMIT / 2, "capacity at 0.5, 3 replicas, 3x");
    stop_all(fleet.children).await;
}
