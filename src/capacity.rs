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
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::rules::{Factor, RuleSet};

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
