//! Fuzzing on the stable toolchain: each target is fed inputs mutated from a corpus of real
//! ones (valid requests, the project's rule files, the admin API's bodies), and every input
//! must meet four checks. A finding is any input that breaks one:
//! - no panic (the request path's own guard answers a panic as an internal error: that is a
//!   finding too);
//! - no hang: no input takes a second;
//! - bounded memory: resident memory grows by no more than 256 MiB over a run;
//! - every rejection a clear error: INVALID_ARGUMENT with a message; a rule file's error with
//!   its file and a message; an admin 4xx with a JSON `error`, never a 5xx.
//!
//! `cargo test --test fuzz` runs a short pass with a fixed seed (10,000 inputs a target, what
//! CI runs); `scripts/fuzz.sh [inputs] [seed]` runs each target for as many as asked (a
//! million by default) and prints inputs per second and findings.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;
use prost::Message;
use serde_yaml::Value;
use sluice::settings::Settings;

/// How many inputs a target gets, and from which seed: `FUZZ_INPUTS` and `FUZZ_SEED`, else
/// CI's short fixed pass.
fn budget() -> (u64, u64) {
    let number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (number("FUZZ_INPUTS", 10_000), number("FUZZ_SEED", 0x5eed))
}

/// xorshift64*: a few lines, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Byte-level mutations of `input`: one to four of bit flips, bytes set to edge values, bytes
/// inserted, ranges deleted or repeated, and splices from another corpus entry.
fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, b'*', b'=', b':'][rng.below(8)];
            }
            2 => {
                let i = rng.below(len + 1);
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                out.splice(i..i, bytes);
            }
            3 if len > 1 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                out.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let copy = out[i..i + n].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, copy);
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let (from, at) = (rng.below(other.len()), rng.below(len + 1));
                    let n = 1 + rng.below((other.len() - from).min(64));
                    out.splice(at..at, other[from..from + n].iter().copied());
                }
            }
            _ => out.truncate(rng.below(len + 1)),
        }
    }
    out
}

/// Resident memory, in bytes.
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// A target's run: how many inputs, how fast, what was found.
struct Report {
    target: &'static str,
    inputs: u64,
    elapsed: Duration,
    findings: Vec<String>,
    /// How the inputs came out (accepted, refused and why): a pass where nearly all are
    /// refused at the first byte says little of what lies behind it.
    outcomes: std::collections::BTreeMap<&'static str, u64>,
}

impl Report {
    fn print_and_check(&self) {
        println!(
            "fuzz {}: {} inputs in {:.1} s ({:.0} a second), {} findings",
            self.target,
            self.inputs,
            self.elapsed.as_secs_f64(),
            self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.findings.len()
        );
        println!("  outcomes: {:?}", self.outcomes);
        for finding in self.findings.iter().take(5) {
            println!("  {finding}");
        }
        assert!(
            self.findings.is_empty(),
            "{}: {} findings",
            self.target,
            self.findings.len()
        );
    }
}

/// Runs `check` on `inputs` inputs mutated from `corpus`, timing each and watching memory.
fn run(
    target: &'static str,
    corpus: &[Vec<u8>],
    mut make: impl FnMut(&mut Rng, &[Vec<u8>]) -> Vec<u8>,
    mut check: impl FnMut(&[u8]) -> Result<&'static str, String>,
) -> Report {
    let (inputs, seed) = budget();
    let mut rng = Rng::new(seed);
    let mut findings = Vec::new();
    let mut outcomes = std::collections::BTreeMap::new();
    let (start, base) = (Instant::now(), resident());
    for n in 0..inputs {
        let input = make(&mut rng, corpus);
        let started = Instant::now();
        let checked = std::panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = started.elapsed();
        let shown = || {
            format!(
                "{:?}",
                String::from_utf8_lossy(&input[..input.len().min(120)])
            )
        };
        match checked {
            Ok(Ok(outcome)) => *outcomes.entry(outcome).or_default() += 1,
            Ok(Err(unclear)) => findings.push(format!("input {n} {}: {unclear}", shown())),
            Err(_) => findings.push(format!("input {n} {}: panicked", shown())),
        }
        if took > Duration::from_secs(1) {
            findings.push(format!("input {n} {}: took {took:?}", shown()));
        }
        if n % 10_000 == 9_999 {
            let grown = resident().saturating_sub(base);
            if grown > 256 << 20 {
                findings.push(format!("resident memory grew by {} MiB", grown >> 20));
                break;
            }
        }
    }
    Report {
        target,
        inputs,
        elapsed: start.elapsed(),
        findings,
        outcomes,
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's rule files: the default rules, the Envoy example's, envoyproxy/ratelimit's
/// documented examples, and the broken fixtures.
fn rule_files() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for dir in [
        "config",
        "examples/envoy/rules",
        "tests/fixtures/envoyproxy-examples",
        "tests/fixtures/broken",
    ] {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let text = std::fs::read_to_string(&path).unwrap();
                files.push((path, text));
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 10,
        "the corpus of rule files: {}",
        files.len()
    );
    files
}

/// A server's shared state on the project's default rules (no listener, no Redis).
fn app() -> Arc<sluice::App> {
    let rules = sluice::load_dir(&root().join("config")).expect("the default rules load");
    let settings = Settings::local(root().join("config"));
    let clock = Arc::new(sluice::ManualClock::new(1_796_601_600_000));
    Arc::new(sluice::App::new(settings, rules, clock, None))
}

/// Requests of every shape a client sends: the LLM gateway's descriptors, reserved entries
/// (reports, estimates, releases, priorities), hits, negative hits, a limit override.
fn request_corpus() -> Vec<Vec<u8>> {
    let descriptor = |entries: &[(&str, &str)]| {
        let mut d = common::descriptor(entries);
        d.hits_addend = None;
        d
    };
    let mut requests = vec![
        common::request("llm_gateway", &[&[("api_key", "k1"), ("model", "gpt-4o")]]),
        common::request(
            "llm_gateway",
            &[
                &[("api_key", "k1")],
                &[("api_key", "k1"), ("model", "gpt-4o")],
                &[("endpoint", "openai")],
                &[("api_key", "k1"), ("sluice.report", "tokens")],
                &[("api_key", "k1"), ("sluice.estimate", "800")],
            ],
        ),
        common::request(
            "edge",
            &[&[("remote_address", "10.0.0.1")], &[("path", "/login")]],
        ),
        common::request(
            "llm_gateway",
            &[&[("api_key", "k2"), ("sluice.release", "1796601600000")]],
        ),
        common::request(
            "llm_gateway",
            &[&[("api_key", "k3"), ("sluice.priority", "high")]],
        ),
    ];
    let mut hits = RateLimitRequest {
        domain: "llm_gateway".into(),
        descriptors: vec![descriptor(&[("api_key", "k1"), ("model", "gpt-4o-mini")])],
        hits_addend: 7,
    };
    hits.descriptors[0].hits_addend = Some(UInt64Value { value: 1500 });
    hits.descriptors[0].is_negative_hits = true;
    requests.push(hits);
    let mut limited = common::request("edge", &[&[("path", "/api")]]);
    limited.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 5,
        unit: 2,
    });
    requests.push(limited);
    requests.iter().map(|r| r.encode_to_vec()).collect()
}

/// A request of parts a client may send: known and unknown domains, keys and values of the
/// rules and odd ones, reserved entries with good and bad values, hits at the edges.
fn built_request(rng: &mut Rng) -> RateLimitRequest {
    const DOMAINS: [&str; 4] = ["llm_gateway", "edge", "", "unknown"];
    const KEYS: [&str; 12] = [
        "api_key",
        "model",
        "endpoint",
        "remote_address",
        "path",
        "sluice.report",
        "sluice.estimate",
        "sluice.release",
        "sluice.priority",
        "sluice.",
        "",
        "k",
    ];
    const VALUES: [&str; 10] = [
        "k1",
        "gpt-4o",
        "tokens",
        "800",
        "18446744073709551616",
        "-1",
        "*",
        "",
        "high",
        "1796601600000",
    ];
    let descriptors = (0..rng.below(6))
        .map(|_| {
            let entries: Vec<(&str, String)> = (0..1 + rng.below(4))
                .map(|_| {
                    let value = if rng.chance(8) {
                        "x".repeat(rng.below(5000))
                    } else {
                        VALUES[rng.below(VALUES.len())].to_string()
                    };
                    // Mostly the rules' own keys; a quarter reserved, empty or unknown.
                    let key = if rng.chance(4) {
                        KEYS[rng.below(KEYS.len())]
                    } else {
                        KEYS[rng.below(5)]
                    };
                    (key, value)
                })
                .collect();
            let pairs: Vec<(&str, &str)> = entries.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut descriptor = common::descriptor(&pairs);
            descriptor.hits_addend = match rng.below(4) {
                0 => None,
                1 => Some(UInt64Value { value: 0 }),
                2 => Some(UInt64Value { value: rng.next() }),
                _ => Some(UInt64Value {
                    value: rng.below(2000) as u64,
                }),
            };
            descriptor.is_negative_hits = rng.chance(6);
            if rng.chance(6) {
                descriptor.limit = Some(RateLimitOverride {
                    requests_per_unit: rng.next() as u32,
                    unit: rng.below(10) as i32,
                });
            }
            descriptor
        })
        .collect();
    RateLimitRequest {
        domain: DOMAINS[if rng.chance(4) {
            rng.below(DOMAINS.len())
        } else {
            rng.below(2)
        }]
        .to_string(),
        descriptors,
        hits_addend: if rng.chance(2) { 0 } else { rng.next() as u32 },
    }
}

#[test]
fn the_request_path_takes_any_bytes_and_answers_or_refuses_them_clearly() {
    let app = app();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let corpus = request_corpus();
    let report = run(
        "grpc request path",
        &corpus,
        |rng, corpus| {
            // A few inputs are noise from nothing; a third are requests built from parts
            // (valid protobuf, odd contents); the rest mutate a real request's bytes.
            if rng.chance(50) {
                (0..rng.below(64)).map(|_| rng.next() as u8).collect()
            } else if rng.chance(3) {
                built_request(rng).encode_to_vec()
            } else {
                let seed = rng.below(corpus.len());
                mutate(rng, &corpus[seed], corpus)
            }
        },
        |input| {
            let answered =
                runtime.block_on(sluice::answer(&app, bytes::Bytes::copy_from_slice(input)));
            match answered {
                Ok(answer) if answer.code == sluice::Code::Ok => Ok("allowed"),
                Ok(_) => Ok("over the limit"),
                Err(sluice::AnswerError::Invalid(error)) if !error.to_string().is_empty() => {
                    Ok("invalid argument")
                }
                Err(error) => Err(format!("answered {error:?}")),
            }
        },
    );
    report.print_and_check();
}

/// Structure-aware mutations of a rule file: a node of its YAML tree replaced by a node of
/// another kind or another place, removed, or repeated; a key renamed; a number pushed to an
/// edge.
fn mutate_tree(rng: &mut Rng, value: &mut Value, donors: &[Value]) {
    let edges = [
        Value::Null,
        Value::from(0),
        Value::from(-1),
        Value::from(u64::MAX),
        Value::from(4_294_967_296u64),
        Value::from(1e300),
        Value::from(""),
        Value::from("*"),
        Value::from("minute"),
        Value::from("token_bucket"),
        Value::from("90s"),
        Value::from("calendar_month"),
        Value::from("Mars/Olympus"),
        Value::Sequence(vec![]),
        Value::Mapping(Default::default()),
    ];
    match value {
        Value::Mapping(map) if !map.is_empty() && !rng.chance(4) => {
            let keys: Vec<Value> = map.keys().cloned().collect();
            let key = keys[rng.below(keys.len())].clone();
            match rng.below(6) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    let child = map.get(&key).cloned().unwrap_or(Value::Null);
                    let renamed = Value::from(format!("{}x", key.as_str().unwrap_or("k")));
                    map.insert(renamed, child);
                }
                2 => {
                    let donor = &donors[rng.below(donors.len())];
                    map.insert(key, pick(rng, donor).clone());
                }
                _ => {
                    if let Some(child) = map.get_mut(&key) {
                        mutate_tree(rng, child, donors);
                    }
                }
            }
        }
        Value::Sequence(items) if !items.is_empty() && !rng.chance(4) => {
            let i = rng.below(items.len());
            match rng.below(5) {
                0 => {
                    items.remove(i);
                }
                1 => {
                    let copy = items[i].clone();
                    items.insert(rng.below(items.len() + 1), copy);
                }
                _ => mutate_tree(rng, &mut items[i], donors),
            }
        }
        _ => *value = edges[rng.below(edges.len())].clone(),
    }
}

/// A node somewhere in `tree`.
fn pick<'v>(rng: &mut Rng, tree: &'v Value) -> &'v Value {
    let mut node = tree;
    for _ in 0..rng.below(6) {
        node = match node {
            Value::Mapping(map) if !map.is_empty() => {
                map.values().nth(rng.below(map.len())).unwrap_or(node)
            }
            Value::Sequence(items) if !items.is_empty() => &items[rng.below(items.len())],
            _ => return node,
        };
    }
    node
}

#[test]
fn the_rule_compiler_takes_any_text_and_rejects_it_clearly() {
    let files = rule_files();
    let corpus: Vec<Vec<u8>> = files.iter().map(|(_, t)| t.clone().into_bytes()).collect();
    let trees: Vec<Value> = files
        .iter()
        .filter_map(|(_, t)| serde_yaml::from_str(t).ok())
        .collect();
    let path = Path::new("fuzzed.yaml");
    let report = run(
        "rule compiler",
        &corpus,
        |rng, corpus| {
            if rng.chance(3) {
                // Bytes: the YAML parser's own edges.
                let seed = rng.below(corpus.len());
                mutate(rng, &corpus[seed], corpus)
            } else {
                let mut tree = trees[rng.below(trees.len())].clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_tree(rng, &mut tree, &trees);
                }
                serde_yaml::to_string(&tree)
                    .unwrap_or_default()
                    .into_bytes()
            }
        },
        |input| {
            let file = sluice::SourceFile {
                path: path.to_path_buf(),
                text: String::from_utf8_lossy(input).into_owned(),
            };
            match sluice::compile_file(&file) {
                Ok(_) => Ok("compiled"),
                Err(errors) if errors.is_empty() => Err("rejected with no error".into()),
                Err(errors) => match errors
                    .iter()
                    .find(|e| e.file != path || e.message.trim().is_empty())
                {
                    Some(unclear) => Err(format!("an unclear error: {unclear:?}")),
                    None if errors.iter().any(|e| e.line.is_some()) => Ok("rejected, with a line"),
                    None => Ok("rejected"),
                },
            }
        },
    );
    report.print_and_check();
}

/// The admin API's JSON bodies and queries, as a client would send them.
fn admin_corpus() -> Vec<Vec<u8>> {
    [
        r#"POST /v1/check {"domain":"llm_gateway","descriptors":[{"entries":[{"key":"api_key","value":"k1"},{"key":"model","value":"gpt-4o"}]}],"dry_run":true}"#,
        r#"POST /v1/check {"domain":"edge","descriptors":[{"entries":[{"key":"path","value":"/api"}],"hits_addend":3,"limit":{"requests_per_unit":5,"unit":"minute"}}],"hits_addend":1}"#,
        r#"POST /v1/explain {"domain":"llm_gateway","descriptors":[{"entries":[{"key":"api_key","value":"k1"}]}]}"#,
        r#"POST /v1/reset {"domain":"llm_gateway","entries":[{"key":"api_key","value":"k1"}]}"#,
        r#"POST /v1/capacity/reduce {"domain":"llm_gateway","rule":"api_key","factor":0.5}"#,
        r#"POST /json {"domain":"edge","descriptors":[{"entries":[{"key":"remote_address","value":"10.0.0.1"}]}]}"#,
        "GET /v1/usage?domain=llm_gateway&descriptor=api_key%3Dk1%2Cmodel%3Dgpt-4o",
        "GET /v1/rules",
        "GET /v1/capacity",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[test]
fn the_admin_api_takes_any_body_and_refuses_it_clearly() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = root().join("config");
    let mut settings = Settings::local(dir);
    settings.watch = false;
    settings.admin_token = Some("fuzz-token".into());
    let clock = Arc::new(sluice::ManualClock::new(1_796_601_600_000));
    let running = runtime
        .block_on(sluice::start(settings, clock))
        .expect("the server starts");
    let base = format!("http://{}", running.http_addr);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let corpus = admin_corpus();
    let report = run(
        "admin API",
        &corpus,
        |rng, corpus| {
            let seed = &corpus[rng.below(corpus.len())];
            // Mostly the body alone, behind a path that stays; sometimes the whole line.
            let text = String::from_utf8_lossy(seed);
            let mut parts = text.splitn(3, ' ');
            let (method, path, body) = (parts.next(), parts.next(), parts.next());
            match (method, path, body) {
                (Some(method), Some(path), Some(body)) if !rng.chance(4) => {
                    let body = mutate(rng, body.as_bytes(), corpus);
                    let mut line = format!("{method} {path} ").into_bytes();
                    line.extend(body);
                    line
                }
                _ => mutate(rng, seed, corpus),
            }
        },
        |input| {
            // "METHOD PATH BODY": the mutated line split as it stands (a broken method or path
            // is sent as GET of what is left, percent-encoded by the client as any URL is).
            let text = String::from_utf8_lossy(input);
            let (method, rest) = text.split_once(' ').unwrap_or(("GET", &text));
            let (path, body) = rest.split_once(' ').unwrap_or((rest, ""));
            let path: String = path
                .chars()
                .filter(|c| c.is_ascii_graphic() && *c != '#')
                .collect();
            let url = format!("{base}/{}", path.trim_start_matches('/'));
            let Ok(url) = reqwest::Url::parse(&url) else {
                return Ok("not a URL");
            };
            let request = if method == "POST" {
                client
                    .post(url)
                    .header("content-type", "application/json")
                    .bearer_auth("fuzz-token")
                    .body(body.to_string())
            } else {
                client.get(url)
            };
            runtime.block_on(async {
                let response = request
                    .send()
                    .await
                    .map_err(|e| format!("no answer: {e}"))?;
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                if status.is_server_error() {
                    return Err(format!("answered {status}: {body}"));
                }
                if status.is_client_error() && status.as_u16() != 404 && status.as_u16() != 405 {
                    let clear = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(|e| !e.trim().is_empty()))
                        .unwrap_or(false)
                        || !body.trim().is_empty();
                    if !clear {
                        return Err(format!("answered {status} with no reason"));
                    }
                }
                Ok(match status.as_u16() {
                    200 => "200",
                    400 => "400",
                    401 | 403 => "401/403",
                    404 | 405 => "404/405",
                    429 => "429",
                    _ => "other",
                })
            })
        },
    );
    runtime.block_on(running.stop()).ok();
    report.print_and_check();
}
