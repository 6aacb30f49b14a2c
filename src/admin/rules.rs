//! What the rules are and how they apply: the rules in force, and how one request would be
//! judged (`/v1/explain`).

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use serde_json::{Value, json};

use super::body::ExplainBody;
use super::counters::{self, WindowUsage};
use super::{Failure, Shared};
use crate::decision::{self, Ask, Judged, Purpose};
use crate::limiter::Enforcement;
use crate::rules::{Consistency, Limit, Policy};

/// Every rule in force, and what the last reloads did, file by file.
pub(super) async fn rules(State(app): Shared) -> Json<Value> {
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
                        .map(|l| json!({"name": l.name.as_deref(), "unit": l.unit.name(), "limit": l.per_unit, "counts": l.measure.field(), "algorithm": algorithm_json(l.algorithm)}))
                        .collect();
                    json!({
                        "path": r.path.as_ref(),
                        // Where in its file; `POST /v1/explain` gives the line of one rule.
                        "at": r.yaml_path.to_string(),
                        "unlimited": matches!(r.policy, Policy::Unlimited),
                        "limits": limits,
                        "shadow_mode": r.enforcement == Enforcement::Shadow,
                        "quota_mode": r.enforcement == Enforcement::Quota,
                        "strict": r.consistency == Consistency::Strict,
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

/// For each descriptor: the rule it matches (or why none), what replaced what, and each
/// counter's local and fleet usage, remaining and reset, as the decision would see them now.
/// Counts nothing.
pub(super) async fn explain(
    State(app): Shared,
    body: Result<Json<ExplainBody>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let Json(body) = body?;
    let rules = app.rules.load_full();
    let entries: Vec<Vec<(&str, &str)>> = body
        .descriptors
        .iter()
        .map(|d| {
            d.entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()))
                .collect()
        })
        .collect();
    let asks: Vec<Ask<'_, (&str, &str)>> = entries
        .iter()
        .map(|entries| Ask {
            entries,
            hits: 1,
            refund: false,
            limit_override: None,
            purpose: Purpose::Call,
            class: None,
        })
        .collect();
    let Some(judged) = decision::explain(&rules, &app.limiter, &body.domain, &asks, app.mode())
    else {
        return Ok(Json(json!({"domain": body.domain, "known_domain": false,
            "why": "no rule file defines this domain: every descriptor is allowed with no limit"})));
    };
    let mut out = Vec::new();
    for (entries, (rule, limits)) in entries.iter().zip(judged) {
        let Some(rule) = rule else {
            out.push(json!({"entries": entries.len(), "rule": null,
                "why": "no rule matches these entries at this depth: allowed with no limit"}));
            continue;
        };
        let usage = counters::usage(&app, &body.domain, entries).await;
        // Limits settled in the store call by call are judged by its counts, not this
        // replica's (which hold only what was counted while the store was away).
        let in_store = |w: &WindowUsage| {
            app.fleet.is_some()
                && (rule.consistency == Consistency::Strict
                    || w.algorithm() == Some(crate::limiter::Algorithm::InFlight))
        };
        let windows: Vec<Value> = usage
            .map(|u| {
                u.windows
                    .iter()
                    .map(|w| explain_window(w, &limits, in_store(w)))
                    .collect()
            })
            .unwrap_or_default();
        out.push(json!({
            "rule": {"path": rule.path.as_ref(), "file": rule.file, "line": rule.line(),
                     "strict": rule.consistency == Consistency::Strict,
                     "shadow_mode": rule.enforcement == Enforcement::Shadow,
                     "unlimited": matches!(rule.policy, Policy::Unlimited)},
            "windows": windows,
            "why": if matches!(rule.policy, Policy::Unlimited) { "unlimited: always allowed" } else { "limited by the windows below" },
        }));
    }
    Ok(Json(
        json!({"domain": body.domain, "known_domain": true, "descriptors": out}),
    ))
}

/// One window of a rule: each limit with the counts behind it and where the decision sees it.
fn explain_window(w: &WindowUsage, judged: &[Judged<'_>], in_store: bool) -> Value {
    let slot = |limit: &Option<Limit>, local: u64, fleet: Option<u64>| {
        let limit = limit.as_ref()?;
        let tokens = limit.measure.is_tokens();
        // The decision's view of this limit; none when another matched limit replaces it.
        let standing = judged
            .iter()
            .find(|j| j.unit == w.unit && j.standing.limit.measure.is_tokens() == tokens)
            .map(|j| j.standing);
        let Some(standing) = standing else {
            return Some(
                json!({"name": limit.name.as_deref(), "limit": limit.per_unit,
                "counts": limit.measure.field(), "local": local, "fleet": fleet,
                "remaining": null, "replaced": true,
                "why": "replaced by another matched limit: not evaluated"}),
            );
        };
        let (used, remaining, spent) = match fleet.filter(|_| in_store) {
            Some(used) => {
                let per_unit = standing.limit.per_unit;
                (used, per_unit.saturating_sub(used), used >= per_unit)
            }
            None => (standing.used, standing.remaining(), standing.over),
        };
        Some(
            json!({"name": limit.name.as_deref(), "limit": standing.limit.per_unit,
            "configured": limit.per_unit, "counts": limit.measure.field(),
            "local": local, "fleet": fleet, "used": used,
            "remaining": remaining, "replaced": false, "settled_in_store": in_store,
            "why": if spent { "spent: the next call that counts is denied" } else { "within the limit" }}),
        )
    };
    let algorithm = w.algorithm().map(algorithm_json);
    json!({"unit": w.unit.name(), "reset_ms": w.until_reset.as_millis() as u64,
           "algorithm": algorithm,
           "requests": slot(&w.requests_limit, w.local.requests.into(), w.fleet.map(|f| f.requests.into())),
           "tokens": slot(&w.tokens_limit, w.local.tokens, w.fleet.map(|f| f.tokens))})
}

/// How a limit counts, as the admin API shows it: its name, and a token bucket's burst.
pub(super) fn algorithm_json(algorithm: crate::limiter::Algorithm) -> serde_json::Value {
    match algorithm {
        crate::limiter::Algorithm::TokenBucket { burst } => {
            json!({"name": algorithm.name(), "burst": burst})
        }
        _ => json!({"name": algorithm.name()}),
    }
}
