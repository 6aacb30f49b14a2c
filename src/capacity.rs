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
    /// The share of the configured limit left in force, above 0 and below 1.
    pub factor: f64,
    /// When it was announced, in ms since the epoch: recovery counts from here.
    pub at_ms: u64,
}

impl Announcement {
    /// As the fleet store keeps it: `factor,at_ms`.
    pub fn encode(&self) -> String {
        format!("{},{}", self.factor, self.at_ms)
    }

    /// The stored form read back; `None` if it is not one.
    pub fn decode(text: &str) -> Option<Announcement> {
        let (factor, at) = text.split_once(',')?;
        Some(Announcement {
            factor: factor.parse().ok()?,
            at_ms: at.parse().ok()?,
        })
    }
}

/// Which rule an announcement is for: its domain and descriptor path (as `/v1/rules` lists it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleName {
    /// The rule's domain.
    pub domain: String,
    /// The rule's descriptor path.
    pub rule: String,
}

impl RuleName {
    /// As the fleet store keys it: domain and path with a unit separator between.
    pub fn encode(&self) -> String {
        format!("{}\u{1f}{}", self.domain, self.rule)
    }

    /// The stored form read back; `None` if it is not one.
    pub fn decode(text: &str) -> Option<RuleName> {
        let (domain, rule) = text.split_once('\u{1f}')?;
        Some(RuleName {
            domain: domain.to_string(),
            rule: rule.to_string(),
        })
    }
}

/// A rule whose factor changed, and its new factor.
#[derive(Debug, Clone, PartialEq)]
pub struct Changed {
    /// The rule.
    pub name: RuleName,
    /// Its factor now, a fraction of the configured limit.
    pub factor: f64,
}

/// How capacity recovers.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// The factor a reduced limit grows by at each step.
    pub factor: f64,
    /// How often it steps.
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

/// Announcements by rule.
#[derive(Debug, Default)]
pub struct Capacity {
    announced: Mutex<HashMap<RuleName, Announcement>>,
}

impl Capacity {
    /// Records an announcement, keeping the newest per rule.
    pub fn record(&self, name: RuleName, announcement: Announcement) {
        let mut map = self
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(name).or_insert(announcement);
        if announcement.at_ms >= entry.at_ms {
            *entry = announcement;
        }
    }

    /// Every announcement not yet fully recovered.
    pub fn announcements(&self) -> Vec<(RuleName, Announcement)> {
        let map = self
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Sets every rule's factor for `now_ms`, forgetting announcements fully recovered. Returns
    /// the rules whose factor changed, with the new factor.
    pub fn apply(&self, rules: &RuleSet, recovery: Recovery, now_ms: u64) -> Vec<Changed> {
        let mut map = self
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut changed = Vec::new();
        for domain in rules.domains() {
            for rule in &domain.rules {
                let name = RuleName {
                    domain: domain.name.to_string(),
                    rule: rule.path.to_string(),
                };
                let factor = map
                    .get(&name)
                    .map_or(1.0, |a| recovery.factor_at(*a, now_ms));
                let millionths = (factor * f64::from(Factor::FULL))
                    .round()
                    .clamp(1.0, f64::from(Factor::FULL)) as u32;
                if rule.capacity.get() != millionths {
                    rule.capacity.set(millionths);
                    changed.push(Changed { name, factor });
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
    use crate::rules::{DomainFiles, SourceFile, compile_file};

    fn name() -> RuleName {
        RuleName {
            domain: "d".into(),
            rule: "k".into(),
        }
    }

    #[test]
    fn announcements_are_stored_as_text_and_read_back() {
        let a = Announcement {
            factor: 0.25,
            at_ms: 1_767_225_600_000,
        };
        assert_eq!(a.encode(), "0.25,1767225600000");
        assert_eq!(Announcement::decode(&a.encode()), Some(a));
        assert_eq!(Announcement::decode("half,now"), None);
        assert_eq!(RuleName::decode(&name().encode()), Some(name()));
        assert_eq!(RuleName::decode("no separator"), None);
    }

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
        let (rules, _) = RuleSet::assemble(vec![Arc::new(domain)], DomainFiles::One);
        let rule = rules.domain("d").unwrap().rules[0].clone();
        let capacity = Capacity::default();
        capacity.record(
            name(),
            Announcement {
                factor: 0.5,
                at_ms: 1_000,
            },
        );
        // An older announcement, arriving late, does not undo a newer one.
        capacity.record(
            name(),
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
            name(),
            Announcement {
                factor: 0.5,
                at_ms: 0,
            },
        );
        assert_eq!(
            capacity.apply(&rules, RECOVERY, 0),
            [Changed {
                name: name(),
                factor: 0.5
            }]
        );
        assert_eq!(rule.capacity.apply(100), 50);
        assert!(
            capacity.apply(&rules, RECOVERY, 5_000).is_empty(),
            "no change within a step"
        );
        assert_eq!(capacity.apply(&rules, RECOVERY, 10_000)[0].factor, 1.0);
        assert_eq!(rule.capacity.apply(100), 100);
        assert!(
            capacity.announcements().is_empty(),
            "a recovered announcement is forgotten"
        );
    }
}
