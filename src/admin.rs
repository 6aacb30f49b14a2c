//! The operator's HTTP side: health, readiness, Prometheus metrics, and the admin API (rules,
//! check, explain, usage, reset). Mutating endpoints need the admin bearer token; without a
//! configured token they are disabled, not open. API keys are never logged or labelled here.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry as ProtoEntry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::limiter::Unit;
use crate::rules::Policy;
use crate::server::App;

type Shared = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/rules", get(rules))
        .route("/v1/check", post(check))
        .route("/v1/explain", post(explain))
        .route("/v1/usage", get(usage))
        .route("/v1/reset", post(reset))
        .route("/v1/capacity", get(capacity))
        .route("/v1/capacity/reduce", post(reduce_capacity))
        .route("/v1/utilization", get(utilization))
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
    // Compared in full whatever the first difference, so timing tells nothing.
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

async fn readyz(State(app): Shared) -> Response {
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

async fn metrics(State(app): Shared) -> Response {
    app.metrics
        .active_counters
        .set(app.limiter.counters().len() as f64);
    let body = crate::telemetry::install().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn rules(State(app): Shared) -> Json<Value> {
    let status = app.reload_status.load_full();
    let set = app.rules.load_full();
    let mut domains: Vec<Value> = set
        .domains()
        .map(|d| {
            let rules: Vec<Value> = d
                .rules
                .iter()
                .map(|r| {
                    let limits: Vec<Value> = r
                        .limits()
                        .map(|l| json!({"name": l.name.as_deref(), "unit": l.unit.name(), "limit": l.per_unit, "counts": l.measure.field()}))
                        .collect();
                    json!({
                        "path": r.path.as_ref(),
                        // Where in its file; `POST /v1/explain` gives the line of one rule.
                        "at": r.yaml_path.to_string(),
                        "unlimited": matches!(r.policy, Policy::Unlimited),
                        "limits": limits,
                        "shadow_mode": r.enforcement == crate::limiter::Enforcement::Shadow,
                        "quota_mode": r.enforcement == crate::limiter::Enforcement::Quota,
                        "strict": r.strict,
                    })
                })
                .collect();
            json!({"domain": d.name.as_ref(), "file": d.file, "rules": rules})
        })
        .collect();
    domains.sort_by(|a, b| a["domain"].as_str().cmp(&b["domain"].as_str()));
    let files: Vec<Value> = status
        .files
        .iter()
        .map(|f| json!({"path": f.path, "domain": f.domain, "stale": f.stale, "errors": f.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()}))
        .collect();
    Json(json!({
        "generation": status.generation,
        "files_hash": format!("{:016x}", status.files_hash),
        "last_success_ms": status.last_success_ms,
        "files": files,
        "domains": domains,
    }))
}

/// A RateLimitRequest in JSON, as envoyproxy/ratelimit's `/json` takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    domain: String,
    descriptors: Vec<DescriptorBody>,
    #[serde(default)]
    hits_addend: u32,
    /// Answer as a check would, counting nothing.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorBody {
    entries: Vec<EntryBody>,
    #[serde(default)]
    hits_addend: Option<u64>,
    #[serde(default)]
    limit: Option<LimitBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryBody {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitBody {
    requests_per_unit: u32,
    unit: String,
}

fn to_proto(body: &CheckBody) -> Result<RateLimitRequest, Failure> {
    let mut descriptors = Vec::new();
    for (i, d) in body.descriptors.iter().enumerate() {
        let limit = match &d.limit {
            None => None,
            Some(l) => {
                let unit = Unit::parse(&l.unit).ok_or_else(|| {
                    Failure(
                        StatusCode::BAD_REQUEST,
                        format!("descriptors[{i}].limit.unit: unknown unit `{}`", l.unit),
                    )
                })?;
                Some(RateLimitOverride {
                    requests_per_unit: l.requests_per_unit,
                    unit: crate::grpc::unit_to_proto(unit) as i32,
                })
            }
        };
        descriptors.push(RateLimitDescriptor {
            entries: d
                .entries
                .iter()
                .map(|e| ProtoEntry {
                    key: e.key.clone(),
                    value: e.value.clone(),
                })
                .collect(),
            limit,
            // A dry run only checks: every descriptor counts 0.
            hits_addend: if body.dry_run {
                Some(UInt64Value { value: 0 })
            } else {
                d.hits_addend.map(|value| UInt64Value { value })
            },
            is_negative_hits: false,
        });
    }
    Ok(RateLimitRequest {
        domain: body.domain.clone(),
        descriptors,
        hits_addend: body.hits_addend,
    })
}

use crate::client::code_name;

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
    let request = to_proto(&body)?;
    let response = crate::grpc::answer(&app, request)
        .await
        .map_err(|s| Failure(StatusCode::BAD_REQUEST, s.message().to_string()))?;
    let statuses: Vec<Value> = response
        .statuses
        .iter()
        .map(|s| {
            json!({
                "code": code_name(s.code),
                "current_limit": s.current_limit.as_ref().map(|l| json!({"name": l.name, "requests_per_unit": l.requests_per_unit, "unit": crate::grpc::proto_unit(l.unit).map(Unit::name)})),
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainBody {
    domain: String,
    descriptors: Vec<DescriptorBody>,
}

/// For each descriptor: the rule it matches (or why none), what replaced what, and each
/// counter's local and fleet usage, remaining and reset. Counts nothing.
async fn explain(
    State(app): Shared,
    body: Result<Json<ExplainBody>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let Json(body) = body?;
    let rules = app.rules.load_full();
    let Some(domain) = rules.domain(&body.domain) else {
        return Ok(Json(json!({"domain": body.domain, "known_domain": false,
            "why": "no rule file defines this domain: every descriptor is allowed with no limit"})));
    };
    let mut matched = Vec::new();
    for d in &body.descriptors {
        let entries: Vec<(&str, &str)> = d
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        matched.push((entries.clone(), domain.tree.find(&entries).cloned()));
    }
    let replaced: Vec<&str> = matched
        .iter()
        .filter_map(|(_, r)| r.as_ref())
        .flat_map(|r| {
            r.limits()
                .flat_map(|l| l.replaces.iter().map(|n| &**n))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out = Vec::new();
    for (entries, rule) in &matched {
        let Some(rule) = rule else {
            out.push(json!({"entries": entries.len(), "rule": null,
                "why": "no rule matches these entries at this depth: allowed with no limit"}));
            continue;
        };
        let usage = crate::usage::usage(&app, &body.domain, entries).await;
        let windows: Vec<Value> = usage
            .map(|u| {
                u.windows
                    .iter()
                    .map(|w| {
                        let slot = |limit: &Option<crate::rules::Limit>, local: u32, fleet: Option<u32>| {
                            limit.as_ref().map(|l| {
                                let used = fleet.unwrap_or(local).max(local);
                                let is_replaced = l.name.as_deref().is_some_and(|n| replaced.contains(&n));
                                json!({"name": l.name.as_deref(), "limit": l.per_unit, "counts": l.measure.field(),
                                       "local": local, "fleet": fleet, "remaining": l.per_unit.saturating_sub(used),
                                       "replaced": is_replaced,
                                       "why": if is_replaced { "replaced by another matched limit: not evaluated" }
                                              else if used >= l.per_unit { "spent: the next call that counts is denied" }
                                              else { "within the limit" }})
                            })
                        };
                        json!({"unit": w.unit.name(), "reset_ms": w.until_reset.as_millis() as u64,
                               "requests": slot(&w.requests_limit, w.local.requests, w.fleet.map(|f| f.requests)),
                               "tokens": slot(&w.tokens_limit, w.local.tokens, w.fleet.map(|f| f.tokens))})
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(json!({
            "rule": {"path": rule.path.as_ref(), "file": rule.file, "line": rule.line(), "strict": rule.strict,
                     "shadow_mode": rule.enforcement == crate::limiter::Enforcement::Shadow,
                     "unlimited": matches!(rule.policy, Policy::Unlimited)},
            "windows": windows,
            "why": if matches!(rule.policy, Policy::Unlimited) { "unlimited: always allowed" } else { "limited by the windows below" },
        }));
    }
    Ok(Json(
        json!({"domain": body.domain, "known_domain": true, "descriptors": out}),
    ))
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    domain: String,
    /// `key=value,key2=value2`
    descriptor: String,
}

fn parse_entries(text: &str) -> Result<Vec<(String, String)>, Failure> {
    text.split(',')
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| {
                    Failure(
                        StatusCode::BAD_REQUEST,
                        format!("descriptor: `{pair}` is not key=value"),
                    )
                })
        })
        .collect()
}

async fn usage(
    State(app): Shared,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Failure> {
    let Query(query) = query.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let owned = parse_entries(&query.descriptor)?;
    let entries: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let Some(usage) = crate::usage::usage(&app, &query.domain, &entries).await else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "no rule matches this descriptor".into(),
        ));
    };
    let windows: Vec<Value> = usage
        .windows
        .iter()
        .map(|w| {
            let side = |limit: &Option<crate::rules::Limit>, local: u32, fleet: Option<u32>| {
                let used = fleet.unwrap_or(local).max(local);
                json!({"used": used, "local": local, "fleet": fleet,
                       "limit": limit.as_ref().map(|l| l.per_unit),
                       "remaining": limit.as_ref().map(|l| l.per_unit.saturating_sub(used))})
            };
            json!({"unit": w.unit.name(), "reset_ms": w.until_reset.as_millis() as u64,
                   "requests": side(&w.requests_limit, w.local.requests, w.fleet.map(|f| f.requests)),
                   "tokens": side(&w.tokens_limit, w.local.tokens, w.fleet.map(|f| f.tokens))})
        })
        .collect();
    Ok(Json(
        json!({"domain": query.domain, "rule": usage.rule.path.as_ref(), "windows": windows}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    domain: String,
    entries: Vec<EntryBody>,
}

async fn reset(
    State(app): Shared,
    headers: HeaderMap,
    body: Result<Json<ResetBody>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    authorize(&app, &headers)?;
    let Json(body) = body?;
    let entries: Vec<(&str, &str)> = body
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    match crate::usage::reset(&app, &body.domain, &entries).await {
        None => Err(Failure(
            StatusCode::NOT_FOUND,
            "no rule matches this descriptor".into(),
        )),
        Some(Err(e)) => Err(Failure(StatusCode::BAD_GATEWAY, format!("Redis: {e}"))),
        Some(Ok(cleared)) => {
            tracing::info!(domain = %body.domain, local = cleared.local_counters, fleet = cleared.fleet_keys, "counters reset by the admin API");
            Ok(Json(
                json!({"local_counters": cleared.local_counters, "fleet_keys": cleared.fleet_keys}),
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReduceBody {
    domain: String,
    /// The rule's descriptor path, as `GET /v1/rules` lists it.
    rule: String,
    /// The share of the current limit to keep (default 0.5).
    #[serde(default)]
    factor: Option<f64>,
}

/// Announces that an upstream is saturated: the rule's limit drops by `factor` here and, with
/// Redis, on every replica, then recovers step by step.
async fn reduce_capacity(
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
    let now = app.limiter.clock().now_ms();
    let current = f64::from(rule.capacity.get()) / f64::from(crate::capacity::Factor::FULL);
    let announcement = crate::capacity::Announcement {
        factor: (current * factor).max(0.000_001),
        at_ms: now,
    };
    app.capacity.record(&body.domain, &body.rule, announcement);
    if let Some(fleet) = &app.fleet {
        fleet
            .announce_capacity(&body.domain, &body.rule, announcement)
            .await
            .map_err(|e| Failure(StatusCode::BAD_GATEWAY, format!("Redis: {e}")))?;
    }
    app.capacity_changed.notify_one();
    tracing::warn!(domain = %body.domain, rule = %body.rule, factor = announcement.factor, "capacity reduced by the admin API");
    Ok(Json(
        json!({"domain": body.domain, "rule": body.rule, "factor": announcement.factor}),
    ))
}

/// The factor in force for every rule below its configured capacity.
async fn capacity(State(app): Shared) -> Json<Value> {
    let rules = app.rules.load_full();
    let mut reduced = Vec::new();
    for domain in rules.domains() {
        for rule in &domain.rules {
            let factor = rule.capacity.get();
            if factor == crate::capacity::Factor::FULL {
                continue;
            }
            let limits: Vec<Value> = rule
                .limits()
                .map(|l| json!({"unit": l.unit.name(), "counts": l.measure.field(), "configured": l.per_unit, "effective": rule.capacity.apply(l.per_unit)}))
                .collect();
            reduced.push(json!({"domain": domain.name.as_ref(), "rule": rule.path.as_ref(),
                "factor": f64::from(factor) / f64::from(crate::capacity::Factor::FULL), "limits": limits}));
        }
    }
    let recovery = app.recovery();
    Json(
        json!({"reduced": reduced, "recovery": {"factor": recovery.factor, "every_ms": recovery.every.as_millis() as u64}}),
    )
}

/// Per endpoint (rules whose last entry key is `endpoint`), the used share of its nearest limit,
/// fleet-wide with Redis: the global view for routing.
async fn utilization(State(app): Shared) -> Json<Value> {
    let rules = app.rules.load_full();
    let mut out = serde_json::Map::new();
    for domain in rules.domains() {
        for rule in &domain.rules {
            let [key] = &rule.keys[..] else { continue };
            if &**key != crate::grpc::ENDPOINT_KEY {
                continue;
            }
            let Some(endpoint) = rule.path.strip_prefix("endpoint_") else {
                continue;
            };
            let entries = [(crate::grpc::ENDPOINT_KEY, endpoint)];
            let Some(usage) = crate::usage::usage(&app, &domain.name, &entries).await else {
                continue;
            };
            let share = usage
                .windows
                .iter()
                .flat_map(|w| {
                    [
                        (
                            &w.requests_limit,
                            w.local.requests,
                            w.fleet.map(|f| f.requests),
                        ),
                        (&w.tokens_limit, w.local.tokens, w.fleet.map(|f| f.tokens)),
                    ]
                })
                .filter_map(|(limit, local, fleet)| {
                    let per_unit = rule.capacity.apply(limit.as_ref()?.per_unit);
                    let used = fleet.unwrap_or(local).max(local);
                    Some(if per_unit == 0 {
                        1.0
                    } else {
                        (f64::from(used) / f64::from(per_unit)).min(1.0)
                    })
                })
                .fold(0.0f64, f64::max);
            out.insert(endpoint.to_string(), json!(share));
        }
    }
    Json(Value::Object(out))
}
