//! How counting works: the only code on the request path that touches shared state. A request
//! arrives here as a list of demands (one per counter it touches); the limiter charges them with
//! compare-and-swap, and if the request is denied it gives back what it charged, so a denied
//! request consumes nothing.

pub mod clock;
pub mod counter;
pub mod table;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

pub use clock::{Clock, ManualClock, SystemClock};
pub use counter::{Counter, Counts, FleetView, Limits, Over, Reading};
pub use table::{CounterKey, CounterRef, CounterTable};
pub use window::{Unit, Window};

/// How a limit takes part in the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enforcement {
    /// Over the limit denies the request.
    #[default]
    Enforce,
    /// Counted and reported, never denies (envoyproxy/ratelimit's `shadow_mode`).
    Shadow,
    /// The request is denied only when every quota limit it touches is over
    /// (envoyproxy/ratelimit's `quota_mode`).
    Quota,
}

/// One counter a request touches, and what it asks of it.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    pub counter: CounterRef<'a>,
    pub limits: Limits,
    pub charge: Counts,
    /// Give `charge` back instead of taking it (Envoy's `is_negative_hits`).
    pub refund: bool,
    pub enforcement: Enforcement,
}

/// What one demand came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Counts of the current window once the request is settled.
    pub counts: Counts,
    pub over: Over,
    /// Whether this request's charge stayed counted.
    pub counted: bool,
    pub until_reset: Duration,
}

/// The counters, the clock, and how the rest of the fleet is seen.
pub struct Limiter {
    table: CounterTable,
    clock: Arc<dyn Clock>,
    fleet: FleetState,
    /// Wakes the sync task when a counter refused a charge while synced: its view of the fleet
    /// is worth refreshing before the next interval.
    pub sync_soon: tokio::sync::Notify,
}

/// How the fleet looks to the request path, set by the sync task: one atomic word, read once
/// per request.
#[derive(Debug, Default)]
pub struct FleetState(std::sync::atomic::AtomicU64);

impl FleetState {
    const ALONE: u64 = 0;
    const SYNCED: u64 = 1;
    const LOCAL_SHARE: u64 = 2;
    const ALLOW_ALL: u64 = 3;
    const DENY_ALL: u64 = 4;

    pub fn set(&self, view: FleetView) {
        let (tag, replicas) = match view {
            FleetView::Alone => (Self::ALONE, 1),
            FleetView::Synced { replicas } => (Self::SYNCED, replicas),
            FleetView::LocalShare { replicas } => (Self::LOCAL_SHARE, replicas),
            FleetView::AllowAll => (Self::ALLOW_ALL, 1),
            FleetView::DenyAll => (Self::DENY_ALL, 1),
        };
        let word = (u64::from(replicas.max(1)) << 8) | tag;
        self.0.store(word, std::sync::atomic::Ordering::Release);
    }

    pub fn get(&self) -> FleetView {
        let word = self.0.load(std::sync::atomic::Ordering::Acquire);
        let replicas = ((word >> 8) as u32).max(1);
        match word & 0xff {
            Self::SYNCED => FleetView::Synced { replicas },
            Self::LOCAL_SHARE => FleetView::LocalShare { replicas },
            Self::ALLOW_ALL => FleetView::AllowAll,
            Self::DENY_ALL => FleetView::DenyAll,
            _ => FleetView::Alone,
        }
    }
}

impl Limiter {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Limiter {
            table: CounterTable::new(),
            clock,
            fleet: FleetState::default(),
            sync_soon: tokio::sync::Notify::new(),
        }
    }

    /// How the rest of the fleet is seen; the sync task sets it.
    pub fn fleet(&self) -> &FleetState {
        &self.fleet
    }

    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    pub fn counters(&self) -> &CounterTable {
        &self.table
    }

    /// Gives back a charge counted earlier in the current window (a request denied after its
    /// local counting, by a strict limit in Redis).
    pub fn give_back(&self, key: &CounterKey, charge: Counts) {
        let parts: Vec<&str> = key.parts().collect();
        let counter = key.with_parts(&parts);
        let window = counter.unit.window_at(self.clock.now_ms());
        self.table
            .pin()
            .with_counter(counter, |c| c.refund(window, charge));
    }

    /// Settles a request: charges every demand, or none. Returns whether the request is allowed
    /// and fills `outcomes` (same order and length as `demands`). Takes no lock and allocates
    /// only to create a counter that does not exist yet.
    pub fn decide(&self, demands: &[Demand<'_>], outcomes: &mut [Outcome]) -> bool {
        self.decide_in(self.fleet.get(), demands, outcomes)
    }

    /// [`Limiter::decide`] under a given view of the fleet (a strict limit whose Redis call
    /// failed falls back to the outage view).
    pub fn decide_in(
        &self,
        view: FleetView,
        demands: &[Demand<'_>],
        outcomes: &mut [Outcome],
    ) -> bool {
        debug_assert_eq!(demands.len(), outcomes.len());
        let now = self.clock.now_ms();
        let table = self.table.pin();
        let mut allowed = true;
        let (mut quota_limits, mut quota_open) = (0usize, 0usize);

        for (demand, outcome) in demands.iter().zip(outcomes.iter_mut()) {
            let unit = demand.counter.unit;
            let window = unit.window_at(now);
            outcome.until_reset = unit.until_reset(now);
            if demand.refund {
                outcome.counts = table.with_counter(demand.counter, |c| {
                    c.refund(window, demand.charge)
                        .map(|own| own.plus(c.others(window)))
                });
                outcome.over = Over::default();
                outcome.counted = false;
                continue;
            }
            // Once the request is denied, later demands are only read, so a key over its own
            // limit never takes from a budget it shares with others.
            let reading = if allowed {
                let enforce = demand.enforcement != Enforcement::Shadow;
                table.with_counter(demand.counter, |c| {
                    c.charge_in_fleet(window, demand.charge, demand.limits, enforce, view)
                })
            } else {
                match table.get(demand.counter) {
                    Some(c) => c.assess(window, demand.charge, demand.limits, view),
                    None => Reading {
                        counts: Counts::ZERO,
                        over: Over::check(Counts::ZERO, demand.charge, demand.limits),
                        counted: false,
                    },
                }
            };
            outcome.counts = reading.counts;
            outcome.over = reading.over;
            outcome.counted = reading.counted;
            match demand.enforcement {
                Enforcement::Enforce if reading.over.any() => allowed = false,
                Enforcement::Quota => {
                    quota_limits += 1;
                    quota_open += usize::from(!reading.over.any());
                }
                _ => {}
            }
        }
        if quota_limits > 0 && quota_open == 0 {
            allowed = false;
        }
        if !allowed && matches!(view, FleetView::Synced { .. }) {
            self.sync_soon.notify_one();
        }
        if !allowed {
            for (demand, outcome) in demands.iter().zip(outcomes.iter_mut()) {
                if outcome.counted {
                    // Another request may have seen these hits for a moment; the counts end exact.
                    let window = demand.counter.unit.window_at(now);
                    outcome.counts = table.with_counter(demand.counter, |c| {
                        c.refund(window, demand.charge)
                            .map(|own| own.plus(c.others(window)))
                    });
                    outcome.counted = false;
                }
            }
        }
        allowed
    }
}
