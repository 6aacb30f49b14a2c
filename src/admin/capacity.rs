//! Capacity reductions (`/v1/capacity`, `/v1/capacity/reduce`) and the endpoints' utilization
//! (`/v1/utilization`), the global view for routing.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::body::ReduceBody;
use super::{Failure, Shared, authorize, counters};
use crate::capacity::RuleName;
use crate::rules::{ENDPOINT_KEY, Factor};

/// Announces that an upstream is saturated: the rule's limit drops by `factor` here and, with
/// Redis, on every replica, then recovers step by step.
pub(super) async fn reduce(
    State(app): Shared,
    headers: HeaderMap,
    body: Result<Json<ReduceBody>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    authorize(&app, &headers)?;
    let Json(body) = body?;
    let factor = body.factor.unwrap_or(0.5);
    if !(factor > 0.0 && factor < 1.0) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "factor must be more than 0 and less than 1".into(),
        ));
    }
    let rules = app.rules.load_full();
    let Some(rule) = rules
        .domain(&body.domain)
        .and_then(|d| d.rules.iter().find(|r| *r.path == *body.rule))
    else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            format!("no rule `{}` in domain `{}`", body.rule, body.domain),
        ));
    };
    // Reductions compound: half of what is in force now.
    let name = RuleName {
        domain: body.domain.clone(),
        rule: body.rule.clone(),
    };
    let announcement = app
        .reduce_capacity(name, rule.capacity.fraction(), factor)
        .await
        .map_err(|e| Failure(StatusCode::BAD_GATEWAY, e.to_string()))?;
    tracing::warn!(domain = %body.domain, rule = %body.rule, factor = announcement.factor, "capacity reduced by the admin API");
    Ok(Json(
        json!({"domain": body.domain, "rule": body.rule, "factor": announcement.factor}),
    ))
}

/// The factor in force for every rule below its configured capacity.
pub(super) async fn capacity(State(app): Shared) -> Json<Value> {
    let rules = app.rules.load_full();
    let mut reduced = Vec::new();
    for domain in rules.domains() {
        for rule in &domain.rules {
            if rule.capacity.get() == Factor::FULL {
                continue;
            }
            let limits: Vec<Value> = rule
                .limits()
                .map(|l| json!({"unit": l.unit.name(), "counts": l.measure.field(), "configured": l.per_unit, "effective": rule.capacity.apply(l.per_unit)}))
                .collect();
            reduced.push(
                json!({"domain": domain.name.as_ref(), "rule": rule.path.as_ref(),
                "factor": rule.capacity.fraction(), "limits": limits}),
            );
        }
    }
    let recovery = app.recovery();
    Json(
        json!({"reduced": reduced, "recovery": {"factor": recovery.factor, "every_ms": recovery.every.as_millis() as u64}}),
    )
}

/// Per endpoint (rules whose last entry key is `endpoint`), the used share of its nearest limit,
/// fleet-wide with Redis: the global view for routing.
pub(super) async fn utilization(State(app): Shared) -> Json<Value> {
    let rules = app.rules.load_full();
    let mut out = serde_json::Map::new();
    for domain in rules.domains() {
        for rule in &domain.rules {
            let Some(endpoint) = rule.endpoint.as_deref() else {
                continue;
            };
            let entries = [(ENDPOINT_KEY, endpoint)];
            let Some(usage) = counters::usage(&app, &domain.name, &entries).await else {
                continue;
            };
            let share = usage
                .windows
                .iter()
                .flat_map(|w| {
                    [
                        (
                            &w.requests_limit,
                            w.local.requests.into(),
                            w.fleet.map(|f| f.requests.into()),
                        ),
                        (&w.tokens_limit, w.local.tokens, w.fleet.map(|f| f.tokens)),
                    ]
                })
                .filter_map(|(limit, local, fleet)| {
                    let per_unit = rule.capacity.apply(limit.as_ref()?.per_unit);
                    let used = counters::seen(local, fleet);
                    Some(if per_unit == 0 {
                        1.0
                    } else {
                        (used as f64 / per_unit as f64).min(1.0)
                    })
                })
                .fold(0.0f64, f64::max);
            out.insert(endpoint.to_string(), json!(share));
        }
    }
    Json(Value::Object(out))
}
