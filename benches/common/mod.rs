//! Rule files the benchmarks share. Every limit is high enough that each call is admitted and
//! counted (the common path). Each benchmark uses a part of this.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HIGH_LIMIT: &str = "rate_limit: { unit: minute, requests_per_unit: 4000000000 }";

/// Domain `bench` with one rule on `api_key`: a counter per key.
pub const API_KEY_RULE: &str = "domain: bench\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 4000000000 }\n";

/// `n` exact-value rules, `tenant: t0` .. `tenant: t{n-1}`, as lines of a `descriptors:` list.
pub fn tenant_rules(n: usize) -> String {
    (0..n)
        .map(|i| format!("  - key: tenant\n    value: t{i}\n    {HIGH_LIMIT}\n"))
        .collect()
}

/// One rule on each of the keys `d0` .. `d{n-1}`, as lines of a `descriptors:` list.
pub fn key_rules(n: usize) -> String {
    (0..n)
        .map(|i| format!("  - key: d{i}\n    {HIGH_LIMIT}\n"))
        .collect()
}

/// A free loopback port, for a server a benchmark starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    /// sluice's HTTP port (metrics); 0 for the no-op server.
    pub http_port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The cores servers run on and the load generator (this process, and Redis) runs on: on two
/// cores or more, apart, so the load never takes the server's core (`LOAD_PIN=0`: unpinned).
pub struct Pinning {
    pub server: Option<&'static str>,
    pub load: Option<&'static str>,
    /// The machine's cores, read before this process is pinned.
    pub cores: usize,
}

impl Pinning {
    pub fn from_env() -> Pinning {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let wanted = std::env::var("LOAD_PIN").map_or(true, |v| v != "0");
        if wanted && cores >= 2 {
            Pinning {
                server: Some("0"),
                load: Some("1"),
                cores,
            }
        } else {
            Pinning {
                server: None,
                load: None,
                cores,
            }
        }
    }

    /// `program`, started on `cpu` when one is given (with `taskset`, which execs it: the pid
    /// is the program's).
    pub fn command(cpu: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match cpu {
            None => Command::new(program),
            Some(cpu) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpu).arg(program);
                command
            }
        }
    }

    /// Pins this process's main thread, before any other thread exists: the load runtime's
    /// threads inherit it.
    pub fn pin_self(&self) {
        let Some(cpu) = self.load else { return };
        let pinned = Command::new("taskset")
            .args(["-p", "-c", cpu, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
        assert!(
            pinned.is_ok_and(|s| s.success()),
            "taskset -p failed; LOAD_PIN=0 runs unpinned"
        );
    }
}

pub fn start(command: &mut Command, port: u16) -> Server {
    command.stdout(Stdio::null()).stderr(Stdio::null());
    started(command, port)
}

/// As [`start`], the server's output (both streams) written to `log`.
pub fn start_writing(command: &mut Command, port: u16, log: std::fs::File) -> Server {
    command
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    started(command, port)
}

fn started(command: &mut Command, port: u16) -> Server {
    let child = command.spawn().expect("start server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        port,
        http_port: 0,
    }
}

/// A redis-server (`binary`) on a free loopback port, on `cpu` when given, keeping nothing on
/// disk; with its port.
pub fn start_redis(cpu: Option<&str>, binary: &str) -> (Server, u16) {
    let port = free_port();
    let server = start(
        Pinning::command(cpu, binary).args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]),
        port,
    );
    (server, port)
}
