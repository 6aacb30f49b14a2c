//! Live rule editing: watch the config directory, debounce bursts of events, compile what
//! changed, and swap the new rule set in atomically.
//!
//! Each file is kept apart: a file that breaks keeps its last good version serving while other
//! files' changes apply, and its error is logged once (until the file changes again). Counters
//! are untouched by a swap (rules keep their ids across reloads), except those of rules that no
//! longer exist, which are dropped.

mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::rules::{self, ConfigError, Domain, DomainFiles, RuleSet, StableHash};
pub use watch::Changes;

/// What the last reloads did: kept for the admin API and metrics.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// Goes up by one each time a new rule set is swapped in (1 after start).
    pub generation: u64,
    /// A hash of the file versions now serving.
    pub files_hash: u64,
    /// When a new rule set was last swapped in, in ms since the epoch.
    pub last_success_ms: Option<u64>,
    /// When a rescan last ran, in ms since the epoch.
    pub last_attempt_ms: Option<u64>,
    /// Scans that swapped in a new rule set.
    pub applied: u64,
    /// Scans that found at least one broken file.
    pub failed: u64,
    /// Each rule file, as the catalog serves it.
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
    domain_files: DomainFiles,
    /// Limits are kept fleet-wide in Redis: rules only one replica can decide are errors.
    fleet_store: bool,
}

/// What a rescan found.
pub enum Scan {
    /// Nothing that serves changed.
    Unchanged,
    /// A new rule set, to swap in.
    Changed(RuleSet),
}

/// One reload, handed to whoever applies it.
pub struct Reloaded {
    /// The new rule set, when anything that serves changed.
    pub rules: Option<RuleSet>,
    /// What the catalog serves now.
    pub status: ReloadStatus,
    /// What set it off: a file change, SIGHUP, or the periodic rescan.
    pub reason: &'static str,
}

impl Catalog {
    /// Loads a directory at start (`now_ms`): strict, every error of every file is returned.
    pub fn load(
        dir: &Path,
        now_ms: u64,
        domain_files: DomainFiles,
        fleet_store: bool,
    ) -> Result<(Catalog, RuleSet), Vec<ConfigError>> {
        let (catalog, set, errors) = Catalog::load_anyway(dir, now_ms, domain_files, fleet_store);
        if errors.is_empty() {
            Ok((catalog, set))
        } else {
            Err(errors)
        }
    }

    /// Loads a directory at start whatever is wrong with it (envoyproxy/ratelimit's
    /// `FORCE_START_WITHOUT_INITIAL_CONFIG`): the good files serve, and the errors are returned
    /// beside them. A directory that cannot be read yields no rules; rescans find it later.
    pub fn load_anyway(
        dir: &Path,
        now_ms: u64,
        domain_files: DomainFiles,
        fleet_store: bool,
    ) -> (Catalog, RuleSet, Vec<ConfigError>) {
        let mut catalog = Catalog {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            owners: HashMap::new(),
            status: ReloadStatus::default(),
            dir_error: None,
            domain_files,
            fleet_store,
        };
        let (sources, unreadable) = match rules::read_dir(dir) {
            Ok(found) => found,
            Err(e) => {
                catalog.dir_error = Some(e.to_string());
                catalog.swapped_in(now_ms);
                return (catalog, RuleSet::default(), vec![e]);
            }
        };
        let mut errors = unreadable;
        for source in &sources {
            let seen = StableHash::of(source.text.as_bytes());
            let (serving, file_errors) = match rules::compile_file_for(source, catalog.fleet_store)
            {
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
        catalog.swapped_in(now_ms);
        (catalog, set, errors)
    }

    /// Reads the directory again and compiles the files that changed. Returns the new rule set
    /// when anything that serves changed.
    pub fn rescan(&mut self, now_ms: u64) -> Scan {
        self.status.last_attempt_ms = Some(now_ms);
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
            let seen = StableHash::of(source.text.as_bytes());
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
            match rules::compile_file_for(source, self.fleet_store) {
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
        self.swapped_in(now_ms);
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
        let (set, conflicts) = RuleSet::assemble(ordered, self.domain_files);
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

    fn swapped_in(&mut self, now: u64) {
        let serving: Vec<u64> = self
            .files
            .values()
            .filter_map(|t| t.serving.as_ref().map(|(hash, _)| *hash))
            .collect();
        let bytes: Vec<u8> = serving.iter().flat_map(|h| h.to_le_bytes()).collect();
        self.status.generation += 1;
        self.status.applied += 1;
        self.status.files_hash = StableHash::of(&bytes);
        self.status.last_success_ms = Some(now);
        self.status.last_attempt_ms = Some(now);
    }

    /// What the catalog serves now, file by file.
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
    /// Whether SIGHUP reloads too: a server's choice; a library embedded in another process
    /// leaves that process's signals alone.
    pub on_hangup: bool,
}

/// Reloads until the task is dropped: on file events (debounced), SIGHUP, and periodically.
/// Each rescan's result goes to `apply`; `now_ms` tells the time.
pub async fn run(
    mut catalog: Catalog,
    changes: Changes,
    settings: ReloadSettings,
    now_ms: impl Fn() -> u64 + Send,
    mut apply: impl FnMut(Reloaded) + Send,
) {
    let hangup = settings
        .on_hangup
        .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()));
    let mut hangup = match hangup {
        None => None,
        Some(Ok(signal)) => Some(signal),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    let mut rescan = tokio::time::interval(settings.rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.tick().await;
    loop {
        let reason = tokio::select! {
            () = changes.next(settings.debounce) => "file change",
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => "SIGHUP",
            _ = rescan.tick() => "periodic rescan",
        };
        let now = now_ms();
        catalog = match tokio::task::spawn_blocking(move || {
            let scan = catalog.rescan(now);
            (catalog, scan)
        })
        .await
        {
            Ok((catalog, scan)) => {
                let rules = match scan {
                    Scan::Changed(set) => Some(set),
                    Scan::Unchanged => None,
                };
                let status = catalog.status();
                apply(Reloaded {
                    rules,
                    status,
                    reason,
                });
                catalog
            }
            Err(e) => {
                tracing::error!(error = %e, "rule reload failed; reloading stops");
                return;
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 5 }\n";
    const A_TEN: &str = "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 10 }\n";
    const BROKEN: &str = "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: fortnight, requests_per_unit: 10 }\n";

    fn limit_of(set: &RuleSet, domain: &str) -> Option<u64> {
        let rule = set.domain(domain)?.rules.first()?.clone();
        rule.limits().next().map(|l| l.per_unit)
    }

    fn changed(scan: Scan) -> RuleSet {
        match scan {
            Scan::Changed(set) => set,
            Scan::Unchanged => panic!("expected a new rule set"),
        }
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_version_serving() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, A).unwrap();
        let (mut catalog, set) = Catalog::load(dir.path(), 1_000, DomainFiles::One, false).unwrap();
        assert_eq!(limit_of(&set, "a"), Some(5));
        assert_eq!(catalog.status().generation, 1);
        assert!(
            matches!(catalog.rescan(2_000), Scan::Unchanged),
            "nothing changed"
        );

        std::fs::write(&file, BROKEN).unwrap();
        let set = changed(catalog.rescan(3_000));
        assert_eq!(
            limit_of(&set, "a"),
            Some(5),
            "the good version still serves"
        );
        let status = catalog.status();
        assert!(status.files[0].stale);
        assert_eq!(status.files[0].errors[0].line, Some(4));
        assert_eq!(status.failed, 1);

        std::fs::write(&file, A_TEN).unwrap();
        let set = changed(catalog.rescan(4_000));
        assert_eq!(limit_of(&set, "a"), Some(10));
        let status = catalog.status();
        assert!(!status.files[0].stale && status.files[0].errors.is_empty());
        // Times come from the caller's clock.
        assert_eq!(
            (status.last_success_ms, status.last_attempt_ms),
            (Some(4_000), Some(4_000))
        );
    }

    #[test]
    fn a_second_file_for_a_domain_is_left_out_and_a_removed_file_takes_its_domain_along() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), A).unwrap();
        let (mut catalog, _) = Catalog::load(dir.path(), 0, DomainFiles::One, false).unwrap();
        std::fs::write(dir.path().join("b.yaml"), A_TEN).unwrap();
        let set = changed(catalog.rescan(1));
        assert_eq!(
            limit_of(&set, "a"),
            Some(5),
            "the file that served the domain keeps it"
        );
        let b = catalog
            .status()
            .files
            .into_iter()
            .find(|f| f.path.ends_with("b.yaml"))
            .unwrap();
        assert!(b.domain.is_none() && b.errors[0].message.contains("already defined"));

        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let set = changed(catalog.rescan(2));
        assert_eq!(limit_of(&set, "a"), Some(10), "b's now");
    }

    #[test]
    fn a_start_with_any_error_is_refused_with_every_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), BROKEN).unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "domain: b\ndescriptors: [{ key: x, rate_limit: { unit: minute } }]\n",
        )
        .unwrap();
        let errors = Catalog::load(dir.path(), 0, DomainFiles::One, false)
            .err()
            .expect("refused");
        assert_eq!(errors.len(), 2);
    }
}
