//! Live rule editing with the real server and real file-system events: edits, editor-style
//! rename-writes, Kubernetes ConfigMap `..data` swaps, broken edits, deletions and SIGHUP.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;

/// Generous bound for a change to show; a reload normally takes well under a second.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

fn rules(domain: &str, key: &str, per_minute: u32) -> String {
    format!(
        "domain: {domain}\ndescriptors:\n  - key: {key}\n    rate_limit:\n      unit: minute\n      requests_per_unit: {per_minute}\n"
    )
}

/// A call that only reads: descriptor-level hits of 0.
fn peek(domain: &str, key: &str) -> RateLimitRequest {
    let mut r = request(domain, &[&[(key, "caller")]]);
    r.descriptors[0].hits_addend = Some(UInt64Value { value: 0 });
    r
}

/// The limit the server applies now to (key=caller) in `domain`, without counting.
async fn limit_now(server: &TestServer, domain: &str, key: &str) -> Option<u32> {
    limit_of(&server.ok(peek(domain, key)).await, 0)
}

async fn wait_for_limit(server: &TestServer, domain: &str, key: &str, want: Option<u32>) {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let now = limit_now(server, domain, key).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{domain}/{key}: limit still {now:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_watching(files: &[(&str, &str)]) -> TestServer {
    start_with(files, |s| s.reload_debounce = Duration::from_millis(50)).await
}

fn status(server: &TestServer) -> Arc<sluice::ReloadStatus> {
    server
        .running
        .as_ref()
        .unwrap()
        .app
        .reload_status
        .load_full()
}

/// Replaces a file the way editors do: write a temporary file, then rename it over.
fn rename_write(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Calls made in the background while a test edits rules.
struct Traffic {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Starts one client per request, each calling until told to stop, for at most
    /// `MAX_CALLS` calls and `MAX_TIME`. A client stops at its first failed call: one is
    /// enough to fail the test, and a closed channel fails at once, so carrying on would
    /// spin without ever yielding to the runtime that wants to shut down.
    fn start(server: &Arc<TestServer>, requests: Vec<RateLimitRequest>) -> Traffic {
        const MAX_CALLS: u64 = 200_000;
        const MAX_TIME: Duration = Duration::from_secs(120);
        let stop = Arc::new(AtomicBool::new(false));
        let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let clients = requests
            .into_iter()
            .map(|request| {
                let (server, stop, calls, failures) = (
                    server.clone(),
                    stop.clone(),
                    calls.clone(),
                    failures.clone(),
                );
                tokio::spawn(async move {
                    let deadline = Instant::now() + MAX_TIME;
                    for _ in 0..MAX_CALLS {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                            break;
                        }
                        let answered = server.call(request.clone()).await;
                        calls.fetch_add(1, Ordering::Relaxed);
                        if answered.is_err() {
                            failures.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            calls,
            failures,
            clients,
        }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Stops the clients and returns (calls, failed calls).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.unwrap();
        }
        (
            self.calls.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_edited_under_traffic_applies_with_no_failed_call() {
    let server = Arc::new(start_watching(&[("api.yaml", &rules("api", "user", 5))]).await);
    let traffic = Traffic::start(&server, vec![peek("api", "user")]);
    std::fs::write(server.dir.path().join("api.yaml"), rules("api", "user", 7)).unwrap();
    wait_for_limit(&server, "api", "user", Some(7)).await;
    let (calls, failures) = traffic.finish().await;
    assert!(calls > 0);
    assert_eq!(failures, 0);
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn an_editor_rename_write_reloads() {
    let server = start_watching(&[("api.yaml", &rules("api", "user", 5))]).await;
    rename_write(
        &server.dir.path().join("api.yaml"),
        &rules("api", "user", 9),
    );
    wait_for_limit(&server, "api", "user", Some(9)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_kubernetes_configmap_symlink_swap_reloads() {
    let dir = tempfile::tempdir().unwrap();
    configmap_version(
        dir.path(),
        "2026_01_01_00_00_00.000000001",
        &[("api.yaml", &rules("api", "user", 5))],
    );
    let mut settings = sluice::settings::Settings::local(dir.path().to_path_buf());
    settings.reload_debounce = Duration::from_millis(50);
    let clock = Arc::new(sluice::ManualClock::new(T0));
    let running = sluice::start(settings, clock.clone()).await.unwrap();
    let server = TestServer {
        client: connect(running.grpc_addr).await,
        running: Some(running),
        clock,
        dir,
    };
    assert_eq!(limit_now(&server, "api", "user").await, Some(5));
    configmap_version(
        server.dir.path(),
        "2026_01_01_00_05_00.000000002",
        &[("api.yaml", &rules("api", "user", 11))],
    );
    std::fs::remove_dir_all(server.dir.path().join("..2026_01_01_00_00_00.000000001")).unwrap();
    wait_for_limit(&server, "api", "user", Some(11)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_broken_edit_keeps_the_old_rules_and_reports_the_error() {
    let server = start_watching(&[("api.yaml", &rules("api", "user", 5))]).await;
    let path = server.dir.path().join("api.yaml");
    rename_write(
        &path,
        "domain: api\ndescriptors:\n  - key: user\n    rate_limit:\n      unit: minutes\n      requests_per_unit: 50\n",
    );
    let deadline = Instant::now() + APPLY_TIMEOUT;
    let error = loop {
        let s = status(&server);
        if let Some(file) = s
            .files
            .iter()
            .find(|f| f.path == path && !f.errors.is_empty())
        {
            assert!(file.stale, "an older version serves");
            assert_eq!(file.domain.as_deref(), Some("api"));
            break file.errors[0].clone();
        }
        assert!(Instant::now() < deadline, "no error reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(error.line, Some(5));
    assert_eq!(
        error.field.as_deref(),
        Some("descriptors[0].rate_limit.unit")
    );
    assert!(error.message.contains("minutes"));
    assert_eq!(
        limit_now(&server, "api", "user").await,
        Some(5),
        "the old rules serve"
    );
    // Fixing the file applies it.
    rename_write(&path, &rules("api", "user", 50));
    wait_for_limit(&server, "api", "user", Some(50)).await;
    let s = status(&server);
    assert!(s.files.iter().all(|f| f.errors.is_empty() && !f.stale));
    server.stop().await;
}

#[tokio::test]
async fn a_broken_file_does_not_hold_back_another_files_change() {
    let server = start_watching(&[
        ("a.yaml", &rules("team_a", "user", 5)),
        ("b.yaml", &rules("team_b", "user", 5)),
    ])
    .await;
    rename_write(
        &server.dir.path().join("a.yaml"),
        "domain: team_a\ndescriptors: [oops\n",
    );
    rename_write(
        &server.dir.path().join("b.yaml"),
        &rules("team_b", "user", 8),
    );
    wait_for_limit(&server, "team_b", "user", Some(8)).await;
    assert_eq!(
        limit_now(&server, "team_a", "user").await,
        Some(5),
        "a's last good version"
    );
    server.stop().await;
}

#[tokio::test]
async fn counts_survive_unrelated_reloads_and_limit_raises() {
    let server = start_watching(&[
        ("api.yaml", &rules("api", "user", 5)),
        ("other.yaml", &rules("other", "user", 5)),
    ])
    .await;
    let call = request("api", &[&[("user", "caller")]]);
    assert_eq!(server.admitted(3, &call).await, 3);
    // An unrelated rule changes: api's counts stay.
    rename_write(
        &server.dir.path().join("other.yaml"),
        &rules("other", "user", 6),
    );
    wait_for_limit(&server, "other", "user", Some(6)).await;
    assert_eq!(remaining(&server.ok(peek("api", "user")).await, 0), 2);
    // This rule's limit goes up mid-window: the caller gets the difference at once.
    rename_write(
        &server.dir.path().join("api.yaml"),
        &rules("api", "user", 10),
    );
    wait_for_limit(&server, "api", "user", Some(10)).await;
    assert_eq!(remaining(&server.ok(peek("api", "user")).await, 0), 7);
    assert_eq!(server.admitted(10, &call).await, 7);
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_files_rules_stop_applying_and_their_counters_go() {
    let server = start_watching(&[
        ("api.yaml", &rules("api", "user", 2)),
        ("keep.yaml", &rules("keep", "user", 2)),
    ])
    .await;
    let call = request("api", &[&[("user", "caller")]]);
    assert_eq!(server.admitted(3, &call).await, 2);
    std::fs::remove_file(server.dir.path().join("api.yaml")).unwrap();
    wait_for_limit(&server, "api", "user", None).await;
    assert_eq!(server.admitted(5, &call).await, 5, "no limit any more");
    // Put back, the rule starts from zero: its old counter was dropped.
    std::fs::write(server.dir.path().join("api.yaml"), rules("api", "user", 2)).unwrap();
    wait_for_limit(&server, "api", "user", Some(2)).await;
    assert_eq!(server.admitted(3, &call).await, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_burst_of_writes_causes_few_reloads() {
    let server = start(&[("api.yaml", &rules("api", "user", 1))]).await;
    let before = status(&server).applied;
    let path = server.dir.path().join("api.yaml");
    let started = Instant::now();
    for n in 1..=100 {
        rename_write(&path, &rules("api", "user", 100 + n));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst = started.elapsed();
    assert!(burst < Duration::from_secs(2), "the burst took {burst:?}");
    wait_for_limit(&server, "api", "user", Some(200)).await;
    // Let any reload still pending land before counting.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reloads = status(&server).applied - before;
    println!("100 writes in {burst:?} caused {reloads} reloads");
    assert!(
        (1..=3).contains(&reloads),
        "{reloads} reloads for 100 writes"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_calls_across_twenty_reloads_never_fail() {
    let server = Arc::new(start_watching(&[("api.yaml", &rules("api", "user", 1_000))]).await);
    let traffic = Traffic::start(
        &server,
        (0..4)
            .map(|c| request("api", &[&[("user", &format!("client-{c}"))]]))
            .collect(),
    );
    let path = server.dir.path().join("api.yaml");
    let before = status(&server).generation;
    // Each reload lands between 500 calls or more, so the traffic spans all twenty.
    for n in 1..=20 {
        let deadline = Instant::now() + APPLY_TIMEOUT;
        while traffic.calls() < u64::from(n) * 500 {
            assert!(Instant::now() < deadline, "the clients stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        rename_write(&path, &rules("api", "user", 1_000 + n));
        wait_for_limit(&server, "api", "user", Some(1_000 + n)).await;
    }
    // Keep the clients going a little past the last reload.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (calls, failures) = traffic.finish().await;
    let generations = status(&server).generation - before;
    println!("{calls} calls across {generations} reloads, {failures} failed");
    assert!(generations >= 20, "{generations} reloads");
    assert!(calls >= 10_000, "only {calls} calls");
    assert_eq!(failures, 0);
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test]
async fn sighup_reloads() {
    // The real binary, with no watcher and no periodic rescan in sight: only SIGHUP reloads.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.yaml");
    std::fs::write(&path, rules("api", "user", 5)).unwrap();
    let config = dir.path().to_str().unwrap();
    let (mut child, mut client) = spawn_sluice(
        &[
            "--watch",
            "false",
            "--rescan-interval",
            "1h",
            "--config",
            config,
        ],
        &[],
    )
    .await;
    let mut limit = async || {
        let r = client
            .should_rate_limit(peek("api", "user"))
            .await
            .unwrap()
            .into_inner();
        limit_of(&r, 0)
    };
    assert_eq!(limit().await, Some(5));
    std::fs::write(&path, rules("api", "user", 12)).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        limit().await,
        Some(5),
        "no watcher: nothing reloads by itself"
    );
    signal(&child, "HUP");
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while limit().await != Some(12) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "TERM");
    let status = tokio::time::timeout(APPLY_TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_file_claiming_another_files_domain_is_left_out() {
    let server = start_watching(&[("a.yaml", &rules("api", "user", 5))]).await;
    let newcomer = server.dir.path().join("b.yaml");
    std::fs::write(&newcomer, rules("api", "user", 99)).unwrap();
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let s = status(&server);
        if let Some(file) = s
            .files
            .iter()
            .find(|f| f.path == newcomer && !f.errors.is_empty())
        {
            assert!(
                file.errors[0].message.contains("already defined in"),
                "{:?}",
                file.errors
            );
            assert!(file.domain.is_none(), "b serves nothing");
            break;
        }
        assert!(Instant::now() < deadline, "no conflict reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        limit_now(&server, "api", "user").await,
        Some(5),
        "a keeps its domain"
    );
    // Once a.yaml is gone, b.yaml's version applies.
    std::fs::remove_file(server.dir.path().join("a.yaml")).unwrap();
    wait_for_limit(&server, "api", "user", Some(99)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_bucket_keeps_its_level_through_a_new_limit_and_starts_afresh_under_a_new_algorithm() {
    let bucket = |per_unit: u32, algorithm: &str| {
        format!(
            "domain: api\ndescriptors:\n  - key: user\n    rate_limit: {{ unit: minute, requests_per_unit: {per_unit}, algorithm: {algorithm} }}\n"
        )
    };
    let server = start_watching(&[("api.yaml", &bucket(6, "token_bucket"))]).await;
    let call = request("api", &[&[("user", "caller")]]);
    assert_eq!(server.admitted(4, &call).await, 4);
    // A new limit: the bucket of 6 had 2 left, and a bucket of 8 (the limit by default) now
    // has those 2 and the 2 more it is larger by.
    let path = server.dir.path().join("api.yaml");
    rename_write(&path, &bucket(8, "token_bucket"));
    wait_for_limit(&server, "api", "user", Some(8)).await;
    assert_eq!(remaining(&server.ok(peek("api", "user")).await, 0), 4);
    // A new algorithm for the same limit: its counter starts afresh.
    rename_write(&path, &bucket(8, "sliding_window"));
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while remaining(&server.ok(peek("api", "user")).await, 0) != 8 {
        assert!(
            Instant::now() < deadline,
            "the sliding window never started afresh"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.admitted(10, &call).await, 8);
    server.stop().await;
}
