//! sluice's LLM shorthand: `api_keys` (keys, their tiers, what unknown keys get) and
//! `endpoints` (shared upstream budgets), compiled to one-level rules beside the file's own
//! descriptors.

use std::sync::Arc;

use super::compile::Compiler;
use super::locate::YamlPath;
use super::matcher::{Level, Node, Selector};
use super::raw::{RawApiKeys, RawFile, RawTier, UnknownKeys};
use super::{
    Consistency, ENDPOINT_KEY, Limit, Measure, MetricDetail, Policy, Rule, RuleWindow, rule_scope,
};
use crate::limiter::{Algorithm, Enforcement, Unit};
use crate::telemetry::RuleMetrics;

impl Compiler<'_> {
    /// `api_keys` and `endpoints`: compiled to one-level descriptors beside the file's own.
    pub(super) fn llm_shorthand(&mut self, raw: &RawFile, root: &YamlPath, tree: &mut Level) {
        if let Some(api_keys) = &raw.api_keys {
            self.api_keys(api_keys, &root.field("api_keys"), tree);
        }
        let threshold = raw.unlimited_tpm_above.unwrap_or(100_000_000);
        for (i, endpoint) in raw.endpoints.iter().enumerate() {
            let at = root.field("endpoints").index(i);
            if endpoint.id.trim().is_empty() {
                self.error(&at.field("id"), "id must not be empty".into());
                continue;
            }
            let policy = match endpoint.tpm_limit {
                Some(tpm) if tpm > threshold => Policy::Unlimited,
                Some(tpm) if tpm > u64::from(u32::MAX) => {
                    self.error(
                        &at.field("tpm_limit"),
                        format!("{tpm} is more than a limit can hold ({}); above unlimited_tpm_above ({threshold}) it means unlimited", u32::MAX),
                    );
                    continue;
                }
                tpm => per_minute_and_day(
                    self.fleet_store,
                    &RawTier {
                        rpm: endpoint.rpm_limit,
                        tpm: tpm.map(|t| t as u32),
                        ..RawTier::default()
                    },
                ),
            };
            let selector = Selector::Exact(endpoint.id.as_str().into());
            self.shorthand_rule(&at, ENDPOINT_KEY, &endpoint.id, selector, policy, tree);
        }
    }

    fn api_keys(&mut self, raw: &RawApiKeys, at: &YamlPath, tree: &mut Level) {
        let key = raw
            .descriptor_key
            .clone()
            .unwrap_or_else(|| "api_key".into());
        let tier = |name: &Option<String>| name.as_ref().and_then(|n| raw.tiers.get(n)).cloned();
        for (i, entry) in raw.keys.iter().enumerate() {
            let at = at.field("keys").index(i);
            if entry.tier.is_some() && tier(&entry.tier).is_none() {
                let name = entry.tier.clone().unwrap_or_default();
                self.error(
                    &at.field("tier"),
                    format!("no tier `{name}` in api_keys.tiers"),
                );
                continue;
            }
            let base = tier(&entry.tier)
                .or_else(|| tier(&raw.default_tier))
                .unwrap_or_default();
            let limits = RawTier {
                rpm: entry.rate_limit_rpm.or(base.rpm),
                tpm: entry.rate_limit_tpm.or(base.tpm),
                ..base
            };
            let (selector, label) = match (&entry.key, &entry.sha256) {
                (Some(k), None) if !k.is_empty() => (Selector::Exact(k.as_str().into()), k.clone()),
                (None, Some(hex)) => match parse_sha256(hex) {
                    Some(digest) => (
                        Selector::Hashed(digest),
                        format!("sha256:{}", hex.to_ascii_lowercase()),
                    ),
                    None => {
                        self.error(
                            &at.field("sha256"),
                            "must be 64 hex digits: the SHA-256 of the key".into(),
                        );
                        continue;
                    }
                },
                _ => {
                    self.error(&at, "give exactly one of `key` and `sha256`".into());
                    continue;
                }
            };
            self.shorthand_rule(
                &at,
                &key,
                &label,
                selector,
                per_minute_and_day(self.fleet_store, &limits),
                tree,
            );
        }
        let unknown = match raw.unknown_keys.unwrap_or_default() {
            UnknownKeys::DefaultTier => raw.default_tier.as_ref().map(|_| tier(&raw.default_tier)),
            UnknownKeys::Deny => Some(Some(RawTier {
                rpm: Some(0),
                ..RawTier::default()
            })),
        };
        match unknown {
            Some(Some(limits)) => {
                let policy = per_minute_and_day(self.fleet_store, &limits);
                self.shorthand_rule(at, &key, "", Selector::AnyValue, policy, tree);
            }
            Some(None) => {
                let name = raw.default_tier.clone().unwrap_or_default();
                self.error(
                    &at.field("default_tier"),
                    format!("no tier `{name}` in api_keys.tiers"),
                );
            }
            None => {}
        }
    }

    /// A one-level rule of the shorthand, inserted in the tree.
    fn shorthand_rule(
        &mut self,
        at: &YamlPath,
        key: &str,
        value: &str,
        selector: Selector,
        policy: Policy,
        tree: &mut Level,
    ) {
        let identity = format!("{key}={value}");
        // API keys appear as a short hash wherever the rule is named (metrics, admin API).
        let label = match &selector {
            Selector::Exact(v) if key != ENDPOINT_KEY => {
                format!("{key}_sha256_{}", short_hash(v.as_bytes()))
            }
            Selector::Hashed(digest) => format!("{key}_sha256_{}", hex(&digest[..6])),
            _ if value.is_empty() => key.to_string(),
            _ => format!("{key}_{value}"),
        };
        let rule = Arc::new(Rule {
            id: rule_scope(&self.domain, [identity.as_str()]),
            domain: self.domain.as_str().into(),
            metrics: RuleMetrics::register(&self.domain, &label, false),
            reserve: Default::default(),
            wait: None,
            capacity: Default::default(),
            endpoint: (key == ENDPOINT_KEY).then(|| value.into()),
            path: label.into(),
            file: self.file.path.clone(),
            yaml_path: at.clone(),
            policy,
            enforcement: Enforcement::Enforce,
            consistency: Consistency::Approximate,
            metric_detail: MetricDetail::Rule,
            keys: Box::new([key.into()]),
            shared_values: Box::new([None]),
            metadata: None,
        });
        let node = Node {
            rule: Some(rule.clone()),
            children: Level::default(),
        };
        if tree.insert(key, selector, node) {
            self.rules.push(rule);
        } else {
            let shown = if value.is_empty() {
                key.to_string()
            } else {
                format!("{key}={value}")
            };
            self.error(
                at,
                format!("`{shown}` is already defined by this file's descriptors"),
            );
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 12 hex digits of a value's SHA-256: enough to tell keys apart, not to recover one.
pub fn short_hash(value: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(value)[..6])
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// A tier's budgets as rule windows: requests and tokens per minute, and per day.
fn per_minute_and_day(leased: bool, tier: &RawTier) -> Policy {
    let limit = |unit, per_unit: Option<u32>, measure| {
        per_unit.map(|per_unit| Limit {
            name: None,
            unit,
            per_unit: per_unit.into(),
            measure,
            replaces: Box::new([]),
            algorithm: Algorithm::FixedWindow,
        })
    };
    let windows: Vec<RuleWindow> = [
        (Unit::Minute, tier.rpm, tier.tpm),
        (Unit::Day, tier.rpd, tier.tpd),
    ]
    .into_iter()
    .filter(|(_, r, t)| r.is_some() || t.is_some())
    .map(|(unit, r, t)| RuleWindow {
        unit,
        requests: limit(unit, r, Measure::Requests),
        tokens: limit(unit, t, Measure::Tokens),
        algorithm: Algorithm::FixedWindow,
        leased,
    })
    .collect();
    if windows.is_empty() {
        Policy::Unlimited
    } else {
        Policy::Limited(windows.into_boxed_slice())
    }
}
