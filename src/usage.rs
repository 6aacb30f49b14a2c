//! One descriptor's counters, read or cleared by an operator: locally and, with Redis,
//! fleet-wide. The admin API exposes these.

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;

use crate::decision::counter_parts;
use crate::limiter::{CounterRef, Counts, Unit};
use crate::rules::{Entry, Limit, Policy, Rule};
use crate::server::App;
use crate::sync::rule_path;

/// The counts of one window of a descriptor's rule.
#[derive(Debug, Clone)]
pub struct WindowUsage {
    pub unit: Unit,
    pub requests_limit: Option<Limit>,
    pub tokens_limit: Option<Limit>,
    /// This replica's own counts.
    pub local: Counts,
    /// The fleet's counts in Redis; `None` without Redis or when it did not answer.
    pub fleet: Option<Counts>,
    pub until_reset: Duration,
}

/// What a descriptor's counters hold now.
#[derive(Debug, Clone)]
pub struct Usage {
    pub rule: Arc<Rule>,
    /// The descriptor path as stored in Redis: `key_value.key_value`.
    pub path: String,
    pub windows: Vec<WindowUsage>,
}

/// The rule a descriptor matches and the values naming its counters.
fn locate<E: Entry>(app: &App, domain: &str, entries: &[E]) -> Option<(Arc<Rule>, Vec<String>)> {
    let rules = app.rules.load();
    let rule = rules.domain(domain)?.tree.find(entries)?.clone();
    let parts = counter_parts(&rule, entries).map(str::to_string).collect();
    Some((rule, parts))
}

/// The usage of the counters a descriptor draws from; `None` if no rule matches it.
pub async fn usage<E: Entry>(app: &App, domain: &str, entries: &[E]) -> Option<Usage> {
    let (rule, parts) = locate(app, domain, entries)?;
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let path = rule_path(&rule, refs.iter().copied());
    let now = app.limiter.clock().now_ms();
    let mut windows = Vec::new();
    if let Policy::Limited(rule_windows) = &rule.policy {
        for w in rule_windows.iter() {
            let window = w.unit.window_at(now);
            let local = app
                .limiter
                .counters()
                .pin()
                .get(CounterRef {
                    scope: rule.id,
                    unit: w.unit,
                    parts: &refs,
                })
                .map_or(Counts::ZERO, |c| c.counts(window));
            let fleet = match &app.fleet {
                Some(fleet) => fleet.usage(&rule.domain, &path, w.unit, window).await.ok(),
                None => None,
            };
            windows.push(WindowUsage {
                unit: w.unit,
                requests_limit: w.requests.clone(),
                tokens_limit: w.tokens.clone(),
                local,
                fleet,
                until_reset: w.unit.until_reset(now),
            });
        }
    }
    Some(Usage {
        rule,
        path,
        windows,
    })
}

/// What a reset cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    pub local_counters: usize,
    pub fleet_keys: usize,
}

/// Clears a descriptor's counters here and, with Redis, in the fleet (every window, found with
/// SCAN). `None` if no rule matches the descriptor.
pub async fn reset<E: Entry>(
    app: &App,
    domain: &str,
    entries: &[E],
) -> Option<Result<Cleared, RedisError>> {
    let (rule, parts) = locate(app, domain, entries)?;
    let local_counters = app.limiter.counters().remove_where(|key| {
        key.scope() == rule.id && key.parts().eq(parts.iter().map(String::as_str))
    });
    let fleet_keys = match &app.fleet {
        None => 0,
        Some(fleet) => {
            let path = rule_path(&rule, parts.iter().map(String::as_str));
            match fleet.reset(&rule.domain, &path).await {
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            }
        }
    };
    Some(Ok(Cleared {
        local_counters,
        fleet_keys,
    }))
}
