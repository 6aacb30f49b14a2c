//! The limits of one descriptor: `rate_limit` and `limits` read into a [`Policy`], each
//! window holding at most one requests-like and one tokens limit.

use std::collections::HashMap;

use super::compile::Compiler;
use super::locate::YamlPath;
use super::raw::{RawDescriptor, RawLimit};
use super::{Limit, Measure, Policy, RuleWindow};
use crate::limiter::Unit;

/// One limit as written: a limit, or `unlimited: true`.
enum Written {
    Unlimited,
    Limited(Limit),
}

impl Compiler<'_> {
    /// The descriptor's limits, `None` when it sets none (it only leads to nested descriptors).
    pub(super) fn policy(&mut self, raw: &RawDescriptor, at: &YamlPath) -> Option<Policy> {
        let written: Vec<(YamlPath, &RawLimit)> = raw
            .rate_limit
            .iter()
            .map(|l| (at.field("rate_limit"), l))
            .chain(
                raw.limits
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (at.field("limits").index(i), l)),
            )
            .collect();
        if written.is_empty() {
            return None;
        }
        if let Some((path, _)) = written.iter().find(|(_, l)| l.unlimited)
            && written.len() > 1
        {
            self.error(
                path,
                "an unlimited descriptor cannot have other limits".into(),
            );
        }
        let mut windows: Vec<RuleWindow> = Vec::new();
        let mut unlimited = false;
        let mut slot_paths: HashMap<(Unit, bool), YamlPath> = HashMap::new();
        for (path, raw_limit) in &written {
            let limit = match self.limit(raw_limit, path) {
                None => continue,
                Some(Written::Unlimited) => {
                    unlimited = true;
                    continue;
                }
                Some(Written::Limited(limit)) => limit,
            };
            let slot = (limit.unit, limit.measure.is_tokens());
            if let Some(first) = slot_paths.get(&slot) {
                let line = self.line_of(first);
                let kind = if slot.1 { "tokens" } else { "requests" };
                self.error(
                    path,
                    format!(
                        "a second {kind} limit per {} on this descriptor (the first is at line {line})",
                        limit.unit
                    ),
                );
                continue;
            }
            slot_paths.insert(slot, path.clone());
            let window = match windows.iter_mut().find(|w| w.unit == limit.unit) {
                Some(window) => window,
                None => {
                    windows.push(RuleWindow {
                        unit: limit.unit,
                        requests: None,
                        tokens: None,
                    });
                    windows.last_mut().expect("just pushed")
                }
            };
            if limit.measure.is_tokens() {
                window.tokens = Some(limit);
            } else {
                window.requests = Some(limit);
            }
        }
        if unlimited {
            return Some(Policy::Unlimited);
        }
        windows.sort_by_key(|w| w.unit);
        Some(Policy::Limited(windows.into_boxed_slice()))
    }

    /// One limit; `None` when it is wrong (its errors recorded).
    fn limit(&mut self, raw: &RawLimit, at: &YamlPath) -> Option<Written> {
        let mut ok = true;
        if let Some(name) = &raw.name {
            if name.trim().is_empty() {
                self.error(&at.field("name"), "name must not be empty".into());
                ok = false;
            } else {
                self.names.insert(name.clone());
            }
        }
        for (i, replace) in raw.replaces.iter().enumerate() {
            let path = at.field("replaces").index(i).field("name");
            if replace.name.trim().is_empty() {
                self.error(&path, "name must not be empty".into());
                ok = false;
            } else if raw.name.as_ref() == Some(&replace.name) {
                // As envoyproxy/ratelimit: a limit replacing itself would never be evaluated.
                self.error(
                    &path,
                    format!("the limit `{}` must not replace itself", replace.name),
                );
                ok = false;
            } else {
                self.replaced.push((path, replace.name.clone()));
            }
        }
        let amounts: Vec<(Measure, u32)> = [
            (Measure::Hits, raw.requests_per_unit),
            (Measure::Requests, raw.requests),
            (Measure::Tokens, raw.tokens),
        ]
        .into_iter()
        .filter_map(|(m, n)| n.map(|n| (m, n)))
        .collect();

        if raw.unlimited {
            if raw.unit.is_some() {
                self.error(
                    &at.field("unit"),
                    "an unlimited limit must not set a unit".into(),
                );
                ok = false;
            }
            if let Some((measure, _)) = amounts.first() {
                self.error(
                    &at.field(measure.field()),
                    format!("an unlimited limit must not set {}", measure.field()),
                );
                ok = false;
            }
            return ok.then_some(Written::Unlimited);
        }
        let unit = match &raw.unit {
            None => {
                self.error(
                    at,
                    "missing `unit` (second, minute, hour, day, week, month or year)".into(),
                );
                None
            }
            Some(text) => {
                let unit = Unit::parse(text.trim());
                if unit.is_none() {
                    self.error(
                        &at.field("unit"),
                        format!(
                            "unknown unit `{text}` (expected second, minute, hour, day, week, month or year)"
                        ),
                    );
                }
                unit
            }
        };
        let amount = match amounts.as_slice() {
            [one] => Some(*one),
            [] => {
                self.error(
                    at,
                    "missing the limit: set requests_per_unit, requests or tokens, or unlimited: true"
                        .into(),
                );
                None
            }
            [_, (second, _), ..] => {
                self.error(
                    &at.field(second.field()),
                    "set only one of requests_per_unit, requests and tokens per limit; \
                     use `limits:` for several"
                        .into(),
                );
                None
            }
        };
        let (unit, (measure, per_unit)) = (unit?, amount?);
        ok.then(|| {
            Written::Limited(Limit {
                name: raw.name.as_deref().map(Into::into),
                unit,
                per_unit,
                measure,
                replaces: raw
                    .replaces
                    .iter()
                    .map(|r| r.name.as_str().into())
                    .collect(),
            })
        })
    }
}
