//! envoyproxy/ratelimit's HTTP endpoints, with its semantics: `GET /healthcheck`, `POST /json`
//! (a RateLimitRequest in protobuf's JSON form in, the response in that form out) and
//! `GET /rlconfig` (the loaded rules as text, on the debug port in the peer).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry as ProtoEntry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as ProtoUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{Struct, UInt64Value, Value as ProtoValue, value::Kind};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Shared;
use crate::limiter::Enforcement;
use crate::proto::{allows, code_name};
use crate::rules::{Measure, Policy};
use crate::service::{self, AnswerError};

/// `GET /healthcheck`: `OK` while the server serves (and, with
/// `--healthy-with-at-least-one-config-loaded`, has a domain loaded); 500 otherwise.
pub(super) async fn healthcheck(State(app): Shared) -> Response {
    if app.healthy() {
        (StatusCode::OK, "OK").into_response()
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no rate limit configuration is loaded",
        )
            .into_response()
    }
}

/// A RateLimitRequest as protobuf's JSON mapping writes it: lowerCamelCase names, the proto
/// names accepted too.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<JsonDescriptor>,
    #[serde(default, alias = "hits_addend")]
    #[serde(rename = "hitsAddend")]
    hits_addend: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDescriptor {
    #[serde(default)]
    entries: Vec<JsonEntry>,
    #[serde(default)]
    limit: Option<JsonLimit>,
    #[serde(default, rename = "hitsAddend", alias = "hits_addend")]
    hits_addend: Option<u64>,
    #[serde(default, rename = "isNegativeHits", alias = "is_negative_hits")]
    is_negative_hits: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLimit {
    #[serde(default, rename = "requestsPerUnit", alias = "requests_per_unit")]
    requests_per_unit: u32,
    /// The enum's name (`MINUTE`) or number.
    #[serde(default)]
    unit: Option<Value>,
}

impl JsonRequest {
    fn into_proto(self) -> Result<RateLimitRequest, String> {
        let mut descriptors = Vec::with_capacity(self.descriptors.len());
        for (i, d) in self.descriptors.into_iter().enumerate() {
            let limit = d
                .limit
                .map(|l| {
                    let unit = match &l.unit {
                        None => Ok(ProtoUnit::Unknown as i32),
                        Some(Value::Number(n)) => n
                            .as_i64()
                            .map(|n| n as i32)
                            .ok_or_else(|| "not a unit number".to_string()),
                        Some(Value::String(name)) => ProtoUnit::from_str_name(name)
                            .map(|u| u as i32)
                            .ok_or_else(|| format!("unknown unit `{name}`")),
                        Some(other) => Err(format!("unit: unexpected {other}")),
                    };
                    unit.map(|unit| RateLimitOverride {
                        requests_per_unit: l.requests_per_unit,
                        unit,
                    })
                })
                .transpose()
                .map_err(|e| format!("descriptors[{i}].limit: {e}"))?;
            descriptors.push(RateLimitDescriptor {
                entries: d
                    .entries
                    .into_iter()
                    .map(|e| ProtoEntry {
                        key: e.key,
                        value: e.value,
                    })
                    .collect(),
                limit,
                hits_addend: d.hits_addend.map(|value| UInt64Value { value }),
                is_negative_hits: d.is_negative_hits,
            });
        }
        Ok(RateLimitRequest {
            domain: self.domain,
            descriptors,
            hits_addend: self.hits_addend,
        })
    }
}

/// `POST /json`: as the peer, 200 for OK, 429 for OVER_LIMIT, 400 for a body or request that
/// is not valid.
pub(super) async fn json(State(app): Shared, body: Bytes) -> Response {
    let bad = |message: String| (StatusCode::BAD_REQUEST, message).into_response();
    let request = match serde_json::from_slice::<JsonRequest>(&body) {
        Ok(request) => match request.into_proto() {
            Ok(request) => request,
            Err(e) => return bad(e),
        },
        Err(e) => return bad(format!("not a RateLimitRequest in JSON: {e}")),
    };
    let response = match service::answer_request(&app, &request).await {
        Ok(answer) => answer.to_response(),
        Err(AnswerError::Invalid(e)) => return bad(e.to_string()),
        Err(e @ AnswerError::Internal) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
    };
    let status = if allows(response.overall_code) {
        StatusCode::OK
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let body = response_json(&response).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A response as protobuf's JSON mapping writes it (zero values left out).
fn response_json(response: &RateLimitResponse) -> Value {
    let mut out = Map::new();
    out.insert(
        "overallCode".into(),
        json!(code_name(response.overall_code)),
    );
    let statuses: Vec<Value> = response
        .statuses
        .iter()
        .map(|s| {
            let mut status = Map::new();
            status.insert("code".into(), json!(code_name(s.code)));
            if let Some(limit) = &s.current_limit {
                let mut l = Map::new();
                if !limit.name.is_empty() {
                    l.insert("name".into(), json!(limit.name));
                }
                if limit.requests_per_unit != 0 {
                    l.insert("requestsPerUnit".into(), json!(limit.requests_per_unit));
                }
                let unit = ProtoUnit::try_from(limit.unit).unwrap_or(ProtoUnit::Unknown);
                l.insert("unit".into(), json!(unit.as_str_name()));
                status.insert("currentLimit".into(), Value::Object(l));
            }
            if s.limit_remaining != 0 {
                status.insert("limitRemaining".into(), json!(s.limit_remaining));
            }
            if let Some(d) = &s.duration_until_reset {
                let text = match d.nanos {
                    0 => format!("{}s", d.seconds),
                    n => format!("{}.{:03}s", d.seconds, n / 1_000_000),
                };
                status.insert("durationUntilReset".into(), json!(text));
            }
            Value::Object(status)
        })
        .collect();
    out.insert("statuses".into(), Value::Array(statuses));
    let headers: Vec<Value> = response
        .response_headers_to_add
        .iter()
        .map(|h| json!({"key": h.key, "value": h.value}))
        .collect();
    if !headers.is_empty() {
        out.insert("responseHeadersToAdd".into(), Value::Array(headers));
    }
    if let Some(metadata) = &response.dynamic_metadata {
        out.insert("dynamicMetadata".into(), struct_json(metadata));
    }
    Value::Object(out)
}

fn struct_json(s: &Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &ProtoValue) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_json).collect()),
    }
}

/// `GET /rlconfig`: one line per limit of every loaded rule, as the peer dumps its config
/// (`domain.key_value: unit=MINUTE requests_per_unit=10, shadow_mode: false`), sluice's token
/// limits marked as such. Sorted, so two replicas' dumps compare.
pub(super) async fn rlconfig(State(app): Shared) -> Response {
    let rules = app.rules.load();
    let mut lines = Vec::new();
    for domain in rules.domains() {
        for rule in &domain.rules {
            let shadow = rule.enforcement == Enforcement::Shadow;
            let key = format!("{}.{}", rule.domain, rule.path);
            match &rule.policy {
                Policy::Unlimited => lines.push(format!("{key}: unlimited, shadow_mode: {shadow}")),
                Policy::Limited(_) => {
                    for limit in rule.limits() {
                        let unit = crate::proto::unit_to_proto(limit.unit).as_str_name();
                        let amount = match limit.measure {
                            Measure::Tokens => "tokens_per_unit",
                            Measure::Hits | Measure::Requests => "requests_per_unit",
                            Measure::Concurrency => "concurrency",
                        };
                        lines.push(format!(
                            "{key}: unit={unit} {amount}={}, shadow_mode: {shadow}",
                            limit.per_unit
                        ));
                    }
                }
            }
        }
    }
    lines.sort();
    let mut text = lines.join("\n");
    text.push('\n');
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}
