//! How counting works: the only code on the request path that touches shared state. A request
//! arrives here as a list of demands (one per counter it touches); the limiter charges them with
//! compare-and-swap, and if the request is denied it gives back what it charged, so a denied
//! request consumes nothing. Nothing here knows of tasks, Redis or protobuf.

mod algorithm;
mod clock;
mod counter;
mod fleet;
mod table;
mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use algorithm::{Algorithm, Rate, bucket_standing, bucket_terms, sliding_standing};
pub use clock::{Clock, ManualClock, SystemClock};
pub use counter::{
    Counter, Counts, Limits, Over, Pace, Reading, Stored, one_measure, saturating_u32,
};
pub use fleet::{FleetState, FleetView};
pub use table::{CounterKey, CounterRef, CounterTable};
pub use window::{Calendar, Period, Unit, Window, Zone};

/// The window a token bucket kept in leases counts in, whatever its unit: what the store's
/// bucket granted a replica is admitted within the second it was granted in, or given back. So
/// no lease is older than a second when it is spent, and the fleet admits within any span `t`
/// no more than the bucket grants within `t` and the second before it.
pub const LEASED_BUCKET_WINDOW: Unit = Unit::Second;

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
    /// The counter charged.
    pub counter: CounterRef<'a>,
    /// The limits it is judged against.
    pub limits: Limits,
    /// What this request adds.
    pub charge: Counts,
    /// Give `charge` back instead of taking it (Envoy's `is_negative_hits`).
    pub refund: bool,
    /// For holds in flight given back: when they were taken (milliseconds since the epoch),
    /// which tells the window they are counted in; none gives back the oldest.
    pub hold_taken_ms: Option<u64>,
    /// How the limits take part in the decision.
    pub enforcement: Enforcement,
}

/// What one demand came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Counts of the current window once the request is settled.
    pub counts: Counts,
    /// Which limits the charge broke.
    pub over: Over,
    /// Whether this request's charge stayed counted.
    pub counted: bool,
    /// Time until the counter's window ends.
    pub until_reset: Duration,
    /// Whether it took holds in flight (a concurrency limit's), at the settlement's time.
    pub took_hold: bool,
}

/// What a settlement came to: whether the request is allowed, and the time it was settled at
/// (milliseconds since the epoch: when its holds in flight were taken, as their release must
/// say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub allowed: bool,
    pub at_ms: u64,
}

/// Called when a request is denied while synced: the fleet view is worth refreshing before
/// the next interval.
type Waker = Box<dyn Fn() + Send + Sync>;

/// The counters, the clock, and how the rest of the fleet is seen.
pub struct Limiter {
    table: CounterTable,
    clock: Arc<dyn Clock>,
    fleet: FleetState,
    wake_sync: OnceLock<Waker>,
    /// The sync's interval (ms; 0 without a fleet store): how long a lease must last until
    /// the sync tops it up ([`Pace`]).
    sync_interval_ms: AtomicU64,
}

impl Limiter {
    /// A limiter with no counters, reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Limiter {
            table: CounterTable::new(),
            clock,
            fleet: FleetState::default(),
            wake_sync: OnceLock::new(),
            sync_interval_ms: AtomicU64::new(0),
        }
    }

    /// How the rest of the fleet is seen; the sync task sets it.
    pub fn fleet(&self) -> &FleetState {
        &self.fleet
    }

    /// Where the limiter reads the time.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// The live counters.
    pub fn counters(&self) -> &CounterTable {
        &self.table
    }

    /// Has `wake` called whenever a request is denied while synced (the sync task sets it
    /// once, to sync sooner than its interval).
    pub fn on_denial_while_synced(&self, wake: impl Fn() + Send + Sync + 'static) {
        let _ = self.wake_sync.set(Box::new(wake));
    }

    /// Tells the request path how often the sync tops leases up, so that a lease that will
    /// run out before then is flagged for a top-up ahead of need (`Over::lease_low`).
    pub fn set_sync_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.sync_interval_ms.store(ms, Ordering::Relaxed);
    }

    /// Gives back a charge counted earlier in the current window (a request denied after its
    /// local counting, by a strict limit in Redis: a store counts no wide counter).
    pub fn give_back(&self, key: &CounterKey, charge: Counts) {
        let parts: Vec<&str> = key.parts().collect();
        let counter = key.with_parts(&parts);
        let window = counter.unit.window_at(self.clock.now_ms());
        self.table
            .pin()
            .with_counter(counter, |c| c.refund(window, charge, false));
    }

    /// Settles a request: charges every demand, or none. Returns whether the request is allowed
    /// and fills `outcomes` (same order and length as `demands`). Takes no lock and allocates
    /// only to create a counter that does not exist yet.
    pub fn settle(&self, demands: &[Demand<'_>], outcomes: &mut [Outcome]) -> Settlement {
        self.settle_in(self.fleet.get(), demands, outcomes)
    }

    /// Reads what every demand would meet, charging nothing: fills `outcomes` as
    /// [`Limiter::settle`] would, without its charges.
    pub fn assess(&self, demands: &[Demand<'_>], outcomes: &mut [Outcome]) {
        let (now, view, table) = (self.clock.now_ms(), self.fleet.get(), self.table.pin());
        for (demand, outcome) in demands.iter().zip(outcomes.iter_mut()) {
            let unit = demand.counter.unit;
            let (reading, until_reset) = if !demand.limits.counted_by_algorithm() {
                let reading = read(&table, demand, unit.window_at(now), view, now);
                let until_reset = if demand.limits.refill_ms > 0 {
                    leased_bucket_reset(demand, &reading)
                } else {
                    unit.until_reset(now)
                };
                (reading, until_reset)
            } else {
                assess_by(&table, demand, now)
            };
            *outcome = Outcome {
                counts: reading.counts,
                over: reading.over,
                counted: false,
                until_reset,
                took_hold: false,
            };
        }
    }

    /// [`Limiter::settle`] under a given view of the fleet (a strict limit whose Redis call
    /// failed falls back to the outage view).
    pub fn settle_in(
        &self,
        view: FleetView,
        demands: &[Demand<'_>],
        outcomes: &mut [Outcome],
    ) -> Settlement {
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
                outcome.counts = give_back(&table, demand, window, now, demand.hold_taken_ms);
                outcome.over = Over::default();
                outcome.counted = false;
                continue;
            }
            // Once the request is denied, later demands are only read, so a key over its own
            // limit never takes from a budget it shares with others.
            let reading = if demand.limits.counted_by_algorithm() {
                let (reading, until_reset) = if allowed {
                    table.with_counter(demand.counter, |c| {
                        c.charge_by(
                            now,
                            unit.millis(),
                            demand.charge,
                            demand.limits,
                            demand.enforcement,
                        )
                    })
                } else {
                    assess_by(&table, demand, now)
                };
                outcome.until_reset = until_reset;
                reading
            } else if allowed {
                table.with_counter(demand.counter, |c| {
                    let pace = match view {
                        FleetView::Synced { .. } => Pace {
                            into_window_ms: now.saturating_sub(unit.window_start_ms(window)),
                            horizon_ms: self.sync_interval_ms.load(Ordering::Relaxed),
                            left_ms: outcome.until_reset.as_millis() as u64,
                        },
                        _ => Pace::NONE,
                    };
                    let mut reading = c.charge_in_fleet(
                        window,
                        demand.charge,
                        demand.limits,
                        demand.enforcement,
                        (view, pace),
                        now,
                    )?;
                    if reading.over.requests || reading.over.tokens {
                        let (stamp, own) = c.local();
                        let own = if stamp == window { own.requests } else { 0 };
                        let background =
                            !reading.over.tokens && pace.long_window() && pace.expects_another(own);
                        match opened_since_asked(demand, c, view, now, background) {
                            Opened::Background => reading.over.recheck = true,
                            Opened::Ask => reading.over.lease_spent = true,
                            Opened::No => {}
                        }
                    }
                    Ok(reading)
                })
            } else {
                read(&table, demand, window, view, now)
            };
            if demand.limits.refill_ms > 0 {
                outcome.until_reset = leased_bucket_reset(demand, &reading);
            }
            outcome.counts = reading.counts;
            outcome.over = reading.over;
            outcome.counted = reading.counted;
            outcome.took_hold = reading.counted && demand.limits.algorithm == Algorithm::InFlight;
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
        if !allowed
            && matches!(view, FleetView::Synced { .. })
            && let Some(wake) = self.wake_sync.get()
        {
            wake();
        }
        if !allowed {
            for (demand, outcome) in demands.iter().zip(outcomes.iter_mut()) {
                if outcome.counted {
                    // Another request may have seen these hits for a moment; the counts end exact.
                    let window = demand.counter.unit.window_at(now);
                    outcome.counts = give_back(&table, demand, window, now, Some(now));
                    outcome.counted = false;
                    outcome.took_hold = false;
                }
            }
        }
        Settlement {
            allowed,
            at_ms: now,
        }
    }
}

/// A token bucket kept in leases: its reset, from the fleet's count as the demand met it.
fn leased_bucket_reset(demand: &Demand<'_>, reading: &Reading) -> Duration {
    let Algorithm::TokenBucket { burst } = demand.limits.algorithm else {
        return Duration::ZERO;
    };
    let (used, charge, limit) = match (demand.limits.requests, demand.limits.tokens) {
        (Some(limit), _) => (
            reading.counts.requests.into(),
            demand.charge.requests.into(),
            limit,
        ),
        (None, Some(limit)) => (
            reading.counts.tokens,
            demand.charge.tokens,
            saturating_u32(limit),
        ),
        (None, None) => return Duration::ZERO,
    };
    let rate = algorithm::Rate {
        limit,
        unit_ms: demand.limits.refill_ms,
    };
    algorithm::leased_bucket_reset(used, charge, reading.over.any(), burst, rate)
}

/// Whether `demand` is a sliding window kept in leases whose budget has opened since its
/// counter last asked the store, so that a fleet the store found spent is not taken at its
/// word: the previous window's weight falls until the window's end, and what opens after the
/// last call to the store goes to whoever asks. A request refused asks again once the view is
/// a 64th of the window old per replica (a full previous window has faded by a 64th of the
/// limit, the bound a replica's unused lease keeps, for each replica since: together the
/// fleet asks about as often as one replica would every 64th), and at every refusal in the
/// window's last 20th (50 ms at most), where what opens is lost if no one asks before the
/// end. Trusting a spent view longer (100 ms, doubling at each call) left per-second windows
/// 174 to 199 of 200 with 80 % of the load on one replica; a 64th whatever the fleet's size
/// put 44 to 65 % of decisions on the request path. `background`: a busy counter in a long
/// window ([`Pace::long_window`]), whose refusal stands while the store is asked in the
/// background once the view is a 64th of the window old, whatever the fleet's size: that call
/// delays no request.
fn opened_since_asked(
    demand: &Demand<'_>,
    counter: &Counter,
    view: FleetView,
    now_ms: u64,
    background: bool,
) -> Opened {
    const LAST_MS: u64 = 50;
    let unit = demand.counter.unit;
    let FleetView::Synced { replicas } = view else {
        return Opened::No;
    };
    if !demand.limits.leased || demand.limits.algorithm != Algorithm::SlidingWindow {
        return Opened::No;
    }
    let ago = counter.fleet_read_ago(unit.window_at(now_ms), now_ms);
    if background && ago.is_some_and(|ago| ago >= unit.millis() / 64) {
        return Opened::Background;
    }
    let at_its_end =
        (unit.until_reset(now_ms).as_millis() as u64) <= (unit.millis() / 20).min(LAST_MS);
    if at_its_end || ago.is_some_and(|ago| ago >= unit.millis() * u64::from(replicas) / 64) {
        Opened::Ask
    } else {
        Opened::No
    }
}

/// Whether a refused sliding window asks the store for what opened since its last call.
enum Opened {
    No,
    /// In the background; the refusal stands.
    Background,
    /// On the request path, with the call that needs it.
    Ask,
}

/// What `demand` would meet in `window`, charging nothing (a counter not yet created is empty).
fn read(
    table: &table::PinnedTable<'_>,
    demand: &Demand<'_>,
    window: Window,
    view: FleetView,
    now_ms: u64,
) -> Reading {
    match table.get(demand.counter) {
        Some(c) => c.assess(window, demand.charge, demand.limits, view, now_ms),
        None => Reading {
            counts: Counts::ZERO,
            over: Over::check(Counts::ZERO, demand.charge, demand.limits),
            counted: false,
        },
    }
}

/// What `demand` would meet under a sliding window or a token bucket, charging nothing, and
/// the time until its reset.
fn assess_by(
    table: &table::PinnedTable<'_>,
    demand: &Demand<'_>,
    now_ms: u64,
) -> (Reading, Duration) {
    let unit_ms = demand.counter.unit.millis();
    match table.get(demand.counter) {
        Some(c) => c.assess_by(now_ms, unit_ms, demand.charge, demand.limits),
        None => Counter::new().assess_by(now_ms, unit_ms, demand.charge, demand.limits),
    }
}

/// Gives `demand`'s charge back in `window` (at `now_ms`; holds in flight taken at
/// `hold_taken_ms`), returning the fleet's counts after it.
fn give_back(
    table: &table::PinnedTable<'_>,
    demand: &Demand<'_>,
    window: Window,
    now_ms: u64,
    hold_taken_ms: Option<u64>,
) -> Counts {
    if demand.limits.counted_by_algorithm() {
        let unit_ms = demand.counter.unit.millis();
        return table.with_counter(demand.counter, |c| {
            c.refund_by(now_ms, unit_ms, demand.charge, demand.limits, hold_taken_ms)
        });
    }
    table.with_counter(demand.counter, |c| {
        c.refund(window, demand.charge, demand.limits.wide)
            .map(|own| own.plus(c.others(window)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sliding window kept in leases: the store last said the rest of the fleet holds the
    /// whole limit. Read moments ago, a refusal trusts that (no call to the store); once the
    /// view is a 64th of the window old per replica, or in the window's last 50 ms, the weight
    /// has fallen since, and the refusal asks the store. A fixed window trusts it to the end:
    /// its budget opens only with the next window.
    #[test]
    fn a_refused_sliding_window_asks_the_store_once_budget_has_opened() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limiter = Limiter::new(clock.clone());
        limiter.fleet().set(FleetView::Synced { replicas: 2 });
        // The fleet read as spent at `read_ms` into a one-second window, then a request at
        // `ms`: one request against a requests limit, or a check of a tokens limit.
        let asks = |read_ms: u64, ms: u64, algorithm: Algorithm, tokens: bool| {
            clock.set_ms(1_000_000 + read_ms);
            let limits = Limits {
                requests: (!tokens).then_some(10),
                tokens: tokens.then_some(10),
                algorithm,
                leased: true,
                ..Limits::default()
            };
            let counter = CounterRef {
                scope: u64::from(algorithm.is_fixed()) + 2 * u64::from(tokens),
                unit: Unit::Second,
                parts: &["k"],
            };
            let window = Unit::Second.window_at(clock.now_ms());
            let table = limiter.counters().pin();
            table.with_counter(counter, |c| {
                let others = Stored {
                    fleet: Counts {
                        requests: 10,
                        tokens: 10,
                    },
                    fades: !algorithm.is_fixed(),
                    ..Stored::default()
                };
                c.synced(window, others, clock.now_ms());
                Ok(())
            });
            drop(table);
            clock.set_ms(1_000_000 + ms);
            let demand = Demand {
                counter,
                limits,
                charge: Counts {
                    requests: u32::from(!tokens),
                    tokens: 0,
                },
                refund: false,
                hold_taken_ms: None,
                enforcement: Enforcement::Enforce,
            };
            let mut outcome = [Outcome::default()];
            assert!(!limiter.settle(&[demand], &mut outcome).allowed);
            outcome[0].over.lease_spent
        };
        let (sliding, fixed) = (Algorithm::SlidingWindow, Algorithm::FixedWindow);
        for tokens in [false, true] {
            let spent = |read_ms, ms, algorithm| asks(read_ms, ms, algorithm, tokens);
            let what = if tokens { "tokens" } else { "requests" };
            assert!(
                !spent(500, 500, sliding),
                "{what}: mid-window, read just now"
            );
            assert!(!spent(940, 940, sliding), "{what}: 60 ms before the end");
            assert!(spent(960, 960, sliding), "{what}: in the last 50 ms");
            assert!(!spent(960, 960, fixed), "{what}: a fixed window");
            // Two replicas: a view read 2 x 1000 / 64 ms ago or more has seen a 64th of a
            // full previous window fade for each.
            assert!(!spent(500, 528, sliding), "{what}: read 28 ms ago");
            assert!(spent(500, 532, sliding), "{what}: read 32 ms ago");
            assert!(!spent(500, 532, fixed), "{what}: a fixed window, 32 ms");
        }
    }

    /// In a window long against the sync interval (a minute, syncing every second), a busy
    /// sliding window refused on a view of a spent fleet no longer fresh asks the store in
    /// the background ([`Over::recheck`]): what opened serves the calls after it, and the
    /// refused call waits on no store. In a second (the test above) it asks on the request
    /// path.
    #[test]
    fn a_busy_sliding_window_in_a_long_window_asks_again_in_the_background() {
        let clock = Arc::new(ManualClock::new(60_000_000));
        let limiter = Limiter::new(clock.clone());
        limiter.fleet().set(FleetView::Synced { replicas: 3 });
        limiter.set_sync_interval(Duration::from_secs(1));
        let limits = Limits {
            requests: Some(60),
            algorithm: Algorithm::SlidingWindow,
            leased: true,
            ..Limits::default()
        };
        let counter = CounterRef {
            scope: 7,
            unit: Unit::Minute,
            parts: &["k"],
        };
        let demand = Demand {
            counter,
            limits,
            charge: Counts {
                requests: 1,
                tokens: 0,
            },
            refund: false,
            hold_taken_ms: None,
            enforcement: Enforcement::Enforce,
        };
        // 30 s into the minute, the store grants this replica 5 and says the fleet holds all
        // 60 (the previous minute's weight included); the 5 are admitted, the sixth refused on
        // the fresh view.
        clock.set_ms(60_000_000 + 30_000);
        let window = Unit::Minute.window_at(clock.now_ms());
        limiter.counters().pin().with_counter(counter, |c| {
            let stored = Stored {
                fleet: Counts {
                    requests: 60,
                    tokens: 0,
                },
                held: Counts {
                    requests: 5,
                    tokens: 0,
                },
                granted: Counts {
                    requests: 5,
                    tokens: 0,
                },
                fades: true,
                ..Stored::default()
            };
            c.synced(window, stored, clock.now_ms());
            Ok(())
        });
        let mut outcome = [Outcome::default()];
        for _ in 0..5 {
            assert!(limiter.settle(&[demand], &mut outcome).allowed);
        }
        let refused = |ms: u64| {
            clock.set_ms(60_000_000 + 30_000 + ms);
            let mut outcome = [Outcome::default()];
            assert!(!limiter.settle(&[demand], &mut outcome).allowed);
            (outcome[0].over.recheck, outcome[0].over.lease_spent)
        };
        assert_eq!(refused(50), (false, false), "read 50 ms ago: trusted");
        assert_eq!(
            refused(500),
            (true, false),
            "read 500 ms ago: in the background"
        );
        // Past a 64th of the minute (937.5 ms), however long the view was trusted.
        assert_eq!(
            refused(3_000),
            (true, false),
            "3 s ago: in the background still"
        );
    }
}
