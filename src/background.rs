//! The tasks beside the request path, started alike for a server and for a limiter embedded in
//! a service: the counter sweep, capacity recovery, rule reloads and the fleet sync. Each takes
//! the handles it uses; [`Background::stop`] ends them.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::app::App;
use crate::capacity::RuleName;
use crate::limiter::Limiter;
use crate::reload::{self, Catalog, Changes, ReloadSettings, Reloaded};
use crate::sync;

/// Where rule reloads come from, and what is done with each.
pub struct Reloads {
    /// The rule files as loaded at start.
    pub catalog: Catalog,
    /// Their file events.
    pub changes: Changes,
    /// Debounce, rescan, SIGHUP.
    pub settings: ReloadSettings,
    /// Applies a reload (a server swaps it in; an embedded limiter adds its own domains first).
    pub apply: Box<dyn FnMut(Reloaded) + Send>,
}

/// The running background tasks.
pub struct Background {
    sweeping: JoinHandle<()>,
    capacity: JoinHandle<()>,
    reloading: Option<JoinHandle<()>>,
    syncing: Option<JoinHandle<()>>,
}

impl Background {
    /// Starts the tasks on the current tokio runtime: the sweep and capacity recovery always,
    /// reloads when given, the sync when `app` has a fleet store.
    pub fn start(app: &Arc<App>, reloads: Option<Reloads>) -> Background {
        let sweeping = tokio::spawn(sweep(
            app.limiter.clone(),
            app.settings.sweep_interval,
            app.metrics.active_counters.clone(),
        ));
        let capacity = tokio::spawn(keep_capacity(app.clone()));
        let reloading = reloads.map(|reloads| {
            let limiter = app.limiter.clone();
            tokio::spawn(reload::run(
                reloads.catalog,
                reloads.changes,
                reloads.settings,
                move || limiter.clock().now_ms(),
                reloads.apply,
            ))
        });
        let syncing = app.fleet.clone().map(|fleet| {
            tracing::info!(
                namespace = %fleet.settings.namespace,
                cluster = fleet.settings.address.cluster,
                interval = ?fleet.settings.interval,
                policy = ?fleet.settings.policy,
                "fleet-wide limits through Redis"
            );
            tokio::spawn(sync::run(app.sync_handles(), fleet))
        });
        Background {
            sweeping,
            capacity,
            reloading,
            syncing,
        }
    }

    /// Ends every task (the fleet's leases are given back by the caller, which knows when no
    /// call is left to admit).
    pub fn stop(self) {
        self.sweeping.abort();
        self.capacity.abort();
        if let Some(reloading) = self.reloading {
            reloading.abort();
        }
        if let Some(syncing) = self.syncing {
            syncing.abort();
        }
    }
}

/// Drops counters whose window has ended, so memory follows active keys.
async fn sweep(limiter: Arc<Limiter>, every: Duration, live: metrics::Gauge) {
    loop {
        tokio::time::sleep(until_next_sweep(limiter.clock().now_ms(), every)).await;
        let dropped = sweep_once(limiter.clone()).await;
        live.set(limiter.counters().len() as f64);
        if dropped > 0 {
            tracing::debug!(
                dropped,
                live = limiter.counters().len(),
                "swept idle counters"
            );
        }
    }
}

/// How long until the next sweep. Sweeps fall just after the instants that are multiples of
/// `every` since the epoch, where fixed windows end (a minute's end is one at the default 10 s),
/// so an ended window's counters go before its keys' next ones arrive. A sweep at a phase
/// fixed by the start-up time kept them up to `every` longer: with 100,000 keys a minute
/// (the soak) it fell 8 s into each minute, and the table held both minutes' counters, 165,000.
fn until_next_sweep(now_ms: u64, every: Duration) -> Duration {
    // Calls at the boundary have moved to the new window by then.
    const AFTER_THE_END_MS: u64 = 200;
    let every_ms = (every.as_millis() as u64).max(1);
    let after = AFTER_THE_END_MS.min(every_ms / 2);
    let next = match now_ms.checked_sub(after) {
        Some(since) => (since / every_ms + 1) * every_ms + after,
        None => after,
    };
    Duration::from_millis(next - now_ms)
}

/// Drops every counter whose window has ended, on a blocking-pool thread. This runtime's
/// thread also accepts gRPC connections and serves the admin API, and a sweep of a million
/// counters takes 50-300 ms of CPU: run here, in pieces or whole, it held a new connection's
/// first call for 84-204 ms (load bench, 1M keys; `perf sched`: this thread busy throughout).
async fn sweep_once(limiter: Arc<Limiter>) -> usize {
    let sweeping = tokio::task::spawn_blocking(move || {
        let now = limiter.clock().now_ms();
        limiter.counters().sweep(now)
    });
    match sweeping.await {
        Ok(dropped) => dropped,
        Err(error) => {
            tracing::error!(%error, "the counter sweep failed; it runs again at the next interval");
            0
        }
    }
}

/// Keeps capacity factors current: applies announcements (local, and with Redis the fleet's,
/// also followed as they are published) and their recovery, logs each change and sets its
/// gauge.
async fn keep_capacity(app: Arc<App>) {
    let follow = async {
        match &app.fleet {
            Some(fleet) => fleet.follow_capacity(&app.capacity_changed).await,
            None => std::future::pending().await,
        }
    };
    let recovery = app.recovery();
    let tick = (recovery.every / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let apply = async {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = app.capacity_changed.notified() => {}
            }
            if let Some(fleet) = &app.fleet {
                match fleet.capacity_announcements().await {
                    Ok(found) => {
                        for (name, a) in found {
                            app.capacity.record(name, a);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cannot read capacity announcements from Redis")
                    }
                }
            }
            let rules = app.rules.load_full();
            let now = app.limiter.clock().now_ms();
            for changed in app.capacity.apply(&rules, recovery, now) {
                app.tell_capacity_listeners(&changed);
                let (RuleName { domain, rule }, factor) = (changed.name, changed.factor);
                tracing::info!(%domain, %rule, factor, "capacity factor changed");
                crate::telemetry::capacity_factor(domain, rule, factor);
            }
        }
    };
    tokio::select! {
        () = follow => {}
        () = apply => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{CounterRef, Counts, Enforcement, Limits, ManualClock, Unit};

    #[test]
    fn sweeps_fall_just_after_the_ends_of_windows() {
        let ten = Duration::from_secs(10);
        let ms = |n| Duration::from_millis(n);
        // Started 8 s into a minute: the next sweep is 200 ms past the minute's end.
        assert_eq!(until_next_sweep(68_000, ten), ms(2_200));
        assert_eq!(until_next_sweep(70_000, ten), ms(200));
        // Just after one, the next is a whole interval on.
        assert_eq!(until_next_sweep(70_200, ten), ms(10_000));
        assert_eq!(until_next_sweep(70_230, ten), ms(9_970));
        // Never more than one interval, never zero, at any interval.
        for every in [1, 7, 250, 1_000, 3_600_000] {
            for now in [0, 1, 99, 100, 101, 59_999, 60_000, 60_199, 60_200, 1 << 41] {
                let wait = until_next_sweep(now, ms(every)).as_millis() as u64;
                assert!(wait >= 1 && wait <= every, "{now} {every}: {wait}");
            }
        }
    }

    /// While a large sweep runs, the runtime that started it (a one-thread runtime, as the
    /// server's is) goes on serving its other tasks: here one that watches the table shrink.
    #[tokio::test(flavor = "current_thread")]
    async fn the_runtime_serves_other_tasks_while_a_large_sweep_runs() {
        let clock = Arc::new(ManualClock::new(60_000));
        let limiter = Arc::new(Limiter::new(clock.clone()));
        let one = Counts {
            requests: 1,
            tokens: 0,
        };
        let total = 200_000;
        let names: Vec<String> = (0..total).map(|i| format!("key-{i}")).collect();
        let pinned = limiter.counters().pin();
        for name in &names {
            let parts = [name.as_str()];
            let key = CounterRef {
                scope: 1,
                unit: Unit::Minute,
                parts: &parts,
            };
            pinned.with_counter(key, |c| {
                let window = Unit::Minute.window_at(60_000);
                c.charge(window, one, Limits::default(), Enforcement::Enforce)
            });
        }
        drop(pinned);
        clock.set_ms(10 * 60_000);
        let sweeping = tokio::spawn(sweep_once(limiter.clone()));
        // This task runs only when the runtime is free; before the sweep's end it sees the
        // table partly swept (a sweep on this thread would show it whole, then empty).
        let mut left = total;
        while left == total {
            tokio::task::yield_now().await;
            left = limiter.counters().len();
        }
        assert!(
            left > 0,
            "this runtime ran nothing else until the sweep of {total} counters had ended"
        );
        assert_eq!(sweeping.await.unwrap(), total);
        assert!(limiter.counters().is_empty());
    }
}
