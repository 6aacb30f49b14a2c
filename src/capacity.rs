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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::rules::{SourceFile, compile_file};

    const RECOVERY: Recovery = Recovery {
        factor: 2.0,
        every: Duration::from_secs(10),
    };

    #[test]
    fn a_reduction_recovers_a_step_every_interval_up_to_the_configured_limit() {
        let announced = Announcement {
            factor: 0.25,
            at_ms: 1_000,
        };
        let at = |s: u64| RECOVERY.factor_at(announced, 1_000 + s * 1000);
        assert_eq!(
            [at(0), at(9), at(10), at(20), at(30), at(1_000)],
            [0.25, 0.25, 0.5, 1.0, 1.0, 1.0]
        );
    }

    #[test]
    fn factors_are_set_on_the_rules_and_forgotten_once_recovered() {
        let domain = compile_file(&SourceFile {
            path: "d.yaml".into(),
            text: "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 100 }\n".into(),
        })
        .unwrap();
        let (rules, _) = RuleSet::assemble(vec![Arc::new(domain)]);
        let rule = rules.domain("d").unwrap().rules[0].clone();
        let capacity = Capacity::default();
        capacity.record(
            "d",
            "k",
            Announcement {
                factor: 0.5,
                at_ms: 1_000,
            },
        );
        // An older announcement, arriving late, does not undo a newer one.
        capacity.record(
            "d",
            "k",
            Announcement {
                factor: 0.9,
                at_ms: 500,
            },
        );
        let kept: Vec<f64> = capacity
            .announcements()
            .iter()
            .map(|(_, a)| a.factor)
            .collect();
        assert_eq!(kept, [0.5]);
        let capacity = Capacity::default();
        capacity.record(
            "d",
            "k",
            Announcement {
                factor: 0.5,
                at_ms: 0,
            },
        );
        assert_eq!(
            capacity.apply(&rules, RECOVERY, 0),
            [("d".to_string(), "k".to_string(), 0.5)]
        );
        assert_eq!(rule.capacity.apply(100), 50);
        assert!(
            capacity.apply(&rules, RECOVERY, 5_000).is_empty(),
            "no change within a step"
        );
        assert_eq!(capacity.apply(&rules, RECOVERY, 10_000)[0].2, 1.0);
        assert_eq!(rule.capacity.apply(100), 100);
        assert!(
            capacity.announcements().is_empty(),
            "a recovered announcement is forgotten"
        );
    }
}
