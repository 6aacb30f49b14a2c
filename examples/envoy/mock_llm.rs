//! A small OpenAI-compatible upstream for the Envoy example and the end-to-end tests:
//! `POST /v1/chat/completions`, answered as JSON or, with `"stream": true`, as server-sent
//! events, always with a `usage` block. The tokens it reports are `x-mock-total-tokens`
//! (default 50), so a test knows what Envoy will report to sluice; `x-mock-delay-ms` holds the
//! answer back, so several requests can be in flight at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Json;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{Value, json};

fn usage(headers: &HeaderMap) -> Value {
    let total: u64 = headers
        .get("x-mock-total-tokens")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let prompt = total.min(10);
    json!({"prompt_tokens": prompt, "completion_tokens": total - prompt, "total_tokens": total})
}

async fn completions(headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let delay = headers
        .get("x-mock-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64)
        .min(10_000);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let model = body["model"].as_str().unwrap_or("mock-model").to_string();
    let usage = usage(&headers);
    if body["stream"].as_bool() != Some(true) {
        return Json(json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the mock."}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    Sse::new(chunks(model, usage)).into_response()
}

/// Three content chunks a few milliseconds apart, then the usage chunk, then `[DONE]`.
fn chunks(model: String, usage: Value) -> impl Stream<Item = Result<Event, Infallible>> {
    let words = ["Hello", " from", " the mock."];
    let content = stream::iter(words).then(move |word| {
        let model = model.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]})
        }
    });
    let tail = stream::iter([
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "choices": [], "usage": usage}),
    ]);
    content
        .chain(tail)
        .map(|chunk| Ok(Event::default().data(chunk.to_string())))
        .chain(stream::iter([Ok(Event::default().data("[DONE]"))]))
}

#[tokio::main]
async fn main() {
    let addr: SocketAddr = std::env::args()
        .skip_while(|a| a != "--addr")
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".into())
        .parse()
        .expect("--addr host:port");
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    eprintln!(
        "mock-llm listening on {}",
        listener.local_addr().expect("address")
    );
    axum::serve(listener, app).await.expect("serve");
}
