//! Raw rule files → compiled domains. Every error of a file is reported, each with its file,
//! line and field; a file with any error yields no domain.

use std::collections::HashSet;
use std::sync::Arc;

use super::locate::{YamlPath, locate};
use super::matcher::{Level, Node, Pattern, Selector};
use super::metadata::to_struct;
use super::raw::{RawDescriptor, RawFile};
use super::{
    ConfigError, Consistency, Domain, ENDPOINT_KEY, Factor, MetricDetail, Policy, Reserve, Rule,
    SourceFile, rule_scope,
};
use crate::limiter::Enforcement;
use crate::telemetry::RuleMetrics;

/// Compiles one rule file into its domain, for a server with no fleet store.
pub fn compile_file(file: &SourceFile) -> Result<Domain, Vec<ConfigError>> {
    compile_file_for(file, false)
}

/// Compiles one rule file into its domain; `fleet_store`: limits are kept fleet-wide in Redis.
pub fn compile_file_for(file: &SourceFile, fleet_store: bool) -> Result<Domain, Vec<ConfigError>> {
    let raw: RawFile = match serde_yaml::from_str(&file.text) {
        Ok(raw) => raw,
        Err(e) => return Err(vec![yaml_error(file, &e)]),
    };
    let mut compiler = Compiler {
        file,
        domain: raw.domain.trim().to_string(),
        errors: Vec::new(),
        rules: Vec::new(),
        names: HashSet::new(),
        replaced: Vec::new(),
        fleet_store,
    };
    let root = YamlPath::default();
    if compiler.domain.is_empty() {
        compiler.error(&root.field("domain"), "domain must not be empty".into());
    }
    let mut tree = Level::default();
    compiler.level(&raw.descriptors, &root, &Ancestry::default(), &mut tree);
    compiler.llm_shorthand(&raw, &root, &mut tree);
    compiler.check_replaces();
    if !compiler.errors.is_empty() {
        return Err(compiler.errors);
    }
    Ok(Domain {
        line: domain_line(&file.text),
        name: compiler.domain.into(),
        file: file.path.clone(),
        tree,
        has_replaces: compiler
            .rules
            .iter()
            .any(|r| r.limits().any(|l| !l.replaces.is_empty())),
        rules: compiler.rules,
    })
}

fn domain_line(text: &str) -> usize {
    text.lines()
        .position(|line| line.starts_with("domain:"))
        .map_or(1, |i| i + 1)
}

/// serde_yaml prints `path: message at line L column C`; split it into our fields.
fn yaml_error(file: &SourceFile, e: &serde_yaml::Error) -> ConfigError {
    let text = e.to_string();
    let suffix = e
        .location()
        .map(|l| format!(" at line {} column {}", l.line(), l.column()));
    let text = suffix
        .and_then(|suffix| text.strip_suffix(&suffix))
        .unwrap_or(&text);
    let (field, message) = match text.split_once(": ") {
        Some((field, message)) if !field.contains(' ') => (Some(field.to_string()), message),
        _ => (None, text),
    };
    ConfigError {
        file: file.path.clone(),
        line: e.location().map(|l| l.line()),
        column: e.location().map(|l| l.column()),
        field,
        message: message.to_string(),
    }
}

/// What the levels above a descriptor contribute to its rule.
#[derive(Default, Clone)]
struct Ancestry {
    keys: Vec<Box<str>>,
    stats_path: Vec<String>,
    identity: Vec<String>,
    shared_values: Vec<Option<Box<str>>>,
}

/// One file being compiled: what it has produced so far, and every error found.
pub(super) struct Compiler<'f> {
    pub(super) file: &'f SourceFile,
    pub(super) domain: String,
    errors: Vec<ConfigError>,
    pub(super) rules: Vec<Arc<Rule>>,
    /// Names of the file's limits, and the `replaces` that must name one of them.
    pub(super) names: HashSet<String>,
    pub(super) replaced: Vec<(YamlPath, String)>,
    /// Limits are kept fleet-wide in a store (Redis): what only one replica can decide is an
    /// error.
    pub(super) fleet_store: bool,
}

impl Compiler<'_> {
    pub(super) fn error(&mut self, at: &YamlPath, message: String) {
        let (line, column) = locate(&self.file.text, at).unzip();
        self.errors.push(ConfigError {
            file: self.file.path.clone(),
            line,
            column,
            field: Some(at.to_string()),
            message,
        });
    }

    pub(super) fn line_of(&self, at: &YamlPath) -> usize {
        locate(&self.file.text, at).map_or(0, |(line, _)| line)
    }

    fn level(
        &mut self,
        descriptors: &[RawDescriptor],
        parent: &YamlPath,
        ancestry: &Ancestry,
        level: &mut Level,
    ) {
        let list = parent.field("descriptors");
        for (i, raw) in descriptors.iter().enumerate() {
            let at = list.index(i);
            if let Some(node) = self.descriptor(raw, &at, ancestry) {
                let (selector, label) = selector(raw);
                if !level.insert(&raw.key, selector, node) {
                    let first = descriptors[..i]
                        .iter()
                        .position(|d| d.key == raw.key && same_value(d, raw))
                        .map(|j| self.line_of(&list.index(j)))
                        .unwrap_or(0);
                    self.error(
                        &at,
                        format!(
                            "duplicate descriptor `{label}` at this level (first at line {first})"
                        ),
                    );
                }
            }
        }
    }

    fn descriptor(
        &mut self,
        raw: &RawDescriptor,
        at: &YamlPath,
        ancestry: &Ancestry,
    ) -> Option<Node> {
        let errors_before = self.errors.len();
        if raw.key.trim().is_empty() {
            self.error(&at.field("key"), "key must not be empty".into());
        }
        let value = raw.value.as_deref().filter(|v| !v.is_empty());
        let wildcard = value.and_then(Pattern::parse);
        if raw.share_threshold && wildcard.is_none() {
            self.error(
                &at.field("share_threshold"),
                "share_threshold needs a wildcard `value` (one with `*`)".into(),
            );
        }
        if raw.shadow_mode && raw.quota_mode {
            self.error(
                &at.field("quota_mode"),
                "a descriptor cannot be in both shadow_mode and quota_mode".into(),
            );
        }
        let metadata = raw.metadata.as_ref().and_then(|m| match to_struct(m) {
            Ok(s) => Some(s),
            Err(message) => {
                self.error(&at.field("metadata"), message);
                None
            }
        });

        let mut ancestry = ancestry.clone();
        let label = match value {
            Some(v) => format!("{}_{v}", raw.key),
            None => raw.key.clone(),
        };
        ancestry.stats_path.push(label);
        ancestry.keys.push(raw.key.as_str().into());
        ancestry
            .identity
            .push(format!("{}={}", raw.key, value.unwrap_or("")));
        ancestry.shared_values.push(
            raw.share_threshold
                .then(|| wildcard.as_ref().map(|p| p.as_str().into()))
                .flatten(),
        );

        let policy = self.policy(raw, at);
        let reserve = self.reserve(raw, policy.as_ref(), at);
        let reserve_is_empty = reserve == Reserve::default();
        let wide = matches!(&policy, Some(Policy::Limited(ws)) if ws.iter().any(|w| w.is_wide()));
        let wait = self.wait(raw, policy.as_ref(), at);
        let mut children = Level::default();
        self.level(&raw.descriptors, at, &ancestry, &mut children);
        if self.errors.len() > errors_before {
            return None;
        }
        let rule = policy.map(|policy| {
            let path = ancestry.stats_path.join(".");
            let holds = match &policy {
                Policy::Limited(windows) => windows
                    .iter()
                    .any(|w| w.algorithm == crate::limiter::Algorithm::InFlight),
                Policy::Unlimited => false,
            };
            let rule = Arc::new(Rule {
                id: rule_scope(&self.domain, ancestry.identity.iter().map(String::as_str)),
                domain: self.domain.as_str().into(),
                metrics: RuleMetrics::register(&self.domain, &path, holds),
                reserve,
                wait,
                capacity: Default::default(),
                endpoint: (ancestry.keys.len() == 1 && raw.key == ENDPOINT_KEY)
                    .then_some(value)
                    .flatten()
                    .map(Into::into),
                path: path.into(),
                file: self.file.path.clone(),
                yaml_path: at.clone(),
                policy,
                enforcement: if raw.shadow_mode {
                    Enforcement::Shadow
                } else if raw.quota_mode {
                    Enforcement::Quota
                } else {
                    Enforcement::Enforce
                },
                // A reserve's shares, and a tokens budget above 32 bits, hold fleet-wide only
                // settled in the store.
                consistency: if self.fleet_store && (!reserve_is_empty || wide) {
                    Consistency::Strict
                } else {
                    raw.consistency.unwrap_or_default()
                },
                metric_detail: if raw.detailed_metric {
                    MetricDetail::AllValues
                } else if raw.value_to_metric {
                    MetricDetail::LastValue
                } else {
                    MetricDetail::Rule
                },
                keys: ancestry.keys.clone().into_boxed_slice(),
                shared_values: ancestry.shared_values.clone().into_boxed_slice(),
                metadata,
            });
            self.rules.push(rule.clone());
            rule
        });
        Some(Node { rule, children })
    }

    fn check_replaces(&mut self) {
        for (path, name) in std::mem::take(&mut self.replaced) {
            if !self.names.contains(&name) {
                self.error(
                    &path,
                    format!("replaces `{name}`, but no limit in this domain has that name"),
                );
            }
        }
    }
}

fn selector(raw: &RawDescriptor) -> (Selector, String) {
    match raw.value.as_deref().filter(|v| !v.is_empty()) {
        None => (Selector::AnyValue, raw.key.clone()),
        Some(value) => {
            let label = format!("{}={value}", raw.key);
            match Pattern::parse(value) {
                Some(pattern) => (Selector::Wildcard(pattern), label),
                None => (Selector::Exact(value.into()), label),
            }
        }
    }
}

fn same_value(a: &RawDescriptor, b: &RawDescriptor) -> bool {
    let v = |d: &RawDescriptor| d.value.clone().filter(|v| !v.is_empty());
    v(a) == v(b)
}

/// The longest a rule may make a call wait: Envoy's rate-limit filter gives up on sluice after
/// its own `timeout`, which a wait must stay under.
pub const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Compiler<'_> {
    /// `wait: 250ms`: how long a call the rule would refuse waits for capacity, from 1 ms to
    /// [`LONGEST_WAIT`]. `None` when absent or wrong (errors recorded).
    fn wait(
        &mut self,
        raw: &RawDescriptor,
        policy: Option<&Policy>,
        at: &YamlPath,
    ) -> Option<std::time::Duration> {
        let text = raw.wait.as_deref()?;
        let path = at.field("wait");
        if !matches!(policy, Some(Policy::Limited(_))) {
            self.error(
                &path,
                "wait is for a call a limit refuses: this descriptor sets none".into(),
            );
            return None;
        }
        match humantime::parse_duration(text.trim()) {
            Ok(wait) if wait >= std::time::Duration::from_millis(1) && wait <= LONGEST_WAIT => {
                Some(wait)
            }
            Ok(_) => {
                self.error(
                    &path,
                    format!(
                        "wait must be from 1ms to {}s, and below Envoy's rate-limit `timeout`: `{text}` is not",
                        LONGEST_WAIT.as_secs()
                    ),
                );
                None
            }
            Err(e) => {
                self.error(
                    &path,
                    format!("`{text}` is not a length of time ({e}); write e.g. 250ms or 2s"),
                );
                None
            }
        }
    }

    /// `reserve: {class: N%}`: shares of the descriptor's limits kept for priority classes, each
    /// above 0 % and together below 100 %. Errors recorded; an empty reserve when wrong.
    fn reserve(&mut self, raw: &RawDescriptor, policy: Option<&Policy>, at: &YamlPath) -> Reserve {
        let Some(written) = &raw.reserve else {
            return Reserve::default();
        };
        let path = at.field("reserve");
        let mut errors = Vec::new();
        if !matches!(policy, Some(Policy::Limited(_))) {
            errors.push("reserve keeps shares of a descriptor's limits: this one sets none".into());
        }
        let mut classes = Vec::new();
        for (class, share) in written {
            let percent = share
                .as_str()
                .and_then(|t| t.trim().strip_suffix('%'))
                .and_then(|n| n.trim().parse::<f64>().ok());
            match percent {
                _ if class.trim().is_empty() => {
                    errors.push("a class name must not be empty".into())
                }
                Some(p) if p > 0.0 && p < 100.0 => {
                    classes.push((class.as_str().into(), (p * 10_000.0).round() as u32));
                }
                Some(_) => errors.push(format!(
                    "the share of `{class}` must be above 0% and below 100%"
                )),
                None => errors.push(format!(
                    "the share of `{class}` is a percentage of the limit, e.g. 20%, not `{}`",
                    serde_yaml::to_string(share).unwrap_or_default().trim()
                )),
            }
        }
        let total: u32 = classes.iter().map(|(_, share)| share).sum();
        if errors.is_empty() && total >= Factor::FULL {
            errors.push("the shares reserved must add up to less than 100%".into());
        }
        if errors.is_empty() {
            return Reserve::new(classes);
        }
        for message in errors {
            self.error(&path, message);
        }
        Reserve::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Algorithm, Unit};
    use crate::rules::{Consistency, Factor, Policy};

    fn compile(text: &str) -> Result<Domain, Vec<ConfigError>> {
        compile_file(&SourceFile {
            path: "rules.yaml".into(),
            text: text.into(),
        })
    }

    /// Each error as `line: field: message`.
    fn errors(text: &str) -> Vec<String> {
        compile(text)
            .expect_err("the file is wrong")
            .iter()
            .map(|e| {
                format!(
                    "{}: {}: {}",
                    e.line.unwrap_or(0),
                    e.field.as_deref().unwrap_or("-"),
                    e.message
                )
            })
            .collect()
    }

    #[test]
    fn a_limit_says_how_it_counts_in_either_format() {
        use crate::limiter::{Algorithm, Unit};
        let domain = compile(
            "domain: llm
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 60, algorithm: sliding_window }
  - key: model
    limits:
      - { unit: minute, requests: 20, algorithm: token_bucket, burst: 5 }
      - { unit: minute, tokens: 1000, algorithm: token_bucket }
      - { unit: day, tokens: 50000 }
",
        )
        .unwrap();
        let windows = |i: usize| -> Vec<(Unit, Algorithm, bool)> {
            domain.rules[i]
                .windows()
                .iter()
                .map(|w| (w.unit, w.algorithm, w.tokens.is_some()))
                .collect()
        };
        assert_eq!(
            windows(0),
            [(Unit::Minute, Algorithm::SlidingWindow, false)]
        );
        // A bucket counts one measure a counter; the tokens bucket's burst is its limit.
        assert_eq!(
            windows(1),
            [
                (Unit::Minute, Algorithm::TokenBucket { burst: 5 }, false),
                (Unit::Minute, Algorithm::TokenBucket { burst: 1000 }, true),
                (Unit::Day, Algorithm::FixedWindow, true),
            ]
        );
        // Their counters are told apart from each other and from a fixed window's.
        let rule = &domain.rules[1];
        let scopes: std::collections::HashSet<u64> = rule
            .windows()
            .iter()
            .map(|w| w.counter_scope(rule.id))
            .collect();
        assert_eq!(scopes.len(), 3);
        assert!(scopes.contains(&rule.id));
    }

    #[test]
    fn a_reload_that_changes_how_a_limit_counts_starts_its_counters_afresh() {
        use crate::rules::{DomainFiles, RuleSet};
        let set = |limit: &str| {
            let text = format!("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {limit}\n");
            RuleSet::assemble(vec![Arc::new(compile(&text).unwrap())], DomainFiles::One).0
        };
        let fixed = set("{ unit: minute, requests_per_unit: 6 }");
        let bucket = set("{ unit: minute, requests_per_unit: 6, algorithm: token_bucket }");
        let more = set("{ unit: minute, requests_per_unit: 9, algorithm: token_bucket }");
        assert_eq!(fixed.recounted_in(&bucket).len(), 1);
        assert!(
            bucket.recounted_in(&more).is_empty(),
            "a new limit keeps its count"
        );
        // A tokens budget counts in a wide word above 32 bits: crossing them starts afresh.
        let (small, large, larger) = (
            set("{ unit: day, tokens: 4000000000 }"),
            set("{ unit: day, tokens: 5000000000 }"),
            set("{ unit: day, tokens: 6000000000 }"),
        );
        assert_eq!(small.recounted_in(&large).len(), 1);
        assert!(large.recounted_in(&larger).is_empty());
        let rule = &bucket.domain("d").unwrap().rules[0];
        let scope = rule.windows()[0].counter_scope(rule.id);
        // The bucket's counters live on through a new limit; a switch back drops them.
        assert!(more.rule_scopes().contains(&scope));
        assert!(!fixed.rule_scopes().contains(&scope));
        assert!(fixed.rule_scopes().contains(&rule.id));
    }

    #[test]
    fn a_window_of_any_length_stands_in_for_a_unit() {
        use crate::limiter::Unit;
        let domain = compile(
            "domain: d
descriptors:
  - key: a
    rate_limit: { window: 90s, requests_per_unit: 6 }
  - key: b
    limits:
      - { window: 5m, requests: 10 }
      - { window: 1h, tokens: 1000 }
      - { window: 2h 30m, tokens: 5000, algorithm: sliding_window }
",
        )
        .unwrap();
        let units: Vec<Vec<String>> = domain
            .rules
            .iter()
            .map(|r| r.windows().iter().map(|w| w.unit.to_string()).collect())
            .collect();
        // A named length keeps its name (1h is an hour: one counter with the unit's).
        assert_eq!(units, [vec!["90s"], vec!["300s", "hour", "9000s"]]);
        assert_eq!(
            domain.rules[0].windows()[0].unit,
            Unit::of_seconds(90).unwrap()
        );
        assert_eq!(
            errors(
                "domain: d
descriptors:
  - key: a
    rate_limit: { window: 1500ms, requests_per_unit: 6 }
  - key: b
    rate_limit: { window: soon, requests_per_unit: 6 }
  - key: c
    rate_limit: { unit: minute, window: 90s, requests_per_unit: 6 }
  - key: e
    rate_limit: { requests_per_unit: 6 }
"
            ),
            [
                "4: descriptors[0].rate_limit.window: a window is a whole number of seconds, from 1s to 4294967295s: `1500ms` is not",
                "6: descriptors[1].rate_limit.window: `soon` is not a length of time (expected number at 0); write e.g. 90s, 5m or 2h",
                "8: descriptors[2].rate_limit.window: set one of `unit`, `window` and `period`",
                "10: descriptors[3].rate_limit: missing `unit` (second, minute, hour, day, week, month or year), `window` (a length such as 90s, 5m or 2h) or `period` (calendar_day, calendar_week or calendar_month)",
            ]
        );
    }

    #[test]
    fn a_calendar_period_counts_in_its_zone() {
        let domain = compile(
            "domain: d
descriptors:
  - key: a
    limits:
      - { period: calendar_month, timezone: Europe/Paris, tokens: 1000000 }
      - { period: calendar_day, requests: 100 }
",
        )
        .unwrap();
        let units: Vec<String> = domain.rules[0]
            .windows()
            .iter()
            .map(|w| w.unit.to_string())
            .collect();
        assert_eq!(units, ["calendar_day@UTC", "calendar_month@Europe/Paris"]);
        assert_eq!(
            errors(
                "domain: d
descriptors:
  - key: a
    rate_limit: { period: calendar_year, requests_per_unit: 6 }
  - key: b
    rate_limit: { period: calendar_month, timezone: Mars/Olympus, requests_per_unit: 6 }
  - key: c
    rate_limit: { unit: day, timezone: UTC, requests_per_unit: 6 }
  - key: e
    rate_limit: { period: calendar_day, requests_per_unit: 6, algorithm: sliding_window }
"
            ),
            [
                "4: descriptors[0].rate_limit.period: unknown period `calendar_year` (expected calendar_day, calendar_week or calendar_month)",
                "6: descriptors[1].rate_limit.timezone: unknown time zone `Mars/Olympus` (an IANA name, e.g. Europe/Paris or UTC)",
                "8: descriptors[2].rate_limit.timezone: a timezone is a calendar period's: set `period: calendar_day`, `calendar_week` or `calendar_month` with it",
                "10: descriptors[3].rate_limit.algorithm: a calendar period counts in fixed windows: sliding_window needs `unit` or `window`",
            ]
        );
        // A budget above 32 bits counts in fixed windows only.
        assert_eq!(
            errors(
                "domain: d
descriptors:
  - key: a
    limits:
      - { period: calendar_month, tokens: 10000000000 }
      - { unit: day, tokens: 5000000000, algorithm: token_bucket }
"
            ),
            [
                "6: descriptors[0].limits[1].tokens: a tokens limit above 4294967295 a window counts in fixed windows only (the other algorithms keep 32 bits): drop `algorithm`, or keep the limit within that"
            ]
        );
    }

    #[test]
    fn a_tokens_budget_above_32_bits_gets_a_counter_of_its_own() {
        let text = "domain: d
descriptors:
  - key: a
    limits:
      - { period: calendar_month, tokens: 10000000000 }
      - { period: calendar_month, requests: 1000 }
      - { unit: day, tokens: 4294967295 }
      - { unit: day, requests: 100 }
";
        let domain = compile(text).unwrap();
        let rule = domain.rules[0].clone();
        let Policy::Limited(windows) = &rule.policy else {
            panic!("limited")
        };
        // The day's limits share a counter as ever; the month's budget is apart from its
        // requests limit, in a counter of another scope.
        assert_eq!(windows.len(), 3, "{windows:?}");
        let month: Vec<_> = windows
            .iter()
            .filter(|w| matches!(w.unit, Unit::Calendar(_)))
            .collect();
        assert_eq!(month.len(), 2);
        let wide = month.iter().find(|w| w.tokens.is_some()).unwrap();
        assert!(wide.requests.is_none());
        assert_eq!(wide.tokens.as_ref().unwrap().per_unit, 10_000_000_000);
        let limits = wide.in_force(Factor::FULL, |_| true);
        assert!(limits.wide);
        assert_eq!(limits.tokens, Some(10_000_000_000));
        // At half capacity the limit halves, and the layout stays wide.
        let half = wide.in_force(Factor::FULL / 2, |_| true);
        assert!(half.wide && half.tokens == Some(5_000_000_000));
        let scopes: std::collections::HashSet<u64> =
            windows.iter().map(|w| w.counter_scope(rule.id)).collect();
        assert_eq!(
            scopes.len(),
            2,
            "the day and the month's requests keep the rule's scope"
        );
        assert_ne!(wide.counter_scope(rule.id), rule.id);
        let day = windows.iter().find(|w| w.unit == Unit::Day).unwrap();
        assert!(day.requests.is_some() && day.tokens.is_some());
        assert!(!day.in_force(Factor::FULL, |_| true).wide);

        // With a fleet store, the rule is settled in the store call by call (its leases are
        // 32-bit): strict, and none of its windows leased.
        let file = SourceFile {
            path: "rules.yaml".into(),
            text: text.into(),
        };
        let domain = compile_file_for(&file, true).expect("settled in the store");
        assert_eq!(domain.rules[0].consistency, Consistency::Strict);
        assert!(domain.rules[0].windows().iter().all(|w| !w.leased));
    }

    #[test]
    fn a_wrong_algorithm_or_burst_is_named_with_its_line() {
        assert_eq!(
            errors(
                "domain: d
descriptors:
  - key: a
    rate_limit: { unit: minute, requests_per_unit: 6, algorithm: leaky }
  - key: b
    rate_limit: { unit: minute, requests_per_unit: 6, burst: 3 }
  - key: c
    rate_limit: { unit: minute, requests_per_unit: 6, algorithm: token_bucket, burst: 0 }
  - key: e
    rate_limit: { unlimited: true, algorithm: sliding_window }
"
            ),
            [
                "4: descriptors[0].rate_limit.algorithm: unknown algorithm `leaky` (expected fixed_window, sliding_window or token_bucket)",
                "6: descriptors[1].rate_limit.burst: burst is a token bucket's size: set `algorithm: token_bucket` with it",
                "8: descriptors[2].rate_limit.burst: burst must be at least 1",
                "10: descriptors[3].rate_limit.algorithm: an unlimited limit must not set algorithm",
            ]
        );
    }

    #[test]
    fn a_wait_is_a_length_from_a_millisecond_to_thirty_seconds_on_a_limited_descriptor() {
        let domain = compile(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests: 1 }\n    wait: 250ms\n",
        )
        .expect("valid");
        assert_eq!(
            domain.rules[0].wait,
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            errors(
                "domain: d
descriptors:
  - key: a
    rate_limit: { unit: second, requests: 1 }
    wait: 1m
  - key: b
    rate_limit: { unit: second, requests: 1 }
    wait: soon
  - key: c
    wait: 1s
"
            ),
            [
                "5: descriptors[0].wait: wait must be from 1ms to 30s, and below Envoy's rate-limit `timeout`: `1m` is not",
                "8: descriptors[1].wait: `soon` is not a length of time (expected number at 0); write e.g. 250ms or 2s",
                "10: descriptors[2].wait: wait is for a call a limit refuses: this descriptor sets none",
            ]
        );
    }

    #[test]
    fn a_reserve_keeps_shares_of_the_limits_for_named_classes() {
        let domain = compile(
            "domain: d
descriptors:
  - key: a
    rate_limit: { unit: minute, requests: 100 }
    reserve: { high: 20%, critical: 5% }
",
        )
        .expect("valid");
        let reserve = &domain.rules[0].reserve;
        // Ordinary calls: 75 %; each named class all but the other's share.
        assert_eq!(reserve.share(None), 750_000);
        assert_eq!(reserve.share(Some("batch")), 750_000);
        assert_eq!(reserve.share(Some("high")), 950_000);
        assert_eq!(reserve.share(Some("critical")), 800_000);
        assert_eq!(
            errors(
                "domain: d
descriptors:
  - key: a
    rate_limit: { unit: minute, requests: 100 }
    reserve: { high: 20 }
  - key: b
    rate_limit: { unit: minute, requests: 100 }
    reserve: { high: 60%, low: 40% }
  - key: c
    reserve: { high: 10% }
  - key: e
    rate_limit: { unit: minute, requests: 100 }
    reserve: { high: 0% }
"
            ),
            [
                "5: descriptors[0].reserve: the share of `high` is a percentage of the limit, e.g. 20%, not `20`",
                "8: descriptors[1].reserve: the shares reserved must add up to less than 100%",
                "10: descriptors[2].reserve: reserve keeps shares of a descriptor's limits: this one sets none",
                "13: descriptors[3].reserve: the share of `high` must be above 0% and below 100%",
            ]
        );
        // With a store, a rule with a reserve is settled there call by call, in fixed windows.
        let file = |text: &str| SourceFile {
            path: "rules.yaml".into(),
            text: text.into(),
        };
        let fixed = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: minute, requests: 100 }\n    reserve: { high: 20% }\n";
        for (fleet_store, consistency) in [
            (false, Consistency::Approximate),
            (true, Consistency::Strict),
        ] {
            let domain = compile_file_for(&file(fixed), fleet_store).unwrap();
            assert_eq!(domain.rules[0].consistency, consistency);
        }
        let sliding = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: minute, requests: 100, algorithm: sliding_window }\n    reserve: { high: 20% }\n";
        let domain = compile_file_for(&file(sliding), true).expect("sliding in the store");
        assert_eq!(domain.rules[0].consistency, Consistency::Strict);
        // A token bucket too: in the store, not in leases (a replica's own counter keeps the
        // bucket's word while the store is away).
        let bucket = sliding.replace("sliding_window", "token_bucket");
        let domain = compile_file_for(&file(&bucket), true).expect("a bucket in the store");
        assert_eq!(domain.rules[0].consistency, Consistency::Strict);
        assert!(!domain.rules[0].windows()[0].leased);
    }

    #[test]
    fn a_concurrency_limit_takes_a_hold_ttl_and_nothing_of_a_window() {
        assert_eq!(
            errors(
                "domain: d
descriptors:
  - key: a
    rate_limit: { concurrency: 3, unit: minute }
  - key: b
    rate_limit: { concurrency: 3, algorithm: token_bucket }
  - key: c
    rate_limit: { requests: 6, unit: minute, hold_ttl: 30s }
  - key: e
    rate_limit: { concurrency: 3, hold_ttl: soon }
  - key: f
    limits:
      - { concurrency: 3 }
      - { concurrency: 4 }
  - key: g
    rate_limit: { concurrency: 3, requests: 5 }
"
            ),
            [
                "4: descriptors[0].rate_limit.unit: a concurrency limit counts streams in flight, not calls over time: `unit` does not apply (`hold_ttl` sets how long a hold lives if its release never comes)",
                "6: descriptors[1].rate_limit.algorithm: a concurrency limit counts streams in flight, not calls over time: `algorithm` does not apply (`hold_ttl` sets how long a hold lives if its release never comes)",
                "8: descriptors[2].rate_limit.hold_ttl: hold_ttl is a concurrency limit's: set `concurrency: N` with it",
                "10: descriptors[3].rate_limit.hold_ttl: `soon` is not a length of time (expected number at 0); write e.g. 90s, 5m or 2h",
                "14: descriptors[4].limits[1]: a second concurrency limit of hold_ttl 300s on this descriptor (the first is at line 13)",
                "16: descriptors[5].rate_limit.requests: set only one of requests_per_unit, requests, tokens and concurrency per limit; use `limits:` for several",
            ]
        );
        let text = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { concurrency: 3 }\n";
        let file = SourceFile {
            path: "rules.yaml".into(),
            text: text.into(),
        };
        // With a store, holds are taken there call by call: the window is not leased, so a
        // replica's own counter (while the store is away) keeps the holds' own word.
        let domain = compile_file_for(&file, true).expect("fleet-wide with a store");
        let window = &domain.rules[0].windows()[0];
        assert_eq!(window.algorithm, Algorithm::InFlight);
        assert!(!window.leased);
        assert_eq!(domain.rules[0].consistency, Consistency::Approximate);
    }

    #[test]
    fn a_concurrency_limit_holds_for_five_minutes_unless_told() {
        use crate::rules::Measure;
        let domain = compile(
            "domain: d
descriptors:
  - key: a
    limits:
      - { concurrency: 3 }
      - { concurrency: 10, hold_ttl: 90s }
      - { requests: 60, unit: minute }
",
        )
        .expect("valid");
        let rule = &domain.rules[0];
        let limits: Vec<_> = rule
            .limits()
            .map(|l| (l.measure, l.per_unit, l.unit.seconds(), l.algorithm))
            .collect();
        assert!(limits.contains(&(Measure::Concurrency, 3, 300, Algorithm::InFlight)));
        assert!(limits.contains(&(Measure::Concurrency, 10, 90, Algorithm::InFlight)));
        assert!(limits.contains(&(Measure::Requests, 60, 60, Algorithm::FixedWindow)));
        // Each in a counter of its own: the requests limit is not shared with the holds.
        assert_eq!(rule.windows().len(), 3);
    }

    #[test]
    fn with_a_fleet_store_a_token_bucket_is_leased_in_windows_of_a_second() {
        let text = "domain: d
descriptors:
  - key: a
    rate_limit: { unit: minute, requests_per_unit: 6, algorithm: token_bucket, burst: 9 }
    descriptors:
      - key: b
        limits:
          - { unit: minute, requests: 60, algorithm: token_bucket }
          - { unit: hour, requests: 600, algorithm: token_bucket }
  - key: huge
    limits:
      - { unit: year, tokens: 4000000000, algorithm: token_bucket }
";
        let file = SourceFile {
            path: "rules.yaml".into(),
            text: text.into(),
        };
        // Alone, the year-long bucket is the replica's own word; in a fleet, the store's
        // doubles cannot hold its fill (4e9 x 31,536,000 s is past 2^53).
        let alone = compile_file_for(&file, false).unwrap();
        assert_eq!(alone.rules[0].windows()[0].counter_unit(), Unit::Minute);
        let errors = compile_file_for(&file, true).expect_err("too large for the store");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(12));
        assert_eq!(
            errors[0].field.as_deref(),
            Some("descriptors[1].limits[0].algorithm")
        );
        assert!(
            errors[0]
                .message
                .starts_with("a token bucket kept fleet-wide holds burst x"),
            "{}",
            errors[0].message
        );
        let fleet = compile_file_for(
            &SourceFile {
                path: "rules.yaml".into(),
                text: text.split("  - key: huge").next().unwrap().into(),
            },
            true,
        )
        .unwrap();
        let by_key = |key: &str| {
            fleet
                .rules
                .iter()
                .find(|r| r.keys.last().is_some_and(|k| &**k == key))
                .unwrap()
        };
        let minute = &by_key("a").windows()[0];
        assert!(minute.leased && minute.is_leased_bucket());
        // The counter counts what the store granted in windows of a second, judged against
        // the bucket's burst; the rate and its unit go to the store.
        assert_eq!(minute.counter_unit(), Unit::Second);
        let limits = minute.in_force(Factor::FULL, |_| true);
        assert!(!limits.counted_by_algorithm());
        assert_eq!(
            (limits.requests, limits.algorithm, limits.refill_ms),
            (Some(6), Algorithm::TokenBucket { burst: 9 }, 60_000)
        );
        // Two buckets of one rule count in windows of the same second, on counters of their
        // own, and the sync finds each by its scope.
        let two = by_key("b");
        let scopes: Vec<u64> = two
            .windows()
            .iter()
            .map(|w| w.counter_scope(two.id))
            .collect();
        assert_ne!(scopes[0], scopes[1]);
        for (w, scope) in two.windows().iter().zip(&scopes) {
            assert!(std::ptr::eq(
                two.window_of(*scope, Unit::Second).unwrap(),
                w
            ));
        }
        assert!(two.window_of(scopes[0], Unit::Minute).is_none());
    }

    #[test]
    fn with_a_fleet_store_a_sliding_window_is_leased_and_a_strict_one_is_not() {
        let file = |text: &str| SourceFile {
            path: "rules.yaml".into(),
            text: text.into(),
        };
        let sliding = file(
            "domain: d
descriptors:
  - key: a
    rate_limit: { unit: minute, requests_per_unit: 6, algorithm: sliding_window }
",
        );
        for fleet_store in [false, true] {
            let domain = compile_file_for(&sliding, fleet_store).unwrap();
            let window = &domain.rules[0].windows()[0];
            assert_eq!(window.leased, fleet_store);
            let limits = window.in_force(Factor::FULL, |_| true);
            // Alone, the sliding window's own word; in a fleet, the leased fixed-window word.
            assert_eq!(limits.counted_by_algorithm(), !fleet_store);
        }
        let strict = file(
            "domain: d
descriptors:
  - key: a
    consistency: strict
    rate_limit: { unit: minute, requests_per_unit: 6, algorithm: token_bucket }
",
        );
        let domain = compile_file_for(&strict, true).expect("a strict bucket");
        let window = &domain.rules[0].windows()[0];
        assert!(!window.leased && !window.is_leased_bucket());
        assert!(
            window
                .in_force(Factor::FULL, |_| true)
                .counted_by_algorithm()
        );
    }

    #[test]
    fn a_nested_descriptor_becomes_one_rule_per_level_that_limits() {
        let domain = compile(
            "domain: llm
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 60 }
    descriptors:
      - key: model
        value: gpt-4o
        consistency: strict
        detailed_metric: true
        limits:
          - { unit: minute, requests: 20 }
          - { unit: minute, tokens: 1000 }
          - { unit: day, tokens: 50000 }
  - key: endpoint
    value: openai
    value_to_metric: true
    rate_limit: { unit: second, requests_per_unit: 10 }
",
        )
        .unwrap();
        let paths: Vec<&str> = domain.rules.iter().map(|r| &*r.path).collect();
        assert_eq!(
            paths,
            ["api_key.model_gpt-4o", "api_key", "endpoint_openai"]
        );
        let model = &domain.rules[0];
        assert_eq!(model.consistency, Consistency::Strict);
        assert_eq!(model.metric_detail, MetricDetail::AllValues);
        // Limits of one unit share a window: minute (requests + tokens), then day.
        let Policy::Limited(windows) = &model.policy else {
            panic!("limited")
        };
        let units: Vec<_> = windows
            .iter()
            .map(|w| (w.unit, w.requests.is_some(), w.tokens.is_some()))
            .collect();
        assert_eq!(
            units,
            [
                (crate::limiter::Unit::Minute, true, true),
                (crate::limiter::Unit::Day, false, true)
            ]
        );
        assert_eq!(domain.rules[1].consistency, Consistency::Approximate);
        assert_eq!(domain.rules[1].endpoint, None);
        let endpoint = &domain.rules[2];
        assert_eq!(endpoint.endpoint.as_deref(), Some("openai"));
        assert_eq!(endpoint.metric_detail, MetricDetail::LastValue);
        // The same descriptor path gets the same id, whatever the file around it.
        let again = compile("domain: llm\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n").unwrap();
        assert_eq!(again.rules[0].id, domain.rules[1].id);
    }

    #[test]
    fn every_error_of_a_file_names_its_line_and_field() {
        let text = "domain: d
descriptors:
  - key: a
    rate_limit: { unit: fortnight, requests_per_unit: 1 }
  - key: b
    rate_limit: { unit: minute }
  - key: c
    rate_limit: { unit: minute, requests_per_unit: 1, replaces: [{ name: nobody }] }
  - key: a
    rate_limit: { unit: minute, requests_per_unit: 1 }
";
        assert_eq!(
            errors(text),
            [
                "4: descriptors[0].rate_limit.unit: unknown unit `fortnight` (expected second, minute, hour, day, week, month or year)",
                "6: descriptors[1].rate_limit: missing the limit: set requests_per_unit, requests, tokens or concurrency, or unlimited: true",
                "8: descriptors[2].rate_limit.replaces[0].name: replaces `nobody`, but no limit in this domain has that name",
            ]
        );
    }

    #[test]
    fn a_limit_that_replaces_itself_is_refused() {
        // envoyproxy/ratelimit refuses it too (config_impl.go: "replaces should not contain
        // name of same descriptor"): such a limit would never be evaluated.
        let text = "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      name: own\n      unit: minute\n      requests_per_unit: 1\n      replaces: [{ name: own }]\n";
        assert_eq!(
            errors(text),
            [
                "8: descriptors[0].rate_limit.replaces[0].name: the limit `own` must not replace itself"
            ]
        );
    }

    #[test]
    fn duplicates_and_bad_choices_are_refused() {
        let duplicate = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: minute, requests_per_unit: 1 }\n  - key: a\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n";
        assert_eq!(
            errors(duplicate),
            ["5: descriptors[1]: duplicate descriptor `a` at this level (first at line 3)"]
        );
        // A choice outside its set is a YAML error, placed by serde.
        let bad = errors("domain: d\ndescriptors:\n  - key: a\n    consistency: eventual\n");
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].starts_with("4: descriptors[0].consistency: unknown variant `eventual`"),
            "{bad:?}"
        );
        let two_kinds = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: minute, requests: 1, tokens: 5 }\n";
        assert_eq!(
            errors(two_kinds),
            [
                "4: descriptors[0].rate_limit.tokens: set only one of requests_per_unit, requests, tokens and concurrency per limit; use `limits:` for several"
            ]
        );
    }

    #[test]
    fn the_shorthand_refuses_unknown_keys_when_asked_and_hides_keys_in_names() {
        let domain = compile(
            "domain: gw
api_keys:
  tiers: { free: { rpm: 5, tpm: 100 } }
  unknown_keys: deny
  keys:
    - { key: secret-key-1, tier: free }
endpoints:
  - { id: openai, rpm_limit: 100 }
",
        )
        .unwrap();
        let paths: Vec<&str> = domain.rules.iter().map(|r| &*r.path).collect();
        assert_eq!(paths.len(), 3);
        assert!(paths[0].starts_with("api_key_sha256_") && !paths[0].contains("secret"));
        assert_eq!(paths[1], "api_key", "the rule of keys not listed");
        let Policy::Limited(windows) = &domain.rules[1].policy else {
            panic!("limited")
        };
        assert_eq!(
            windows[0].requests.as_ref().map(|l| l.per_unit),
            Some(0),
            "refused"
        );
        assert_eq!(domain.rules[2].endpoint.as_deref(), Some("openai"));
        let bad = errors("domain: gw\napi_keys:\n  unknown_keys: maybe\n");
        assert!(
            bad[0].contains("api_keys.unknown_keys: unknown variant `maybe`"),
            "{bad:?}"
        );
    }
}
