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

/// One HTTP/2 frame: its 9-byte header (length, type, flags, stream) and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// An HPACK header field, literal without indexing: a static-table name (`index`) or a new
/// name, and the value, neither Huffman-coded.
fn field(index: u8, name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![index];
    if index == 0 {
        out.push(name.len() as u8);
        out.extend(name.as_bytes());
    }
    out.push(value.len() as u8);
    out.extend(value.as_bytes());
    out
}

/// [8/8]: a slowloris client (its own HTTP/2 frames on a raw socket) opens twenty
/// ShouldRateLimit calls on one connection and never sends a body. The server advertises its
/// limit of streams (`--grpc-max-concurrent-streams 8`), refuses the twelve past it at once
/// (RST_STREAM REFUSED_STREAM), ends the eight it holds at `--grpc-call-timeout` (700 ms),
/// and serves another client meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_bounded_by_the_listeners_stream_limit_and_call_timeout() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("d.yaml", RULES)]);
    let config = dir.path().to_str().unwrap();
    let args = [
        "--config",
        config,
        "--grpc-max-concurrent-streams",
        "8",
        "--grpc-call-timeout",
        "700ms",
    ];
    let (mut child, mut client, _, grpc) = spawn_logged(&args, &[], &dir.path().join("log")).await;
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", grpc)).unwrap();
    let path = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
    // :method POST and :scheme http by index; :path and :authority by indexed name.
    let mut headers = vec![0x83, 0x86];
    headers.extend(field(4, "", path));
    headers.extend(field(1, "", "127.0.0.1"));
    headers.extend(field(0, "content-type", "application/grpc"));
    headers.extend(field(0, "te", "trailers"));
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(4, 0, 0, &[]));
    for i in 0..20u32 {
        // END_HEADERS, and neither END_STREAM nor any DATA: the call is never finished.
        opening.extend(frame(1, 0x4, 1 + 2 * i, &headers));
    }
    slow.write_all(&opening).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    // Another client is served while the slow one holds its streams.
    client
        .should_rate_limit(request("d", &[&[("k", "v")]]))
        .await
        .expect("another client served");
    let (mut buffer, mut limit, mut refused, mut ended) =
        (Vec::new(), None, Vec::new(), Vec::new());
    while started.elapsed() < Duration::from_secs(5) && ended.len() < 8 {
        let mut chunk = [0u8; 16384];
        match slow.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buffer.extend(&chunk[..n]),
            Err(_) => continue,
        }
        while buffer.len() >= 9 {
            let length = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
            if buffer.len() < 9 + length {
                break;
            }
            let (kind, flags) = (buffer[3], buffer[4]);
            let stream =
                u32::from_be_bytes([buffer[5], buffer[6], buffer[7], buffer[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = buffer[9..9 + length].to_vec();
            buffer.drain(..9 + length);
            match kind {
                // The server's SETTINGS (not an ack): acked, and its stream limit read.
                4 if flags & 1 == 0 => {
                    for setting in payload.chunks(6) {
                        if setting[..2] == [0, 3] {
                            limit = Some(u32::from_be_bytes(setting[2..6].try_into().unwrap()));
                        }
                    }
                    slow.write_all(&frame(4, 1, 0, &[])).unwrap();
                }
                3 if payload == 7u32.to_be_bytes() => refused.push((stream, started.elapsed())),
                // A response HEADERS that ends its stream: the call answered (trailers only).
                1 if flags & 1 == 1 => ended.push((stream, started.elapsed())),
                _ => {}
            }
        }
    }
    println!("stream limit {limit:?}; refused {refused:?}; ended {ended:?}");
    assert_eq!(limit, Some(8));
    let refused_streams: Vec<u32> = refused.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        refused_streams,
        (8..20).map(|i| 1 + 2 * i).collect::<Vec<u32>>()
    );
    assert!(
        refused
            .iter()
            .all(|(_, at)| *at < Duration::from_millis(500))
    );
    let mut ended_streams: Vec<u32> = ended.iter().map(|(s, _)| *s).collect();
    ended_streams.sort();
    assert_eq!(
        ended_streams,
        (0..8).map(|i| 1 + 2 * i).collect::<Vec<u32>>()
    );
    assert!(
        ended
            .iter()
            .all(|(_, at)| *at >= Duration::from_millis(600) && *at < Duration::from_secs(3)),
        "{ended:?}"
    );
    // The slow connection closes first, or the stop waits its grace for it.
    drop(slow);
    signal(&child, "TERM");
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
}

/// What a raw HTTP/1 client gets back before the server closes the connection, and when it
/// closed.
fn read_until_closed(stream: &mut std::net::TcpStream, started: Instant) -> (String, Duration) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_disconnected_at_the_header_and_request_time_limits() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    write_rules(dir.path(), &[("d.yaml", RULES)]);
    let config = dir.path().to_str().unwrap();
    let args = [
        "--config",
        config,
        "--http-header-timeout",
        "500ms",
        "--http-request-timeout",
        "800ms",
    ];
    let (mut child, _, http, _) = spawn_logged(&args, &[], &dir.path().join("log")).await;
    let run = tokio::task::spawn_blocking(move || {
        let connect = || std::net::TcpStream::connect(&http).unwrap();
        // Half a request line's headers, then nothing.
        let mut headers_cut = connect();
        let started = Instant::now();
        headers_cut
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: sluice\r\n")
            .unwrap();
        // Connected, silent.
        let mut silent = connect();
        let silent_since = Instant::now();
        // Headers whole, the body promised and never finished.
        let mut body_cut = connect();
        let body_since = Instant::now();
        body_cut
            .write_all(b"POST /v1/check HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"domain\":")
            .unwrap();
        // One request answered, the connection kept alive, then nothing.
        let mut idle = connect();
        let idle_since = Instant::now();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: sluice\r\n\r\n")
            .unwrap();
        // Meanwhile another client is served at once.
        let mut quick = connect();
        let quick_since = Instant::now();
        quick
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n")
            .unwrap();
        let quick = read_until_closed(&mut quick, quick_since);
        (
            read_until_closed(&mut idle, idle_since),
            read_until_closed(&mut headers_cut, started),
            read_until_closed(&mut silent, silent_since),
            read_until_closed(&mut body_cut, body_since),
            quick,
        )
    });
    let (idle, headers_cut, silent, body_cut, quick) = run.await.unwrap();
    println!(
        "idle after an answer: closed after {:?} ({:?}); headers cut: {:?} ({:?}); silent: {:?} ({:?}); body cut: {:?} ({:?}); a quick client: {:?}",
        idle.1,
        idle.0.lines().next(),
        headers_cut.1,
        headers_cut.0.lines().next(),
        silent.1,
        silent.0.lines().next(),
        body_cut.1,
        body_cut.0.lines().next(),
        quick.1
    );
    assert!(quick.0.starts_with("HTTP/1.1 200"), "{}", quick.0);
    assert!(quick.1 < Duration::from_millis(400), "{:?}", quick.1);
    // Headers not sent within 500 ms: the connection is closed (hyper answers 408 first).
    for (what, (answer, after)) in [("headers cut", &headers_cut), ("silent", &silent)] {
        assert!(
            *after >= Duration::from_millis(450) && *after < Duration::from_secs(3),
            "{what}: {after:?}"
        );
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{what}: {answer}"
        );
    }
    // Kept alive and idle past 500 ms: closed, after its answer.
    assert!(idle.0.starts_with("HTTP/1.1 200"), "{}", idle.0);
    assert!(
        idle.1 >= Duration::from_millis(450) && idle.1 < Duration::from_secs(3),
        "idle: {:?}",
        idle.1
    );
    // A body not finished within the request's 800 ms: 408.
    assert!(body_cut.0.starts_with("HTTP/1.1 408"), "{}", body_cut.0);
    assert!(
        body_cut.1 >= Duration::from_millis(750) && body_cut.1 < Duration::from_secs(3),
        "{:?}",
        body_cut.1
    );
    signal(&child, "TERM");
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
}
