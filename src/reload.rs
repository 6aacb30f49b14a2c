//! Live rule editing: watch the config directory, debounce bursts of events, compile what
//! changed, and swap the new rule set in atomically.
//!
//! Each file is kept apart: a file that breaks keeps its last good version serving while other
//! files' changes apply, and its error is logged once (until the file changes again). Counters
//! are untouched by a swap (rules keep their ids across reloads), except those of rules that no
//! longer exist, which are dropped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

use crate::rules::{self, ConfigError, Domain, OVERRIDE_SCOPE, RuleSet};
use crate::server::App;

/// What the last reloads did: kept for the admin API and metrics.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// Goes up by one each time a new rule set is swapped in (1 after start).
    pub generation: u64,
    /// A hash of the file versions now serving.
    pub files_hash: u64,
    /// When a new rule set was last swapped in, in ms since the epoch.
    pub last_success_ms: Option<u64>,
    pub last_attempt_ms: Option<u64>,
    /// Scans that swapped in a new rule set.
    pub applied: u64,
    /// Scans that found at least one broken file.
    pub failed: u64,
    pub files: Vec<FileStatus>,
}

#[derive(Debug, Clone)]
pub struct FileStatus {
    pub path: PathBuf,
    /// The domain this file serves, if any version of it is good.
    pub domain: Option<String>,
    /// Whether the version serving is older than the file on disk (the newer one is broken).
    pub stale: bool,
    /// The errors of the file's current version; empty when it is good.
    pub errors: Vec<ConfigError>,
}

struct Tracked {
    /// Hash of the text last read, good or not.
    seen: u64,
    /// The last good version: its hash and domain.
    serving: Option<(u64, Arc<Domain>)>,
    errors: Vec<ConfigError>,
    /// Set when this file's domain is already defined by another file.
    conflict: Option<ConfigError>,
}

/// The rule files of a directory and the last good version of each.
pub struct Catalog {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Tracked>,
    /// Which file served each domain in the set now in force: on a conflict, it keeps it.
    owners: HashMap<Box<str>, PathBuf>,
    status: ReloadStatus,
    dir_error: Option<String>,
}

pub enum Scan {
    Unchanged,
    Changed(RuleSet),
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Catalog {
    /// Loads a directory at start: strict, every error of every file is returned.
    pub fn load(dir: &Path) -> Result<(Catalog, RuleSet), Vec<ConfigError>> {
        let mut catalog = Catalog {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            owners: HashMap::new(),
            status: ReloadStatus::default(),
            dir_error: None,
        };
        let (sources, unreadable) = rules::read_dir(dir).map_err(|e| vec![e])?;
        let mut errors = unreadable;
        for source in &sources {
            let seen = fnv(source.text.as_bytes());
            let (serving, file_errors) = match rules::compile_file(source) {
                Ok(domain) => (Some((seen, Arc::new(domain))), Vec::new()),
                Err(file_errors) => (None, file_errors),
            };
            errors.extend(file_errors.iter().cloned());
            catalog.files.insert(
                source.path.clone(),
                Tracked {
                    seen,
                    serving,
                    errors: file_errors,
                    conflict: None,
                },
            );
        }
        let set = catalog.assemble();
        errors.extend(catalog.files.values().filter_map(|t| t.conflict.clone()));
        if !errors.is_empty() {
            return Err(errors);
        }
        catalog.swapped_in();
        Ok((catalog, set))
    }

    /// Reads the directory again and compiles the files that changed. Returns the new rule set
    /// when anything that serves changed.
    pub fn rescan(&mut self) -> Scan {
        self.status.last_attempt_ms = Some(now_ms());
        let (sources, unreadable) = match rules::read_dir(&self.dir) {
            Ok(found) => {
                self.dir_error = None;
                found
            }
            Err(e) => {
                // Keep everything serving; say so once.
                let message = e.to_string();
                if self.dir_error.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "cannot read the config directory; keeping the rules in force");
                    self.status.failed += 1;
                    self.dir_error = Some(message);
                }
                return Scan::Unchanged;
            }
        };
        let mut changed = false;
        let mut broken = false;
        for source in &sources {
            let seen = fnv(source.text.as_bytes());
            if self.files.get(&source.path).is_some_and(|t| t.seen == seen) {
                continue;
            }
            changed = true;
            let tracked = self.files.entry(source.path.clone()).or_insert(Tracked {
                seen,
                serving: None,
                errors: Vec::new(),
                conflict: None,
            });
            tracked.seen = seen;
            match rules::compile_file(source) {
                Ok(domain) => {
                    if !tracked.errors.is_empty() {
                        tracing::info!(file = %source.path.display(), "rule file is good again");
                    }
                    tracked.serving = Some((seen, Arc::new(domain)));
                    tracked.errors.clear();
                }
                Err(errors) => {
                    broken = true;
                    for error in &errors {
                        tracing::warn!(%error, "rule file rejected; its last good version keeps serving");
                    }
                    tracked.errors = errors;
                }
            }
        }
        for error in unreadable {
            if let Some(tracked) = self.files.get_mut(&error.file) {
                if tracked.errors.first() != Some(&error) {
                    tracing::warn!(%error, "rule file unreadable; its last good version keeps serving");
                    broken = true;
                }
                tracked.errors = vec![error];
            }
        }
        let before = self.files.len();
        let on_disk: std::collections::HashSet<&PathBuf> =
            sources.iter().map(|s| &s.path).collect();
        self.files
            .retain(|path, _| on_disk.contains(path) || path.exists());
        changed |= self.files.len() != before;
        if broken {
            self.status.failed += 1;
        }
        if !changed {
            return Scan::Unchanged;
        }
        let set = self.assemble();
        self.swapped_in();
        Scan::Changed(set)
    }

    /// Builds the rule set from each file's last good version. Files that served a domain in
    /// the set in force keep it; a file that newly claims a taken domain is left out.
    fn assemble(&mut self) -> RuleSet {
        let (keeps, newcomers): (Vec<_>, Vec<_>) = self
            .files
            .iter()
            .filter_map(|(path, t)| t.serving.as_ref().map(|(_, d)| (path, d.clone())))
            .partition(|(path, domain)| self.owners.get(&domain.name) == Some(*path));
        let ordered = keeps.into_iter().chain(newcomers).map(|(_, d)| d).collect();
        let (set, conflicts) = RuleSet::assemble(ordered);
        for tracked in self.files.values_mut() {
            tracked.conflict = None;
        }
        for conflict in conflicts {
            if let Some(tracked) = self.files.get_mut(&conflict.file) {
                if tracked.conflict.is_none() {
                    tracing::warn!(error = %conflict, "rule file left out");
                }
                tracked.conflict = Some(conflict);
            }
        }
        self.owners = set
            .domains()
            .map(|d| (d.name.clone(), d.file.clone()))
            .collect();
        set
    }

    fn swapped_in(&mut self) {
        let serving: Vec<u64> = self
            .files
            .values()
            .filter_map(|t| t.serving.as_ref().map(|(hash, _)| *hash))
            .collect();
        let bytes: Vec<u8> = serving.iter().flat_map(|h| h.to_le_bytes()).collect();
        let now = now_ms();
        self.status.generation += 1;
        self.status.applied += 1;
        self.status.files_hash = fnv(&bytes);
        self.status.last_success_ms = Some(now);
        self.status.last_attempt_ms = Some(now);
    }

    pub fn status(&self) -> ReloadStatus {
        let mut status = self.status.clone();
        status.files = self
            .files
            .iter()
            .map(|(path, t)| FileStatus {
                path: path.clone(),
                domain: t
                    .serving
                    .as_ref()
                    .filter(|_| t.conflict.is_none())
                    .map(|(_, d)| d.name.to_string()),
                stale: t.serving.as_ref().is_some_and(|(hash, _)| *hash != t.seen),
                errors: t.errors.iter().chain(&t.conflict).cloned().collect(),
            })
            .collect();
        status
    }
}

/// How often the reload task looks again without being told.
#[derive(Debug, Clone, Copy)]
pub struct ReloadSettings {
    /// Quiet time after the last event before reloading.
    pub debounce: Duration,
    /// Rescan this often whatever the events say.
    pub rescan_every: Duration,
}

/// File events on the config directory. Set up before the rules are first read, so an edit
/// made while the server starts is not missed until the periodic rescan.
pub struct Changes {
    signalled: Arc<Notify>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Changes {
    /// Watches `dir` when `watch` is set; without a watch, SIGHUP and the periodic rescan
    /// still reload.
    pub fn watch(dir: &Path, watch: bool) -> Changes {
        let signalled = Arc::new(Notify::new());
        let watcher = if watch {
            watch_dir(dir, signalled.clone())
        } else {
            None
        };
        Changes {
            signalled,
            _watcher: watcher,
        }
    }
}

/// Reloads until the task is dropped: on file events (debounced), SIGHUP, and periodically.
pub async fn run(app: Arc<App>, mut catalog: Catalog, changes: Changes, settings: ReloadSettings) {
    let changed = &changes.signalled;
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    let mut rescan = tokio::time::interval(settings.rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.tick().await;
    loop {
        let reason = tokio::select! {
            _ = changed.notified() => {
                settle(changed, settings.debounce).await;
                "file change"
            }
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => "SIGHUP",
            _ = rescan.tick() => "periodic rescan",
        };
        catalog = match tokio::task::spawn_blocking(move || {
            let scan = catalog.rescan();
            (catalog, scan)
        })
        .await
        {
            Ok((catalog, scan)) => {
                let status = catalog.status();
                if let Scan::Changed(set) = scan {
                    swap_in(&app, set, status.generation, reason);
                }
                publish(&app, status);
                catalog
            }
            Err(e) => {
                tracing::error!(error = %e, "rule reload failed; reloading stops");
                return;
            }
        };
    }
}

/// Makes a reload status visible: to the admin API, and as metrics.
pub fn publish(app: &App, status: ReloadStatus) {
    let metrics = &app.metrics;
    let before = app.reload_status.load();
    metrics.config_generation.set(status.generation as f64);
    metrics
        .reloads
        .increment(status.applied.saturating_sub(before.applied));
    metrics
        .reload_failures
        .increment(status.failed.saturating_sub(before.failed));
    if let Some(ms) = status.last_success_ms {
        metrics.last_reload.set(ms as f64 / 1000.0);
    }
    metrics.rules.set(app.rules.load().rule_count() as f64);
    app.reload_status.store(Arc::new(status));
}

/// Swaps in a new rule set and drops the counters of rules that are gone.
fn swap_in(app: &App, set: RuleSet, generation: u64, reason: &str) {
    let live = set.rule_scopes();
    let (domains, rules) = (set.domains().count(), set.rule_count());
    app.rules.store(Arc::new(set));
    // New rules start at full capacity: let the capacity task set their factors now.
    app.capacity_changed.notify_one();
    let dropped = app
        .limiter
        .counters()
        .remove_where(|key| key.scope() & OVERRIDE_SCOPE == 0 && !live.contains(&key.scope()));
    tracing::info!(
        generation,
        domains,
        rules,
        dropped_counters = dropped,
        reason,
        "rules reloaded"
    );
}

/// Waits until events stop for `quiet`, or at most 20 times that, so a stream of writes still
/// reloads.
async fn settle(changed: &Notify, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet * 20;
    loop {
        tokio::select! {
            _ = changed.notified() => {
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
            }
            _ = tokio::time::sleep(quiet) => return,
        }
    }
}

/// Watches the directory itself (not recursively): edits, creations, removals, renames, and a
/// Kubernetes ConfigMap's `..data` symlink swap all show up as events on its entries.
fn watch_dir(dir: &Path, changed: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
        Ok(_) => changed.notify_one(),
        Err(e) => tracing::warn!(error = %e, "config watch error; the periodic rescan still runs"),
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; relying on the periodic rescan");
            None
        }
    }
}
