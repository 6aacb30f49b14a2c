//! What the operator asked for: rule files are read into raw serde types, then compiled once,
//! at load, into an immutable [`RuleSet`] that cannot hold an invalid rule. The request path
//! only ever touches the compiled form.

mod compile;
mod files;
mod limits;
pub mod locate;
pub mod matcher;
mod metadata;
pub mod raw;
mod shorthand;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use envoy_types::pb::google::protobuf::Struct;

pub use compile::{compile_file, compile_file_for};
pub use files::{ConfigError, SourceFile, load_dir, load_dir_with, read_dir};
pub use limits::bucket_tick_ms;
pub use locate::YamlPath;
pub use matcher::{Entry, Level};

use crate::limiter::{Algorithm, Enforcement, LEASED_BUCKET_WINDOW, Limits, Unit, saturating_u32};
use crate::telemetry::RuleMetrics;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    /// `requests_per_unit` (envoyproxy/ratelimit): each call counts its hits.
    Hits,
    /// `requests`: each call counts one.
    Requests,
    /// `tokens`: each call counts its hits, reported as tokens.
    Tokens,
    /// `concurrency`: each call takes one hold while its stream lasts, given back at its end
    /// (a `sluice.release` call).
    Concurrency,
}

impl Measure {
    /// Requests-like limits share one slot of a counter, tokens the other.
    pub fn is_tokens(self) -> bool {
        self == Measure::Tokens
    }

    pub fn field(self) -> &'static str {
        match self {
            Measure::Hits => "requests_per_unit",
            Measure::Requests => "requests",
            Measure::Tokens => "tokens",
            Measure::Concurrency => "concurrency",
        }
    }
}

/// One limit of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Shared, so that an answer carries it without copying the text.
    pub name: Option<Arc<str>>,
    pub unit: Unit,
    /// The limit per window as configured: 64-bit for a tokens budget; a requests-like limit
    /// is at most `u32::MAX` (the Envoy API's field).
    pub per_unit: u64,
    pub measure: Measure,
    /// Names of limits this one replaces when both match one request.
    pub replaces: Box<[Box<str>]>,
    /// How it counts.
    pub algorithm: Algorithm,
}

impl Limit {
    /// The limit in force at a capacity factor of `scale` millionths: what requests are
    /// decided against, what is reported, and what the sync leases against.
    pub fn in_force(&self, scale: u32) -> u64 {
        self::scale(self.per_unit, scale)
    }

    /// What its remaining counts down from, as configured: the limit, or a token bucket's
    /// burst.
    pub fn ceiling(&self) -> u64 {
        match self.algorithm {
            Algorithm::TokenBucket { burst } => burst.into(),
            _ => self.per_unit,
        }
    }

    /// Whether it is a tokens budget above what 32 bits hold, which a counter of its own
    /// counts in 64 ([`Limits::wide`]).
    pub fn is_wide(&self) -> bool {
        self.per_unit > u64::from(u32::MAX)
    }
}

/// The limits of a rule that share one window, and so one counter: at most one requests-like
/// limit and one tokens limit, checked by a single compare-and-swap. A sliding window or a
/// token bucket counts one measure a counter: its window holds one of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleWindow {
    pub unit: Unit,
    pub requests: Option<Limit>,
    pub tokens: Option<Limit>,
    /// How its limits count (a token bucket's burst as written).
    pub algorithm: Algorithm,
    /// Kept fleet-wide in leases from a store ([`Limits::leased`]).
    pub leased: bool,
}

impl RuleWindow {
    /// The scope of its counters for rule `rule_id`: the rule's id for fixed windows (as ever),
    /// told apart for the other algorithms and measures, and for a wide tokens budget, so that
    /// a reload that changes how a limit counts starts its counter afresh rather than reading
    /// another layout's word. A token bucket kept in leases counts in windows of a second
    /// whatever its unit ([`RuleWindow::counter_unit`]), so its scope tells its unit too.
    #[inline]
    pub fn counter_scope(&self, rule_id: u64) -> u64 {
        let wide = self.tokens.as_ref().is_some_and(Limit::is_wide);
        let tag: u64 = match self.algorithm {
            Algorithm::FixedWindow if wide => 3,
            Algorithm::FixedWindow => return rule_id,
            Algorithm::SlidingWindow => 1,
            Algorithm::TokenBucket { .. } if self.leased => 4 + self.unit.millis() * 8,
            Algorithm::TokenBucket { .. } => 2,
            Algorithm::InFlight => 5,
        };
        let tag = tag * 2 + u64::from(self.tokens.is_some());
        (rule_id ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15)) & !OVERRIDE_SCOPE
    }

    /// The unit of the windows its counters count in: the limit's own, except for a token
    /// bucket kept in leases, whose counter admits what the store's bucket granted it within
    /// windows of a second ([`LEASED_BUCKET_WINDOW`]): a lease is spent within a second of
    /// its grant or given back, which is what bounds the fleet's bucket.
    #[inline]
    pub fn counter_unit(&self) -> Unit {
        if self.is_leased_bucket() {
            LEASED_BUCKET_WINDOW
        } else {
            self.unit
        }
    }

    /// Whether it has a tokens limit above `u32::MAX` a window (a counter of 64-bit tokens).
    pub fn is_wide(&self) -> bool {
        self.tokens.as_ref().is_some_and(Limit::is_wide)
    }

    /// Whether it is a token bucket kept fleet-wide in leases.
    #[inline]
    pub fn is_leased_bucket(&self) -> bool {
        self.leased && matches!(self.algorithm, Algorithm::TokenBucket { .. })
    }

    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.requests.iter().chain(self.tokens.iter())
    }

    /// The window's limits in force at a capacity factor of `scale` millionths, of those
    /// `counted` keeps (a request leaves out the limits another of its limits replaces). The
    /// request path settles against these, and the sync leases against them: one rule.
    pub fn in_force(&self, scale: u32, counted: impl Fn(&Limit) -> bool) -> Limits {
        let in_force = |limit: &Option<Limit>| {
            limit
                .as_ref()
                .filter(|l| counted(l))
                .map(|l| l.in_force(scale))
        };
        let algorithm = match self.algorithm {
            Algorithm::TokenBucket { burst } => Algorithm::TokenBucket {
                burst: saturating_u32(self::scale(burst.into(), scale)),
            },
            other => other,
        };
        Limits {
            requests: in_force(&self.requests).map(saturating_u32),
            tokens: in_force(&self.tokens),
            algorithm,
            wide: self.tokens.as_ref().is_some_and(Limit::is_wide),
            leased: self.leased,
            refill_ms: if self.is_leased_bucket() {
                self.unit.millis()
            } else {
                0
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Always allowed; answered with `limit_remaining = u32::MAX`.
    Unlimited,
    /// One window per unit used, ordered from the shortest unit.
    Limited(Box<[RuleWindow]>),
}

/// Shares of a rule's limits kept for priority classes (`reserve: {high: 20%}`): a call of a
/// class named here may use all of a limit but the other classes' shares; any other call
/// (no class, or one not named) none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reserve {
    /// Each class and its share, in millionths of the limit.
    classes: Box<[(Box<str>, u32)]>,
    /// Their sum, below [`Factor::FULL`].
    total: u32,
}

impl Reserve {
    /// Shares in millionths; their sum must be below [`Factor::FULL`] (the compiler checks).
    pub fn new(classes: Vec<(Box<str>, u32)>) -> Reserve {
        let total = classes.iter().map(|(_, share)| share).sum();
        debug_assert!(total < Factor::FULL);
        Reserve {
            classes: classes.into_boxed_slice(),
            total,
        }
    }

    /// The share of a limit a call of `class` may use, in millionths.
    #[inline]
    pub fn share(&self, class: Option<&str>) -> u32 {
        if self.total == 0 {
            return Factor::FULL;
        }
        let own = class
            .and_then(|c| self.classes.iter().find(|(name, _)| &**name == c))
            .map_or(0, |(_, share)| *share);
        Factor::FULL - (self.total - own)
    }

    /// Whether it keeps no share for any class.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// `class` as the reserve names it, if it does: the class whose share a call of it uses.
    pub fn named<'r>(&'r self, class: Option<&str>) -> Option<&'r str> {
        let class = class?;
        self.classes
            .iter()
            .find(|(name, _)| &**name == class)
            .map(|(name, _)| &**name)
    }

    /// The classes and their shares (millionths), as written.
    pub fn classes(&self) -> impl Iterator<Item = (&str, u32)> {
        self.classes.iter().map(|(name, share)| (&**name, *share))
    }
}

/// A scale in millionths (a capacity factor) narrowed by a share in millionths.
#[inline]
pub fn narrowed(scale: u32, share: u32) -> u32 {
    if share == Factor::FULL {
        return scale;
    }
    (u64::from(scale) * u64::from(share) / u64::from(Factor::FULL)) as u32
}

/// A descriptor of a rule file that sets limits.
#[derive(Debug)]
pub struct Rule {
    /// Stable across reloads for the same domain and descriptor path: names its counters.
    pub id: u64,
    pub domain: Box<str>,
    /// The descriptor path as envoyproxy/ratelimit names it in stats: `key_value.key`.
    pub path: Box<str>,
    pub file: PathBuf,
    /// Where the rule is written: `descriptors[2].descriptors[0]`. Its line is found from
    /// this only when asked ([`Rule::line`]), so loading stays linear in the file's size.
    pub yaml_path: YamlPath,
    pub policy: Policy,
    pub enforcement: Enforcement,
    /// Where its counts are decided when Redis is configured.
    pub consistency: Consistency,
    /// Which of the caller's values its metrics carry.
    pub metric_detail: MetricDetail,
    /// The entry key of each level, from the top.
    pub keys: Box<[Box<str>]>,
    /// Per level, the wildcard whose matches share one counter (`share_threshold`).
    pub shared_values: Box<[Option<Box<str>>]>,
    /// Added to the response's dynamic metadata when the rule matches.
    pub metadata: Option<Struct>,
    /// Its counters, labelled by domain and path.
    pub metrics: RuleMetrics,
    /// Shares of its limits kept for priority classes.
    pub reserve: Reserve,
    /// How long a call it would refuse may wait for capacity instead (`wait:`).
    pub wait: Option<std::time::Duration>,
    /// The share of its limits in force (capacity reduction), set by the capacity task.
    pub capacity: Factor,
    /// The upstream endpoint the rule limits, for a one-level rule on the [`ENDPOINT_KEY`]
    /// entry with a value: its utilization is reported for routing.
    pub endpoint: Option<Box<str>>,
}

impl Rule {
    /// The line the rule starts at, read from its file now (`None` if the file changed shape).
    pub fn line(&self) -> Option<usize> {
        let text = std::fs::read_to_string(&self.file).ok()?;
        locate::locate(&text, &self.yaml_path).map(|(line, _)| line)
    }

    /// Every limit of the rule, window by window.
    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.windows().iter().flat_map(RuleWindow::limits)
    }

    /// The scopes of its counters: its id (fixed windows, and where the store's keys are
    /// looked up by rule), and each window's own ([`RuleWindow::counter_scope`]).
    pub fn counter_scopes(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.id).chain(self.windows().iter().map(|w| w.counter_scope(self.id)))
    }

    /// The window whose counters count in `unit` ([`RuleWindow::counter_unit`]) with scope
    /// `scope`, if it is one of this rule's.
    pub fn window_of(&self, scope: u64, unit: Unit) -> Option<&RuleWindow> {
        self.windows()
            .iter()
            .find(|w| w.counter_unit() == unit && w.counter_scope(self.id) == scope)
    }

    /// Its windows, shortest unit first; none when unlimited.
    #[inline]
    pub fn windows(&self) -> &[RuleWindow] {
        match &self.policy {
            Policy::Unlimited => &[],
            Policy::Limited(windows) => windows,
        }
    }

    /// The values that tell one caller's counter of this rule from another's: the request's
    /// values, or the wildcard itself at levels whose matches share a counter
    /// (`share_threshold`).
    pub fn counter_parts<'a, E: Entry>(
        &'a self,
        entries: &'a [E],
    ) -> impl Iterator<Item = &'a str> {
        entries.iter().enumerate().map(|(level, entry)| {
            self.shared_values
                .get(level)
                .and_then(Option::as_deref)
                .unwrap_or(entry.value())
        })
    }

    /// The descriptor path of one caller's counter, as Redis keys and the admin API name it:
    /// `key_value` per level, joined with dots (`api_key_k1.model_gpt-4o`).
    pub fn counter_path<'a>(&self, parts: impl Iterator<Item = &'a str>) -> String {
        let mut path = String::new();
        self.write_counter_path(&mut path, parts);
        path
    }

    /// [`Rule::counter_path`], appended to `out`.
    pub fn write_counter_path<'a>(&self, out: &mut String, parts: impl Iterator<Item = &'a str>) {
        for (level, (key, value)) in self.keys.iter().zip(parts).enumerate() {
            if level > 0 {
                out.push('.');
            }
            out.push_str(key);
            out.push('_');
            out.push_str(value);
        }
    }
}

/// The entry key whose values name upstream endpoints.
pub const ENDPOINT_KEY: &str = "endpoint";

/// Where a rule's counts are decided when Redis is configured (`consistency:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Locally, against fleet totals synced every interval (the default).
    #[default]
    Approximate,
    /// In Redis, atomically, on the request path: exact, at a round trip per call.
    Strict,
}

/// Which of the caller's values a rule's metrics carry in their `rule` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricDetail {
    /// The rule's path alone: no caller value ever becomes a label.
    #[default]
    Rule,
    /// The value of the rule's own (last) level (`value_to_metric`).
    LastValue,
    /// The values of every level (`detailed_metric`).
    AllValues,
}

/// A rule's capacity factor in millionths: 1,000,000 is the configured limit. The one part
/// of a compiled [`RuleSet`] that changes at run time: the capacity task lowers it when an
/// upstream is saturated and raises it as capacity recovers; requests read it once per rule.
#[derive(Debug)]
pub struct Factor(AtomicU32);

impl Default for Factor {
    fn default() -> Self {
        Factor(AtomicU32::new(Factor::FULL))
    }
}

impl Factor {
    /// The configured limit, unreduced.
    pub const FULL: u32 = 1_000_000;

    /// The factor in force, in millionths.
    #[inline]
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the factor in force, in millionths.
    pub fn set(&self, millionths: u32) {
        self.0.store(millionths, Ordering::Relaxed);
    }

    /// A limit as the factor leaves it.
    pub fn apply(&self, per_unit: u64) -> u64 {
        scale(per_unit, self.get())
    }

    /// The factor in force as a fraction of the configured limit.
    pub fn fraction(&self) -> f64 {
        f64::from(self.get()) / f64::from(Factor::FULL)
    }
}

/// `per_unit` at a factor of `millionths` (at most [`Factor::FULL`]: never more than it was).
#[inline]
pub fn scale(per_unit: u64, millionths: u32) -> u64 {
    match millionths {
        Factor::FULL => per_unit,
        f => (u128::from(per_unit) * u128::from(f) / u128::from(Factor::FULL)) as u64,
    }
}

/// The rules of one domain, from one file.
#[derive(Debug)]
pub struct Domain {
    pub name: Box<str>,
    pub file: PathBuf,
    /// Where `domain:` is written.
    pub line: usize,
    pub tree: Level,
    pub rules: Vec<Arc<Rule>>,
    /// Whether any limit of the domain `replaces` another: when none does, a request skips
    /// the search for replaced limits.
    pub has_replaces: bool,
}

/// Whether one domain may be defined by several files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DomainFiles {
    /// Each domain lives in one file; a second file defining it is an error.
    #[default]
    One,
    /// The files defining one domain are merged (envoyproxy/ratelimit's
    /// `MERGE_DOMAIN_CONFIG`).
    Merged,
}

/// Every loaded domain. Immutable: a reload builds a new one and swaps it in.
#[derive(Debug, Default)]
pub struct RuleSet {
    domains: HashMap<Box<str>, Arc<Domain>, foldhash::fast::FixedState>,
}

impl RuleSet {
    /// Puts compiled domains together, in the order given. A domain already defined by an
    /// earlier file is left out, with an error that names both files, unless `merge` is set
    /// (envoyproxy/ratelimit's `MERGE_DOMAIN_CONFIG`): then its descriptors join the domain's,
    /// and a file that defines a top-level descriptor the domain already has is left out with
    /// an error naming both files.
    pub fn assemble(domains: Vec<Arc<Domain>>, merge: DomainFiles) -> (RuleSet, Vec<ConfigError>) {
        let mut set = RuleSet::default();
        let mut errors = Vec::new();
        for domain in domains {
            let Some(first) = set.domains.get_mut(&domain.name) else {
                set.domains.insert(domain.name.clone(), domain);
                continue;
            };
            let error = |message| ConfigError {
                file: domain.file.clone(),
                line: Some(domain.line),
                column: None,
                field: Some("domain".into()),
                message,
            };
            if merge == DomainFiles::One {
                errors.push(error(format!(
                    "domain `{}` is already defined in {}:{}; each domain must live in one file (or set --merge-domain-config)",
                    domain.name,
                    first.file.display(),
                    first.line
                )));
                continue;
            }
            let mut tree = first.tree.clone();
            let both = tree.merge(&domain.tree);
            if !both.is_empty() {
                errors.push(error(format!(
                    "domain `{}` is merged with {}:{}, and both files define the descriptor {}",
                    domain.name,
                    first.file.display(),
                    first.line,
                    both.iter()
                        .map(|d| format!("`{d}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
                continue;
            }
            *first = Arc::new(Domain {
                name: first.name.clone(),
                file: first.file.clone(),
                line: first.line,
                tree,
                rules: first.rules.iter().chain(&domain.rules).cloned().collect(),
                has_replaces: first.has_replaces || domain.has_replaces,
            });
        }
        (set, errors)
    }

    /// The rules of one domain.
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name).map(|d| &**d)
    }

    /// Every domain.
    pub fn domains(&self) -> impl Iterator<Item = &Arc<Domain>> {
        self.domains.values()
    }

    /// The counter scopes of every rule in the set.
    pub fn rule_scopes(&self) -> std::collections::HashSet<u64> {
        self.domains
            .values()
            .flat_map(|d| d.rules.iter())
            .flat_map(|r| r.counter_scopes())
            .collect()
    }

    /// The rules of this set whose limits count differently in `next` (an algorithm changed,
    /// added or dropped for a unit, or a tokens budget moved across 32 bits): their counters
    /// of that kind start afresh there.
    pub fn recounted_in<'n>(&self, next: &'n RuleSet) -> Vec<&'n Rule> {
        let old: HashMap<u64, &Rule> = self
            .domains
            .values()
            .flat_map(|d| d.rules.iter().map(|r| (r.id, &**r)))
            .collect();
        // A counter's scope tells how its word is laid out.
        let kinds = |r: &Rule| -> Vec<(Unit, u64)> {
            r.windows()
                .iter()
                .map(|w| (w.unit, w.counter_scope(r.id)))
                .collect()
        };
        next.domains
            .values()
            .flat_map(|d| d.rules.iter())
            .filter(|r| old.get(&r.id).is_some_and(|o| kinds(o) != kinds(r)))
            .map(|r| &**r)
            .collect()
    }

    /// How many rules the set holds.
    pub fn rule_count(&self) -> usize {
        self.domains.values().map(|d| d.rules.len()).sum()
    }
}

/// Counter scopes with this bit set belong to a request's limit override, not to a rule.
pub const OVERRIDE_SCOPE: u64 = 1 << 63;

/// The counter scope of a rule: its stable id, with the override bit clear.
pub fn rule_scope<'a>(domain: &str, path: impl IntoIterator<Item = &'a str>) -> u64 {
    stable_id(domain, path) & !OVERRIDE_SCOPE
}

/// The counter scope of a limit override sent for descriptors with these keys.
pub fn override_scope<'a>(domain: &str, keys: impl IntoIterator<Item = &'a str>) -> u64 {
    stable_id(domain, keys) | OVERRIDE_SCOPE
}

/// FNV-1a over a domain and the parts of a descriptor path: the same rule gets the same id in
/// every process and across reloads, so its counters survive. Allocation-free, so the request
/// path can name override counters with it too.
pub fn stable_id<'a>(domain: &str, parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut hash = StableHash::default();
    hash.eat(domain.as_bytes());
    for part in parts {
        hash.eat(&[0]);
        hash.eat(part.as_bytes());
    }
    hash.finish()
}

/// 64-bit FNV-1a: the same bytes hash alike in every process and release, so rule ids and
/// file hashes can be compared across replicas.
#[derive(Debug, Clone, Copy)]
pub struct StableHash(u64);

impl Default for StableHash {
    fn default() -> Self {
        StableHash(0xcbf2_9ce4_8422_2325)
    }
}

impl StableHash {
    /// Hashes `bytes` in.
    pub fn eat(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn finish(self) -> u64 {
        self.0
    }

    /// The hash of `bytes` alone.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut hash = StableHash::default();
        hash.eat(bytes);
        hash.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_unit: u32, measure: Measure) -> Limit {
        Limit {
            name: None,
            unit: Unit::Minute,
            per_unit: per_unit.into(),
            measure,
            replaces: Box::new([]),
            algorithm: Algorithm::FixedWindow,
        }
    }

    #[test]
    fn a_window_is_in_force_at_its_capacity_factor_less_what_is_left_out() {
        let window = RuleWindow {
            unit: Unit::Minute,
            requests: Some(limit(600, Measure::Requests)),
            tokens: Some(limit(90_001, Measure::Tokens)),
            algorithm: Algorithm::FixedWindow,
            leased: false,
        };
        let full = window.in_force(Factor::FULL, |_| true);
        assert_eq!((full.requests, full.tokens), (Some(600), Some(90_001)));
        // Half capacity rounds down: never more than the factor allows.
        let half = window.in_force(Factor::FULL / 2, |_| true);
        assert_eq!((half.requests, half.tokens), (Some(300), Some(45_000)));
        let requests_only = window.in_force(Factor::FULL, |l| l.measure == Measure::Requests);
        assert_eq!(
            (requests_only.requests, requests_only.tokens),
            (Some(600), None)
        );
    }
}
