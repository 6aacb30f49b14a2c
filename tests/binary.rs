//! The `sluice` binary itself: `validate` on broken files, `serve` refusing them with the same
//! messages, and `serve` on the default rules answering over gRPC and stopping on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// Every error the broken fixtures hold: (file, line, field, words of the message).
const EXPECTED: &[(&str, usize, &str, &str)] = &[
    ("empty-domain.yaml", 1, "domain", "must not be empty"),
    (
        "negative-limit.yaml",
        6,
        "descriptors[0].rate_limit.requests_per_unit",
        "-5",
    ),
    ("not-yaml.yaml", 6, "", "while scanning a quoted scalar"),
    (
        "semantic.yaml",
        4,
        "descriptors[0].key",
        "key must not be empty",
    ),
    (
        "semantic.yaml",
        11,
        "descriptors[1].rate_limit.unit",
        "unknown unit `minutes`",
    ),
    (
        "semantic.yaml",
        17,
        "descriptors[2].rate_limit.unit",
        "unlimited limit must not set a unit",
    ),
    (
        "semantic.yaml",
        24,
        "descriptors[4]",
        "duplicate descriptor `region=eu` at this level (first at line 19)",
    ),
    (
        "semantic.yaml",
        32,
        "descriptors[5].limits[0]",
        "missing `unit`",
    ),
    (
        "semantic.yaml",
        35,
        "descriptors[5].limits[1].tokens",
        "set only one of",
    ),
    (
        "semantic.yaml",
        41,
        "descriptors[6].limits[1]",
        "a second requests limit per minute",
    ),
    (
        "semantic.yaml",
        45,
        "descriptors[7].share_threshold",
        "needs a wildcard",
    ),
    (
        "semantic.yaml",
        50,
        "descriptors[7].rate_limit.replaces[0].name",
        "`no_such_limit`",
    ),
    (
        "semantic.yaml",
        54,
        "descriptors[8].rate_limit",
        "cannot have other limits",
    ),
    (
        "unknown-field.yaml",
        4,
        "descriptors[0]",
        "unknown field `rate_limt`",
    ),
    ("same-domain-b.yaml", 2, "domain", "already defined in"),
];

fn assert_every_error(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    for (file, line, field, words) in EXPECTED {
        let place = format!("{file}:{line}:");
        let found = lines.iter().any(|l| {
            l.contains(&place)
                && l.contains(words)
                && (field.is_empty() || l.contains(&format!(": {field}: ")))
        });
        assert!(
            found,
            "no error `{place} {field}: ...{words}...` in:\n{stderr}"
        );
    }
}

#[test]
fn validate_prints_every_error_with_file_line_and_field() {
    let out = Command::new(SLUICE)
        .args(["validate", fixture("broken").to_str().unwrap()])
        .output()
        .expect("run sluice validate");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_every_error(&stderr);
    assert!(
        stderr.contains(&format!("{} errors", EXPECTED.len())),
        "{stderr}"
    );
}

#[test]
fn validate_accepts_the_default_rules() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_refuses_broken_rules_with_the_same_messages() {
    let mut child = Command::new(SLUICE)
        .args(["serve", "--config", fixture("broken").to_str().unwrap()])
        .args(["--grpc-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("sluice serve did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_every_error(&stderr);
    assert!(stderr.contains("refusing to start"), "{stderr}");
}

#[tokio::test]
async fn serve_answers_on_the_default_rules_and_stops_on_sigterm() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let config = config.to_str().unwrap();
    let (mut child, mut client) = spawn_sluice(&[], &[("SLUICE_CONFIG", config)]).await;
    // The default rules: a partner key has 600 requests a minute.
    let call = request("llm_gateway", &[&[("api_key", "partner-team-key")]]);
    let response = client
        .should_rate_limit(call)
        .await
        .expect("call")
        .into_inner();
    assert!(is_ok(&response));
    assert_eq!(limit_of(&response, 0), Some(600));
    let blocked = request("edge", &[&[("remote_address", "192.0.2.66")]]);
    let response = client
        .should_rate_limit(blocked)
        .await
        .expect("call")
        .into_inner();
    assert!(!is_ok(&response));

    signal(&child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "clean exit, got {status:?}");
}
