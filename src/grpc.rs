//! The Envoy protocol at the edge: validates `ShouldRateLimit` requests, turns them into a
//! decision, and the decision into Envoy's response. Nothing else lives here.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry as ProtoEntry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code as ProtoCode, DescriptorStatus, RateLimit as ProtoLimit, rate_limit::Unit as ProtoUnit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, Struct, Value, value::Kind};
use smallvec::SmallVec;
use tonic::{Request, Response, Status};

use crate::decision::{
    Ask, Code, LimitOverride, OwnedLimit, Purpose, StrictWork, Verdict, decide, nearer,
};
use crate::limiter::{Enforcement, Unit};
use crate::rules::Entry;
use crate::server::App;
use crate::settings::RequestLimits;
use crate::sync::strict;
use crate::telemetry::RuleMetrics;

impl Entry for ProtoEntry {
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &str {
        &self.value
    }
}

pub struct RateLimitGrpc {
    app: Arc<App>,
}

impl RateLimitGrpc {
    pub fn new(app: Arc<App>) -> Self {
        RateLimitGrpc { app }
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        answer(&self.app, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Answers one RateLimitRequest: validation, the local decision, strict rules in Redis,
/// metrics. The gRPC service and the admin API's `/v1/check` both answer through here.
pub async fn answer(
    app: &Arc<App>,
    request: RateLimitRequest,
) -> Result<RateLimitResponse, Status> {
    let started = std::time::Instant::now();
    let asks = validate(&request, &app.settings.request_limits).inspect_err(|_| {
        app.metrics.invalid_requests.increment(1);
    })?;
    // Envoy reads UNKNOWN as "allow"; a bug here must surface as UNAVAILABLE, which Envoy
    // hands to its `failure_mode_deny` setting.
    let internal = || {
        tracing::error!("internal error while deciding a request");
        Status::unavailable("sluice: internal error")
    };
    let (response, strict) =
        std::panic::catch_unwind(AssertUnwindSafe(|| respond(app, &request, &asks)))
            .map_err(|_| internal())?;
    let (Some(work), Some(_)) = (strict, &app.fleet) else {
        app.record_answer(&response, started);
        return Ok(response);
    };
    // Strict rules wait on Redis: settled in a task of their own, so a panic there is
    // caught too.
    let settling = app.clone();
    let response = tokio::spawn(async move { settle_strict(&settling, response, &work).await })
        .await
        .map_err(|_| internal())?;
    app.record_answer(&response, started);
    Ok(response)
}

fn respond(
    app: &App,
    request: &RateLimitRequest,
    asks: &[Ask<'_, ProtoEntry>],
) -> (RateLimitResponse, Option<Box<StrictWork>>) {
    // One usage report per call, however many descriptors carry it.
    let reported = asks
        .iter()
        .filter(|a| matches!(a.purpose, Purpose::Report { .. }))
        .map(|a| a.hits)
        .max();
    if let Some(tokens) = reported {
        app.stats.usage_report(tokens);
        app.metrics.usage_reports.increment(1);
        app.metrics.reported_tokens.increment(tokens);
    }
    let rules = app.rules.load();
    let mut verdict = decide(&rules, &app.limiter, &request.domain, asks, app.mode());
    if !verdict.known_domain {
        tracing::debug!(domain = %request.domain, "request for an unknown domain");
        app.stats.unknown_domain();
        app.metrics.unknown_domain.increment(1);
    }
    record_rules(
        asks,
        &verdict,
        app.settings.near_limit_ratio,
        app.settings.shadow_mode,
    );
    let openai = app.settings.openai_headers;
    (to_response(&verdict, asks, openai), verdict.strict.take())
}

/// Counts each matched rule's hit: over, near or within its limit, shadowed, tokens reported.
fn record_rules(
    asks: &[Ask<'_, ProtoEntry>],
    verdict: &Verdict<'_>,
    near_ratio: f64,
    global_shadow: bool,
) {
    for (ask, status) in asks.iter().zip(&verdict.statuses) {
        let Some(rule) = status.rule else { continue };
        let detailed;
        // Callers' values in a label only where a rule asks: every level's with
        // detailed_metric, the rule's own level's with value_to_metric.
        let metrics = if rule.detailed_metric || rule.value_to_metric {
            let values: Vec<&str> = if rule.detailed_metric {
                ask.entries.iter().map(|e| e.value.as_str()).collect()
            } else {
                ask.entries
                    .last()
                    .map(|e| e.value.as_str())
                    .into_iter()
                    .collect()
            };
            detailed = RuleMetrics::detailed(
                &rule.domain,
                &format!("{}[{}]", rule.metric_label, values.join(".")),
            );
            &detailed
        } else {
            &rule.metrics
        };
        if let Purpose::Report { .. } = ask.purpose {
            metrics.tokens.increment(ask.hits);
            continue;
        }
        metrics.hits.increment(ask.hits);
        let Some(limit) = status.limit else { continue };
        if status.over {
            metrics.over_limit.increment(1);
            if global_shadow || rule.enforcement == Enforcement::Shadow {
                metrics.shadow_mode.increment(1);
            }
        } else if f64::from(limit.per_unit.saturating_sub(status.remaining))
            >= near_ratio * f64::from(limit.per_unit)
        {
            metrics.near_limit.increment(1);
        } else {
            metrics.within_limit.increment(1);
        }
    }
}

/// Settles the strict limits of a request decided locally, and reports them.
async fn settle_strict(
    app: &App,
    mut response: RateLimitResponse,
    work: &StrictWork,
) -> RateLimitResponse {
    let Some(fleet) = &app.fleet else {
        return response;
    };
    let allowed = response.overall_code == ProtoCode::Ok as i32;
    let (allowed, settled) =
        strict::settle(fleet, &app.limiter, work, allowed, app.settings.shadow_mode).await;
    response.overall_code = code(if allowed { Code::Ok } else { Code::OverLimit });
    for (ask, status) in response.statuses.iter_mut().enumerate() {
        let mut best: Option<((bool, u32, u32), &OwnedLimit, usize)> = None;
        for (j, job) in work.jobs.iter().enumerate().filter(|(_, j)| j.ask == ask) {
            let result = &settled[j];
            let slots = [
                (&job.requests, result.counts.requests, result.over.requests),
                (&job.tokens, result.counts.tokens, result.over.tokens),
            ];
            for (limit, used, over) in slots {
                let Some(limit) = limit else { continue };
                let candidate = (over, used, limit.per_unit);
                if nearer(candidate, best.map(|b| b.0)) {
                    best = Some((candidate, limit, j));
                }
            }
        }
        let Some(((over, used, per_unit), limit, j)) = best else {
            continue;
        };
        let enforced = work.jobs[j].enforcement != Enforcement::Shadow && !app.settings.shadow_mode;
        let reset = settled[j].until_reset;
        *status = DescriptorStatus {
            code: code(if over && enforced {
                Code::OverLimit
            } else {
                Code::Ok
            }),
            current_limit: Some(ProtoLimit {
                name: limit.name.clone().unwrap_or_default(),
                requests_per_unit: limit.per_unit,
                unit: unit_to_proto(limit.unit) as i32,
            }),
            limit_remaining: per_unit.saturating_sub(used),
            duration_until_reset: Some(ProtoDuration {
                seconds: reset.as_secs() as i64,
                nanos: reset.subsec_nanos() as i32,
            }),
            quota: None,
        };
    }
    response
}

/// Checks a request against the protocol and the configured bounds, and resolves each
/// descriptor's hits: the descriptor's `hits_addend` wins when set (0 means check only),
/// else the request's, where 0 means 1.
pub fn validate<'a>(
    request: &'a RateLimitRequest,
    bounds: &RequestLimits,
) -> Result<SmallVec<[Ask<'a, ProtoEntry>; 8]>, Status> {
    let invalid = |message: String| Err(Status::invalid_argument(message));
    let max_bytes = bounds.max_value_bytes as usize;
    if request.domain.is_empty() {
        return invalid("domain must not be empty".into());
    }
    if request.domain.len() > max_bytes {
        return invalid(format!("domain is longer than {max_bytes} bytes"));
    }
    if request.descriptors.is_empty() {
        return invalid("at least one descriptor is required".into());
    }
    if request.descriptors.len() > bounds.max_descriptors as usize {
        return invalid(format!(
            "{} descriptors; at most {} are accepted",
            request.descriptors.len(),
            bounds.max_descriptors
        ));
    }
    let request_hits = match request.hits_addend {
        0 => 1,
        n => u64::from(n),
    };
    let mut asks = SmallVec::new();
    for (i, descriptor) in request.descriptors.iter().enumerate() {
        asks.push(validate_descriptor(i, descriptor, request_hits, bounds)?);
    }
    Ok(asks)
}

fn validate_descriptor<'a>(
    i: usize,
    descriptor: &'a RateLimitDescriptor,
    request_hits: u64,
    bounds: &RequestLimits,
) -> Result<Ask<'a, ProtoEntry>, Status> {
    let invalid = |message: String| {
        Err(Status::invalid_argument(format!(
            "descriptors[{i}]: {message}"
        )))
    };
    let max_bytes = bounds.max_value_bytes as usize;
    if descriptor.entries.is_empty() {
        return invalid("at least one entry is required".into());
    }
    if descriptor.entries.len() > bounds.max_entries as usize {
        return invalid(format!(
            "{} entries; at most {} are accepted",
            descriptor.entries.len(),
            bounds.max_entries
        ));
    }
    for (j, entry) in descriptor.entries.iter().enumerate() {
        if entry.key.is_empty() {
            return invalid(format!("entries[{j}]: key must not be empty"));
        }
        if entry.key.len() > max_bytes || entry.value.len() > max_bytes {
            return invalid(format!(
                "entries[{j}]: key or value is longer than {max_bytes} bytes"
            ));
        }
    }
    let limit_override = match &descriptor.limit {
        None => None,
        Some(o) => match proto_unit(o.unit) {
            Some(unit) => Some(LimitOverride {
                per_unit: o.requests_per_unit,
                unit,
            }),
            None => return invalid(format!("limit: unit {} is not a known unit", o.unit)),
        },
    };
    // sluice's reserved entries come after the descriptor's own and are not matched.
    let own = descriptor
        .entries
        .iter()
        .position(|e| e.key.starts_with(RESERVED_PREFIX))
        .unwrap_or(descriptor.entries.len());
    if own == 0 {
        return invalid(format!(
            "needs an entry besides the {RESERVED_PREFIX}* ones"
        ));
    }
    let (mut report, mut estimate) = (false, None);
    for (j, entry) in descriptor.entries.iter().enumerate().skip(own) {
        match (entry.key.as_str(), entry.value.as_str()) {
            (REPORT_KEY, "tokens") => report = true,
            (ESTIMATE_KEY, value) => match value.trim().parse::<u64>() {
                Ok(n) => estimate = Some(n),
                Err(_) => {
                    return invalid(format!(
                        "entries[{j}]: {ESTIMATE_KEY} must be a number of tokens, not `{value}`"
                    ));
                }
            },
            (key, value) if key.starts_with(RESERVED_PREFIX) => {
                return invalid(format!(
                    "entries[{j}]: unknown reserved entry `{key}={value}` (known: {REPORT_KEY}=tokens, {ESTIMATE_KEY}=N)"
                ));
            }
            _ => {
                return invalid(format!(
                    "entries[{j}]: `{}` follows a {RESERVED_PREFIX}* entry; reserved entries go last",
                    entry.key
                ));
            }
        }
    }
    let purpose = match (report, estimate) {
        (true, reserved) => Purpose::Report {
            reserved: reserved.unwrap_or(0),
        },
        (false, Some(tokens)) => Purpose::Reserve { tokens },
        (false, None) => Purpose::Call,
    };
    Ok(Ask {
        entries: &descriptor.entries[..own],
        hits: descriptor.hits_addend.map_or(request_hits, |h| h.value),
        refund: descriptor.is_negative_hits,
        limit_override,
        purpose,
    })
}

/// Entries whose keys start with this are sluice's own, not part of the descriptor matched.
pub const RESERVED_PREFIX: &str = "sluice.";
/// `sluice.report=tokens`: the descriptor reports tokens used (its hits), at stream end.
pub const REPORT_KEY: &str = "sluice.report";
/// `sluice.estimate=N`: the request reserves N tokens now; its report settles the difference.
pub const ESTIMATE_KEY: &str = "sluice.estimate";

pub fn proto_unit(unit: i32) -> Option<Unit> {
    Some(match ProtoUnit::try_from(unit).ok()? {
        ProtoUnit::Unknown => return None,
        ProtoUnit::Second => Unit::Second,
        ProtoUnit::Minute => Unit::Minute,
        ProtoUnit::Hour => Unit::Hour,
        ProtoUnit::Day => Unit::Day,
        ProtoUnit::Week => Unit::Week,
        ProtoUnit::Month => Unit::Month,
        ProtoUnit::Year => Unit::Year,
    })
}

pub fn unit_to_proto(unit: Unit) -> ProtoUnit {
    match unit {
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    }
}

fn code(code: Code) -> i32 {
    match code {
        Code::Ok => ProtoCode::Ok as i32,
        Code::OverLimit => ProtoCode::OverLimit as i32,
    }
}

/// Envoy's response. With `openai` set, OpenAI-style rate-limit headers are added to every
/// answer and a denied one carries an OpenAI-style JSON error, so OpenAI-compatible SDKs back
/// off correctly.
pub fn to_response(
    verdict: &Verdict<'_>,
    asks: &[Ask<'_, ProtoEntry>],
    openai: bool,
) -> RateLimitResponse {
    let statuses = verdict
        .statuses
        .iter()
        .map(|status| DescriptorStatus {
            code: code(status.code),
            current_limit: status.limit.map(|limit| ProtoLimit {
                name: limit.name.unwrap_or_default().to_string(),
                requests_per_unit: limit.per_unit,
                unit: unit_to_proto(limit.unit) as i32,
            }),
            limit_remaining: status.remaining,
            duration_until_reset: status.limit.map(|_| ProtoDuration {
                seconds: status.until_reset.as_secs() as i64,
                nanos: status.until_reset.subsec_nanos() as i32,
            }),
            quota: None,
        })
        .collect();
    // Metadata of every matched rule, merged in descriptor order (later keys win).
    let mut metadata: Option<Struct> = endpoint_utilization(verdict, asks);
    for rule in verdict.statuses.iter().filter_map(|s| s.rule) {
        if let Some(extra) = &rule.metadata {
            let merged = metadata.get_or_insert_with(Struct::default);
            merged
                .fields
                .extend(extra.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    let (response_headers_to_add, raw_body) = if openai {
        openai_answer(verdict)
    } else {
        (Vec::new(), Vec::new())
    };
    RateLimitResponse {
        overall_code: code(if verdict.allowed {
            Code::Ok
        } else {
            Code::OverLimit
        }),
        statuses,
        dynamic_metadata: metadata,
        response_headers_to_add,
        raw_body,
        ..Default::default()
    }
}

/// The entry key whose values name upstream endpoints.
pub const ENDPOINT_KEY: &str = "endpoint";

/// For each descriptor naming an endpoint, how much of its nearest limit the fleet has used
/// (0 to 1): `{"endpoint_utilization": {"openai": 0.42}}`, so Envoy can route away from an
/// endpoint the fleet has saturated.
fn endpoint_utilization(verdict: &Verdict<'_>, asks: &[Ask<'_, ProtoEntry>]) -> Option<Struct> {
    let mut fields = std::collections::HashMap::new();
    for (ask, status) in asks.iter().zip(&verdict.statuses) {
        let (Some(endpoint), Some(limit)) = (
            ask.entries.iter().find(|e| e.key == ENDPOINT_KEY),
            status.limit,
        ) else {
            continue;
        };
        let used = limit.per_unit.saturating_sub(status.remaining);
        let share = if limit.per_unit == 0 || status.code == Code::OverLimit {
            1.0
        } else {
            (f64::from(used) / f64::from(limit.per_unit)).min(1.0)
        };
        fields.insert(endpoint.value.clone(), number(share));
    }
    if fields.is_empty() {
        return None;
    }
    let utilization = Value {
        kind: Some(Kind::StructValue(Struct { fields })),
    };
    Some(Struct {
        fields: [("endpoint_utilization".to_string(), utilization)].into(),
    })
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// `1m30s`, `45s`, `250ms`: the reset format OpenAI's headers use. Whole numbers, one
/// string: this is written for every answer.
pub fn reset_text(d: std::time::Duration) -> String {
    use std::fmt::Write;
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut text = String::with_capacity(16);
    if h > 0 {
        write!(text, "{h}h").ok();
    }
    if h > 0 || m > 0 {
        write!(text, "{m}m").ok();
    }
    if ms == 0 {
        write!(text, "{s}s").ok();
    } else {
        write!(text, "{s}.{ms:03}s").ok();
    }
    text
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
        ..Default::default()
    }
}

fn openai_answer(verdict: &Verdict<'_>) -> (Vec<HeaderValue>, Vec<u8>) {
    let mut headers = Vec::with_capacity(8);
    let lines = [
        ("requests", verdict.headline.requests),
        ("tokens", verdict.headline.tokens),
    ];
    let names = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    for ((_, line), [limit, remaining, reset]) in lines.iter().zip(names) {
        let Some(line) = line else { continue };
        headers.push(header(limit, line.limit.per_unit.to_string()));
        headers.push(header(remaining, line.remaining().to_string()));
        headers.push(header(reset, reset_text(line.until_reset)));
    }
    if verdict.allowed {
        return (headers, Vec::new());
    }
    // What denied: the over limit that resets last decides when to retry.
    let over = lines
        .iter()
        .filter_map(|(what, line)| line.filter(|l| l.over).map(|l| (*what, l)))
        .max_by_key(|(_, l)| l.until_reset);
    let Some((what, line)) = over else {
        return (headers, Vec::new());
    };
    let retry = line.until_reset.as_millis().div_ceil(1000).max(1);
    headers.push(header("retry-after", retry.to_string()));
    headers.push(header("content-type", "application/json".into()));
    let name = line
        .limit
        .name
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let message = format!(
        "Rate limit reached for {what} per {unit}{name}: limit {limit}, used {used}. Please try again in {retry}s.",
        unit = line.limit.unit,
        limit = line.limit.per_unit,
        used = line.used,
    );
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": "rate_limit_exceeded",
            "param": null,
            "code": "rate_limit_exceeded",
        }
    });
    (headers, body.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::reset_text;
    use std::time::Duration;

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(reset_text(Duration::from_millis(250)), "250ms");
        assert_eq!(reset_text(Duration::from_secs(45)), "45s");
        assert_eq!(reset_text(Duration::from_millis(1_500)), "1.500s");
        assert_eq!(reset_text(Duration::from_secs(90)), "1m30s");
        assert_eq!(reset_text(Duration::from_secs(3_600 + 61)), "1h1m1s");
        assert_eq!(reset_text(Duration::from_secs(3_600)), "1h0m0s");
        assert_eq!(reset_text(Duration::from_millis(61_005)), "1m1.005s");
    }
}
