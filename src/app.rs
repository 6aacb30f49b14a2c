//! The shared state of a running server: the rules in force, the counters, the fleet store,
//! capacity announcements and metrics. Handlers borrow it; background tasks take only the
//! handles they use.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::capacity::{Announcement, Capacity, Changed, Recovery, RuleName};
use crate::decision::Mode;
use crate::limiter::{Clock, Limiter};
use crate::reload::{ReloadStatus, Reloaded};
use crate::rules::{OVERRIDE_SCOPE, RuleSet};
use crate::settings::Settings;
use crate::sync::{Fleet, SyncHandles};
use crate::telemetry::ProcessMetrics;
use crate::traces::Traces;

/// Everything a request needs, shared by every connection.
pub struct App {
    /// The rules in force: one atomic load per request; a reload swaps in a new set while
    /// requests in flight finish on the one they loaded.
    pub rules: Arc<ArcSwap<RuleSet>>,
    /// The counters, the clock, and the fleet view.
    pub limiter: Arc<Limiter>,
    /// The process settings, as started.
    pub settings: Settings,
    /// What the last reloads did (generation, hash, per-file errors).
    pub reload_status: ArcSwap<ReloadStatus>,
    /// The fleet store, when Redis is configured.
    pub fleet: Option<Arc<Fleet>>,
    /// Process-wide metric handles.
    pub metrics: ProcessMetrics,
    /// Capacity reductions announced, here or by the fleet.
    pub capacity: Capacity,
    /// Wakes the capacity task: an announcement arrived, or rules were reloaded.
    pub capacity_changed: tokio::sync::Notify,
    /// Whether any domain is loaded; the gRPC health service follows it.
    pub domains_loaded: tokio::sync::watch::Sender<bool>,
    /// OpenTelemetry traces of ShouldRateLimit, when on.
    pub traces: Option<Traces>,
    /// Calls waiting for capacity (a rule's `wait:`), in arrival order per descriptor.
    pub waiting: WaitQueues,
    /// Told of every change of a rule's capacity factor (an embedded limiter's
    /// `on_capacity_change`), by the capacity task.
    pub capacity_listeners: std::sync::RwLock<Vec<CapacityListener>>,
}

/// A callback told of a rule's capacity factor as it changes.
pub type CapacityListener = Box<dyn Fn(&Changed) + Send + Sync>;

/// The calls waiting for capacity: one first-come-first-served queue per descriptor refused
/// (a tokio semaphore of one permit, fair), whose head alone retries; and a wake-up for heads
/// whose capacity comes back by a release rather than with time.
#[derive(Debug, Default)]
pub struct WaitQueues {
    queues: std::sync::Mutex<std::collections::HashMap<u64, Arc<tokio::sync::Semaphore>>>,
    /// Notified when holds in flight are given back.
    pub released: tokio::sync::Notify,
}

impl WaitQueues {
    /// The queue of descriptor `key`. Queues no waiter holds any more (the map's handle is
    /// their last) are dropped here, so the map keeps only the queues in use and the last few.
    pub fn queue(&self, key: u64) -> Arc<tokio::sync::Semaphore> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.retain(|_, queue| Arc::strong_count(queue) > 1);
        queues
            .entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1)))
            .clone()
    }
}

impl App {
    /// The state of a server starting on `rules`.
    pub fn new(
        settings: Settings,
        rules: RuleSet,
        clock: Arc<dyn Clock>,
        fleet: Option<Arc<Fleet>>,
    ) -> App {
        let domains_loaded = tokio::sync::watch::Sender::new(rules.domains().next().is_some());
        App {
            fleet,
            domains_loaded,
            traces: None,
            rules: Arc::new(ArcSwap::from_pointee(rules)),
            limiter: Arc::new(Limiter::new(clock)),
            settings,
            reload_status: ArcSwap::from_pointee(ReloadStatus::default()),
            metrics: ProcessMetrics::register(),
            capacity: Capacity::default(),
            capacity_changed: tokio::sync::Notify::new(),
            waiting: WaitQueues::default(),
            capacity_listeners: std::sync::RwLock::default(),
        }
    }

    /// Announces that the upstream behind a rule is saturated: its limit drops to `factor` of
    /// what is in force now (`in_force`, a fraction of the configured limit: reductions
    /// compound), here and, with a fleet store, on every replica; then recovers step by step.
    pub async fn reduce_capacity(
        &self,
        name: RuleName,
        in_force: f64,
        factor: f64,
    ) -> Result<Announcement, crate::sync::SyncError> {
        let announcement = Announcement {
            factor: (in_force * factor).max(0.000_001),
            at_ms: self.limiter.clock().now_ms(),
        };
        self.capacity.record(name.clone(), announcement);
        if let Some(fleet) = &self.fleet {
            fleet.announce_capacity(&name, announcement).await?;
        }
        self.capacity_changed.notify_one();
        Ok(announcement)
    }

    /// Tells every capacity listener of `changed`.
    pub fn tell_capacity_listeners(&self, changed: &Changed) {
        let listeners = self
            .capacity_listeners
            .read()
            .unwrap_or_else(|e| e.into_inner());
        for listener in listeners.iter() {
            listener(changed);
        }
    }

    /// Whether health checks pass: always, unless
    /// `--healthy-with-at-least-one-config-loaded` asks for a loaded domain.
    pub fn healthy(&self) -> bool {
        !self.settings.healthy_with_at_least_one_config_loaded || *self.domains_loaded.borrow()
    }

    /// How reduced capacity recovers.
    pub fn recovery(&self) -> Recovery {
        Recovery {
            factor: self.settings.capacity_recovery_factor,
            every: self.settings.capacity_recovery_interval,
        }
    }

    /// How every rule is treated: global shadow mode, strict rules in Redis.
    pub fn mode(&self) -> Mode {
        Mode {
            shadow: self.settings.shadow_mode,
            quota: self.settings.quota_mode,
            strict_in_store: self.fleet.is_some(),
        }
    }

    /// What the sync task needs of the server.
    pub fn sync_handles(&self) -> SyncHandles {
        SyncHandles {
            limiter: self.limiter.clone(),
            rules: self.rules.clone(),
            metrics: self.metrics.sync.clone(),
        }
    }

    /// Applies a reload: swaps in its rule set, if it brought one, and publishes its status.
    pub fn apply_reload(&self, reloaded: Reloaded) {
        if let Some(set) = reloaded.rules {
            self.swap_in(set, reloaded.status.generation, reloaded.reason);
        }
        self.publish_reload(reloaded.status);
    }

    /// Makes a reload status visible: to the admin API, and as metrics.
    pub fn publish_reload(&self, status: ReloadStatus) {
        let metrics = &self.metrics.reload;
        let before = self.reload_status.load();
        metrics.generation.set(status.generation as f64);
        metrics
            .applied
            .increment(status.applied.saturating_sub(before.applied));
        metrics
            .failed
            .increment(status.failed.saturating_sub(before.failed));
        if let Some([success, error]) = &metrics.peer_loads {
            success.increment(status.applied.saturating_sub(before.applied));
            error.increment(status.failed.saturating_sub(before.failed));
        }
        if let Some(ms) = status.last_success_ms {
            metrics.last_success.set(ms as f64 / 1000.0);
        }
        metrics.rules.set(self.rules.load().rule_count() as f64);
        self.reload_status.store(Arc::new(status));
    }

    /// Swaps in a new rule set and drops the counters of rules that are gone (rules keep
    /// their ids across reloads, so every other counter carries on).
    fn swap_in(&self, set: RuleSet, generation: u64, reason: &str) {
        let live = set.rule_scopes();
        let (domains, rules) = (set.domains().count(), set.rule_count());
        for rule in self.rules.load().recounted_in(&set) {
            let algorithms: Vec<String> = rule
                .windows()
                .iter()
                .map(|w| format!("{} per {}", w.algorithm.name(), w.unit))
                .collect();
            tracing::info!(
                domain = %rule.domain,
                rule = %rule.path,
                now = %algorithms.join(", "),
                "a rule's limits count differently now: those counters start afresh"
            );
        }
        self.rules.store(Arc::new(set));
        self.domains_loaded.send_replace(domains > 0);
        // New rules start at full capacity: let the capacity task set their factors now.
        self.capacity_changed.notify_one();
        let dropped = self
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
}
