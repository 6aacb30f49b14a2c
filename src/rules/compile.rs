//! Raw rule files → compiled domains. Every error of a file is reported, each with its file,
//! line and field; a file with any error yields no domain.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};

use super::locate::{YamlPath, locate};
use super::matcher::{Level, Node, Pattern, Selector};
use super::raw::{RawApiKeys, RawDescriptor, RawFile, RawLimit, RawTier};
use super::{
    ConfigError, Domain, Limit, Measure, Policy, Rule, RuleWindow, SourceFile, rule_scope,
};
use crate::limiter::{Enforcement, Unit};
use crate::telemetry::RuleMetrics;

/// Compiles one rule file into its domain.
pub fn compile_file(file: &SourceFile) -> Result<Domain, Vec<ConfigError>> {
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

struct Compiler<'f> {
    file: &'f SourceFile,
    domain: String,
    errors: Vec<ConfigError>,
    rules: Vec<Arc<Rule>>,
    names: HashSet<String>,
    replaced: Vec<(YamlPath, String)>,
}

impl Compiler<'_> {
    fn error(&mut self, at: &YamlPath, message: String) {
        let (line, column) = locate(&self.file.text, at).unzip();
        self.errors.push(ConfigError {
            file: self.file.path.clone(),
            line,
            column,
            field: Some(at.to_string()),
            message,
        });
    }

    fn line_of(&self, at: &YamlPath) -> usize {
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
        let strict = match raw.consistency.as_deref().map(str::trim) {
            None | Some("approximate") => false,
            Some("strict") => true,
            Some(other) => {
                self.error(
                    &at.field("consistency"),
                    format!("unknown consistency `{other}` (expected strict or approximate)"),
                );
                false
            }
        };
        let metadata = raw.metadata.as_ref().and_then(|m| match yaml_to_struct(m) {
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
        let mut children = Level::default();
        self.level(&raw.descriptors, at, &ancestry, &mut children);
        if self.errors.len() > errors_before {
            return None;
        }
        let rule = policy.map(|policy| {
            let path = ancestry.stats_path.join(".");
            let rule = Arc::new(Rule {
                id: rule_scope(&self.domain, ancestry.identity.iter().map(String::as_str)),
                domain: self.domain.as_str().into(),
                metrics: RuleMetrics::register(&self.domain, &path),
                metric_label: path.as_str().into(),
                capacity: Default::default(),
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
                strict,
                detailed_metric: raw.detailed_metric,
                value_to_metric: raw.value_to_metric,
                keys: ancestry.keys.clone().into_boxed_slice(),
                shared_values: ancestry.shared_values.clone().into_boxed_slice(),
                metadata,
            });
            self.rules.push(rule.clone());
            rule
        });
        Some(Node { rule, children })
    }

    /// The descriptor's limits, `None` when it sets none (it only leads to nested descriptors).
    fn policy(&mut self, raw: &RawDescriptor, at: &YamlPath) -> Option<Policy> {
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
            let Some(limit) = self.limit(raw_limit, path) else {
                continue;
            };
            let Some(limit) = limit else {
                unlimited = true;
                continue;
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

    /// One limit: `Some(None)` for `unlimited`, `None` when it is wrong (errors recorded).
    fn limit(&mut self, raw: &RawLimit, at: &YamlPath) -> Option<Option<Limit>> {
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
            return ok.then_some(None);
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
            Some(Limit {
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

    /// `api_keys` and `endpoints`: compiled to one-level descriptors beside the file's own.
    fn llm_shorthand(&mut self, raw: &RawFile, root: &YamlPath, tree: &mut Level) {
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
                tpm => per_minute_and_day(&RawTier {
                    rpm: endpoint.rpm_limit,
                    tpm: tpm.map(|t| t as u32),
                    ..RawTier::default()
                }),
            };
            let selector = Selector::Exact(endpoint.id.as_str().into());
            self.shorthand_rule(&at, "endpoint", &endpoint.id, selector, policy, tree);
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
                per_minute_and_day(&limits),
                tree,
            );
        }
        let unknown = match raw.unknown_keys.as_deref() {
            None | Some("default_tier") => {
                raw.default_tier.as_ref().map(|_| tier(&raw.default_tier))
            }
            Some("deny") => Some(Some(RawTier {
                rpm: Some(0),
                ..RawTier::default()
            })),
            Some(other) => {
                self.error(
                    &at.field("unknown_keys"),
                    format!("unknown value `{other}` (expected deny or default_tier)"),
                );
                None
            }
        };
        match unknown {
            Some(Some(limits)) => {
                let policy = per_minute_and_day(&limits);
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
            Selector::Exact(v) if key != "endpoint" => {
                format!("{key}_sha256_{}", short_hash(v.as_bytes()))
            }
            Selector::Hashed(digest) => format!("{key}_sha256_{}", hex(&digest[..6])),
            _ if value.is_empty() => key.to_string(),
            _ => format!("{key}_{value}"),
        };
        let rule = Arc::new(Rule {
            id: rule_scope(&self.domain, [identity.as_str()]),
            domain: self.domain.as_str().into(),
            metrics: RuleMetrics::register(&self.domain, &label),
            metric_label: label.as_str().into(),
            capacity: Default::default(),
            path: label.into(),
            file: self.file.path.clone(),
            yaml_path: at.clone(),
            policy,
            enforcement: Enforcement::Enforce,
            strict: false,
            detailed_metric: false,
            value_to_metric: false,
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
fn per_minute_and_day(tier: &RawTier) -> Policy {
    let limit = |unit, per_unit: Option<u32>, measure| {
        per_unit.map(|per_unit| Limit {
            name: None,
            unit,
            per_unit,
            measure,
            replaces: Box::new([]),
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
    })
    .collect();
    if windows.is_empty() {
        Policy::Unlimited
    } else {
        Policy::Limited(windows.into_boxed_slice())
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

fn yaml_to_struct(map: &serde_yaml::Mapping) -> Result<Struct, String> {
    let mut fields = HashMap::new();
    for (key, value) in map {
        let key = key
            .as_str()
            .ok_or_else(|| format!("metadata keys must be strings, found {key:?}"))?;
        fields.insert(key.to_string(), yaml_to_value(value)?);
    }
    Ok(Struct { fields })
}

fn yaml_to_value(value: &serde_yaml::Value) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    let kind = match value {
        Y::Null => Kind::NullValue(0),
        Y::Bool(b) => Kind::BoolValue(*b),
        Y::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Y::String(s) => Kind::StringValue(s.clone()),
        Y::Sequence(items) => Kind::ListValue(ListValue {
            values: items.iter().map(yaml_to_value).collect::<Result<_, _>>()?,
        }),
        Y::Mapping(map) => Kind::StructValue(yaml_to_struct(map)?),
        Y::Tagged(tagged) => return yaml_to_value(&tagged.value),
    };
    Ok(Value { kind: Some(kind) })
}
