//! One counter: a window stamp and the request and token counts of that window, in one atomic
//! word that a single compare-and-swap changes.
//!
//! Layout of the 128-bit word, high to low:
//!
//! ```text
//! | window: u32 | lease: u32 | requests: u32 | tokens: u32 |
//! ```
//!
//! The window stamp lives beside the counts so that rolling into a new window and counting in it
//! is one atomic step: no thread can add to a window another thread has just reset, and no lock
//! is needed. Counts are u32 because every limit is (the Envoy API carries `requests_per_unit` as
//! u32); they saturate instead of wrapping. With a fleet store, the lease is the requests the
//! store set aside for this replica in the window (zero alone): in the same word as the count,
//! so admitting from it and the sync lowering it are one compare-and-swap each, and no request
//! can admit past what the replica holds. `u32::MAX` as a window marks a counter the sweeper
//! has retired: an increment can never land in a counter that has left the table.
//!
//! With a fleet store (Redis) configured, two more words ride along, written only by the sync
//! task: `pushed`, the counts already sent to the store, and `others`, what the rest of the fleet
//! had counted in the window at the last sync (for requests, what they hold in leases). They
//! are read by requests, and written only by the sync and by a request that took a lease. The
//! reserved half of `others` holds when the store was last read for the counter (in wrapping
//! milliseconds); a counter never read has none, and the sync syncs it at once.
//!
//! A fourth, smaller word, `ahead`, holds a lease the sync took for the next window in the
//! last round of this one (window and requests). It is not part of the counter word, so no
//! request admits from it until one claims it ([`Counter::claim_ahead`]): a compare-and-swap
//! empties it, and only the request that emptied it adds it to the lease, so it is added once.

use std::time::Duration;

use portable_atomic::{AtomicU64, AtomicU128, Ordering};

use super::Enforcement;
use super::algorithm::{self, Algorithm, Judged, Rate};
use super::fleet::{FleetCounts, FleetView, judge};
use super::window::Window;

const RETIRED: u32 = u32::MAX;

/// Requests and tokens, counted or charged together. Tokens are 64-bit: a monthly budget
/// can pass `u32::MAX`, which bounds every requests limit (the Envoy API's field).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests (or hits) counted.
    pub requests: u32,
    /// Tokens counted.
    pub tokens: u64,
}

impl Counts {
    /// `used` in the slot of its measure (a counter of one measure: a sliding window's, a
    /// token bucket's).
    pub fn in_slot(used: u32, tokens: bool) -> Counts {
        if tokens {
            Counts {
                requests: 0,
                tokens: used.into(),
            }
        } else {
            Counts {
                requests: used,
                tokens: 0,
            }
        }
    }

    /// Nothing counted.
    pub const ZERO: Counts = Counts {
        requests: 0,
        tokens: 0,
    };

    /// Whether both counts are zero.
    pub fn is_zero(self) -> bool {
        self == Counts::ZERO
    }

    /// Both counts added, saturating.
    pub fn plus(self, other: Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_add(other.requests),
            tokens: self.tokens.saturating_add(other.tokens),
        }
    }

    /// Both counts less `other`'s, never below zero.
    pub fn minus(self, other: Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(other.requests),
            tokens: self.tokens.saturating_sub(other.tokens),
        }
    }
}

/// The limits checked against one counter: either may be absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// The requests-like limit, if any.
    pub requests: Option<u32>,
    /// The tokens limit, if any.
    pub tokens: Option<u64>,
    /// How they count. A sliding window or a token bucket counts one measure a counter, so
    /// it sets one of the two.
    pub algorithm: Algorithm,
    /// The counter holds a tokens budget configured above `u32::MAX` a window: its word keeps
    /// 64 bits of tokens in place of the requests count and lease (the rule compiler gives
    /// such a limit a counter of its own). Fixed for the counter's life, so it follows the
    /// limit as written, not the limit in force that a capacity factor scales.
    pub wide: bool,
    /// The limits are kept fleet-wide in leases from a store (Redis). The counter is then the
    /// fixed-window word whatever the algorithm: a replica admits what it holds, and the store
    /// applies a sliding window when it grants a lease. Fixed for the process's life.
    pub leased: bool,
    /// A token bucket kept in leases: the length of the unit its limit refills in (ms). Its
    /// counter counts in windows of a second (`LEASED_BUCKET_WINDOW`); this is what
    /// its reset and its share during an outage are reckoned from. Zero otherwise.
    pub refill_ms: u64,
}

impl Limits {
    /// Whether the counter's word is the algorithm's own (`limiter::algorithm`) rather than the
    /// fixed-window word: a sliding window or a token bucket decided by this replica alone.
    pub fn counted_by_algorithm(&self) -> bool {
        !self.algorithm.is_fixed() && !self.leased
    }
}

/// Which of a counter's limits a charge would break.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Over {
    pub requests: bool,
    pub tokens: bool,
    /// Over only where this replica's leases (requests, tokens) are spent, while the fleet
    /// had budget left at the last sync: fresh leases from the store may admit it.
    pub lease_spent: bool,
    /// Admitted, and the charge took this replica's requests lease down to its low water
    /// ([`low_water`]) while the fleet had budget left, at a pace that spends the rest before
    /// the next sync: worth topping up now, in the background, so that the next calls find
    /// lease and none waits on the store.
    pub lease_low: bool,
    /// Refused on a view of the fleet's requests budget spent, read a while ago (a fixed
    /// window, where only a lease given back reopens it): the refusal stands, and the store
    /// is asked again in the background, for the calls after this one.
    pub recheck: bool,
}

impl Over {
    /// Whether either limit would break.
    pub fn any(self) -> bool {
        self.requests || self.tokens
    }

    /// Which limits `charge` would break on top of `used`.
    pub fn check(used: Counts, charge: Counts, limits: Limits) -> Over {
        Over {
            requests: breaks(
                used.requests.into(),
                charge.requests.into(),
                limits.requests.map(u64::from),
            ),
            tokens: breaks(used.tokens, charge.tokens, limits.tokens),
            lease_spent: false,
            lease_low: false,
            recheck: false,
        }
    }
}

/// What is left of a requests lease when it is topped up ahead of need: half of the 64th of
/// the limit a replica may hold unused in a fleet, at least one unit. Leases kept that small
/// (a limit of 200 a second leaves each replica 3 unused) ran out every few calls, and 14 to
/// 23 % of the decisions of three replicas offered 1.5x to 3x such a limit waited on the store.
pub fn low_water(limit: u32) -> u32 {
    (limit / 128).max(1)
}

/// How fast a counter spends its lease, as the request path sees it: how far into its window
/// the charge comes, and how long until the sync tops leases up (its interval; none without a
/// fleet store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pace {
    pub into_window_ms: u64,
    pub horizon_ms: u64,
    /// What is left of the window.
    pub left_ms: u64,
}

impl Pace {
    /// No sync to wait for: nothing is topped up ahead of need.
    pub const NONE: Pace = Pace {
        into_window_ms: 0,
        horizon_ms: 0,
        left_ms: 0,
    };

    /// Whether, at the rate `admitted` came in the window so far, another call is due before
    /// the window ends: then what a refused call asks of the store in the background serves
    /// the calls after it. A counter too quiet for that asks on the request path, with the
    /// call that needs it: a unit claimed for a call that never comes is lost to the window.
    pub fn expects_another(self, admitted: u32) -> bool {
        self.horizon_ms > 0 && u64::from(admitted) * self.left_ms >= self.into_window_ms.max(1)
    }

    /// Whether the window is long against the sync interval (ten rounds or more): a sliding
    /// window's budget then opens by many units between rounds, and a refusal on a view read
    /// a while ago is worth a call in the background ([`Over::recheck`]). In a short one (a
    /// second, at the default interval) a 64th opens every 16 ms, and the call refused while
    /// a background call claims it is a large share of what the window admits.
    pub fn long_window(self) -> bool {
        self.horizon_ms > 0
            && self.into_window_ms.saturating_add(self.left_ms) >= 10 * self.horizon_ms
    }

    /// Whether `left` will be spent within the horizon at the rate `admitted` came in the
    /// window so far. A counter that spends its lease slower waits for the sync: topping up
    /// every quiet counter that took its last units would cost a call per key per window.
    pub fn spends(self, admitted: u32, left: u32) -> bool {
        self.horizon_ms > 0
            && u64::from(admitted) * self.horizon_ms >= u64::from(left) * self.into_window_ms.max(1)
    }
}

/// A count or limit as 32 bits, saturating: where a figure is known to fit (requests limits,
/// leases, the other algorithms' limits) or is clamped by rule.
pub fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A zero charge only checks: it is over when the budget is already spent.
pub(super) fn breaks(used: u64, charge: u64, limit: Option<u64>) -> bool {
    match limit {
        None => false,
        Some(limit) if charge == 0 => used >= limit,
        Some(limit) => used.saturating_add(charge) > limit,
    }
}

/// What a counter said to a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The counts of the window after the charge, or as they stand when the charge was refused.
    pub counts: Counts,
    pub over: Over,
    /// Whether the charge was added.
    pub counted: bool,
}

/// How long what the store said of the rest of the fleet is trusted to refuse a request
/// without asking again, at first: a replica that gave its lease back (it stopped, or went
/// idle) is seen by the others within this, not at their next sync. Each time the store is
/// asked again and nothing has changed, the trust doubles, up to [`FRESH_MAX_DOUBLINGS`]
/// doublings (3.2 s): a spent fleet costs a replica a few calls a window, not ten a second.
const FRESH_MS: u64 = 100;
const FRESH_MAX_DOUBLINGS: u32 = 5;

/// The note of a synced word: when the store was read (in 4 ms ticks, wrapping, in the low
/// 28 bits; never 0, which is "never read") and a mark in the high 4 bits. In the others'
/// word the mark is how many times the trust has doubled; in the pushed word, whether the
/// rest of the fleet had admitted in the window (1) or not (0). The others' word's mark may
/// also be [`SPENT_FOR_GOOD`].
fn stamp(now_ms: u64, mark: u32) -> u32 {
    let ticks = ((now_ms / 4) as u32 & 0x0fff_ffff).max(1);
    let mark = if mark == SPENT_FOR_GOOD {
        mark
    } else {
        mark.min(FRESH_MAX_DOUBLINGS)
    };
    (mark << 28) | ticks
}

/// The others' word's mark for a view the store said is spent for the rest of its window
/// ([`Stored::spent_for_good`]): fresh until the window ends.
const SPENT_FOR_GOOD: u32 = 0xf;

/// The mark [`stamp`] put in `note`'s high bits.
fn mark_of(note: u32) -> u32 {
    note >> 28
}

/// Whether a view stamped `note` is still fresh at `now_ms`.
fn fresh(note: u32, now_ms: u64) -> bool {
    let doublings = mark_of(note);
    doublings == SPENT_FOR_GOOD
        || age_of(note, now_ms).is_some_and(|age| age < FRESH_MS << doublings)
}

/// How long ago (ms, to 4 ms) a view stamped `note` was read; none if never.
fn age_of(note: u32, now_ms: u64) -> Option<u64> {
    let ticks = note & 0x0fff_ffff;
    let age = ((now_ms / 4) as u32 & 0x0fff_ffff).wrapping_sub(ticks) & 0x0fff_ffff;
    (ticks != 0).then_some(u64::from(age) * 4)
}

/// What the fleet store holds of one counter's window after a sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// This replica's counts in the store: requests admitted, tokens reported.
    pub pushed: Counts,
    /// The fleet's leases: requests and tokens leased to all replicas (tokens reported past
    /// a lease count as leased).
    pub fleet: Counts,
    /// What is leased to this replica, as the store has it.
    pub held: Counts,
    /// What this call granted it.
    pub granted: Counts,
    /// `fleet` holds a sliding window's previous window, weighed as of the call: it falls as
    /// the window goes on, which is no lease given back to look for sooner.
    pub fades: bool,
    /// The tokens this replica had reported when the call was made: the store raised its
    /// tokens lease to that (if more) before granting, and so does the counter, or a grant
    /// that follows a report past the lease would be partly spent on tokens already counted
    /// (a replica reported 200 on a lease of 75 and was granted 31: it held 106 of the 231 the
    /// store set aside for it, and was refused with 31 its own). Not what it said it held: a
    /// give-back sent since would be held again.
    pub tokens_counted: u64,
    /// What the fleet has admitted in the window, as pushed (this replica's included).
    pub fleet_admitted: u32,
    /// A fixed window's requests budget is all leased and no other replica holds any of it
    /// unused, as last pushed: nothing can be given back in this window, so a refusal on it
    /// stands until the window ends, with no need to ask again (a raised limit aside).
    pub spent_for_good: bool,
    /// `fleet` is a token bucket's, which refills all the time: a spent fleet is trusted for
    /// the first [`FRESH_MS`] only, never twice as long, or what refills meanwhile could
    /// overflow the bucket unclaimed.
    pub refills: bool,
}

/// What a window-stamped lease word (window in the high half, units in the low) holds for
/// `window`: nothing when it was stamped for another.
fn held_in(word: u64, window: Window) -> u32 {
    if (word >> 32) as u32 == window.0 {
        word as u32
    } else {
        0
    }
}

/// The counter was retired by the sweeper between lookup and use; look it up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired;

/// One counter's atomic words: its own counts, and what the sync last learnt of the fleet.
#[derive(Debug)]
pub struct Counter {
    word: AtomicU128,
    /// What the sync last pushed: window, counts, and a note whose low bits stamp when and
    /// whose high bits say whether the rest of the fleet had admitted in that window.
    pushed: AtomicU128,
    others: AtomicU128,
    /// A lease of the next window, taken before it began: window (high half), requests. A
    /// sliding window takes none: its word keeps instead what the counter held unused when
    /// its window closed, for the sync to give back (the next window weighs what was leased).
    ahead: AtomicU64,
    /// The tokens this replica holds in its lease for a window: window (high half), tokens.
    /// Apart from the counter word: a check only compares the tokens reported with it, and a
    /// report is counted whatever the lease.
    tokens_lease: AtomicU64,
}

/// A counter word unpacked: a window stamp, the note in the reserved word, and the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    window: u32,
    note: u32,
    counts: Counts,
}

impl Word {
    fn new(window: u32, counts: Counts) -> Word {
        Word {
            window,
            note: 0,
            counts,
        }
    }

    fn pack(self) -> u128 {
        self.pack_as(false)
    }

    fn unpack(word: u128) -> Word {
        Word::unpack_as(word, false)
    }

    /// Packed in a wide counter's layout or the usual one. The usual keeps 32 bits of tokens,
    /// saturating (its limits are at most `u32::MAX`: only a shadow count goes past); a wide
    /// counter keeps 64 bits of tokens where the note and requests would be, and neither.
    ///
    /// ```text
    /// usual: | window: u32 | note: u32 | requests: u32 | tokens: u32 |
    /// wide:  | window: u32 | 0: u32    | tokens: u64                 |
    /// ```
    fn pack_as(self, wide: bool) -> u128 {
        let window = u128::from(self.window) << 96;
        if wide {
            return window | u128::from(self.counts.tokens);
        }
        let tokens = self.counts.tokens.min(u64::from(u32::MAX));
        window
            | (u128::from(self.note) << 64)
            | (u128::from(self.counts.requests) << 32)
            | u128::from(tokens)
    }

    fn unpack_as(word: u128, wide: bool) -> Word {
        if wide {
            return Word {
                window: (word >> 96) as u32,
                note: 0,
                counts: Counts {
                    requests: 0,
                    tokens: word as u64,
                },
            };
        }
        Word {
            window: (word >> 96) as u32,
            note: (word >> 64) as u32,
            counts: Counts {
                requests: (word >> 32) as u32,
                tokens: u64::from(word as u32),
            },
        }
    }

    fn load(atomic: &AtomicU128) -> Word {
        Word::unpack(atomic.load(Ordering::Acquire))
    }

    /// The counts if the word holds `window`, else zero.
    fn counts_in(self, window: Window) -> Counts {
        if self.window == window.0 {
            self.counts
        } else {
            Counts::ZERO
        }
    }
}

/// What one step of [`Counter::update`] decides.
enum Step<T> {
    /// Leave the word as it is, and answer `T`.
    Keep(T),
    /// Write this word (if no other thread wrote first), and answer `T`.
    Write(Word, T),
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new()
    }
}

impl Counter {
    /// An empty counter.
    pub fn new() -> Self {
        Counter {
            word: AtomicU128::new(0),
            pushed: AtomicU128::new(0),
            others: AtomicU128::new(0),
            ahead: AtomicU64::new(0),
            tokens_lease: AtomicU64::new(0),
        }
    }

    /// The one compare-and-swap loop every change goes through: `step` sees the word as it is
    /// and says what to write; if another thread wrote in between, `step` runs again on what
    /// that thread wrote. A retired counter takes no step.
    fn update<T>(&self, step: impl FnMut(Word) -> Step<T>) -> Result<T, Retired> {
        self.update_as(false, step)
    }

    /// [`Counter::update`] of a counter laid out wide (`wide`) or as usual.
    fn update_as<T>(
        &self,
        wide: bool,
        mut step: impl FnMut(Word) -> Step<T>,
    ) -> Result<T, Retired> {
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let word = Word::unpack_as(current, wide);
            if word.window == RETIRED {
                return Err(Retired);
            }
            let (next, answer) = match step(word) {
                Step::Keep(answer) => return Ok(answer),
                Step::Write(next, answer) => (next, answer),
            };
            match self.word.compare_exchange_weak(
                current,
                next.pack_as(wide),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(answer),
                Err(actual) => current = actual,
            }
        }
    }

    /// The counts of `window`: zero when the counter holds an older window. `wide`: the
    /// counter is laid out for a tokens budget above `u32::MAX` ([`Limits::wide`]).
    pub fn counts(&self, window: Window, wide: bool) -> Counts {
        let word = Word::unpack_as(self.word.load(Ordering::Acquire), wide);
        if word.window == RETIRED || word.window < window.0 {
            Counts::ZERO
        } else {
            word.counts
        }
    }

    /// Adds `charge` to `window` unless the charge is enforced and a limit would break; then
    /// nothing is added. A shadow charge is always added, saturating.
    pub fn charge(
        &self,
        window: Window,
        charge: Counts,
        limits: Limits,
        enforcement: Enforcement,
    ) -> Result<Reading, Retired> {
        self.charge_in_fleet(
            window,
            charge,
            limits,
            enforcement,
            (FleetView::Alone, Pace::NONE),
            0,
        )
    }

    /// [`Counter::charge`], judged against the fleet as `view` sees it at `now_ms`. The counts
    /// reported are the fleet's: this replica's plus the others' at the last sync.
    pub fn charge_in_fleet(
        &self,
        window: Window,
        charge: Counts,
        limits: Limits,
        enforcement: Enforcement,
        (view, pace): (FleetView, Pace),
        now_ms: u64,
    ) -> Result<Reading, Retired> {
        let fleet = self.fleet_counts_for(window, view, now_ms);
        // Only fixed and sliding windows' leases are kept to a 64th unused; a token bucket's
        // grants are sized by what the bucket holds.
        let low_water = match (view, limits.requests) {
            (FleetView::Synced { .. }, Some(limit)) if limits.refill_ms == 0 => {
                Some((limit, low_water(limit)))
            }
            _ => None,
        };
        let enforce = enforcement != Enforcement::Shadow;
        let mut closed = None;
        let reading = self.update_as(limits.wide, |word| {
            // Another thread may already have rolled into the next window on a clock read a
            // moment later than ours: count in the newer window rather than reset it. A new
            // window starts with no lease.
            closed = (word.window < window.0).then_some(word);
            let (stamp, held, counts) = if word.window < window.0 {
                (window.0, 0, Counts::ZERO)
            } else {
                (word.window, word.note, word.counts)
            };
            let fleet = FleetCounts {
                held: Counts {
                    requests: held,
                    ..fleet.held
                },
                ..fleet
            };
            let background = pace.expects_another(counts.requests)
                && (limits.algorithm.is_fixed() || pace.long_window());
            let over = judge(counts, charge, limits, fleet, (view, background));
            if (enforce && over.any()) || charge.is_zero() {
                return Step::Keep(Reading {
                    counts: counts.plus(fleet.others),
                    over,
                    counted: false,
                });
            }
            let after = counts.plus(charge);
            let mut over = over;
            if let Some((limit, low)) = low_water {
                let (before, left) = (
                    held.saturating_sub(counts.requests),
                    held.saturating_sub(after.requests),
                );
                let fleet_spent =
                    u64::from(held) + u64::from(fleet.others.requests) >= u64::from(limit);
                // Crossing the low water, once per grant; or, in a long window, a grant under
                // it (what a sliding window opened since the last call, or a nearly spent
                // fleet had left) spent to its last unit while the next call is due before
                // the sync. In a short one (a second) the quiet replicas of a fleet would
                // each hold that top-up idle while the busy one is refused (10 replicas, 80 %
                // of the load on one: a window of 195 of 200).
                let crossed = before > low && left <= low && pace.spends(after.requests, left);
                let emptied =
                    left == 0 && before > 0 && pace.long_window() && pace.spends(after.requests, 1);
                over.lease_low = (crossed || emptied) && !fleet_spent;
            }
            let reading = Reading {
                counts: after.plus(fleet.others),
                over,
                counted: true,
            };
            Step::Write(
                Word {
                    window: stamp,
                    note: held,
                    counts: after,
                },
                reading,
            )
        })?;
        // The step that wrote ran last: `closed` is the word it replaced, if it rolled over.
        if reading.counted
            && ((limits.algorithm == Algorithm::SlidingWindow && limits.leased)
                || limits.refill_ms > 0)
            && let Some(word) = closed
        {
            self.keep_closed(word);
        }
        Ok(reading)
    }

    /// Keeps what a sliding window's counter held unused in the window `word` closed, for the
    /// sync to give back ([`Counter::take_closed`]).
    fn keep_closed(&self, word: Word) {
        let unused = word.note.saturating_sub(word.counts.requests);
        if unused > 0 && word.window != 0 {
            self.ahead.store(
                (u64::from(word.window) << 32) | u64::from(unused),
                Ordering::Release,
            );
        }
    }

    /// What this sliding window's counter (or token bucket's, kept in leases) held unused when
    /// `window` closed, once: the caller gives it back to the store, so the next window no
    /// longer weighs it (the bucket holds it again).
    pub fn take_closed(&self, window: Window) -> u32 {
        self.take_ahead(window)
    }

    /// Gives back `amount` counted earlier in `window`, never below zero. Nothing happens when the
    /// window has already rolled over: those hits belong to a window that is gone. `wide` as
    /// for [`Counter::counts`].
    pub fn refund(&self, window: Window, amount: Counts, wide: bool) -> Result<Counts, Retired> {
        self.update_as(wide, |word| {
            if word.window != window.0 {
                return Step::Keep(if word.window > window.0 {
                    word.counts
                } else {
                    Counts::ZERO
                });
            }
            let after = word.counts.minus(amount);
            Step::Write(
                Word {
                    counts: after,
                    ..word
                },
                after,
            )
        })
    }

    /// What `charge` would meet, without adding it: fleet counts and the limits it would break.
    pub fn assess(
        &self,
        window: Window,
        charge: Counts,
        limits: Limits,
        view: FleetView,
        now_ms: u64,
    ) -> Reading {
        let word = Word::unpack_as(self.word.load(Ordering::Acquire), limits.wide);
        let (local, held) = if word.window == RETIRED || word.window < window.0 {
            (Counts::ZERO, 0)
        } else {
            (word.counts, word.note)
        };
        let fleet = self.fleet_counts_for(window, view, now_ms);
        let fleet = FleetCounts {
            held: Counts {
                requests: held,
                ..fleet.held
            },
            ..fleet
        };
        Reading {
            counts: local.plus(fleet.others),
            over: judge(local, charge, limits, fleet, (view, false)),
            counted: false,
        }
    }

    /// What the last sync learnt of the fleet in `window`, where the view uses it (the lease
    /// is read with the counts, in the same word).
    fn fleet_counts_for(&self, window: Window, view: FleetView, now_ms: u64) -> FleetCounts {
        match view {
            FleetView::Synced { .. } => {
                let others = Word::load(&self.others);
                FleetCounts {
                    fresh: others.window == window.0 && fresh(others.note, now_ms),
                    ..self.fleet_counts(window)
                }
            }
            // What it holds of the tokens budget stays its own to spend while the store is
            // away, as its requests lease does.
            _ => FleetCounts {
                held: Counts {
                    requests: 0,
                    tokens: self.tokens_lease(window),
                },
                ..FleetCounts::default()
            },
        }
    }

    /// How long ago (ms) the store was last read for `window`; none if not in it.
    pub fn fleet_read_ago(&self, window: Window, now_ms: u64) -> Option<u64> {
        let others = Word::load(&self.others);
        (others.window == window.0)
            .then(|| age_of(others.note, now_ms))
            .flatten()
    }

    fn fleet_counts(&self, window: Window) -> FleetCounts {
        FleetCounts {
            others: Word::load(&self.others).counts_in(window),
            held: Counts {
                requests: 0,
                tokens: self.tokens_lease(window),
            },
            fresh: false,
        }
    }

    /// The tokens this replica holds in its lease for `window`. Leases are 32-bit: a fleet
    /// store counts no wide counter ([`Limits::wide`]).
    pub fn tokens_lease(&self, window: Window) -> u64 {
        held_in(self.tokens_lease.load(Ordering::Acquire), window).into()
    }

    /// Adds what the store granted to the tokens lease of `window` (added, not set, as
    /// [`Counter::leased`]); a grant for a window gone is dropped.
    fn leased_tokens(&self, window: Window, granted: u64, holding: u64) {
        let (granted, holding) = (saturating_u32(granted), saturating_u32(holding));
        if granted == 0 {
            return;
        }
        let _ = self
            .tokens_lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (stamp, held) = ((word >> 32) as u32, word as u32);
                let held = match stamp.cmp(&window.0) {
                    std::cmp::Ordering::Greater => return None,
                    std::cmp::Ordering::Equal => held.max(holding).saturating_add(granted),
                    std::cmp::Ordering::Less => holding.saturating_add(granted),
                };
                Some((u64::from(window.0) << 32) | u64::from(held))
            });
    }

    /// Lowers the tokens lease of `window` to `to`, never below the tokens this replica has
    /// reported in it, and returns how much it gave up (as [`Counter::shrink_lease`]).
    pub fn shrink_tokens_lease(&self, window: Window, to: u64) -> u64 {
        let reported = Word::load(&self.word).counts_in(window).tokens;
        let to = saturating_u32(to.max(reported));
        let mut given = 0;
        let _ = self
            .tokens_lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (stamp, held) = ((word >> 32) as u32, word as u32);
                let kept = to;
                if stamp != window.0 || kept >= held {
                    given = 0;
                    return None;
                }
                given = u64::from(held - kept);
                Some((u64::from(window.0) << 32) | u64::from(kept))
            });
        given
    }

    /// The requests this replica holds in its lease for `window`.
    pub fn lease(&self, window: Window) -> u32 {
        let word = Word::load(&self.word);
        if word.window == window.0 {
            word.note
        } else {
            0
        }
    }

    /// Adds what the store granted to the lease of `window` (a counter still in an older
    /// window rolls into this one; a grant for a window gone is dropped). Grants are added, not
    /// set from what the store says the replica holds: an answer can cross a give-back in
    /// flight, and a lease set from it could admit what was given back.
    pub fn leased(&self, window: Window, granted: u32) {
        self.leased_as(window, granted, 0, false);
    }

    /// [`Counter::leased`]; `sliding`: a sliding window's, which keeps what it held unused in
    /// the window it rolls out of ([`Counter::take_closed`]).
    ///
    /// `admitted`: what the call said this replica had admitted in the window. Admitted past
    /// its lease (Redis failing, under `--redis-failure-policy local_share` or `allow`), it
    /// said it held that much, and the store raised its lease to it before granting; so does
    /// the counter, or the grant would be spent on requests already admitted and the rest of
    /// it stay held in the store unused (a replica that admitted 470 on a lease of 254 was
    /// granted 265: the store held 735 for it, the counter 519, and 216 were lost to the
    /// fleet). Not what the call said it held: a give-back sent since would be held again.
    fn leased_as(&self, window: Window, granted: u32, admitted: u32, sliding: bool) {
        if granted == 0 && admitted == 0 {
            return;
        }
        let mut closed = None;
        let _ = self.update(|word| {
            closed = None;
            let (held, counts) = match word.window.cmp(&window.0) {
                std::cmp::Ordering::Greater => return Step::Keep(()),
                std::cmp::Ordering::Equal => {
                    let held = word.note.max(admitted).saturating_add(granted);
                    if held == word.note {
                        return Step::Keep(());
                    }
                    (held, word.counts)
                }
                std::cmp::Ordering::Less if granted == 0 => return Step::Keep(()),
                std::cmp::Ordering::Less => {
                    closed = Some(word);
                    (granted, Counts::ZERO)
                }
            };
            Step::Write(
                Word {
                    window: window.0,
                    note: held,
                    counts,
                },
                (),
            )
        });
        if sliding && let Some(word) = closed {
            self.keep_closed(word);
        }
    }

    /// Lowers the lease of `window` to `to`, never below what this replica has admitted in
    /// it, and returns how much it gave up (`None`: another window). The sync gives that back
    /// to the fleet only after this, so no request can admit from what is given back.
    pub fn shrink_lease(&self, window: Window, to: u32) -> Option<u32> {
        self.update(|word| {
            if word.window != window.0 {
                return Step::Keep(None);
            }
            let held = to.max(word.counts.requests);
            if held >= word.note {
                return Step::Keep(Some(0));
            }
            Step::Write(Word { note: held, ..word }, Some(word.note - held))
        })
        .ok()
        .flatten()
    }

    /// This replica's own counts: window stamp and counts, as stored.
    pub fn local(&self) -> (Window, Counts) {
        let word = Word::load(&self.word);
        (Window(word.window), word.counts)
    }

    /// What was last pushed to the fleet store, for the window it was pushed in.
    pub fn pushed(&self) -> (Window, Counts) {
        let word = Word::load(&self.pushed);
        (Window(word.window), word.counts)
    }

    /// The rest of the fleet's counts in `window`, as of the last sync.
    pub fn others(&self, window: Window) -> Counts {
        self.fleet_counts(window).others
    }

    /// Records a sync of `window` at `now_ms`: what the store holds now. Only the sync task
    /// calls this.
    pub fn synced(&self, window: Window, store: Stored, now_ms: u64) {
        self.record_sync(window, store, now_ms, false);
    }

    /// [`Counter::synced`], for a window long against the sync interval: a sync that finds
    /// the others where they were keeps the trust the request path built up. Resetting it
    /// every round made a spent fleet cost each replica three calls a second; in a long
    /// window, a lease given back is still found seconds later. In a short one (a second) it
    /// would not be, and what was given back would be lost to the fleet.
    pub fn synced_in_long_window(&self, window: Window, store: Stored, now_ms: u64) {
        self.record_sync(window, store, now_ms, true);
    }

    fn record_sync(&self, window: Window, store: Stored, now_ms: u64, keep_trust: bool) {
        let counts = store.fleet.minus(store.held);
        let current = Word::load(&self.others);
        let unchanged = keep_trust
            && current.window == window.0
            && (store.fades
                || (store.granted.is_zero() && current.counts.requests == counts.requests));
        let doublings = if store.spent_for_good {
            SPENT_FOR_GOOD
        } else if unchanged && !store.refills {
            mark_of(current.note).min(FRESH_MAX_DOUBLINGS)
        } else {
            0
        };
        let others = Word {
            window: window.0,
            note: stamp(now_ms, doublings),
            counts,
        };
        // The pushed word's mark says whether the rest of the fleet admitted in the window (not
        // only leased: a unit another replica holds idle is no sign the key is in use).
        let pushed = Word {
            window: window.0,
            note: stamp(
                now_ms,
                u32::from(store.fleet_admitted > store.pushed.requests),
            ),
            counts: store.pushed,
        };
        self.pushed.store(pushed.pack(), Ordering::Release);
        self.others.store(others.pack(), Ordering::Release);
        self.take_grants(window, &store);
    }

    /// Adds what a call granted to the leases of `window`, each raised first to what the call
    /// said was counted ([`Counter::leased_as`]).
    fn take_grants(&self, window: Window, store: &Stored) {
        self.leased_as(
            window,
            store.granted.requests,
            store.pushed.requests,
            store.fades,
        );
        self.leased_tokens(window, store.granted.tokens, store.tokens_counted);
    }

    /// Records a lease taken on the request path: [`Counter::leased`], and what the fleet
    /// has leased in all, so that a fleet found spent is not asked again by every request
    /// that follows.
    pub fn leased_with_fleet(&self, window: Window, store: Stored, now_ms: u64) {
        self.take_grants(window, &store);
        let current = Word::load(&self.others);
        let others_now = store.fleet.minus(store.held);
        // Asked again and nothing changed: trust the answer twice as long. A sliding window's
        // budget opens a little at a time as the previous window fades: each call finds what
        // opened since the last, so its calls, too, come twice as far apart each time, up to
        // a 64th of the window per replica (the limiter's `opened_since_asked`).
        let unchanged = current.window == window.0
            && (store.fades || (store.granted.is_zero() && current.counts == others_now));
        let doublings = if store.spent_for_good {
            SPENT_FOR_GOOD
        } else if unchanged && !store.refills {
            (mark_of(current.note) + 1).min(FRESH_MAX_DOUBLINGS)
        } else {
            0
        };
        let others = Word {
            window: window.0,
            note: stamp(now_ms, doublings),
            counts: others_now,
        };
        self.others.store(others.pack(), Ordering::Release);
    }

    /// Keeps `granted` for `window`, which has not begun: a lease the sync took ahead of it.
    /// A lease ahead for an older window, never claimed, is dropped (the fleet lost it to that
    /// window, as with any lease unused at a window's end).
    pub fn lease_ahead(&self, window: Window, granted: u32) {
        if granted == 0 {
            return;
        }
        let _ = self
            .ahead
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                let (stamp, held) = ((word >> 32) as u32, word as u32);
                let held = if stamp == window.0 {
                    held.saturating_add(granted)
                } else {
                    granted
                };
                Some((u64::from(window.0) << 32) | u64::from(held))
            });
    }

    /// What is kept ahead for `window` and not yet claimed.
    pub fn ahead(&self, window: Window) -> u32 {
        held_in(self.ahead.load(Ordering::Acquire), window)
    }

    /// Adds the lease kept ahead for `window` to the lease, once (the caller that empties the
    /// `ahead` word adds it); returns how much it added.
    pub fn claim_ahead(&self, window: Window) -> u32 {
        let held = self.take_ahead(window);
        self.leased(window, held);
        held
    }

    /// Empties the lease kept ahead for `window` and returns it, for the caller alone to add
    /// or give back (0 when another caller emptied it first).
    pub fn take_ahead(&self, window: Window) -> u32 {
        let word = self.ahead.load(Ordering::Acquire);
        let held = word as u32;
        if (word >> 32) as u32 != window.0 || held == 0 {
            return 0;
        }
        let emptied = u64::from(window.0) << 32;
        self.ahead
            .compare_exchange(word, emptied, Ordering::AcqRel, Ordering::Acquire)
            .map_or(0, |_| held)
    }

    /// What the fleet had leased of `window` in all, as last read: in this window if the
    /// store was read for it, else in the window before (the best guess while this one is
    /// new); none when neither was read.
    pub fn fleet_leased_seen(&self, window: Window) -> Option<u64> {
        let others = Word::load(&self.others);
        if others.window == window.0 {
            return Some(u64::from(self.lease(window)) + u64::from(others.counts.requests));
        }
        if others.window.checked_add(1) != Some(window.0) {
            return None;
        }
        let pushed = Word::load(&self.pushed);
        let own = if pushed.window == others.window {
            pushed.counts.requests
        } else {
            0
        };
        Some(u64::from(own) + u64::from(others.counts.requests))
    }

    /// Called by a request about to ask the store again because it found the fleet spent (a
    /// requests `limit`) on a view gone stale: marks the view read now, so that the requests
    /// that find it stale a moment later are refused on it rather than each asking too (two
    /// and three such calls at once were common). True when another request marked it first,
    /// or a fresh answer came meanwhile: the caller decides again on the view.
    pub fn mark_fleet_asked(&self, window: Window, limit: u32, now_ms: u64) -> bool {
        let mut current = self.others.load(Ordering::Acquire);
        loop {
            let others = Word::unpack(current);
            let leased = u64::from(self.lease(window)) + u64::from(others.counts.requests);
            if others.window != window.0 || leased < u64::from(limit) {
                return false;
            }
            if fresh(others.note, now_ms) {
                return true;
            }
            let marked = Word {
                note: stamp(now_ms, mark_of(others.note)),
                ..others
            };
            match self.others.compare_exchange(
                current,
                marked.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return false,
                Err(actual) => current = actual,
            }
        }
    }

    /// What the fleet had leased of the tokens of `window` in all, as last read (none when
    /// nothing was read of it).
    pub fn fleet_tokens_leased_seen(&self, window: Window) -> Option<u64> {
        let others = Word::load(&self.others);
        (others.window == window.0).then(|| self.tokens_lease(window) + others.counts.tokens)
    }

    /// Whether the other replicas had admitted in `window` when the sync last pushed it.
    pub fn admitted_elsewhere(&self, window: Window) -> bool {
        let pushed = Word::load(&self.pushed);
        pushed.window == window.0 && mark_of(pushed.note) != 0
    }

    /// How long ago the sync last pushed this counter's counts of `window`, if it did.
    pub fn pushed_ago(&self, window: Window, now_ms: u64) -> Option<u64> {
        let pushed = Word::load(&self.pushed);
        (pushed.window == window.0)
            .then(|| age_of(pushed.note, now_ms))
            .flatten()
    }

    /// The fleet's total in `window` as of the last sync (zero if none was read for it), and
    /// when the store was last read for it (none before the first). Only the sync task calls
    /// this.
    pub fn last_synced(&self, window: Window) -> (Counts, Option<u32>) {
        // A note of 0 is a counter the store was never read for.
        let note = Word::load(&self.others).note;
        let round = (note != 0).then_some(note);
        let fleet = self.fleet_counts(window);
        let total = Counts {
            requests: self.lease(window).saturating_add(fleet.others.requests),
            tokens: self
                .tokens_lease(window)
                .saturating_add(fleet.others.tokens),
        };
        (total, round)
    }

    /// Whether this replica holds lease of `window` it has not used: requests not admitted,
    /// or tokens not reported.
    pub fn has_unused_lease(&self, window: Window) -> bool {
        let used = Word::load(&self.word).counts_in(window);
        self.lease(window) > used.requests || self.tokens_lease(window) > used.tokens
    }

    /// Whether the store was read for this counter in `window` (by the sync or a lease on
    /// the request path).
    pub fn read_in(&self, window: Window) -> bool {
        let others = Word::load(&self.others);
        others.window == window.0 && others.note != 0
    }

    /// The compare-and-swap loop of [`Counter::update`] over the raw word, for the counters
    /// of a sliding window or a token bucket ([`algorithm`] lays their words out).
    fn update_raw<T>(&self, mut step: impl FnMut(u128) -> (Option<u128>, T)) -> Result<T, Retired> {
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            if (current >> 96) as u32 == RETIRED {
                return Err(Retired);
            }
            let (next, answer) = step(current);
            let Some(next) = next else { return Ok(answer) };
            match self.word.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(answer),
                Err(actual) => current = actual,
            }
        }
    }

    /// [`Counter::charge`] for a limit that counts by a sliding window or a token bucket, at
    /// `now_ms` in windows of `unit_ms`: one measure, judged by this replica alone. Also
    /// returns the time the status reports until its reset.
    pub fn charge_by(
        &self,
        now_ms: u64,
        unit_ms: u64,
        charge: Counts,
        limits: Limits,
        enforcement: Enforcement,
    ) -> Result<(Reading, Duration), Retired> {
        let Some((rate, n, tokens)) = one_measure(limits, charge, unit_ms) else {
            return Ok((unlimited(), Duration::ZERO));
        };
        let enforce = enforcement != Enforcement::Shadow;
        let judged = self.update_raw(|word| {
            algorithm::charge(limits.algorithm, word, now_ms, rate, n, enforce)
        })?;
        Ok((judged_reading(judged, tokens), judged.until_reset))
    }

    /// What `charge` would meet under a sliding window or a token bucket, adding nothing: the
    /// limit as it stands now, and whether `charge` would break it.
    pub fn assess_by(
        &self,
        now_ms: u64,
        unit_ms: u64,
        charge: Counts,
        limits: Limits,
    ) -> (Reading, Duration) {
        let Some((rate, n, tokens)) = one_measure(limits, charge, unit_ms) else {
            return (unlimited(), Duration::ZERO);
        };
        let mut word = self.word.load(Ordering::Acquire);
        if (word >> 96) as u32 == RETIRED {
            word = 0;
        }
        let step = |n| algorithm::charge(limits.algorithm, word, now_ms, rate, n, true).1;
        let now = step(0);
        let judged = Judged {
            over: if n == 0 { now.over } else { step(n).over },
            ..now
        };
        (judged_reading(judged, tokens), judged.until_reset)
    }

    /// Gives back `amount` charged in this window under a sliding window or a token bucket (a
    /// request denied by another of its limits) at `now_ms`, or holds in flight taken at
    /// `hold_taken_ms` (the oldest when not given); returns what is used after.
    pub fn refund_by(
        &self,
        now_ms: u64,
        unit_ms: u64,
        amount: Counts,
        limits: Limits,
        hold_taken_ms: Option<u64>,
    ) -> Result<Counts, Retired> {
        let Some((rate, n, tokens)) = one_measure(limits, amount, unit_ms) else {
            return Ok(Counts::ZERO);
        };
        let used = self.update_raw(|word| match limits.algorithm {
            Algorithm::SlidingWindow => {
                let next = algorithm::sliding_refund(word, now_ms / unit_ms, n);
                let used = algorithm::sliding_used(next.unwrap_or(word), now_ms, rate);
                (next, used)
            }
            Algorithm::TokenBucket { burst } => {
                let next = algorithm::bucket_refund(word, now_ms, rate, n);
                (
                    Some(next),
                    algorithm::bucket_used_at(next, now_ms, rate, burst),
                )
            }
            Algorithm::InFlight => algorithm::hold_release(word, now_ms, rate, hold_taken_ms, n),
            Algorithm::FixedWindow => (None, 0),
        })?;
        Ok(Counts::in_slot(used, tokens))
    }

    /// Retires the counter if its window ended before `current`. Once retired it accepts no more
    /// charges, so the sweeper can drop it without losing a count.
    pub fn retire_if_idle(&self, current: Window) -> bool {
        // Kept while the rest of the fleet counts in the current window, so the sync keeps
        // its view of the others fresh. A sync that read nothing for it does not keep it.
        let others = Word::load(&self.others);
        let active_elsewhere = others.window >= current.0 && !others.counts.is_zero();
        // A lease taken ahead of this window keeps it too, until it is claimed.
        let leased_ahead = self.ahead(current) > 0;
        self.update(|word| {
            if word.window >= current.0 || active_elsewhere || leased_ahead {
                Step::Keep(false)
            } else {
                Step::Write(Word::new(RETIRED, Counts::ZERO), true)
            }
        })
        .unwrap_or(true)
    }

    /// Whether the sweeper has retired it.
    pub fn is_retired(&self) -> bool {
        Word::load(&self.word).window == RETIRED
    }
}

/// The one limit a sliding window or token bucket counter judges (here or in the fleet
/// store): its rate, the charge on its measure, and whether that measure is tokens. None when
/// neither limit is set.
pub fn one_measure(limits: Limits, charge: Counts, unit_ms: u64) -> Option<(Rate, u32, bool)> {
    // The rule compiler keeps these limits within 32 bits (only a fixed window is wide).
    let (limit, n, tokens) = match (limits.requests, limits.tokens) {
        (Some(limit), _) => (limit, charge.requests, false),
        (None, Some(limit)) => (saturating_u32(limit), saturating_u32(charge.tokens), true),
        (None, None) => return None,
    };
    Some((Rate { limit, unit_ms }, n, tokens))
}

fn judged_reading(judged: Judged, tokens: bool) -> Reading {
    Reading {
        counts: Counts::in_slot(judged.used, tokens),
        over: Over {
            requests: judged.over && !tokens,
            tokens: judged.over && tokens,
            lease_spent: false,
            lease_low: false,
            recheck: false,
        },
        counted: judged.counted,
    }
}

fn unlimited() -> Reading {
    Reading {
        counts: Counts::ZERO,
        over: Over::default(),
        counted: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Window = Window(100);
    /// When the tests' syncs and charges happen.
    const NOW: u64 = 1_000;
    fn req(n: u32) -> Counts {
        Counts {
            requests: n,
            tokens: 0,
        }
    }
    /// A requests limit alone.
    fn requests_only(requests: u32) -> Limits {
        Limits {
            requests: Some(requests),
            tokens: None,
            ..Default::default()
        }
    }

    fn limit(requests: u32, tokens: u32) -> Limits {
        Limits {
            requests: Some(requests),
            tokens: Some(tokens.into()),
            ..Default::default()
        }
    }

    #[test]
    fn counts_up_to_the_limit_and_refuses_without_counting() {
        let c = Counter::new();
        let l = requests_only(2);
        assert!(
            c.charge(W, req(1), l, Enforcement::Enforce)
                .unwrap()
                .counted
        );
        assert!(
            c.charge(W, req(1), l, Enforcement::Enforce)
                .unwrap()
                .counted
        );
        let r = c.charge(W, req(1), l, Enforcement::Enforce).unwrap();
        assert!(!r.counted && r.over.requests);
        assert_eq!(c.counts(W, false), req(2));
    }

    #[test]
    fn a_wide_counter_counts_tokens_past_32_bits_exactly() {
        let c = Counter::new();
        let budget = Limits {
            tokens: Some(10_000_000_000),
            wide: true,
            ..Default::default()
        };
        let tokens = |n: u64| Counts {
            requests: 1,
            tokens: n,
        };
        for _ in 0..3 {
            let r = c
                .charge(W, tokens(3_000_000_000), budget, Enforcement::Shadow)
                .unwrap();
            assert!(r.counted);
        }
        // The requests a call carries are not kept: a wide counter holds tokens alone.
        assert_eq!(c.counts(W, true), tokens(9_000_000_000).minus(req(1)));
        let check = |c: &Counter| {
            c.charge(W, Counts::ZERO, budget, Enforcement::Enforce)
                .unwrap()
                .over
                .tokens
        };
        assert!(!check(&c));
        // A charge that would pass the budget by one is refused whole; one that meets it fits.
        let r = c
            .charge(W, tokens(1_000_000_001), budget, Enforcement::Enforce)
            .unwrap();
        assert!(!r.counted && r.over.tokens);
        let r = c
            .charge(W, tokens(1_000_000_000), budget, Enforcement::Enforce)
            .unwrap();
        assert!(r.counted && r.counts.tokens == 10_000_000_000);
        assert!(check(&c), "spent: a check is over");
        assert_eq!(
            c.refund(W, tokens(5_000_000_000), true).unwrap().tokens,
            5_000_000_000
        );
        assert_eq!(c.counts(Window(101), true), Counts::ZERO);
        // The usual layout keeps 32 bits: a shadow count past them saturates.
        let narrow = Counter::new();
        narrow
            .charge(
                W,
                tokens(5_000_000_000),
                Limits::default(),
                Enforcement::Shadow,
            )
            .unwrap();
        assert_eq!(narrow.counts(W, false).tokens, u64::from(u32::MAX));
    }

    #[test]
    fn a_new_window_starts_from_zero() {
        let c = Counter::new();
        let l = limit(1, 10);
        assert!(
            c.charge(W, req(1), l, Enforcement::Enforce)
                .unwrap()
                .counted
        );
        assert!(
            !c.charge(W, req(1), l, Enforcement::Enforce)
                .unwrap()
                .counted
        );
        assert_eq!(c.counts(Window(101), false), Counts::ZERO);
        let r = c
            .charge(Window(101), req(1), l, Enforcement::Enforce)
            .unwrap();
        assert!(r.counted);
        assert_eq!(r.counts, req(1));
        // A late reader of the old window counts in the newer one instead of resetting it.
        let r = c.charge(W, req(1), l, Enforcement::Enforce).unwrap();
        assert!(!r.counted && r.over.requests);
    }

    #[test]
    fn one_charge_checks_requests_and_tokens_together() {
        let c = Counter::new();
        let l = limit(10, 100);
        let charge = Counts {
            requests: 1,
            tokens: 60,
        };
        assert!(
            c.charge(W, charge, l, Enforcement::Enforce)
                .unwrap()
                .counted
        );
        let r = c.charge(W, charge, l, Enforcement::Enforce).unwrap();
        assert!(!r.counted);
        assert_eq!(
            r.over,
            Over {
                requests: false,
                tokens: true,
                lease_spent: false,
                lease_low: false,
                recheck: false,
            }
        );
        assert_eq!(
            c.counts(W, false),
            Counts {
                requests: 1,
                tokens: 60
            }
        );
    }

    #[test]
    fn a_zero_charge_checks_without_counting() {
        let c = Counter::new();
        let l = limit(1, 1);
        let r = c.charge(W, Counts::ZERO, l, Enforcement::Enforce).unwrap();
        assert!(!r.over.any() && !r.counted);
        c.charge(W, req(1), l, Enforcement::Enforce).unwrap();
        assert!(
            c.charge(W, Counts::ZERO, l, Enforcement::Enforce)
                .unwrap()
                .over
                .requests
        );
        // A limit of zero blocks everything, checks included.
        let blocked = Counter::new();
        assert!(
            blocked
                .charge(W, Counts::ZERO, limit(0, 0), Enforcement::Enforce)
                .unwrap()
                .over
                .requests
        );
    }

    #[test]
    fn shadow_charges_count_past_the_limit_and_saturate() {
        let c = Counter::new();
        let l = limit(1, 1);
        c.charge(W, req(u32::MAX), l, Enforcement::Shadow).unwrap();
        let r = c.charge(W, req(5), l, Enforcement::Shadow).unwrap();
        assert!(r.counted && r.over.requests);
        assert_eq!(r.counts.requests, u32::MAX);
    }

    #[test]
    fn refunds_stop_at_zero_and_ignore_past_windows() {
        let c = Counter::new();
        c.charge(W, req(3), Limits::default(), Enforcement::Enforce)
            .unwrap();
        assert_eq!(c.refund(W, req(5), false).unwrap(), Counts::ZERO);
        c.charge(W, req(3), Limits::default(), Enforcement::Enforce)
            .unwrap();
        assert_eq!(c.refund(Window(99), req(3), false).unwrap(), req(3));
        assert_eq!(c.counts(W, false), req(3));
    }

    #[test]
    fn a_retired_counter_takes_no_charge() {
        let c = Counter::new();
        c.charge(W, req(1), Limits::default(), Enforcement::Enforce)
            .unwrap();
        assert!(!c.retire_if_idle(W));
        assert!(c.retire_if_idle(Window(101)));
        assert_eq!(
            c.charge(Window(101), req(1), Limits::default(), Enforcement::Enforce),
            Err(Retired)
        );
    }

    fn admitted(c: &Counter, limits: Limits, view: FleetView, tries: usize) -> usize {
        (0..tries)
            .filter(|_| {
                c.charge_in_fleet(
                    W,
                    req(1),
                    limits,
                    Enforcement::Enforce,
                    (view, Pace::NONE),
                    NOW,
                )
                .unwrap()
                .counted
            })
            .count()
    }

    fn stored(pushed: u32, fleet: u32, held: u32) -> Stored {
        Stored {
            pushed: req(pushed),
            fleet: req(fleet),
            held: req(held),
            granted: req(held),
            fleet_admitted: pushed,
            fades: false,
            refills: false,
            spent_for_good: false,
            tokens_counted: 0,
        }
    }

    #[test]
    fn a_fleet_spent_for_good_is_trusted_to_the_windows_end() {
        let spent_for_good = Stored {
            spent_for_good: true,
            ..stored(0, 30, 20)
        };
        for by_sync in [false, true] {
            let c = Counter::new();
            if by_sync {
                c.synced(W, spent_for_good, NOW);
            } else {
                c.leased_with_fleet(W, spent_for_good, NOW);
            }
            let note = |c: &Counter| Word::load(&c.others).note;
            assert!(fresh(note(&c), NOW + 59_000), "{by_sync}");
            // Refused on it, a request asks nothing, even a minute on.
            assert!(c.mark_fleet_asked(W, 30, NOW + 59_000));
            // An answer that says otherwise (a limit raised, say) is trusted as any other.
            c.leased_with_fleet(W, stored(0, 40, 20), NOW + 100);
            assert!(!fresh(note(&c), NOW + 100 + 150), "{by_sync}");
        }
    }

    #[test]
    fn one_request_at_a_time_asks_again_of_a_spent_fleet() {
        let c = Counter::new();
        // 20 held of a limit of 30, the others 10: spent, as read at NOW.
        c.synced(W, stored(0, 30, 20), NOW);
        // Fresh: nobody asks (the request is refused on the view).
        assert!(c.mark_fleet_asked(W, 30, NOW + 50));
        // Stale: the first request marks it and asks; the next, a moment later, decides on it.
        assert!(!c.mark_fleet_asked(W, 30, NOW + 200));
        assert!(c.mark_fleet_asked(W, 30, NOW + 201));
        assert!(fresh(Word::load(&c.others).note, NOW + 250));
        // A fleet with budget left (a limit raised to 40) is asked by each request that needs
        // it: not marked.
        assert!(!c.mark_fleet_asked(W, 40, NOW + 600));
        assert!(!fresh(Word::load(&c.others).note, NOW + 600));
        // Nor is another window's view.
        assert!(!c.mark_fleet_asked(Window(W.0 + 1), 30, NOW + 600));
    }

    /// What the rest of the fleet admitted, not what it leased, is what says a key is in use
    /// elsewhere: a sync that read 3 admitted, 1 of them this replica's, says so; one that read
    /// only this replica's admission does not, however much the others hold; another window's
    /// read says nothing of this one.
    #[test]
    fn admitted_elsewhere_follows_the_fleets_admissions() {
        let c = Counter::new();
        c.synced(W, stored(1, 5, 1).with_admitted(3), NOW);
        assert!(c.admitted_elsewhere(W));
        assert!(!c.admitted_elsewhere(Window(W.0 + 1)));
        c.synced(W, stored(1, 5, 1).with_admitted(1), NOW);
        assert!(!c.admitted_elsewhere(W), "others hold 4, admitted none");
    }

    impl Stored {
        fn with_admitted(self, fleet_admitted: u32) -> Stored {
            Stored {
                fleet_admitted,
                ..self
            }
        }
    }

    #[test]
    fn a_lease_spent_to_its_low_water_at_pace_is_flagged_once_for_a_top_up() {
        // A limit of 1,280: the low water is 10 (half of a 64th).
        let l = requests_only(1_280);
        assert_eq!(low_water(1_280), 10);
        assert_eq!(low_water(200), 1);
        let view = FleetView::Synced { replicas: 3 };
        // Which admissions of `n` are flagged (1 is the first).
        let flags = |c: &Counter, pace: Pace, n: usize| -> Vec<usize> {
            (1..=n)
                .filter(|_| {
                    let r = c
                        .charge_in_fleet(W, req(1), l, Enforcement::Enforce, (view, pace), NOW)
                        .unwrap();
                    assert!(r.counted);
                    r.over.lease_low
                })
                .collect()
        };
        // 20 held, the fleet 40 of 1,280; 100 ms into a window of a second, a sync every
        // second: the admission that leaves 10 is flagged, and only it.
        let fast = Pace {
            into_window_ms: 100,
            horizon_ms: 1_000,
            left_ms: 900,
        };
        let c = Counter::new();
        c.synced(W, stored(0, 40, 20), NOW);
        assert_eq!(flags(&c, fast, 20), [10]);
        // In a window of a minute, the one that takes the last unit too (the top-up at 10 is
        // not answered here; answered, it would have refilled the lease); and of a grant under
        // the low water (what a sliding window opened), its last unit.
        let long = Pace {
            left_ms: 59_900,
            ..fast
        };
        let c = Counter::new();
        c.synced(W, stored(0, 40, 20), NOW);
        assert_eq!(flags(&c, long, 20), [10, 20]);
        let c = Counter::new();
        c.synced(W, stored(0, 40, 3), NOW);
        assert_eq!(flags(&c, long, 3), [3]);
        let c = Counter::new();
        c.synced(W, stored(0, 40, 3), NOW);
        assert!(flags(&c, fast, 3).is_empty(), "in a second, none");
        // At the same pace with no sync to wait for (no store), or 50 s into the window (10
        // left lasts 50 s at 10 in 50 s): the sync tops it up in time, no flag.
        for pace in [
            Pace::NONE,
            Pace {
                into_window_ms: 50_000,
                horizon_ms: 1_000,
                left_ms: 10_000,
            },
        ] {
            let c = Counter::new();
            c.synced(W, stored(0, 40, 20), NOW);
            assert!(flags(&c, pace, 20).is_empty(), "{pace:?}");
        }
        // The fleet spent (the others hold the other 1,260): nothing to top up from.
        let c = Counter::new();
        c.synced(W, stored(0, 1_280, 20), NOW);
        assert!(flags(&c, fast, 20).is_empty());
    }

    #[test]
    fn a_replica_past_the_limit_on_its_own_count_does_not_ask_the_store_again() {
        let l = requests_only(30);
        let view = FleetView::Synced { replicas: 1 };
        // Holding the whole limit, or 20 of it with the rest elsewhere, it admits what it
        // holds; ten seconds on its view of the fleet is stale. Past the limit on its own
        // count no lease could admit the next call: refused with nothing to ask. Short of it,
        // refused too, and the stale view is asked again in the background while the next
        // call is due in the window (a fixed window's budget comes back only as a lease given
        // back, for the calls after this one); 100 ms before the window's end, at 20 calls in
        // 10 s, none is: this call asks, on the request path.
        let pace = |left_ms| Pace {
            into_window_ms: 10_000,
            horizon_ms: 1_000,
            left_ms,
        };
        for (held, left_ms, (asks_now, asks_after)) in [
            (30, 50_000, (false, false)),
            (20, 50_000, (false, true)),
            (20, 100, (true, false)),
        ] {
            let c = Counter::new();
            c.synced(W, stored(0, 30, held), NOW);
            assert_eq!(admitted(&c, l, view, 40), held as usize);
            let r = c
                .charge_in_fleet(
                    W,
                    req(1),
                    l,
                    Enforcement::Enforce,
                    (view, pace(left_ms)),
                    NOW + 10_000,
                )
                .unwrap();
            assert!(
                r.over.requests && r.over.lease_spent == asks_now && r.over.recheck == asks_after,
                "{held}, {left_ms} ms left: {r:?}"
            );
        }
    }

    #[test]
    fn synced_replicas_admit_only_what_they_hold() {
        let l = requests_only(30);
        let view = FleetView::Synced { replicas: 3 };
        let c = Counter::new();
        // No lease yet: nothing admitted, and the denial says a lease may admit it.
        let r = c
            .charge_in_fleet(W, req(1), l, Enforcement::Enforce, (view, Pace::NONE), NOW)
            .unwrap();
        assert!(!r.counted && r.over.requests && r.over.lease_spent);
        // The store leased it 10 of the fleet's 30; the others hold none yet.
        c.synced(W, stored(0, 10, 10), NOW);
        assert_eq!(admitted(&c, l, view, 20), 10);
        let r = c.assess(W, req(1), l, view, NOW);
        assert!(
            r.over.requests && r.over.lease_spent,
            "the fleet had 20 left"
        );
        // The others took 18: 12 more for this one, then the fleet is spent.
        c.leased_with_fleet(
            W,
            Stored {
                held: req(12),
                granted: req(2),
                fleet: req(30),
                ..Stored::default()
            },
            NOW,
        );
        assert_eq!(c.others(W), req(18));
        assert_eq!(admitted(&c, l, view, 20), 2);
        let r = c.assess(W, req(1), l, view, NOW);
        assert!(
            r.over.requests && !r.over.lease_spent,
            "nothing left to lease"
        );
        assert_eq!(r.counts, req(30), "the fleet's counts are reported");
        // Even a check says over.
        assert!(c.assess(W, Counts::ZERO, l, view, NOW).over.requests);
        // A lease grows by what is granted; a later window starts with none.
        assert_eq!(c.lease(W), 12);
        c.leased(W, 5);
        assert_eq!(c.lease(W), 17);
        c.leased(Window(99), 5);
        assert_eq!(c.lease(W), 17, "a grant for a window gone is dropped");
        assert_eq!(c.lease(Window(101)), 0);
        assert_eq!(c.others(Window(101)), Counts::ZERO);
        // The sync lowers it, never below what was admitted, and says what it gave up.
        assert_eq!(c.shrink_lease(W, 0), Some(5));
        assert_eq!(c.lease(W), 12);
        assert_eq!(c.shrink_lease(Window(99), 0), None);
        let idle = Counter::new();
        idle.synced(W, stored(0, 10, 10), NOW);
        assert_eq!(admitted(&idle, l, view, 3), 3);
        assert_eq!(idle.shrink_lease(W, 0), Some(7));
        assert_eq!(admitted(&idle, l, view, 3), 0, "nothing left to admit from");
    }

    #[test]
    fn a_lowered_limit_binds_what_is_held() {
        let view = FleetView::Synced { replicas: 2 };
        let c = Counter::new();
        c.synced(W, stored(0, 20, 10), NOW);
        // The limit went from 20 to 12 (a reload): the 10 held and the others' 10 are over it.
        let l = requests_only(12);
        assert_eq!(admitted(&c, l, view, 5), 2);
    }

    #[test]
    fn outage_policies() {
        let l = requests_only(30);
        assert_eq!(
            admitted(
                &Counter::new(),
                l,
                FleetView::LocalShare { replicas: 3 },
                20
            ),
            10
        );
        assert_eq!(admitted(&Counter::new(), l, FleetView::AllowAll, 50), 50);
        assert_eq!(admitted(&Counter::new(), l, FleetView::DenyAll, 5), 0);
        // What a replica holds stays its own to spend while the store is away, under any
        // policy: the store set it aside for it.
        let holding = || {
            let c = Counter::new();
            c.synced(W, stored(0, 15, 15), NOW);
            c
        };
        assert_eq!(admitted(&holding(), l, FleetView::DenyAll, 20), 15);
        assert_eq!(
            admitted(&holding(), l, FleetView::LocalShare { replicas: 3 }, 20),
            15
        );
        // Unlimited slots stay unlimited whatever the policy.
        let free = Limits::default();
        assert_eq!(admitted(&Counter::new(), free, FleetView::DenyAll, 5), 5);
    }

    #[test]
    fn counters_active_elsewhere_are_not_retired() {
        let c = Counter::new();
        c.charge(W, req(1), Limits::default(), Enforcement::Enforce)
            .unwrap();
        c.synced(Window(101), stored(0, 4, 0), NOW);
        assert!(!c.retire_if_idle(Window(101)));
        assert!(c.retire_if_idle(Window(102)));
    }

    #[test]
    fn a_sync_that_found_nothing_in_the_window_does_not_keep_a_counter() {
        let c = Counter::new();
        c.charge(W, req(1), Limits::default(), Enforcement::Enforce)
            .unwrap();
        // The sync reads every live counter in the current window: finding it empty there must
        // not keep the counter alive (it did, and with Redis on no counter was ever dropped).
        c.synced(Window(101), Stored::default(), NOW);
        assert!(c.retire_if_idle(Window(101)));
    }

    #[test]
    fn a_sliding_windows_counter_keeps_what_it_held_unused_when_its_window_closed() {
        let sliding = Limits {
            requests: Some(100),
            algorithm: Algorithm::SlidingWindow,
            leased: true,
            ..Default::default()
        };
        let fixed = Limits {
            algorithm: Algorithm::FixedWindow,
            ..sliding
        };
        let view = FleetView::Synced { replicas: 2 };
        let next = Window(W.0 + 1);
        for (limits, fades, kept) in [(sliding, true, 3), (fixed, false, 0)] {
            let c = Counter::new();
            let grant = |held| Stored {
                fades,
                refills: false,
                tokens_counted: 0,
                ..stored(0, held, held)
            };
            c.leased_with_fleet(W, grant(10), NOW);
            for _ in 0..7 {
                let r = c.charge_in_fleet(
                    W,
                    req(1),
                    limits,
                    Enforcement::Enforce,
                    (view, Pace::NONE),
                    NOW,
                );
                assert!(r.unwrap().counted);
            }
            // The sync's grant in the next window rolls the counter over.
            c.leased_with_fleet(next, grant(5), NOW + 1_000);
            assert_eq!(c.take_closed(W), kept, "10 held, 7 admitted");
            assert_eq!(c.take_closed(W), 0, "taken once");
            assert_eq!(c.lease(next), 5);
        }
        // A charge that rolls over keeps it too (a shadow charge needs no lease).
        let c = Counter::new();
        c.leased_with_fleet(
            W,
            Stored {
                fades: true,
                refills: false,
                tokens_counted: 0,
                ..stored(0, 4, 4)
            },
            NOW,
        );
        c.charge_in_fleet(
            W,
            req(1),
            sliding,
            Enforcement::Enforce,
            (view, Pace::NONE),
            NOW,
        )
        .unwrap();
        c.charge_in_fleet(
            next,
            req(1),
            sliding,
            Enforcement::Shadow,
            (view, Pace::NONE),
            NOW + 1_000,
        )
        .unwrap();
        assert_eq!(c.take_closed(W), 3);
    }

    #[test]
    fn a_lease_taken_ahead_is_admitted_from_only_once_claimed_and_only_once() {
        let c = Counter::new();
        let l = requests_only(100);
        let view = FleetView::Synced { replicas: 2 };
        let next = Window(W.0 + 1);
        c.charge_in_fleet(W, req(1), l, Enforcement::Enforce, (view, Pace::NONE), NOW)
            .unwrap();
        c.lease_ahead(next, 4);
        c.lease_ahead(next, 3);
        assert_eq!((c.ahead(next), c.lease(next)), (7, 0));
        // Not the current window's lease: nothing is admitted from it before the claim.
        assert_eq!(c.claim_ahead(W), 0);
        assert_eq!(admitted(&c, l, view, 1), 0);
        // In the next window, the first claim adds it; a second finds it emptied.
        assert_eq!(c.claim_ahead(next), 7);
        assert_eq!(c.claim_ahead(next), 0);
        assert_eq!(c.lease(next), 7);
        let in_next = (0..10)
            .filter(|_| {
                c.charge_in_fleet(
                    next,
                    req(1),
                    l,
                    Enforcement::Enforce,
                    (view, Pace::NONE),
                    NOW,
                )
                .unwrap()
                .counted
            })
            .count();
        assert_eq!(in_next, 7);
        // A lease ahead of an older window is dropped for a newer one; one taken empties it.
        c.lease_ahead(Window(W.0 + 2), 2);
        c.lease_ahead(Window(W.0 + 3), 5);
        assert_eq!(c.ahead(Window(W.0 + 2)), 0);
        assert_eq!(c.take_ahead(Window(W.0 + 3)), 5);
        assert_eq!(c.ahead(Window(W.0 + 3)), 0);
    }

    #[test]
    fn a_tokens_check_is_admitted_while_the_tokens_reported_stay_under_the_lease() {
        let l = Limits {
            requests: None,
            tokens: Some(900),
            ..Default::default()
        };
        let view = FleetView::Synced { replicas: 3 };
        let tokens = |n| Counts {
            requests: 0,
            tokens: n,
        };
        let check = |c: &Counter| {
            c.charge_in_fleet(
                W,
                Counts::ZERO,
                l,
                Enforcement::Enforce,
                (view, Pace::NONE),
                NOW,
            )
            .unwrap()
            .over
        };
        let c = Counter::new();
        // No tokens lease yet: refused, and a lease may admit it.
        let over = check(&c);
        assert!(over.tokens && over.lease_spent);
        // Leased 300 of the fleet's 900, the others hold 200.
        let leased = |held: u32, granted: u32, fleet: u32| Stored {
            pushed: Counts::ZERO,
            fleet: tokens(fleet.into()),
            held: tokens(held.into()),
            granted: tokens(granted.into()),
            fleet_admitted: 0,
            fades: false,
            refills: false,
            spent_for_good: false,
            tokens_counted: 0,
        };
        c.synced(W, leased(300, 300, 500), NOW);
        assert_eq!(c.tokens_lease(W), 300);
        c.charge_in_fleet(
            W,
            tokens(299),
            l,
            Enforcement::Shadow,
            (view, Pace::NONE),
            NOW,
        )
        .unwrap();
        assert!(!check(&c).any(), "299 of a lease of 300 reported");
        // A report past the lease is counted (the tokens were spent) and stops the checks.
        let r = c
            .charge_in_fleet(
                W,
                tokens(40),
                l,
                Enforcement::Shadow,
                (view, Pace::NONE),
                NOW,
            )
            .unwrap();
        assert!(r.counted && r.counts.tokens == 339 + 200);
        let over = check(&c);
        assert!(over.tokens && over.lease_spent, "the fleet has 400 left");
        // The fleet spent (the others took the rest), as read a moment ago: no call to ask.
        c.leased_with_fleet(W, leased(339, 0, 900), NOW);
        let over = check(&c);
        assert!(over.tokens && !over.lease_spent);
        // Idle, the lease shrinks to what was reported, no lower.
        assert_eq!(c.shrink_tokens_lease(W, 0), 0);
        let d = Counter::new();
        d.synced(W, leased(300, 300, 300), NOW);
        d.charge_in_fleet(
            W,
            tokens(120),
            l,
            Enforcement::Shadow,
            (view, Pace::NONE),
            NOW,
        )
        .unwrap();
        assert_eq!(d.shrink_tokens_lease(W, 0), 180);
        assert_eq!(d.tokens_lease(W), 120);
        // Held while the store is away, under a share of the limit.
        let share = FleetView::LocalShare { replicas: 3 };
        let away = d
            .charge_in_fleet(
                W,
                Counts::ZERO,
                l,
                Enforcement::Enforce,
                (share, Pace::NONE),
                NOW,
            )
            .unwrap();
        assert!(!away.over.any(), "120 of a share of 300");
    }

    #[test]
    fn a_counter_with_a_lease_ahead_is_not_retired_before_it_is_claimed() {
        let c = Counter::new();
        c.charge(W, req(1), Limits::default(), Enforcement::Enforce)
            .unwrap();
        let next = Window(W.0 + 1);
        c.lease_ahead(next, 2);
        assert!(!c.retire_if_idle(next), "its lease ahead would be lost");
        assert_eq!(c.claim_ahead(next), 2);
        assert!(c.retire_if_idle(Window(W.0 + 2)));
    }

    #[test]
    fn a_sync_that_finds_the_others_unchanged_keeps_the_trust_built_up() {
        let c = Counter::new();
        c.synced(W, stored(0, 10, 0), NOW);
        // The request path asked twice and nothing changed: trusted 400 ms.
        c.leased_with_fleet(W, stored(0, 10, 0), NOW);
        c.leased_with_fleet(W, stored(0, 10, 0), NOW);
        let note = |c: &Counter| Word::load(&c.others).note;
        assert_eq!(mark_of(note(&c)), 2);
        c.synced_in_long_window(W, stored(0, 10, 0), NOW + 50);
        assert_eq!(mark_of(note(&c)), 2, "unchanged: kept");
        assert!(fresh(note(&c), NOW + 50 + 390));
        // The others changed: trusted afresh for 100 ms only.
        c.synced_in_long_window(W, stored(0, 8, 0), NOW + 60);
        assert_eq!(mark_of(note(&c)), 0);
        assert!(!fresh(note(&c), NOW + 60 + 100));
        // In a short window every sync trusts afresh.
        c.leased_with_fleet(W, stored(0, 8, 0), NOW + 70);
        c.synced(W, stored(0, 8, 0), NOW + 80);
        assert_eq!(mark_of(note(&c)), 0);
    }

    #[test]
    fn the_round_of_the_last_change_rides_beside_the_fleet_counts() {
        let c = Counter::new();
        c.charge(W, req(3), Limits::default(), Enforcement::Enforce)
            .unwrap();
        assert_eq!(c.last_synced(W), (Counts::ZERO, None));
        // The sync said it admitted 3 (with no lease): the store raised its lease to that.
        let raised = Stored {
            granted: Counts::ZERO,
            ..stored(3, 5, 3)
        };
        c.synced(W, raised, 164);
        assert_eq!(
            c.last_synced(W),
            (req(5), Some(41)),
            "164 ms: the 41st 4 ms tick"
        );
        assert_eq!(c.others(W), req(2));
        // Another window: no total read for it yet, the round kept.
        assert_eq!(c.last_synced(Window(101)), (Counts::ZERO, Some(41)));
        let l = requests_only(5);
        // The note does not disturb the counts requests judge against.
        let r = c
            .charge_in_fleet(
                W,
                req(1),
                l,
                Enforcement::Enforce,
                (FleetView::Synced { replicas: 2 }, Pace::NONE),
                NOW,
            )
            .unwrap();
        assert!(!r.counted && r.over.requests);
    }

    #[test]
    fn a_grant_after_requests_admitted_past_the_lease_adds_to_what_was_admitted() {
        let c = Counter::new();
        let store = |admitted, granted| Stored {
            pushed: req(admitted),
            granted: req(granted),
            ..Stored::default()
        };
        c.synced(W, store(0, 4), NOW);
        // Redis failing, the policy admitted 10 on that lease of 4; the next call said so, and
        // the store raised the lease to 10 before granting 6.
        c.charge(W, req(10), Limits::default(), Enforcement::Enforce)
            .unwrap();
        c.synced(W, store(10, 6), NOW);
        assert_eq!(c.lease(W), 16);
        // A call sent before a give-back, answered after it: what went back is not held again.
        assert_eq!(c.shrink_lease(W, 0), Some(6));
        c.leased_with_fleet(W, store(10, 2), NOW);
        assert_eq!(c.lease(W), 12);
        // A grant for a window the counter has not reached starts it afresh.
        c.synced(Window(W.0 + 1), store(0, 3), NOW);
        assert_eq!(c.lease(Window(W.0 + 1)), 3);
    }

    #[test]
    fn a_grant_after_tokens_reported_past_the_lease_adds_to_what_was_reported() {
        let (c, w) = (Counter::new(), Window(7));
        let store = |granted, holding| Stored {
            granted: Counts {
                requests: 0,
                tokens: granted,
            },
            tokens_counted: holding,
            ..Stored::default()
        };
        c.synced(w, store(75, 0), 0);
        assert_eq!(c.tokens_lease(w), 75);
        // 200 reported on that lease: the store raised it to 200, then granted 31 more.
        let reported = Counts {
            requests: 0,
            tokens: 200,
        };
        c.charge(w, reported, Limits::default(), Enforcement::Enforce)
            .unwrap();
        c.synced(w, store(31, 200), 0);
        assert_eq!(c.tokens_lease(w), 231);
        // A grant that follows no such report adds to the lease as it was.
        c.synced(w, store(9, 200), 0);
        assert_eq!(c.tokens_lease(w), 240);
        // A call sent before a give-back (down to what was reported), answered after it: what
        // went back is not held again.
        assert_eq!(c.shrink_tokens_lease(w, 0), 40);
        c.leased_with_fleet(w, store(5, 200), 0);
        assert_eq!(c.tokens_lease(w), 205);
    }
}
