//! One descriptor's counters, read or cleared by an operator: locally and, with Redis,
//! fleet-wide (`/v1/usage`, `/v1/reset`, and the counts `/v1/explain` and
//! `/v1/utilization` show).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::body::{ResetBody, UsageQuery};
use super::{Failure, Shared, authorize};
use crate::app::App;
use crate::limiter::{Algorithm, CounterRef, Counts, Demand, Enforcement, Outcome, Unit};
use crate::rules::{Entry, Limit, Rule};
use crate::sync::SyncError;

/// The count an operator sees: the fleet's where Redis answered, never less than this
/// replica's own (a push may not have landed yet).
pub fn seen(local: u64, fleet: Option<u64>) -> u64 {
    fleet.unwrap_or(local).max(local)
}

/// The counts of one window of a descriptor's rule.
#[derive(Debug, Clone)]
pub struct WindowUsage {
    /// The window's unit.
    pub unit: Unit,
    /// Its requests-like limit, as configured.
    pub requests_limit: Option<Limit>,
    /// Its tokens limit, as configured.
    pub tokens_limit: Option<Limit>,
    /// This replica's own counts (a token bucket kept in leases: what the fleet has taken of
    /// it, as this replica knows it).
    pub local: Counts,
    /// The fleet's counts in Redis (a token bucket: what the fleet's bucket has taken of its
    /// burst); `None` without Redis or when it did not answer.
    pub fleet: Option<Counts>,
    /// Time until the window ends (a token bucket kept in leases: as a call would be told,
    /// until it is full, or when it is empty until one more fits).
    pub until_reset: Duration,
}

impl WindowUsage {
    /// How the window's limits count (a window holds one algorithm).
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.requests_limit
            .as_ref()
            .or(self.tokens_limit.as_ref())
            .map(|l| l.algorithm)
    }
}

/// What a descriptor's counters hold now.
#[derive(Debug, Clone)]
pub struct Usage {
    /// The rule the descriptor matches.
    pub rule: Arc<Rule>,
    /// The descriptor path as stored in Redis: `key_value.key_value`.
    pub path: String,
    /// One entry per window of the rule, shortest first.
    pub windows: Vec<WindowUsage>,
}

/// The rule in force that a descriptor matches.
fn matching<E: Entry>(app: &App, domain: &str, entries: &[E]) -> Option<Arc<Rule>> {
    app.rules.load().domain(domain)?.tree.find(entries).cloned()
}

/// The usage of the counters a descriptor draws from; `None` if no rule matches it.
pub async fn usage<E: Entry>(app: &App, domain: &str, entries: &[E]) -> Option<Usage> {
    Some(usage_of(app, matching(app, domain, entries)?, entries).await)
}

/// The usage of `rule`'s counters for the descriptor `entries` (which it matches).
pub async fn usage_of<E: Entry>(app: &App, rule: Arc<Rule>, entries: &[E]) -> Usage {
    let refs: Vec<&str> = rule.counter_parts(entries).collect();
    let path = rule.counter_path(refs.iter().copied());
    let now = app.limiter.clock().now_ms();
    let mut windows = Vec::new();
    for w in rule.windows() {
        let unit = w.counter_unit();
        let window = unit.window_at(now);
        // The pinned table is not held across the fleet's await below.
        let (local, until_reset) = if w.is_leased_bucket() {
            // As a call would find it: what the fleet has taken of the bucket as this replica
            // knows it, and when it is full again.
            let demand = Demand {
                counter: CounterRef {
                    scope: w.counter_scope(rule.id),
                    unit,
                    parts: &refs,
                },
                limits: w.in_force(rule.capacity.get(), |_| true),
                charge: Counts::ZERO,
                refund: false,
                hold_taken_ms: None,
                enforcement: Enforcement::Enforce,
            };
            let mut outcome = [Outcome::default()];
            app.limiter
                .assess(std::slice::from_ref(&demand), &mut outcome);
            (outcome[0].counts, outcome[0].until_reset)
        } else {
            let counters = app.limiter.counters().pin();
            let counter = counters.get(CounterRef {
                scope: w.counter_scope(rule.id),
                unit,
                parts: &refs,
            });
            match counter {
                // A sliding window's estimate, a bucket's size less what it holds.
                Some(c) if !w.algorithm.is_fixed() && !w.leased => {
                    let limits = w.in_force(rule.capacity.get(), |_| true);
                    let (reading, until_reset) =
                        c.assess_by(now, w.unit.millis(), Counts::ZERO, limits);
                    (reading.counts, until_reset)
                }
                Some(c) => {
                    let wide = w.tokens.as_ref().is_some_and(|l| l.is_wide());
                    (c.counts(window, wide), unit.until_reset(now))
                }
                None => (Counts::ZERO, unit.until_reset(now)),
            }
        };
        let fleet = match &app.fleet {
            Some(fleet) => {
                let rule_window = (w, rule.capacity.get());
                fleet
                    .usage(&rule.domain, &path, rule_window, window, now)
                    .await
                    .ok()
            }
            None => None,
        };
        windows.push(WindowUsage {
            unit: w.unit,
            requests_limit: w.requests.clone(),
            tokens_limit: w.tokens.clone(),
            local,
            fleet,
            until_reset,
        });
    }
    Usage {
        rule,
        path,
        windows,
    }
}

/// What a reset cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    /// Counters dropped on this replica.
    pub local_counters: usize,
    /// Keys deleted in Redis (every window of the counter).
    pub fleet_keys: usize,
}

/// Why a reset cleared nothing.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// No rule matches the descriptor: there is nothing to clear.
    #[error("no rule matches this descriptor")]
    NoRule,
    /// The fleet's counts could not be cleared (this replica's were).
    #[error(transparent)]
    Fleet(#[from] SyncError),
}

/// Clears a descriptor's counters here and, with Redis, in the fleet (every window, found with
/// SCAN).
pub async fn reset<E: Entry>(
    app: &App,
    domain: &str,
    entries: &[E],
) -> Result<Cleared, ResetError> {
    let rule = matching(app, domain, entries).ok_or(ResetError::NoRule)?;
    let local_counters = app.limiter.counters().remove_where(|key| {
        rule.windows()
            .iter()
            .any(|w| w.counter_scope(rule.id) == key.scope())
            && key.parts().eq(rule.counter_parts(entries))
    });
    let fleet_keys = match &app.fleet {
        None => 0,
        Some(fleet) => {
            let path = rule.counter_path(rule.counter_parts(entries));
            fleet.reset(&rule.domain, &path).await?
        }
    };
    Ok(Cleared {
        local_counters,
        fleet_keys,
    })
}

/// `GET /v1/usage`: one descriptor's counts, here and fleet-wide.
pub(super) async fn get_usage(
    State(app): Shared,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Value>, Failure> {
    let Query(query) = query.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let owned = crate::proto::parse_entries(&query.descriptor)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("descriptor: {e}")))?;
    let entries: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let Some(usage) = usage(&app, &query.domain, &entries).await else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "no rule matches this descriptor".into(),
        ));
    };
    let windows: Vec<Value> = usage
        .windows
        .iter()
        .map(|w| {
            let side = |limit: &Option<Limit>, local: u64, fleet: Option<u64>| {
                let used = seen(local, fleet);
                json!({"used": used, "local": local, "fleet": fleet,
                       "limit": limit.as_ref().map(|l| l.per_unit),
                       "remaining": limit.as_ref().map(|l| l.ceiling().saturating_sub(used))})
            };
            let algorithm = w.algorithm().map(super::rules::algorithm_json);
            json!({"unit": w.unit.name(), "reset_ms": w.until_reset.as_millis() as u64,
                   "algorithm": algorithm,
                   "requests": side(&w.requests_limit, w.local.requests.into(), w.fleet.map(|f| f.requests.into())),
                   "tokens": side(&w.tokens_limit, w.local.tokens, w.fleet.map(|f| f.tokens))})
        })
        .collect();
    Ok(Json(
        json!({"domain": query.domain, "rule": usage.rule.path.as_ref(), "windows": windows}),
    ))
}

/// `POST /v1/reset`: clears one descriptor's counters, here and fleet-wide.
pub(super) async fn post_reset(
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
    match reset(&app, &body.domain, &entries).await {
        Err(ResetError::NoRule) => Err(Failure(
            StatusCode::NOT_FOUND,
            "no rule matches this descriptor".into(),
        )),
        Err(ResetError::Fleet(e)) => Err(Failure(StatusCode::BAD_GATEWAY, e.to_string())),
        Ok(cleared) => {
            tracing::info!(domain = %body.domain, local = cleared.local_counters, fleet = cleared.fleet_keys, "counters reset by the admin API");
            Ok(Json(
                json!({"local_counters": cleared.local_counters, "fleet_keys": cleared.fleet_keys}),
            ))
        }
    }
}
