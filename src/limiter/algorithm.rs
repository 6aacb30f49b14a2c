//! How a limit counts, besides the fixed window: a sliding window and a token bucket (GCRA).
//! Each is one pure step over a counter's 128-bit word, so the counter changes it with the same
//! single compare-and-swap as a fixed window, with no lock.
//!
//! Both count one measure (requests or tokens) per counter. The word's top 32 bits stay a
//! window stamp, so the sweeper needs no algorithm to know when a counter is idle: the stamp is
//! the last window (of the limit's unit) in which the counter still matters.
//!
//! ```text
//! sliding window:  | last window that matters (current + 1): u32 | previous: u32 | current: u32 | 0 |
//! token bucket:    | window in which the bucket is full: u32 | last charged: u42 | fill: u54 |
//! in flight:       | last window that matters (current + 1): u32 | previous: u32 | current: u32 | 0 |
//! ```
//!
//! In flight (`concurrency`): holds taken and not yet given back, counted by the window of
//! `hold_ttl` in which each was taken. A charge fits when `previous + current + n ≤ limit`. A
//! release names when its hold was taken, and so the window it is counted in; holds of a window
//! two windows back are dropped, so a hold whose release never comes lapses between `hold_ttl`
//! and twice that after it was taken, and its late release finds nothing to give back.
//!
//! Sliding window: the weighted estimate of the last unit of time, `current + previous × (the
//! share of the previous window still inside it)`, computed exactly in integers: a charge `n`
//! fits when `(current + n) × W + previous × (W − elapsed) ≤ limit × W`.
//!
//! Token bucket: GCRA in exact integers. One unit (a request or a token) costs `W` (the unit's
//! length in ticks of the bucket's clock, milliseconds up to hour units) of "fill", which
//! drains at `limit` a tick, so the bucket refills `limit` units every `W` and no division is
//! ever rounded; a charge `n` fits when `fill + n × W ≤ burst × W`. The fill is kept rather
//! than GCRA's theoretical arrival time, so a new limit keeps the bucket's level.

use std::time::Duration;

use super::counter::saturating_u32;

/// How a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Counts in windows aligned to the epoch; the count starts afresh in each (the default,
    /// as envoyproxy/ratelimit).
    #[default]
    FixedWindow,
    /// Weighs the previous window's count by how much of it is still within the last unit of
    /// time: no burst of twice the limit across a boundary.
    SlidingWindow,
    /// A bucket of `burst` that refills at the limit's rate, continuously (GCRA).
    TokenBucket {
        /// The bucket's size: what may pass at once after a quiet spell.
        burst: u32,
    },
    /// Holds in flight (`concurrency`): a call takes one while its stream lasts and gives it
    /// back at its end; the limit's unit is the hold's time to live.
    InFlight,
}

impl Algorithm {
    /// Its name, as rule files and the API write it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::TokenBucket { .. } => "token_bucket",
            Algorithm::InFlight => "concurrency",
        }
    }

    /// Whether it counts in fixed windows (the counter word of `Counter` as it was).
    pub fn is_fixed(self) -> bool {
        self == Algorithm::FixedWindow
    }
}

/// One charge of `n` under `algorithm` (a sliding window or a token bucket; a fixed window
/// counts in `Counter`'s own word and is never sent here): the word to write (none to
/// keep it) and what the charge came to.
pub(super) fn charge(
    algorithm: Algorithm,
    word: u128,
    now_ms: u64,
    rate: Rate,
    n: u32,
    enforce: bool,
) -> (Option<u128>, Judged) {
    match algorithm {
        Algorithm::SlidingWindow => sliding_charge(word, now_ms, rate, n, enforce),
        Algorithm::TokenBucket { burst } => bucket_charge(word, now_ms, rate, burst, n, enforce),
        Algorithm::InFlight => hold_charge(word, now_ms, rate, n, enforce),
        Algorithm::FixedWindow => (
            None,
            Judged {
                used: 0,
                over: false,
                counted: false,
                until_reset: Duration::ZERO,
            },
        ),
    }
}

/// What one step of an algorithm made of a charge, in the terms a status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    /// What the limit counts as used now (after the charge, if it was counted): the estimate
    /// of a sliding window; for a token bucket, its size less what it holds.
    pub used: u32,
    /// Whether the charge broke the limit.
    pub over: bool,
    /// Whether the charge was added.
    pub counted: bool,
    /// For a charge that fits, the time until the limit is wholly free again (the window's end;
    /// the bucket full); for one over, the time until it would fit if nothing else came.
    pub until_reset: Duration,
}

/// A limit of one measure, as an algorithm applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Per unit of time (the capacity factor applied).
    pub limit: u32,
    /// The unit's length in milliseconds.
    pub unit_ms: u64,
}

const STAMP_SHIFT: u32 = 96;

fn stamp_of(word: u128) -> u32 {
    (word >> STAMP_SHIFT) as u32
}

/// A window stamp, never [`RETIRED`](u32::MAX) (a counter near the end of time stays live).
fn stamp(window: u64) -> u32 {
    window.min(u64::from(u32::MAX - 1)) as u32
}

/// A zero charge only checks: it is over when not one unit is left.
fn probe(charge: u32) -> u64 {
    u64::from(charge.max(1))
}

// ---------------------------------------------------------------------------------------------
// Sliding window

/// A sliding window's state: the current window, its count, and the previous window's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sliding {
    window: u64,
    previous: u32,
    current: u32,
}

impl Sliding {
    fn unpack(word: u128) -> Sliding {
        Sliding {
            // The stamp is the window after the current one: the last in which it matters.
            window: u64::from(stamp_of(word)).saturating_sub(1),
            previous: (word >> 64) as u32,
            current: (word >> 32) as u32,
        }
    }

    fn pack(self) -> u128 {
        (u128::from(stamp(self.window + 1)) << STAMP_SHIFT)
            | (u128::from(self.previous) << 64)
            | (u128::from(self.current) << 32)
    }

    /// The state as seen in `window`: rolled forward if it is older (a count two windows old
    /// no longer weighs); kept if another thread already rolled past it.
    fn at(self, window: u64) -> Sliding {
        if self.window >= window {
            self
        } else if self.window + 1 == window {
            Sliding {
                window,
                previous: self.current,
                current: 0,
            }
        } else {
            Sliding {
                window,
                previous: 0,
                current: 0,
            }
        }
    }
}

/// `previous × (W − elapsed)`: the previous window's weight, times W (exact).
fn carried(previous: u32, rate: Rate, elapsed: u64) -> u128 {
    u128::from(previous) * u128::from(rate.unit_ms - elapsed)
}

/// The estimate, rounded up: what a status reports as used.
fn estimate(s: Sliding, rate: Rate, elapsed: u64) -> u32 {
    let weighted = carried(s.previous, rate, elapsed).div_ceil(u128::from(rate.unit_ms));
    (u128::from(s.current) + weighted).min(u128::from(u32::MAX)) as u32
}

/// Whether `current + n` fits beside the previous window's weight.
fn sliding_fits(s: Sliding, n: u64, rate: Rate, elapsed: u64) -> bool {
    let w = u128::from(rate.unit_ms);
    (u128::from(s.current) + u128::from(n)) * w + carried(s.previous, rate, elapsed)
        <= u128::from(rate.limit) * w
}

/// Milliseconds from `now_ms` until `n` fits, if nothing else is counted (none when it fits
/// now). Within this window the previous window's weight fades; failing that, in the next
/// the current count becomes the one that fades.
fn sliding_wait(s: Sliding, n: u64, rate: Rate, now_ms: u64) -> u64 {
    let w = u128::from(rate.unit_ms);
    let start = s.window * rate.unit_ms;
    let elapsed = now_ms.saturating_sub(start).min(rate.unit_ms - 1);
    let limit = u128::from(rate.limit);
    // Fits at elapsed e when previous × (W − e) ≤ (limit − current − n) × W.
    let first_at = |previous: u32, taken: u128| -> Option<u64> {
        let room = limit.checked_sub(taken)? * w;
        if previous == 0 {
            return Some(0);
        }
        // The least e with previous × (W − e) ≤ room: e ≥ W − room / previous.
        let fade = room / u128::from(previous);
        Some(w.saturating_sub(fade) as u64)
    };
    if let Some(e) = first_at(s.previous, u128::from(s.current) + u128::from(n)) {
        return e.saturating_sub(elapsed).max(1);
    }
    let next_start = start + rate.unit_ms;
    let wait_in_next = first_at(s.current, u128::from(n)).unwrap_or(rate.unit_ms);
    next_start + wait_in_next.min(rate.unit_ms) - now_ms
}

/// A sliding window counted elsewhere (the fleet store, call by call) as a status reports it:
/// its `current` and `previous` windows' counts at `now_ms` (after a charge that was taken)
/// come to the estimate used, and the time until the limit is wholly free again or, for a
/// charge of `refused` that did not fit, until it would.
pub fn sliding_standing(
    (current, previous): (u64, u64),
    now_ms: u64,
    rate: Rate,
    refused: Option<u64>,
) -> (u32, Duration) {
    let window = now_ms / rate.unit_ms;
    let s = Sliding {
        window,
        previous: saturating_u32(previous),
        current: saturating_u32(current),
    };
    let elapsed = now_ms - window * rate.unit_ms;
    let wait = match refused {
        Some(n) => sliding_wait(s, n.max(1), rate, now_ms),
        None => (window + 1) * rate.unit_ms - now_ms,
    };
    (estimate(s, rate, elapsed), Duration::from_millis(wait))
}

/// One charge of `n` to a sliding window word at `now_ms`: the word to write (none to keep it)
/// and what it came to. An enforced charge that does not fit adds nothing.
pub(super) fn sliding_charge(
    word: u128,
    now_ms: u64,
    rate: Rate,
    n: u32,
    enforce: bool,
) -> (Option<u128>, Judged) {
    let window = now_ms / rate.unit_ms;
    let s = Sliding::unpack(word).at(window);
    let elapsed = now_ms
        .saturating_sub(s.window * rate.unit_ms)
        .min(rate.unit_ms);
    let fits = sliding_fits(s, probe(n), rate, elapsed);
    let until_end = (s.window + 1) * rate.unit_ms - now_ms.min((s.window + 1) * rate.unit_ms);
    if (enforce && !fits) || n == 0 {
        let until_reset = if fits {
            until_end
        } else {
            sliding_wait(s, probe(n), rate, now_ms)
        };
        // Rolling forward is left to the next charge that counts: a refusal writes nothing.
        return (
            None,
            Judged {
                used: estimate(s, rate, elapsed),
                over: !fits,
                counted: false,
                until_reset: Duration::from_millis(until_reset),
            },
        );
    }
    let after = Sliding {
        current: s.current.saturating_add(n),
        ..s
    };
    (
        Some(after.pack()),
        Judged {
            used: estimate(after, rate, elapsed),
            over: !fits,
            counted: true,
            until_reset: Duration::from_millis(until_end.max(1)),
        },
    )
}

/// Gives `n` back to a sliding window word, if it still holds the window `charged_in`.
pub(super) fn sliding_refund(word: u128, charged_in: u64, n: u32) -> Option<u128> {
    let s = Sliding::unpack(word);
    (s.window == charged_in && stamp_of(word) != 0).then(|| {
        Sliding {
            current: s.current.saturating_sub(n),
            ..s
        }
        .pack()
    })
}

/// What a sliding window word counts as used at `now_ms`, charging nothing.
pub(super) fn sliding_used(word: u128, now_ms: u64, rate: Rate) -> u32 {
    let window = now_ms / rate.unit_ms;
    let s = Sliding::unpack(word).at(window);
    let elapsed = now_ms
        .saturating_sub(s.window * rate.unit_ms)
        .min(rate.unit_ms);
    estimate(s, rate, elapsed)
}

// ---------------------------------------------------------------------------------------------
// In flight

/// Holds in flight at `now_ms`: the sliding window's state, counted unweighted.
fn holds_at(word: u128, now_ms: u64, rate: Rate) -> Sliding {
    Sliding::unpack(word).at(now_ms / rate.unit_ms)
}

fn held(s: Sliding) -> u64 {
    u64::from(s.previous) + u64::from(s.current)
}

/// Milliseconds from `now_ms` until the holds counted lapse, if none is given back: those of
/// the previous window when this one ends, the current window's when the next one ends. With
/// `need` set, until enough have lapsed for `need` more to fit.
fn holds_lapse(s: Sliding, rate: Rate, now_ms: u64, need: Option<u64>) -> u64 {
    let this_end = (s.window + 1) * rate.unit_ms;
    let next_end = this_end + rate.unit_ms;
    let last = match need {
        Some(n) if u64::from(s.current) + n <= u64::from(rate.limit) => this_end,
        Some(_) => next_end,
        None if s.current > 0 => next_end,
        None if s.previous > 0 => this_end,
        None => return 0,
    };
    last.saturating_sub(now_ms).max(1)
}

/// One charge of `n` holds at `now_ms`: the word to write (none to keep it) and what it came
/// to. An enforced charge that does not fit takes nothing.
pub(super) fn hold_charge(
    word: u128,
    now_ms: u64,
    rate: Rate,
    n: u32,
    enforce: bool,
) -> (Option<u128>, Judged) {
    let s = holds_at(word, now_ms, rate);
    let fits = held(s) + probe(n) <= u64::from(rate.limit);
    if (enforce && !fits) || n == 0 {
        let need = (!fits).then_some(probe(n));
        return (
            None,
            Judged {
                used: saturating_u32(held(s)),
                over: !fits,
                counted: false,
                until_reset: Duration::from_millis(holds_lapse(s, rate, now_ms, need)),
            },
        );
    }
    let after = Sliding {
        current: s.current.saturating_add(n),
        ..s
    };
    (
        Some(after.pack()),
        Judged {
            used: saturating_u32(held(after)),
            over: !fits,
            counted: true,
            until_reset: Duration::from_millis(holds_lapse(after, rate, now_ms, None)),
        },
    )
}

/// Gives back `n` holds taken at `taken_ms` (when known): from the window they are counted in,
/// or nothing if they have lapsed. Without a time, from the oldest holds first. Returns the
/// word to write (none to keep it) and the holds left.
pub(super) fn hold_release(
    word: u128,
    now_ms: u64,
    rate: Rate,
    taken_ms: Option<u64>,
    n: u32,
) -> (Option<u128>, u32) {
    if stamp_of(word) == 0 {
        return (None, 0);
    }
    let s = holds_at(word, now_ms, rate);
    let after = match taken_ms.map(|t| t / rate.unit_ms) {
        // A clock a little ahead of this one: its hold is of the current window.
        Some(taken) if taken >= s.window => Sliding {
            current: s.current.saturating_sub(n),
            ..s
        },
        Some(taken) if taken + 1 == s.window => Sliding {
            previous: s.previous.saturating_sub(n),
            ..s
        },
        Some(_) => return (None, saturating_u32(held(s))),
        None => {
            let from_previous = n.min(s.previous);
            Sliding {
                previous: s.previous - from_previous,
                current: s.current.saturating_sub(n - from_previous),
                ..s
            }
        }
    };
    (Some(after.pack()), saturating_u32(held(after)))
}

/// The holds in flight in a word at `now_ms`, charging nothing.
#[cfg(test)]
fn holds_used(word: u128, now_ms: u64, rate: Rate) -> u32 {
    saturating_u32(held(holds_at(word, now_ms, rate)))
}

// ---------------------------------------------------------------------------------------------
// Token bucket

const FILL_BITS: u32 = 54;
const FILL_MAX: u128 = (1 << FILL_BITS) - 1;
const TICK_MAX: u64 = (1 << 42) - 1;

/// A bucket's clock: milliseconds up to hour units; seconds up to 30 days; ten seconds
/// beyond, so that a bucket of `u32::MAX` fits the word's 54 bits of fill in every unit.
fn tick_ms(unit_ms: u64) -> u64 {
    if unit_ms <= 3_600_000 {
        1
    } else if unit_ms <= 2_592_000_000 {
        1_000
    } else {
        10_000
    }
}

/// A token bucket's state: when it was last charged (in ticks since the epoch) and its fill
/// then, in units of `1 / W` of a unit (W: the unit's length in ticks). Free of the limit, so
/// a new limit (a reload, a capacity change) keeps the level and changes the refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    at: u64,
    fill: u128,
}

struct Clocked {
    now: u64,
    tick: u64,
    w: u128,
}

impl Clocked {
    fn new(now_ms: u64, rate: Rate) -> Clocked {
        let tick = tick_ms(rate.unit_ms);
        Clocked {
            now: now_ms / tick,
            tick,
            w: u128::from(rate.unit_ms / tick),
        }
    }

    /// Milliseconds until `fill` has drained to `to`, rounded up to a tick.
    fn drain_ms(&self, fill: u128, to: u128, rate: Rate) -> u64 {
        let ticks = fill
            .saturating_sub(to)
            .div_ceil(u128::from(rate.limit.max(1)));
        (ticks * u128::from(self.tick)).min(u128::from(u64::MAX)) as u64
    }
}

impl Bucket {
    fn unpack(word: u128) -> Bucket {
        Bucket {
            at: ((word >> FILL_BITS) as u64) & TICK_MAX,
            fill: word & FILL_MAX,
        }
    }

    /// The word, stamped with the window of `unit_ms` in which it is full again.
    fn pack(self, clock: &Clocked, rate: Rate) -> u128 {
        let full_at = u128::from(self.at) * u128::from(clock.tick)
            + u128::from(clock.drain_ms(self.fill, 0, rate));
        let window = (full_at / u128::from(rate.unit_ms)).min(u128::from(u64::MAX)) as u64;
        (u128::from(stamp(window)) << STAMP_SHIFT)
            | (u128::from(self.at.min(TICK_MAX)) << FILL_BITS)
            | self.fill.min(FILL_MAX)
    }

    /// Its fill at `now`, drained at `limit` a tick since it was last charged.
    fn fill_at(self, clock: &Clocked, rate: Rate) -> u128 {
        let drained = u128::from(clock.now.saturating_sub(self.at)) * u128::from(rate.limit);
        self.fill.saturating_sub(drained)
    }

    /// Its size less the whole units it holds: what a status reports as used.
    fn used(fill: u128, burst: u32, clock: &Clocked) -> u32 {
        let capacity = u128::from(burst) * clock.w;
        let holds = capacity.saturating_sub(fill) / clock.w;
        (u128::from(burst) - holds.min(u128::from(burst))) as u32
    }
}

/// One charge of `n` to a token bucket word at `now_ms`: the word to write (none to keep it)
/// and what it came to. An enforced charge that does not fit adds nothing.
pub(super) fn bucket_charge(
    word: u128,
    now_ms: u64,
    rate: Rate,
    burst: u32,
    n: u32,
    enforce: bool,
) -> (Option<u128>, Judged) {
    let clock = Clocked::new(now_ms, rate);
    let capacity = u128::from(burst) * clock.w;
    let fill = Bucket::unpack(word).fill_at(&clock, rate);
    let cost = u128::from(probe(n)) * clock.w;
    let fits = rate.limit > 0 && fill + cost <= capacity;
    if (enforce && !fits) || n == 0 {
        let until_reset = if fits {
            clock.drain_ms(fill, 0, rate)
        } else if rate.limit == 0 || cost > capacity {
            // Never fits: reported as the unit, as a window that never opens would be.
            rate.unit_ms
        } else {
            clock.drain_ms(fill + cost, capacity, rate)
        };
        return (
            None,
            Judged {
                used: Bucket::used(fill, burst, &clock),
                over: !fits,
                counted: false,
                until_reset: Duration::from_millis(until_reset),
            },
        );
    }
    let after = Bucket {
        at: clock.now,
        fill: (fill + u128::from(n) * clock.w).min(FILL_MAX),
    };
    (
        Some(after.pack(&clock, rate)),
        Judged {
            used: Bucket::used(after.fill, burst, &clock),
            over: !fits,
            counted: true,
            until_reset: Duration::from_millis(clock.drain_ms(after.fill, 0, rate)),
        },
    )
}

/// A token bucket counted elsewhere (the fleet store, call by call) in this module's terms:
/// the tick of its clock (ms) and the fill one unit costs (`W`, the unit's length in ticks).
pub fn bucket_terms(rate: Rate) -> (u64, u64) {
    let tick = tick_ms(rate.unit_ms);
    (tick, rate.unit_ms / tick)
}

/// A token bucket counted elsewhere as a status reports it: its `fill` at `now_ms` (after a
/// charge that was taken) comes to what is used of `burst`, and the time until it is full or,
/// for a charge of `refused` units that did not fit, until it would.
pub fn bucket_standing(
    fill: u128,
    now_ms: u64,
    rate: Rate,
    burst: u32,
    refused: Option<u64>,
) -> (u32, Duration) {
    let clock = Clocked::new(now_ms, rate);
    let capacity = u128::from(burst) * clock.w;
    let wait = match refused {
        None => clock.drain_ms(fill, 0, rate),
        Some(n) => {
            let cost = u128::from(n.max(1)) * clock.w;
            if rate.limit == 0 || cost > capacity {
                rate.unit_ms
            } else {
                clock.drain_ms(fill + cost, capacity, rate)
            }
        }
    };
    (
        Bucket::used(fill, burst, &clock),
        Duration::from_millis(wait),
    )
}

/// Gives `n` back to a token bucket word at `now_ms` (never fuller than full).
pub(super) fn bucket_refund(word: u128, now_ms: u64, rate: Rate, n: u32) -> u128 {
    let clock = Clocked::new(now_ms, rate);
    let fill = Bucket::unpack(word).fill_at(&clock, rate);
    Bucket {
        at: clock.now,
        fill: fill.saturating_sub(u128::from(n) * clock.w),
    }
    .pack(&clock, rate)
}

/// What a token bucket word reports as used at `now_ms`, charging nothing.
pub(super) fn bucket_used_at(word: u128, now_ms: u64, rate: Rate, burst: u32) -> u32 {
    let clock = Clocked::new(now_ms, rate);
    Bucket::used(Bucket::unpack(word).fill_at(&clock, rate), burst, &clock)
}

/// A token bucket kept in leases, from what the fleet has taken of it as this replica knows it
/// (`used`: its burst less what it holds): for a charge that fits, the time until it is full;
/// for one over, the time until the charge would fit if nothing else came (a charge larger
/// than the burst never fits: reported as the unit, as [`bucket_charge`] does).
pub(super) fn leased_bucket_reset(
    used: u64,
    charge: u64,
    over: bool,
    burst: u32,
    rate: Rate,
) -> Duration {
    let burst = u64::from(burst);
    let short = if !over {
        used.min(burst)
    } else if charge > burst || rate.limit == 0 {
        return Duration::from_millis(rate.unit_ms);
    } else {
        (used + probe(saturating_u32(charge))).saturating_sub(burst)
    };
    let ms = (u128::from(short) * u128::from(rate.unit_ms)).div_ceil(u128::from(rate.limit.max(1)));
    Duration::from_millis(ms.min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINUTE: Rate = Rate {
        limit: 60,
        unit_ms: 60_000,
    };

    /// Three streams, holds living 10 s.
    const THREE_HOLDS: Rate = Rate {
        limit: 3,
        unit_ms: 10_000,
    };

    fn take(word: &mut u128, now_ms: u64) -> Judged {
        let (next, judged) = hold_charge(*word, now_ms, THREE_HOLDS, 1, true);
        if let Some(next) = next {
            *word = next;
        }
        judged
    }

    fn give_back(word: &mut u128, now_ms: u64, taken_ms: Option<u64>) -> u32 {
        let (next, left) = hold_release(*word, now_ms, THREE_HOLDS, taken_ms, 1);
        if let Some(next) = next {
            *word = next;
        }
        left
    }

    #[test]
    fn holds_fill_to_the_limit_and_a_release_frees_one() {
        let (mut word, t0) = (0u128, 1_000_000_000);
        for i in 1..=3 {
            let judged = take(&mut word, t0 + i);
            assert!(judged.counted && !judged.over, "hold {i}");
            assert_eq!(judged.used, i as u32);
        }
        let refused = take(&mut word, t0 + 10);
        assert!(refused.over && !refused.counted);
        assert_eq!(refused.used, 3, "a refusal takes nothing");
        assert_eq!(give_back(&mut word, t0 + 20, Some(t0 + 1)), 2);
        assert!(take(&mut word, t0 + 30).counted, "the freed slot is taken");
        assert!(take(&mut word, t0 + 40).over);
    }

    #[test]
    fn a_hold_never_given_back_lapses_after_its_time_to_live_and_before_twice_that() {
        // Taken 1 s into a window of 10 s: counted until the window after next begins.
        let (mut word, start) = (0u128, 1_000_000_000);
        for _ in 0..3 {
            take(&mut word, start + 1_000);
        }
        // Still held 10.9 s later (the next window), lapsed at 19 s (two windows on).
        assert!(take(&mut word, start + 11_900).over);
        assert_eq!(holds_used(word, start + 19_999, THREE_HOLDS), 3);
        assert_eq!(holds_used(word, start + 20_000, THREE_HOLDS), 0);
        let judged = take(&mut word, start + 20_000);
        assert!(judged.counted && judged.used == 1);
        // Its late release finds nothing to give back: the new hold stays.
        assert_eq!(give_back(&mut word, start + 20_001, Some(start + 1_000)), 1);
    }

    #[test]
    fn a_release_gives_back_from_the_window_its_hold_was_taken_in() {
        let (mut word, start) = (0u128, 1_000_000_000);
        take(&mut word, start + 100); // window 0
        take(&mut word, start + 10_100); // window 1: the first is now the previous window's
        take(&mut word, start + 10_200);
        // The first's release frees the previous window's hold: when window 1 ends, the two
        // of window 1 are still counted.
        assert_eq!(give_back(&mut word, start + 10_300, Some(start + 100)), 2);
        assert_eq!(holds_used(word, start + 20_000, THREE_HOLDS), 2);
        // A release with no time gives back the oldest first.
        assert_eq!(give_back(&mut word, start + 20_100, None), 1);
    }

    #[test]
    fn a_release_on_a_word_never_charged_writes_nothing() {
        assert_eq!(
            hold_release(0, 5_000, THREE_HOLDS, Some(4_000), 1),
            (None, 0)
        );
        let mut word = 0;
        take(&mut word, 5_000);
        // Releasing more than is held stops at zero.
        assert_eq!(give_back(&mut word, 5_001, Some(5_000)), 0);
        assert_eq!(give_back(&mut word, 5_002, Some(5_000)), 0);
    }

    #[test]
    fn a_refusal_says_when_enough_holds_lapse() {
        let (mut word, start) = (0u128, 1_000_000_000);
        take(&mut word, start + 1_000); // window 0
        take(&mut word, start + 12_000); // window 1
        take(&mut word, start + 13_000);
        // At 15 s: one hold lapses when window 1 ends (20 s), enough for one more.
        let refused = take(&mut word, start + 15_000);
        assert!(refused.over);
        assert_eq!(refused.until_reset, Duration::from_millis(5_000));
        // A charge that fits reports when every hold would have lapsed: its own, taken in
        // window 2, when window 3 ends.
        let (_, fits) = hold_charge(word, start + 20_500, THREE_HOLDS, 1, true);
        assert!(fits.counted);
        assert_eq!(fits.until_reset, Duration::from_millis(19_500));
    }

    /// Charges `n` at `now` in a loop as the counter does, returning the judgement.
    fn charge(word: &mut u128, step: impl Fn(u128) -> (Option<u128>, Judged)) -> Judged {
        let (next, judged) = step(*word);
        if let Some(next) = next {
            *word = next;
        }
        judged
    }

    #[test]
    fn a_sliding_window_weighs_the_previous_window_by_what_is_left_of_it() {
        let mut word = 0;
        let t0 = 600_000; // a minute boundary
        // 60 in the first minute's last second.
        for _ in 0..60 {
            let j = charge(&mut word, |w| sliding_charge(w, t0 - 500, MINUTE, 1, true));
            assert!(j.counted);
        }
        assert!(!charge(&mut word, |w| sliding_charge(w, t0 - 400, MINUTE, 1, true)).counted);
        // A quarter into the next minute, three quarters of the 60 still weigh: 15 fit.
        let quarter = t0 + 15_000;
        let admitted = (0..30)
            .filter(|_| charge(&mut word, |w| sliding_charge(w, quarter, MINUTE, 1, true)).counted)
            .count();
        assert_eq!(admitted, 15);
        assert_eq!(sliding_used(word, quarter, MINUTE), 60);
        // Two minutes on, nothing weighs.
        assert_eq!(sliding_used(word, t0 + 120_000, MINUTE), 0);
    }

    #[test]
    fn a_sliding_denial_says_when_the_request_would_fit() {
        let mut word = 0;
        let t0 = 600_000;
        for _ in 0..60 {
            charge(&mut word, |w| sliding_charge(w, t0 - 1, MINUTE, 1, true));
        }
        // At the boundary all 60 weigh; one more fits once a sixtieth has faded: 1 s on.
        let j = charge(&mut word, |w| sliding_charge(w, t0, MINUTE, 1, true));
        assert!(j.over && !j.counted);
        assert_eq!(j.until_reset, Duration::from_secs(1));
        let j = charge(&mut word, |w| {
            sliding_charge(w, t0 + 1_000, MINUTE, 1, true)
        });
        assert!(j.counted, "{j:?}");
    }

    #[test]
    fn a_token_bucket_refills_at_the_limits_rate_up_to_its_burst() {
        let mut word = 0;
        let t0 = 1_000_000;
        let burst = 10;
        let admitted = (0..20)
            .filter(|_| charge(&mut word, |w| bucket_charge(w, t0, MINUTE, burst, 1, true)).counted)
            .count();
        assert_eq!(admitted, 10, "a full bucket lets its burst through at once");
        let j = charge(&mut word, |w| bucket_charge(w, t0, MINUTE, burst, 1, true));
        assert!(j.over);
        assert_eq!(
            j.until_reset,
            Duration::from_secs(1),
            "one a second refills"
        );
        assert_eq!(bucket_used_at(word, t0, MINUTE, burst), 10);
        // 2.5 s later two whole units are back.
        let later = t0 + 2_500;
        assert_eq!(bucket_used_at(word, later, MINUTE, burst), 8);
        // Full again 10 s after the burst; a charge of 3 then is drained in 3 s.
        assert_eq!(bucket_used_at(word, t0 + 9_999, MINUTE, burst), 1);
        assert_eq!(bucket_used_at(word, t0 + 10_000, MINUTE, burst), 0);
        let j = charge(&mut word, |w| {
            bucket_charge(w, t0 + 10_000, MINUTE, burst, 3, true)
        });
        assert!(j.counted);
        assert_eq!((j.used, j.until_reset), (3, Duration::from_secs(3)));
    }

    #[test]
    fn a_bucket_word_is_stamped_with_the_window_it_is_full_in() {
        let t0 = 1_000_000; // window 16 of a minute
        let (word, _) = bucket_charge(0, t0, MINUTE, 60, 60, true);
        // 60 a minute drain in 60 s: full at 1,060,000 ms, in window 17.
        assert_eq!(stamp_of(word.unwrap()), 17);
        let (word, _) = bucket_charge(0, t0, MINUTE, 60, 1, true);
        assert_eq!(stamp_of(word.unwrap()), 16);
    }

    #[test]
    fn a_new_limit_keeps_the_buckets_level_and_changes_its_refill() {
        let t0 = 1_000_000;
        let (word, _) = bucket_charge(0, t0, MINUTE, 60, 60, true);
        let word = word.unwrap();
        let doubled = Rate {
            limit: 120,
            ..MINUTE
        };
        assert_eq!(bucket_used_at(word, t0, doubled, 60), 60);
        assert_eq!(bucket_used_at(word, t0 + 15_000, doubled, 60), 30);
        assert_eq!(bucket_used_at(word, t0 + 15_000, MINUTE, 60), 45);
    }

    #[test]
    fn a_month_of_ten_billion_fits_the_word() {
        let month = Rate {
            limit: u32::MAX,
            unit_ms: 30 * 86_400_000,
        };
        let t0 = 1_800_000_000_000;
        let (word, j) = bucket_charge(0, t0, month, u32::MAX, u32::MAX, true);
        assert!(j.counted && j.used == u32::MAX);
        let word = word.unwrap();
        assert!(bucket_charge(word, t0, month, u32::MAX, 1, true).1.over);
        // Half the month on, half of it is back.
        assert_eq!(
            bucket_used_at(word, t0 + 15 * 86_400_000, month, u32::MAX),
            u32::MAX - u32::MAX / 2
        );
    }

    #[test]
    fn refunds_give_back_what_was_charged() {
        let t0 = 1_000_000;
        let (word, _) = bucket_charge(0, t0, MINUTE, 10, 4, true);
        let word = bucket_refund(word.unwrap(), t0, MINUTE, 4);
        assert_eq!(bucket_used_at(word, t0, MINUTE, 10), 0);
        let (word, _) = sliding_charge(0, t0, MINUTE, 5, true);
        let word = sliding_refund(word.unwrap(), t0 / 60_000, 2).unwrap();
        assert_eq!(sliding_used(word, t0, MINUTE), 3);
        // Not in another window.
        assert_eq!(sliding_refund(word, t0 / 60_000 + 1, 2), None);
    }

    // Reference models: plain sequential simulations, in floating-free terms of their own.

    /// A sliding window as a list of the window counts, one per window index.
    struct SlidingModel {
        counts: std::collections::HashMap<u64, u64>,
    }

    impl SlidingModel {
        fn admit(&mut self, now: u64, n: u64, rate: Rate) -> bool {
            let w = rate.unit_ms;
            let window = now / w;
            let current = self.counts.get(&window).copied().unwrap_or(0);
            let previous = if window == 0 {
                0
            } else {
                self.counts.get(&(window - 1)).copied().unwrap_or(0)
            };
            let elapsed = now - window * w;
            // current + n + previous × (W − elapsed) / W ≤ limit, without dividing.
            let fits =
                (current + n.max(1)) * w + previous * (w - elapsed) <= u64::from(rate.limit) * w;
            if fits && n > 0 {
                *self.counts.entry(window).or_default() += n;
            }
            fits
        }
    }

    /// A token bucket as a level in fractions of a unit, refilled by elapsed time.
    struct BucketModel {
        /// Units held, times W.
        level: u64,
        at: u64,
    }

    impl BucketModel {
        fn admit(&mut self, now: u64, n: u64, rate: Rate, burst: u64) -> bool {
            let w = rate.unit_ms;
            let refill = (now - self.at) * u64::from(rate.limit);
            self.level = (self.level + refill).min(burst * w);
            self.at = now;
            let fits = rate.limit > 0 && n.max(1) * w <= self.level;
            if fits && n > 0 {
                self.level -= n * w;
            }
            fits
        }
    }

    fn arrivals() -> impl Strategy<Value = Vec<(u64, u32)>> {
        // Gaps of 0 to 3 s, hits of 0 to 7: dense enough to meet each limit, sparse enough
        // to refill and roll over.
        prop::collection::vec((0u64..3_000, 0u32..8), 1..400)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_sliding_window_admits_exactly_what_its_model_admits(
            start in 0u64..10_000_000,
            limit in 1u32..40,
            unit_ms in prop::sample::select(vec![1_000u64, 10_000, 60_000]),
            arrivals in arrivals(),
        ) {
            let rate = Rate { limit, unit_ms };
            let mut model = SlidingModel { counts: Default::default() };
            let (mut word, mut now) = (0u128, start);
            for (gap, n) in arrivals {
                now += gap;
                let expected = model.admit(now, u64::from(n), rate);
                let judged = charge(&mut word, |w| sliding_charge(w, now, rate, n, true));
                prop_assert_eq!(!judged.over, expected, "at {} ms, {} hits", now, n);
                prop_assert_eq!(judged.counted, expected && n > 0);
            }
        }

        #[test]
        fn a_token_bucket_admits_exactly_what_its_model_admits(
            start in 0u64..10_000_000,
            limit in 1u32..40,
            burst in 1u32..60,
            unit_ms in prop::sample::select(vec![1_000u64, 10_000, 60_000]),
            arrivals in arrivals(),
        ) {
            let rate = Rate { limit, unit_ms };
            let mut model = BucketModel { level: u64::from(burst) * unit_ms, at: start };
            let (mut word, mut now) = (0u128, start);
            for (gap, n) in arrivals {
                now += gap;
                let expected = model.admit(now, u64::from(n), rate, u64::from(burst));
                let judged = charge(&mut word, |w| bucket_charge(w, now, rate, burst, n, true));
                prop_assert_eq!(!judged.over, expected, "at {} ms, {} hits", now, n);
                prop_assert_eq!(judged.counted, expected && n > 0);
            }
        }

        #[test]
        fn a_denial_says_truly_when_the_charge_would_fit(
            start in 0u64..10_000_000,
            limit in 1u32..40,
            burst in 1u32..60,
            unit_ms in prop::sample::select(vec![1_000u64, 60_000]),
            arrivals in arrivals(),
            n in 1u32..8,
        ) {
            let rate = Rate { limit, unit_ms };
            let (mut sliding, mut bucket, mut now) = (0u128, 0u128, start);
            for (gap, hits) in arrivals {
                now += gap;
                charge(&mut sliding, |w| sliding_charge(w, now, rate, hits, true));
                charge(&mut bucket, |w| bucket_charge(w, now, rate, burst, hits, true));
            }
            // If refused now, it fits after the wait given, and not a millisecond sooner.
            let (_, j) = sliding_charge(sliding, now, rate, n, true);
            if j.over && n <= limit {
                let wait = j.until_reset.as_millis() as u64;
                prop_assert!(!sliding_charge(sliding, now + wait, rate, n, true).1.over);
                prop_assert!(wait == 1 || sliding_charge(sliding, now + wait - 1, rate, n, true).1.over);
            }
            let (_, j) = bucket_charge(bucket, now, rate, burst, n, true);
            if j.over && n <= burst {
                let wait = j.until_reset.as_millis() as u64;
                prop_assert!(!bucket_charge(bucket, now + wait, rate, burst, n, true).1.over);
                prop_assert!(bucket_charge(bucket, now + wait - 1, rate, burst, n, true).1.over);
            }
        }
    }

    #[test]
    fn a_leased_buckets_reset_is_reckoned_from_the_fleets_count() {
        // 60 a minute, a burst of 30: one refills a second.
        let reset = |used, charge, over| leased_bucket_reset(used, charge, over, 30, MINUTE);
        // Fits: until the bucket is full again (10 taken: 10 s).
        assert_eq!(reset(10, 1, false), Duration::from_secs(10));
        assert_eq!(reset(0, 1, false), Duration::ZERO);
        // Over: until this charge would fit (all 30 taken: 1 s for one, 5 s for five).
        assert_eq!(reset(30, 1, true), Duration::from_secs(1));
        assert_eq!(reset(30, 5, true), Duration::from_secs(5));
        // A check (charge 0) is over when not one unit is left: as for one.
        assert_eq!(reset(30, 0, true), Duration::from_secs(1));
        // A charge larger than the burst never fits: the unit.
        assert_eq!(reset(0, 31, true), Duration::from_secs(60));
    }
}
