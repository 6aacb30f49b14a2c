//! [8/8]'s resource exhaustion: a server out of file descriptors keeps serving the connections
//! it has, leaves new ones waiting rather than failing, says so in its log a bounded number of
//! times, and serves again once connections close.

mod common;

use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

const RULES: &str = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1000000 }\n";

/// A connection that answered one call within `wait`, or none.
async fn served(grpc: u16, wait: Duration) -> Option<RateLimitServiceClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect_timeout(wait)
        .timeout(wait);
    let channel = tokio::time::timeout(wait, endpoint.connect())
        .await
        .ok()?
        .ok()?;
    let mut client = RateLimitServiceClient::new(channel);
    let call = request("d", &[&[("k", "v")]]);
    let answer = tokio::time::timeout(wait, client.should_rate_limit(call)).await;
    matches!(answer, Ok(Ok(_))).then_some(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_a_server_keeps_its_connections_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("d.yaml", RULES)]);
    let log = dir.path().join("log");
    let (grpc, http) = (free_port(), free_port());
    // 64 descriptors in all: the runtimes, listeners and log take about twenty.
    let command = format!(
        "ulimit -n 64 && exec '{}' serve --config '{}' --grpc-addr 127.0.0.1:{grpc} --http-addr 127.0.0.1:{http} --grpc-threads 2",
        env!("CARGO_BIN_EXE_sluice"),
        dir.path().display()
    );
    let mut child = tokio::process::Command::new("bash")
        .args(["-c", &command])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut first = loop {
        if let Some(client) = served(grpc, Duration::from_millis(500)).await {
            break client;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited at start"
        );
        assert!(started.elapsed() < Duration::from_secs(20), "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Connections until three in a row go unserved: the descriptors are spent.
    let mut held = Vec::new();
    let mut unserved = 0;
    while unserved < 3 && held.len() < 200 {
        match served(grpc, Duration::from_millis(500)).await {
            Some(client) => {
                held.push(client);
                unserved = 0;
            }
            None => unserved += 1,
        }
    }
    println!(
        "{} connections served besides the first before three in a row waited",
        held.len()
    );
    assert_eq!(unserved, 3, "200 connections and the limit never met");
    assert!(child.try_wait().unwrap().is_none(), "the server died");
    // The connections it has are served as before.
    let call = request("d", &[&[("k", "v")]]);
    first
        .should_rate_limit(call.clone())
        .await
        .expect("the first connection still served");
    for client in held.iter_mut().take(5) {
        client
            .should_rate_limit(call.clone())
            .await
            .expect("a held connection still served");
    }
    // Connections close: new ones are served again.
    drop(held);
    let recovered = Instant::now();
    loop {
        if served(grpc, Duration::from_millis(500)).await.is_some() {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(10),
            "not served again 10 s after the connections closed"
        );
    }
    println!(
        "served again {:?} after the connections closed",
        recovered.elapsed()
    );
    signal(&child, "TERM");
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    let told = logged
        .lines()
        .filter(|l| l.contains("cannot accept"))
        .count();
    println!("the log told of it {told} times");
    assert!(
        told >= 1,
        "the log never said connections were refused:\n{logged}"
    );
    assert!(told <= 4, "the log told of it {told} times:\n{logged}");
}
