//! Health, readiness and the Prometheus scrape.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;

/// Ready once rules are loaded, and (under the `deny` policy) while Redis answers.
pub(super) async fn readyz(State(app): Shared) -> Response {
    let rules = app.rules.load();
    if rules.domains().next().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no rules loaded\n",
        )
            .into_response();
    }
    if let Some(fleet) = &app.fleet
        && fleet.required()
        && !fleet.status.load().reachable
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Redis is required and unreachable\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// The Prometheus text format.
pub(super) async fn metrics(State(app): Shared) -> Response {
    app.metrics
        .active_counters
        .set(app.limiter.counters().len() as f64);
    let body = crate::telemetry::install().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
