//! What the operator asked for: rule files are read into raw serde types, then compiled once,
//! at load, into an immutable [`RuleSet`] that cannot hold an invalid rule. The request path
//! only ever touches the compiled form.

mod compile;
pub mod locate;
pub mod matcher;
pub mod raw;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Struct;

pub use compile::compile_file;
pub use locate::YamlPath;
pub use matcher::{Entry, Level, Pattern};

use crate::limiter::{Enforcement, Unit};
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
        }
    }
}

/// One limit of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub name: Option<Box<str>>,
    pub unit: Unit,
    pub per_unit: u32,
    pub measure: Measure,
    /// Names of limits this one replaces when both match one request.
    pub replaces: Box<[Box<str>]>,
}

/// The limits of a rule that share one window, and so one counter: at most one requests-like
/// limit and one tokens limit, checked by a single compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleWindow {
    pub unit: Unit,
    pub requests: Option<Limit>,
    pub tokens: Option<Limit>,
}

impl RuleWindow {
    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.requests.iter().chain(self.tokens.iter())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Always allowed; answered with `limit_remaining = u32::MAX`.
    Unlimited,
    /// One window per unit used, ordered from the shortest unit.
    Limited(Box<[RuleWindow]>),
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
    /// `consistency: strict`: with Redis, checked and counted atomically in Redis on the
    /// request path instead of locally.
    pub strict: bool,
    pub detailed_metric: bool,
    pub value_to_metric: bool,
    /// The entry key of each level, from the top.
    pub keys: Box<[Box<str>]>,
    /// Per level, the wildcard whose matches share one counter (`share_threshold`).
    pub shared_values: Box<[Option<Box<str>>]>,
    /// Added to the response's dynamic metadata when the rule matches.
    pub metadata: Option<Struct>,
    /// Its counters, labelled by domain and `metric_label`.
    pub metrics: RuleMetrics,
    /// The share of its limits in force (capacity reduction), set by the capacity task.
    pub capacity: crate::capacity::Factor,
    /// How metrics name the rule: its path, with API keys of the shorthand as a short hash.
    pub metric_label: Box<str>,
}

impl Rule {
    /// The line the rule starts at, read from its file now (`None` if the file changed shape).
    pub fn line(&self) -> Option<usize> {
        let text = std::fs::read_to_string(&self.file).ok()?;
        locate::locate(&text, &self.yaml_path).map(|(line, _)| line)
    }

    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        let windows: &[RuleWindow] = match &self.policy {
            Policy::Unlimited => &[],
            Policy::Limited(windows) => windows,
        };
        windows.iter().flat_map(RuleWindow::limits)
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

/// Every loaded domain. Immutable: a reload builds a new one and swaps it in.
#[derive(Debug, Default)]
pub struct RuleSet {
    domains: HashMap<Box<str>, Arc<Domain>, foldhash::fast::FixedState>,
}

impl RuleSet {
    /// Puts compiled domains together, in the order given. A domain already defined by an
    /// earlier file is left out, with an error that names both files.
    pub fn assemble(domains: Vec<Arc<Domain>>) -> (RuleSet, Vec<ConfigError>) {
        let mut set = RuleSet::default();
        let mut errors = Vec::new();
        for domain in domains {
            if let Some(first) = set.domains.get(&domain.name) {
                errors.push(ConfigError {
                    file: domain.file.clone(),
                    line: Some(domain.line),
                    column: None,
                    field: Some("domain".into()),
                    message: format!(
                        "domain `{}` is already defined in {}:{}; each domain must live in one file",
                        domain.name,
                        first.file.display(),
                        first.line
                    ),
                });
                continue;
            }
            set.domains.insert(domain.name.clone(), domain);
        }
        (set, errors)
    }

    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name).map(|d| &**d)
    }

    pub fn domains(&self) -> impl Iterator<Item = &Arc<Domain>> {
        self.domains.values()
    }

    /// The counter scopes of every rule in the set.
    pub fn rule_scopes(&self) -> std::collections::HashSet<u64> {
        self.domains
            .values()
            .flat_map(|d| d.rules.iter().map(|r| r.id))
            .collect()
    }

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
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(domain.as_bytes());
    for part in parts {
        eat(&[0]);
        eat(part.as_bytes());
    }
    hash
}

/// A problem in a rule file, placed as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Where in the document: `descriptors[1].rate_limit.unit`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A rule file as read from disk.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

/// The rule files of a directory: `*.yaml` and `*.yml`, not hidden, symlinks followed (as a
/// Kubernetes ConfigMap volume lays them out), sorted by name. A file that cannot be read is an
/// error of its own and does not keep the others from loading.
pub fn read_dir(dir: &Path) -> Result<(Vec<SourceFile>, Vec<ConfigError>), ConfigError> {
    let io_error = |path: &Path, e: std::io::Error| ConfigError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: None,
        message: format!("cannot read: {e}"),
    };
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_rule_file = !name.starts_with('.')
            && (name.ends_with(".yaml") || name.ends_with(".yml"))
            && path.is_file();
        if is_rule_file {
            paths.push(path);
        }
    }
    paths.sort();
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push(SourceFile { path, text }),
            Err(e) => errors.push(io_error(&path, e)),
        }
    }
    Ok((files, errors))
}

/// Reads and compiles a rule directory, reporting every error of every file.
pub fn load_dir(dir: &Path) -> Result<RuleSet, Vec<ConfigError>> {
    let (files, mut errors) = read_dir(dir).map_err(|e| vec![e])?;
    let mut domains = Vec::new();
    for file in &files {
        match compile_file(file) {
            Ok(domain) => domains.push(Arc::new(domain)),
            Err(mut file_errors) => errors.append(&mut file_errors),
        }
    }
    let (set, mut domain_errors) = RuleSet::assemble(domains);
    errors.append(&mut domain_errors);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(errors)
    }
}
