//! Capacity reduction: when an upstream starts answering 429s, an operator (or automation)
//! announces it, and a rule's effective limit drops by a factor on every replica, then recovers
//! step by step to the configured limit.
//!
//! An announcement is `(factor, time)` per rule. Every replica derives the factor in force from
//! it the same way, `min(1, factor × recovery^⌊elapsed / interval⌋)`, so recovery needs no
//! further messages and replicas agree. With Redis, announcements are kept in a hash (read every
//! tick, so a replica that restarts catches up) and published on a channel (so others apply them
//! at once). The request path reads one atomic per matched rule.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::rules::RuleSet;
use crate::server::App;

/// A rule's capacity factor in millionths: 1,000,000 is the configured limit.
#[derive(Debug)]
pub struct Factor(AtomicU32);

impl Default for Factor {
    fn default() -> Self {
        Factor(AtomicU32::new(Factor::FULL))
    }
}

impl Factor {
    pub const FULL: u32 = 1_000_000;

    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, millionths: u32) {
        self.0.store(millionths, Ordering::Relaxed);
    }

    /// A limit as the factor leaves it.
    pub fn apply(&self, per_unit: u32) -> u32 {
        match self.get() {
            Factor::FULL => per_unit,
            f => (u64::from(per_unit) * u64::from(f) / u64::from(Factor::FULL)) as u32,
        }
    }
}

/// One announcement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Announcement {
    pub factor: f64,
    pub at_ms: u64,
}

/// How capacity recovers.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    pub factor: f64,
    pub every: Duration,
}

impl Recovery {
    /// The factor in force at `now_ms` after an announcement.
    pub fn factor_at(&self, announced: Announcement, now_ms: u64) -> f64 {
        let steps = now_ms.saturating_sub(announced.at_ms) / (self.every.as_millis().max(1) as u64);
        let grown = announced.factor * self.factor.powi(steps.min(1_000) as i32);
        grown.min(1.0)
    }
}

/// Announcements by (domain, rule path).
#[derive(Debug, Default)]
pub struct Capacity {
    announced: Mutex<HashMap<(String, String), Announcement>>,
}

impl Capacity {
    /// Records an announcement, keeping the newest per rule.
    pub fn record(&self, domain: &str, rule: &str, announcement: Announcement) {
        let mut map = self
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = map
            .entry((domain.to_string(), rule.to_string()))
            .or_insert(announcement);
        if announcement.at_ms >= entry.at_ms {
            *entry = announcement;
        }
    }

    pub fn announcements(&self) -> Vec<((String, String), Announcement)> {
        let map = self
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Sets every rule's factor for `now_ms`, forgetting announcements fully recovered. Returns
    /// the rules whose factor changed, with the new factor.
    pub fn apply(
        &self,
        rules: &RuleSet,
        recovery: Recovery,
        now_ms: u64,
    ) -> Vec<(String, String, f64)> {
        let mut map = self
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut changed = Vec::new();
        for domain in rules.domains() {
            for rule in &domain.rules {
                let key = (domain.name.to_string(), rule.path.to_string());
                let factor = map
                    .get(&key)
                    .map_or(1.0, |a| recovery.factor_at(*a, now_ms));
                let millionths = (factor * f64::from(Factor::FULL))
                    .round()
                    .clamp(1.0, f64::from(Factor::FULL)) as u32;
                if rule.capacity.get() != millionths {
                    rule.capacity.set(millionths);
                    changed.push((key.0.clone(), key.1.clone(), factor));
                }
            }
        }
        map.retain(|_, a| recovery.factor_at(*a, now_ms) < 1.0);
        changed
    }
}

/// Keeps factors current: applies announcements (local, and with Redis the fleet's) and their
/// recovery, logs each change and sets its gauge.
pub async fn run(app: Arc<App>) {
    // With Redis, also follow the fleet's announcements as they are published.
    let follow = async {
        match &app.fleet {
            Some(fleet) => fleet.follow_capacity(&app.capacity_changed).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = follow => {}
        () = keep_current(&app) => {}
    }
}

async fn keep_current(app: &Arc<App>) {
    let recovery = app.recovery();
    let tick = (recovery.every / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = app.capacity_changed.notified() => {}
        }
        if let Some(fleet) = &app.fleet {
            match fleet.capacity_announcements().await {
                Ok(found) => {
                    for ((domain, rule), a) in found {
                        app.capacity.record(&domain, &rule, a);
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot read capacity announcements from Redis")
                }
            }
        }
        let rules = app.rules.load_full();
        for (domain, rule, factor) in
            app.capacity
                .apply(&rules, recovery, app.limiter.clock().now_ms())
        {
            tracing::info!(%domain, %rule, factor, "capacity factor changed");
            metrics::gauge!(crate::telemetry::names::CAPACITY_FACTOR, "domain" => domain, "rule" => rule).set(factor);
        }
    }
}
