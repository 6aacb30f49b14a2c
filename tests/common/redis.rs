//! A real `redis-server` for the tests, on a free loopback port, stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    binary: PathBuf,
    extra: Vec<String>,
    _dir: tempfile::TempDir,
}

/// The redis-server binary, or `None` outside CI when it is missing (the test then says it
/// skips). Under CI=true a missing binary fails the test.
pub fn redis_binary() -> Option<PathBuf> {
    binary("SLUICE_REDIS_SERVER", "redis-server")
}

/// A program named by `variable`, else `default` on the PATH, that answers `--version`; `None`
/// outside CI when it is missing (the test then says it skips), a failure under CI=true.
pub fn binary(variable: &str, default: &str) -> Option<PathBuf> {
    let candidate = std::env::var(variable).unwrap_or_else(|_| default.into());
    let found = Command::new(&candidate)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(PathBuf::from(candidate));
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{default} not found (set {variable} or run scripts/test.sh)");
    }
    eprintln!("SKIPPED: {default} not found; run scripts/test.sh to install it");
    None
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        Self::start_with(&[])
    }

    /// A server with extra redis-server arguments (e.g. cluster mode).
    pub fn start_with(extra: &[&str]) -> Option<RedisServer> {
        let binary = redis_binary()?;
        let mut server = RedisServer {
            child: None,
            port: super::free_port(),
            binary,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _dir: tempfile::tempdir().expect("temp dir"),
        };
        server.run();
        Some(server)
    }

    /// Starts it on its port (again, after [`RedisServer::kill`]: empty, as after a crash
    /// without persistence).
    pub fn run(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self._dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ping().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    fn ping(&self) -> redis::RedisResult<String> {
        match redis::cmd("PING").query(&mut self.connection()?) {
            // A password-protected server answers, so it is up.
            Err(e) if e.to_string().contains("NOAUTH") => Ok("PONG".into()),
            other => other,
        }
    }

    /// Kills the server (SIGKILL: no goodbye, as a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Pauses (`SIGSTOP`: slow, not dead; it reads nothing until [`RedisServer::resume`]) or
    /// resumes (`SIGCONT`) the server, by its pid.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query(&mut self.connection().expect("connect to redis"))
            .expect("redis command")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A namespace no other test run shares.
pub fn unique_namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test-{test}-{}-{nanos}", std::process::id())
}

/// Milliseconds since the epoch by the wall clock: where the tests set manual clocks that
/// must agree with Redis's own time (key expiries).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `n` replicas of sluice in this process, on the rule `files`, syncing with `redis` in a
/// namespace of their own named after `test`, at the default settings otherwise; their
/// manual clocks start at `start_ms`, alike.
pub async fn replicas(
    redis: &RedisServer,
    test: &str,
    n: usize,
    start_ms: u64,
    files: &[(&str, &str)],
) -> Vec<super::TestServer> {
    let namespace = unique_namespace(test);
    let mut replicas = Vec::new();
    for _ in 0..n {
        let (url, namespace) = (redis.url(), namespace.clone());
        replicas.push(
            super::start_at(start_ms, files, move |s| {
                s.redis_url = Some(url);
                s.redis_namespace = Some(namespace);
            })
            .await,
        );
    }
    replicas
}
