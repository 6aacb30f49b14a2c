//! The operator's HTTP side: health, readiness, Prometheus metrics, and the admin API (rules,
//! check, explain, usage, reset, capacity). Mutating endpoints need the admin bearer token;
//! without a configured token they are disabled, not open. API keys are never logged or
//! labelled here.

mod body;
mod capacity;
pub mod counters;
mod health;
mod peer;
mod rules;

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::app::App;
use crate::limiter::Unit;
use crate::proto::code_name;
use crate::service::{self, AnswerError};
use body::CheckBody;

/// The state every handler takes.
type Shared = State<Arc<App>>;

/// The HTTP routes of a server: health, metrics and the admin API on one listener.
pub fn router(app: Arc<App>) -> Router {
    health_router(app.clone()).merge(admin_router(app))
}

/// Health and metrics: what load balancers, probes and Prometheus reach.
pub fn health_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/healthcheck", get(peer::healthcheck))
        .with_state(app)
}

/// The admin API: rules, checks, usage, resets, capacity (`--admin-addr` serves it apart).
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/rules", get(rules::rules))
        .route("/v1/check", post(check))
        .route("/v1/explain", post(rules::explain))
        .route("/v1/usage", get(counters::get_usage))
        .route("/v1/reset", post(counters::post_reset))
        .route("/v1/capacity", get(capacity::capacity))
        .route("/v1/capacity/reduce", post(capacity::reduce))
        .route("/v1/utilization", get(capacity::utilization))
        .route("/json", post(peer::json))
        .route("/rlconfig", get(peer::rlconfig))
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .with_state(app)
}

/// The largest body the admin API reads (a `/v1/check` of the most descriptors and entries the
/// request bounds allow, at ordinary value lengths, is a few hundred kB); larger bodies are
/// answered 413 before they are read.
pub const ADMIN_BODY_LIMIT: usize = 1024 * 1024;

/// The metrics listener's routes (`--metrics-addr`): the scrape at `path`.
pub fn metrics_router(app: Arc<App>, path: &str) -> Router {
    Router::new()
        .route(path, get(health::metrics))
        .with_state(app)
}

/// The debug listener's routes (`--debug-addr`): envoyproxy/ratelimit's `/rlconfig`.
pub fn debug_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/rlconfig", get(peer::rlconfig))
        .route(
            "/",
            get(|| async { "/rlconfig: the loaded rules, one limit a line\n" }),
        )
        .with_state(app)
}

/// An error answer: a status and a JSON body with a message.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<JsonRejection> for Failure {
    fn from(rejection: JsonRejection) -> Self {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("bad JSON: {}", rejection.body_text()),
        )
    }
}

/// Mutating endpoints: the bearer token must match the configured one.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Failure> {
    let Some(expected) = app.settings.admin_token() else {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            "no admin token is configured (SLUICE_ADMIN_TOKEN or --admin-token-file): this endpoint is disabled".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in constant time, so timing tells nothing of the token (its length aside).
    let same: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), expected.as_bytes()).into();
    if same {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

/// Answers like ShouldRateLimit. Counting needs the admin token; a dry run does not.
async fn check(
    State(app): Shared,
    headers: HeaderMap,
    body: Result<Json<CheckBody>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let Json(body) = body?;
    if !body.dry_run {
        authorize(&app, &headers)?;
    }
    let request = body.to_proto()?;
    let response = service::answer_request(&app, &request)
        .await
        .map_err(|e| match e {
            AnswerError::Invalid(e) => Failure(StatusCode::BAD_REQUEST, e.to_string()),
            AnswerError::Internal => Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        })?
        .to_response();
    let statuses: Vec<Value> = response
        .statuses
        .iter()
        .map(|s| {
            json!({
                "code": code_name(s.code),
                "current_limit": s.current_limit.as_ref().map(|l| json!({"name": l.name, "requests_per_unit": l.requests_per_unit, "unit": crate::proto::unit_of(l.unit).map(Unit::name)})),
                "limit_remaining": s.limit_remaining,
                "duration_until_reset_ms": s.duration_until_reset.as_ref().map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000),
            })
        })
        .collect();
    let headers: serde_json::Map<String, Value> = response
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), Value::String(h.value.clone())))
        .collect();
    Ok(Json(json!({
        "overall_code": code_name(response.overall_code),
        "statuses": statuses,
        "response_headers_to_add": headers,
        "dry_run": body.dry_run,
    })))
}
