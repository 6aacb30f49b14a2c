//! End to end through a real Envoy: plain HTTP to Envoy (examples/envoy/envoy.yaml), which asks
//! sluice over gRPC and forwards to the mock LLM upstream. Tokens reach sluice as usage reports
//! at stream end, for JSON and for SSE responses.

mod common;

use std::time::{Duration, Instant};

use common::envoy::{Envoy, MockLlm, envoy_binary};
use common::metrics::counted;
use common::*;
use serde_json::Value;

/// sluice's manual clock sits 20 s into a minute: resets read 40 s, and no window rolls over
/// during a test.
const NOW: u64 = T0 + 20_000;

struct Stack {
    sluice: TestServer,
    _mock: MockLlm,
    envoy: Envoy,
    http: reqwest::Client,
    /// The process-wide usage report counters when the stack started.
    reports_at_start: (u64, u64),
    /// Held for the stack's life: usage reports are counted process-wide, so stacks take
    /// turns and each reads only its own.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start_stack(rules: &str) -> Option<Stack> {
    stack_with(rules, false).await
}

async fn stack_with(rules: &str, failure_mode_deny: bool) -> Option<Stack> {
    let binary = envoy_binary()?;
    let turn = TURNS.lock().await;
    let sluice = start_at(NOW, &[("llm.yaml", rules)], |_| {}).await;
    let reports_at_start = usage_reports(&sluice).await;
    let mock = MockLlm::start().await;
    let sluice_port = sluice.running.as_ref().unwrap().grpc_addr.port();
    let envoy = Envoy::start(&binary, sluice_port, mock.port, failure_mode_deny).await;
    Some(Stack {
        sluice,
        _mock: mock,
        envoy,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        reports_at_start,
        _turn: turn,
    })
}

/// Usage reports and the tokens they reported, process-wide.
async fn usage_reports(server: &TestServer) -> (u64, u64) {
    (
        counted(server, "sluice_usage_reports_total").await,
        counted(server, "sluice_reported_tokens_total").await,
    )
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Stack {
    /// A chat completion as an OpenAI SDK sends it; `tokens` is what the mock will report.
    async fn chat(&self, key: &str, model: &str, tokens: u32, stream: bool) -> Answer {
        self.chat_with(key, model, tokens, stream, &[]).await
    }

    async fn chat_with(
        &self,
        key: &str,
        model: &str,
        tokens: u32,
        stream: bool,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .http
            .post(self.envoy.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("x-model", model)
            .header("x-mock-total-tokens", tokens.to_string())
            .json(&serde_json::json!({"model": model, "stream": stream, "messages": []}));
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("Envoy answers");
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        let body = response.text().await.expect("body");
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Tokens sluice has counted for a key's descriptor (its own, local counts).
    async fn tokens_counted(&self, key: &str) -> u64 {
        let app = &self.sluice.running.as_ref().unwrap().app;
        let usage = sluice::counters::usage(app, "llm_gateway", &[("api_key", key)])
            .await
            .expect("a rule matches");
        usage
            .windows
            .iter()
            .map(|w| w.local.tokens)
            .max()
            .unwrap_or(0)
    }

    /// Waits for the usage reports of finished streams to reach sluice.
    async fn until_tokens(&self, key: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counted = self.tokens_counted(key).await;
            if counted == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{key}: {counted} tokens counted, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        drop(self.envoy);
        self.sluice.stop().await;
    }
}

const RPM: &str = r#"
domain: llm_gateway
descriptors:
  - key: api_key
    limits:
      - name: key_rpm
        unit: minute
        requests: 3
      - name: key_tpm
        unit: minute
        tokens: 100000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_rpm_limit_get_an_openai_style_429() {
    let Some(stack) = start_stack(RPM).await else {
        return;
    };
    for n in 1..=3u32 {
        let ok = stack.chat("k1", "gpt-4o", 10, false).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert_eq!(ok.header("x-ratelimit-limit-requests"), Some("3"));
        let remaining = (3 - n).to_string();
        assert_eq!(
            ok.header("x-ratelimit-remaining-requests"),
            Some(remaining.as_str())
        );
        assert_eq!(ok.header("x-ratelimit-reset-requests"), Some("40s"));
        assert_eq!(ok.header("x-ratelimit-limit-tokens"), Some("100000"));
        stack.until_tokens("k1", 10 * u64::from(n)).await;
    }
    let denied = stack.chat("k1", "gpt-4o", 10, false).await;
    assert_eq!(denied.status, 429);
    assert_eq!(denied.header("retry-after"), Some("40"));
    assert_eq!(denied.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(denied.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(denied.header("x-ratelimit-remaining-tokens"), Some("99970"));
    assert_eq!(denied.header("content-type"), Some("application/json"));
    // Envoy's own draft-03 headers, from the statuses.
    assert_eq!(denied.header("x-ratelimit-remaining"), Some("0"));
    let body: Value = serde_json::from_str(&denied.body).expect("JSON body");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    for words in ["requests per minute", "key_rpm", "limit 3", "used 3", "40s"] {
        assert!(message.contains(words), "{words:?} not in {message:?}");
    }
    // Another key is untouched.
    assert_eq!(stack.chat("k2", "gpt-4o", 10, false).await.status, 200);
    stack.stop().await;
}

const TPM: &str = r#"
domain: llm_gateway
descriptors:
  - key: api_key
    limits:
      - unit: minute
        requests: 100
      - name: key_tpm
        unit: minute
        tokens: 1000
"#;

async fn tokens_run_out(stream: bool) {
    let Some(stack) = start_stack(TPM).await else {
        return;
    };
    // 600 tokens reported: 400 left, so the next call still passes the check.
    assert_eq!(stack.chat("k1", "gpt-4o", 600, stream).await.status, 200);
    stack.until_tokens("k1", 600).await;
    let second = stack.chat("k1", "gpt-4o", 600, stream).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-ratelimit-remaining-tokens"), Some("400"));
    if stream {
        assert!(
            second.body.contains("data: [DONE]"),
            "an SSE stream: {}",
            second.body
        );
    }
    stack.until_tokens("k1", 1200).await;
    // The budget is spent: the check at request time refuses.
    let denied = stack.chat("k1", "gpt-4o", 600, stream).await;
    assert_eq!(denied.status, 429);
    assert_eq!(denied.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(denied.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(denied.header("retry-after"), Some("40"));
    let body: Value = serde_json::from_str(&denied.body).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("tokens per minute") && message.contains("used 1200"),
        "{message}"
    );
    // A denied call reports nothing: still 1200, from two reports.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stack.tokens_counted("k1").await, 1200);
    let (reports, tokens) = usage_reports(&stack.sluice).await;
    let (reports_before, tokens_before) = stack.reports_at_start;
    assert_eq!(
        (reports - reports_before, tokens - tokens_before),
        (2, 1200),
        "one report per stream"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_json_usage_exhausts_the_tpm_limit() {
    tokens_run_out(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_sse_usage_exhausts_the_tpm_limit() {
    tokens_run_out(true).await;
}

const KEY_AND_ENDPOINT: &str = r#"
domain: llm_gateway
descriptors:
  - key: api_key
    limits:
      - unit: minute
        requests: 2
  - key: endpoint
    value: openai
    limits:
      - unit: minute
        requests: 5
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_own_limit_does_not_use_the_endpoint_budget() {
    let Some(stack) = start_stack(KEY_AND_ENDPOINT).await else {
        return;
    };
    let statuses = |answers: Vec<u16>| answers;
    let mut greedy = Vec::new();
    for _ in 0..6 {
        greedy.push(stack.chat("greedy", "m", 1, false).await.status);
    }
    assert_eq!(statuses(greedy), [200, 200, 429, 429, 429, 429]);
    // The endpoint counted 2 of its 5: three more keys of 1 each still pass.
    for key in ["a", "b", "c"] {
        assert_eq!(stack.chat(key, "m", 1, false).await.status, 200, "{key}");
    }
    let full = stack.chat("d", "m", 1, false).await;
    assert_eq!(full.status, 429, "the endpoint's 5 are used");
    stack.stop().await;
}

const TIERS: &str = r#"
domain: llm_gateway
descriptors:
  - key: api_key
    value: known-key
    limits:
      - unit: minute
        requests: 5
  # The default tier: any other key.
  - key: api_key
    limits:
      - unit: minute
        requests: 2
"#;

const DENY_UNKNOWN: &str = r#"
domain: llm_gateway
descriptors:
  - key: api_key
    value: known-key
    limits:
      - unit: minute
        requests: 5
  # Unknown keys are refused.
  - key: api_key
    rate_limit:
      unit: minute
      requests_per_unit: 0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_get_the_default_tier_or_are_refused() {
    let Some(stack) = start_stack(TIERS).await else {
        return;
    };
    let mut unknown = Vec::new();
    for _ in 0..3 {
        unknown.push(stack.chat("stranger", "m", 1, false).await.status);
    }
    assert_eq!(unknown, [200, 200, 429]);
    let mut known = 0;
    for _ in 0..6 {
        known += usize::from(stack.chat("known-key", "m", 1, false).await.status == 200);
    }
    assert_eq!(known, 5);
    stack.stop().await;

    let Some(stack) = start_stack(DENY_UNKNOWN).await else {
        return;
    };
    assert_eq!(stack.chat("stranger", "m", 1, false).await.status, 429);
    assert_eq!(stack.chat("known-key", "m", 1, false).await.status, 200);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_reservations_against_three_estimates_admit_three() {
    let Some(stack) = start_stack(TPM).await else {
        return;
    };
    // 1000 tokens a minute; each request reserves 300 (x-max-tokens) and uses 50.
    let mut calls = tokio::task::JoinSet::new();
    let stack = std::sync::Arc::new(stack);
    for _ in 0..10 {
        let stack = stack.clone();
        calls.spawn(async move {
            stack
                .chat_with(
                    "k1",
                    "m",
                    50,
                    false,
                    &[("x-max-tokens", "300"), ("x-mock-delay-ms", "1000")],
                )
                .await
                .status
        });
    }
    let mut admitted = 0;
    while let Some(status) = calls.join_next().await {
        admitted += usize::from(status.unwrap() == 200);
    }
    assert_eq!(admitted, 3);
    // Settled by their reports: 3 x 50 used, the other 750 reserved come back.
    stack.until_tokens("k1", 150).await;
    std::sync::Arc::into_inner(stack).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_mode_deny_decides_when_sluice_is_down() {
    let Some(binary) = envoy_binary() else { return };
    let mock = MockLlm::start().await;
    // Nothing listens on this port: sluice is down.
    let down = free_port();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for (deny, want) in [(false, 200), (true, 500)] {
        let envoy = Envoy::start(&binary, down, mock.port, deny).await;
        let answer = http
            .post(envoy.url("/v1/chat/completions"))
            .header("x-api-key", "k1")
            .header("x-model", "m")
            .json(&serde_json::json!({"model": "m"}))
            .send()
            .await
            .expect("Envoy answers");
        assert_eq!(answer.status().as_u16(), want, "failure_mode_deny: {deny}");
    }
}

const STREAMS: &str = r#"
domain: llm_gateway
descriptors:
  - key: api_key
    limits:
      - name: key_streams
        concurrency: 3
        hold_ttl: 1m
"#;

/// `n` streams on key k1 at once, each held open `delay_ms` by the upstream.
fn streams(stack: &std::sync::Arc<Stack>, n: usize, delay_ms: &str) -> tokio::task::JoinSet<u16> {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (stack, delay_ms) = (stack.clone(), delay_ms.to_string());
        calls.spawn(async move {
            stack
                .chat_with("k1", "m", 10, true, &[("x-mock-delay-ms", &delay_ms)])
                .await
                .status
        });
    }
    calls
}

/// Five streams at once, each held open a second: their statuses, sorted.
async fn five_at_once(stack: &std::sync::Arc<Stack>) -> Vec<u16> {
    let mut calls = streams(stack, 5, "1000");
    let mut statuses = Vec::new();
    while let Some(status) = calls.join_next().await {
        statuses.push(status.unwrap());
    }
    statuses.sort();
    statuses
}

/// Sends calls, each ending at once, until one passes: the stream-done calls of streams just
/// ended reach sluice a moment after their clients see the end.
async fn until_one_passes(stack: &Stack) -> Duration {
    let started = Instant::now();
    loop {
        if stack.chat("k1", "m", 10, false).await.status == 200 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no slot came free"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_streams_on_a_key_of_three_slots_give_three_answers_and_two_429s() {
    let Some(stack) = start_stack(STREAMS).await else {
        return;
    };
    let stack = std::sync::Arc::new(stack);
    assert_eq!(five_at_once(&stack).await, [200, 200, 200, 429, 429]);
    // The three ended; their releases free the slots.
    until_one_passes(&stack).await;
    assert_eq!(five_at_once(&stack).await, [200, 200, 200, 429, 429]);

    // Refused streams release nothing, though Envoy makes a stream-done call for them too:
    // three long streams hold the slots while refused ones come and go.
    until_one_passes(&stack).await;
    let mut long = streams(&stack, 3, "3000");
    let app = stack.sluice.running.as_ref().unwrap().app.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while holds_in_flight(&app, "k1").await < 3 {
        assert!(Instant::now() < deadline, "the three streams took no holds");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        assert_eq!(stack.chat("k1", "m", 10, false).await.status, 429);
    }
    // Time for the refused streams' stream-done calls to arrive: the holds stay three.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(holds_in_flight(&app, "k1").await, 3);
    assert_eq!(stack.chat("k1", "m", 10, false).await.status, 429);
    while let Some(status) = long.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    until_one_passes(&stack).await;
    std::sync::Arc::into_inner(stack).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_of_streams_whose_envoy_died_lapse_after_their_time_to_live() {
    let Some(binary) = envoy_binary() else { return };
    let Some(stack) = start_stack(STREAMS).await else {
        return;
    };
    // Three streams held open for a long while, then their Envoy is killed: no stream-done
    // call is ever made for them.
    let url = stack.envoy.url("/v1/chat/completions");
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let request = stack
            .http
            .post(url.clone())
            .header("authorization", "Bearer k1")
            .header("x-model", "m")
            .header("x-mock-delay-ms", "8000")
            .json(&serde_json::json!({"model": "m", "stream": false, "messages": []}));
        held.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    }
    let app = stack.sluice.running.as_ref().unwrap().app.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while holds_in_flight(&app, "k1").await < 3 {
        assert!(Instant::now() < deadline, "the three streams took no holds");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Stack {
        sluice,
        _mock,
        envoy,
        http,
        ..
    } = stack;
    drop(envoy);
    held.abort_all();
    let sluice_port = sluice.running.as_ref().unwrap().grpc_addr.port();
    let envoy = Envoy::start(&binary, sluice_port, _mock.port, false).await;
    let chat = async || {
        http.post(envoy.url("/v1/chat/completions"))
            .header("authorization", "Bearer k1")
            .header("x-model", "m")
            .json(&serde_json::json!({"model": "m", "stream": false, "messages": []}))
            .send()
            .await
            .expect("Envoy answers")
            .status()
            .as_u16()
    };
    assert_eq!(
        chat().await,
        429,
        "the lost streams still hold the key's slots"
    );
    // Within the hold's time to live (1 minute, from when they were taken) they stay held;
    // once the window after the next begins they have lapsed.
    sluice.clock.advance_ms(59_000);
    assert_eq!(chat().await, 429);
    sluice.clock.advance_ms(61_000);
    assert_eq!(chat().await, 200, "the lapsed holds freed their slots");
    drop(envoy);
    sluice.stop().await;
}

/// Holds in flight on a key, as sluice's admin API reads them.
async fn holds_in_flight(app: &std::sync::Arc<sluice::App>, key: &str) -> u64 {
    let usage = sluice::counters::usage(app, "llm_gateway", &[("api_key", key)])
        .await
        .expect("a rule matches");
    usage
        .windows
        .iter()
        .map(|w| u64::from(w.local.requests))
        .max()
        .unwrap_or(0)
}
