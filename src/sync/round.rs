//! One sync round: heartbeat, then one lease call for every live counter that is due, a batch
//! at a time: it pushes what the replica counted, tops its lease up, and reads the fleet's
//! counts back. A counter whose lease will run out, or near a tokens limit, is synced every
//! round; the others on their turn (`sync_now`, `turn`).

use std::collections::HashMap;
use std::sync::Arc;

use redis::{FromRedisValue, RedisError};

use super::keys::{expiry_ms, write_key_of};
use super::lease::{
    Ask, LeaseCall, NO_LIMIT, Refill, Reply, STORED_LIMIT, Slide, rest_at_rate, unused_bound,
};
use super::{Fleet, SyncHandles};
use crate::limiter::{Algorithm, Counter, CounterKey, Counts, Limits, Window};
use crate::rules::{Consistency, OVERRIDE_SCOPE, Rule, RuleSet};

/// The rules in force by counter scope, rebuilt when the rule set changes.
#[derive(Default)]
pub(super) struct RuleIndex {
    of: Arc<RuleSet>,
    by_scope: HashMap<u64, Arc<Rule>, foldhash::fast::FixedState>,
}

impl RuleIndex {
    fn follow(&mut self, rules: Arc<RuleSet>) {
        if !Arc::ptr_eq(&rules, &self.of) {
            // A rule's counters: its id for fixed windows, a scope of their own for the
            // other algorithms (`RuleWindow::counter_scope`).
            self.by_scope = rules
                .domains()
                .flat_map(|d| d.rules.iter())
                .flat_map(|r| r.counter_scopes().map(|s| (s, r.clone())))
                .collect();
            self.of = rules;
        }
    }
}

struct Work<'g> {
    counter: &'g Counter,
    purpose: Purpose,
    /// Whether the window is long against the sync interval ([`leases_ahead`]).
    long_window: bool,
    /// The requests limit the counter is judged against here, if known (for the overshoot
    /// gauge).
    limit: Option<u32>,
    window: Window,
    call: LeaseCall,
    /// Where the key's name is in the batch's `keys`.
    key: std::ops::Range<usize>,
    /// A unit of the next window to lease in the same round if this sync finds the key
    /// admitted elsewhere (the call, and where its key's name is).
    ahead_if_elsewhere: Option<(LeaseCall, std::ops::Range<usize>)>,
}

/// What a lease call of a round is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The counter's window as it goes: push, top up or give back, read the fleet.
    Sync,
    /// A lease of the next window (`window`), taken ahead of it: only the grant is kept.
    Ahead,
    /// A sliding window's window just closed (`window`): what the counter held of it unused
    /// goes back, so the next window does not weigh it. The answer is not kept.
    GiveBackClosed,
    /// A sync that asks nothing ([`LeaseCall::reads_only`]), sent as a read.
    Read,
}

/// Pipelines are cut at this many counters, so one round never builds an unbounded request.
const BATCH: usize = 500;

/// One counter as a round finds it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Found {
    /// What this replica has counted in the window.
    pub own: Counts,
    /// Of which not yet in the store.
    pub pending: (i64, i64),
    /// What is leased to this replica for the window.
    pub held: Counts,
    pub synced_before: bool,
    /// Whether the store was read for it in this window: "idle since its last sync" means
    /// nothing before. (A lease claimed from the one taken ahead, at the window's first round,
    /// was given back as idle before the first request could use it.)
    pub synced_this_window: bool,
    /// What the fleet has leased in all, as last read (this window or the one before), in a
    /// window long against the sync interval ([`leases_ahead`]); none otherwise.
    pub fleet_leased: Option<u64>,
    /// The same of the tokens budget (this window only).
    pub fleet_tokens_leased: Option<u64>,
    /// Whether this replica saw itself the fleet's only one at its last heartbeat: what it
    /// holds unused is then refused to no one.
    pub alone: bool,
}

/// One of a counter's two budgets, each leased on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Budget {
    Requests,
    Tokens,
}

impl Found {
    /// Of one budget: what this replica has counted, how much of it is pending, what it
    /// holds, and what the fleet has leased (as [`Found::fleet_leased`]).
    fn of(self, budget: Budget) -> (u32, u32, u32, Option<u64>) {
        match budget {
            Budget::Requests => (
                self.own.requests,
                self.pending.0.max(0) as u32,
                self.held.requests,
                self.fleet_leased,
            ),
            Budget::Tokens => (
                super::narrow(self.own.tokens),
                self.pending.1.max(0) as u32,
                super::narrow(self.held.tokens),
                self.fleet_tokens_leased,
            ),
        }
    }
}

/// Whether a counter is synced this round rather than on its turn: always while it was never
/// synced or its limits are not known here (overrides); when a lease (requests or tokens) will
/// not last until the next round at the rate it has been spent, or goes back. A counter whose
/// leases last can wait: it admits nothing it does not hold, however late it syncs.
pub(super) fn sync_now(found: Found, limits: Option<Limits>) -> bool {
    let (Some(limits), true) = (limits, found.synced_before) else {
        return true;
    };
    let runs_out = |budget, limit: Option<u32>| {
        let (own, spent, held, _) = found.of(budget);
        let spare = u64::from(held.saturating_sub(own));
        limit.is_some() && spent > 0 && spare < 2 * u64::from(spent)
    };
    [
        (Budget::Requests, limits.requests),
        (Budget::Tokens, limits.tokens.map(super::narrow)),
    ]
    .into_iter()
    .any(|(budget, limit)| runs_out(budget, limit) || gives_back(found, budget, limit))
}

/// Whether a counter admitted nothing since its last sync (and, for tokens, had nothing
/// reported) and holds more of a budget than it used, while the fleet has leased at least half
/// of its limit: what it holds goes back to the fleet, for the replicas that have traffic. Far
/// from the limit a spare lease is kept, so a quiet counter's next call needs no call to the
/// store; near it, a lease held unused is what another replica is refused. A replica alone
/// keeps it: no other is refused, and its next call would lease again.
pub(super) fn gives_back(found: Found, budget: Budget, limit: Option<u32>) -> bool {
    let (own, _, held, fleet_leased) = found.of(budget);
    let idle = found.pending.0 == 0 && (budget == Budget::Requests || found.pending.1 == 0);
    !found.alone && contended(fleet_leased, limit) && found.synced_this_window && idle && held > own
}

/// Whether the fleet has leased at least half of `limit`, as last read. In a short window
/// (or when nothing was read of this window or the one before) it is taken to be: a second's
/// window is half over before its first sync, and a lease kept or sized for a fleet thought
/// far from its limit stranded 5 to 10 % of it (measured: 176 to 195 of 200 a window, with
/// 80 % of the load on one of 3 replicas).
fn contended(fleet_leased: Option<u64>, limit: Option<u32>) -> bool {
    limit.is_some_and(|l| near_limit(fleet_leased, l))
}

/// Whether what the fleet has leased (as last read; unknown counts as near) is at least half
/// of `limit`: the one test of "near the limit" the sync and the request path share.
pub(super) fn near_limit(fleet_leased: Option<u64>, limit: u32) -> bool {
    fleet_leased.is_none_or(|leased| leased * 2 >= u64::from(limit))
}

/// Whether a window is long enough, at this sync interval, for the sync to lease the next
/// one ahead of it: at least ten rounds. Shorter windows (a second, at the default interval)
/// are leased as they go: a lease ahead of every second would strand twice as much with a
/// replica that dies.
pub(super) fn leases_ahead(unit: crate::limiter::Unit, interval: std::time::Duration) -> bool {
    u128::from(unit.millis()) >= 10 * interval.as_millis()
}

/// Most rounds a window's leases ahead are spread over.
const AHEAD_SPREAD: u32 = 10;

/// How long before its window's end a counter's lease of the next window is first due: three
/// intervals or more, by its key, so the leases ahead of many counters spread over up to
/// [`AHEAD_SPREAD`] rounds (at most a fifth of the window) instead of coming in one. Three
/// rounds before the end, not the last: with many counters the last round pushes them all, and
/// grants that came back after the window turned were too late for its first calls (measured:
/// 71 % of 100,000 quiet counters' calls still leased on the request path). All in the same
/// round, 100,000 counters' calls ahead ran 4.2 s, past the window's end (13-28 %).
pub(super) fn ahead_opens(
    key: &CounterKey,
    unit: crate::limiter::Unit,
    interval: std::time::Duration,
) -> std::time::Duration {
    use std::hash::BuildHasher;
    let rounds = unit.millis() / (interval.as_millis().max(1) as u64);
    let spread = (rounds / 5).clamp(1, u64::from(AHEAD_SPREAD)) as u32;
    // Not the bits `turn` spreads by, so a round's turns and its leases ahead are unrelated.
    let hash = foldhash::fast::FixedState::default().hash_one(key) >> 32;
    interval * (3 + hash as u32 % spread)
}

/// What a replica asks to hold of the next window, in one of this window's last rounds
/// ([`ahead_opens`]): what it
/// admitted in two intervals at this window's rate (the next window's first sync tops it up
/// from its own rate), never more than it admitted in this window. While the fleet is far
/// from the limit (not `contended`: under half of it leased), as much as it admitted in this
/// window, so a quiet counter (a call or two a window) needs no call to the store in the next
/// either; near the limit a quiet counter gets none, since a lease it may not use is what
/// another replica is refused. Far from the limit, a counter this replica did not see in this
/// window while the rest of the fleet did (`elsewhere`) gets one: with keys met a few times a
/// minute across replicas, a replica's first call to a key in a window is most of its calls
/// to it, and without the unit each such call would wait on the store.
pub(super) fn ahead_target(
    admitted: u32,
    elapsed_ms: u64,
    interval_ms: u64,
    contended: bool,
    elsewhere: bool,
) -> u32 {
    if admitted == 0 {
        return u32::from(elsewhere && !contended);
    }
    let projected = u64::from(admitted) * 2 * interval_ms / elapsed_ms.max(1);
    let least = if contended { 0 } else { u64::from(admitted) };
    projected.max(least).min(u64::from(admitted)) as u32
}

/// What a replica asks of the store for a counter's budget: to hold what it used (`own`) and,
/// for what it used since it last synced (`spent`), twice as much again for each of the `every` rounds until its turn comes again (at that
/// rate, it is due on its turn, not every round), but no more than three quarters of what
/// the rest of the window will use at the rate so far (`rest`: a rate read from a few calls is
/// rough, and a lease too large strands its rest at the window's end); none when idle. The
/// store grants less near the end of the budget, and then the counter is due sooner.
pub(super) fn target((own, spent): (u32, u32), every: u32, rest: u32) -> u32 {
    if spent == 0 {
        return 0;
    }
    let ahead = spent
        .saturating_mul(2)
        .saturating_mul(every.max(1))
        .min((rest / 4 * 3).max(1));
    own.saturating_add(ahead)
}

/// Whether this round of the interval (`tick`) is the turn of a counter far from its limits:
/// every `every` ticks, at a tick set by its key, so the syncs of many such counters spread
/// evenly over the rounds instead of coming all at once. Most counters of a busy fleet are far from their limits:
/// syncing each every round made Redis work follow requests and counters alive, not the
/// counters near a limit.
pub(super) fn turn(key: &CounterKey, tick: u32, every: u32) -> bool {
    use std::hash::BuildHasher;
    let spread = foldhash::fast::FixedState::default().hash_one(key) as u32;
    tick.wrapping_add(spread).is_multiple_of(every.max(1))
}

/// Why a round runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Every interval while serving.
    Serving,
    /// Once at shutdown, when no call is left to admit: every counter with something to push
    /// or a lease to give back.
    Leaving,
}

/// Runs one sync round: one lease call for every live counter that is due, a batch at a time
/// (the batch's work and key names reuse their buffers), the heartbeat in the first batch's
/// pipeline (so a Redis that stalls holds the round's pushes too, and a retry must not count
/// them twice). Grants are sized by the fleet size of the last round. Quiet counters take their
/// turns (`turn`) only in a round of the interval (`tick`: its number); a round a denial woke
/// early syncs only the counters due now ([`sync_now`]). Keyed to every round, a quiet
/// counter's turn came as often as denials woke the sync (measured: 10,000 keys met once a
/// minute by three replicas, every counter read on nearly every round, rounds every 100 ms,
/// while their first calls in each window woke it). Returns the fleet size now and the
/// counters synced.
pub(super) async fn round(
    handles: &SyncHandles,
    fleet: &Fleet,
    index: &mut RuleIndex,
    (tick, mut replicas): (Option<u32>, u32),
    mode: Mode,
) -> Result<(u32, usize), RedisError> {
    let leaving = mode == Mode::Leaving;
    let mut store = fleet.store().await?;
    let now = handles.limiter.clock().now_ms();
    // On a cluster the heartbeat's key has a slot of its own: sent on its own there.
    let mut heartbeat = !fleet.settings.address.cluster;
    if !heartbeat {
        let mut pipe = redis::pipe();
        fleet.queue_heartbeat(&mut pipe, now);
        let (alive,): (u32,) = store.pipeline(&pipe, fleet.timeout()).await?;
        replicas = alive.max(1);
    }
    index.follow(handles.rules.load_full());
    let mut planner = Planner {
        fleet,
        now,
        interval: fleet.settings.interval,
        every: fleet.settings.quiet_refresh_rounds,
        tick,
        replicas,
        leaving,
    };
    let table = handles.limiter.counters().snapshot();
    let mut entries = table.iter();
    let (mut batch, mut keys) = (Vec::with_capacity(BATCH), String::new());
    let (mut counters, mut overshoot) = (0, 0u32);
    loop {
        batch.clear();
        keys.clear();
        for (key, counter) in entries.by_ref() {
            let rule = index.by_scope.get(&key.scope()).map(Arc::as_ref);
            planner.plan(key, counter, rule, &mut batch, &mut keys);
            if batch.len() >= BATCH {
                break;
            }
        }
        if batch.is_empty() && !heartbeat {
            break;
        }
        counters += batch.len();
        let (alive, over) = send_batch(&mut store, fleet, (&batch, &keys), heartbeat, now).await?;
        if let Some(alive) = alive {
            // Later batches' grants are sized by the fleet as this round's heartbeat read it.
            (planner.replicas, heartbeat) = (alive, false);
        }
        overshoot = overshoot.max(over);
    }
    handles.metrics.overshoot.set(overshoot as f64);
    Ok((planner.replicas, counters))
}

/// What a round plans every counter's calls with.
struct Planner<'f> {
    fleet: &'f Fleet,
    now: u64,
    interval: std::time::Duration,
    /// Rounds between a quiet counter's turns.
    every: u32,
    /// This round's number among the interval's, if it is one of them ([`turn`]).
    tick: Option<u32>,
    /// The fleet's size, as its last heartbeat read it.
    replicas: u32,
    leaving: bool,
}

impl Planner<'_> {
    /// Adds to `batch` the calls `counter` is due this round (their keys' names written into
    /// `keys`): its window's sync, a lease of the next window ahead of it, what it held unused
    /// of a window just closed.
    fn plan<'g>(
        &self,
        key: &CounterKey,
        counter: &'g Counter,
        rule: Option<&Rule>,
        batch: &mut Vec<Work<'g>>,
        keys: &mut String,
    ) {
        let Planner {
            fleet,
            now,
            interval,
            every,
            tick,
            replicas,
            leaving,
        } = *self;
        let unit = key.unit();
        let window = unit.window_at(now);
        // A lease taken ahead of this window that no request claimed: the lease's now,
        // so it is synced (and given back if idle) as any other.
        counter.claim_ahead(window);
        let (stamp, local) = counter.local();
        let (pushed_in, pushed) = counter.pushed();
        let own = if stamp == window { local } else { Counts::ZERO };
        let base = if pushed_in == window {
            pushed
        } else {
            Counts::ZERO
        };
        // The limits in force: leased against the configured ones while a capacity
        // reduction holds the request path to less, the fleet could lease past it.
        let limits = rule
            .and_then(|rule| {
                let w = rule.window_of(key.scope(), unit)?;
                Some(w.in_force(rule.capacity.get(), |_| true))
            })
            .unwrap_or_default();
        // Holds in flight, and the sliding windows and buckets of strict rules, are taken
        // and given back in the store call by call; a local counter holds only what was
        // taken while the store was away, in the algorithm's own word, which lapses here.
        let settled_in_store = rule.is_some_and(|r| r.consistency == Consistency::Strict);
        if limits.algorithm == Algorithm::InFlight
            || (settled_in_store && !limits.algorithm.is_fixed())
        {
            return;
        }
        // A token bucket is leased against its burst; the store refills it at its rate.
        let (in_force, limits) = (limits, Refill::called(limits));
        let refill = Refill::of(in_force, window, now);
        let (_, synced_in) = counter.last_synced(window);
        let found = Found {
            own,
            pending: (
                i64::from(own.requests) - i64::from(base.requests),
                i64::from(super::narrow(own.tokens)) - i64::from(super::narrow(base.tokens)),
            ),
            held: Counts {
                requests: counter.lease(window),
                tokens: counter.tokens_lease(window),
            },
            synced_before: synced_in.is_some(),
            synced_this_window: counter.read_in(window),
            // A token bucket's is what the fleet has taken of its burst: under half, the
            // bucket is far from empty, however short its counter's window.
            fleet_leased: (leases_ahead(unit, interval) || refill.is_some())
                .then(|| counter.fleet_leased_seen(window))
                .flatten(),
            fleet_tokens_leased: (leases_ahead(unit, interval) || refill.is_some())
                .then(|| counter.fleet_tokens_leased_seen(window))
                .flatten(),
            alone: replicas == 1,
        };
        // Overrides carry their limits in the request: not known here.
        let overridden = key.scope() & OVERRIDE_SCOPE != 0;
        let known = (!overridden).then_some(limits);
        // A window's last round pushes what is pending, so its fleet total is whole.
        let last_round = unit.until_reset(now) <= interval;
        let closing = found.pending != (0, 0) && last_round;
        let spare = found.held.requests > own.requests || found.held.tokens > own.tokens;
        let last = leaving && (found.pending != (0, 0) || spare);
        // A strict rule's counts are taken in the store call by call; its local counter
        // holds only what was admitted while the store was away, given back here.
        let strict = rule.is_some_and(|r| r.consistency == Consistency::Strict);
        // An active counter's last round of a long window also leases the next window,
        // so its first calls there need no call to the store.
        let next = Window(window.0.saturating_add(1));
        // From a round set by the key among the window's last (`ahead_opens`), once per
        // window.
        let ahead_round = unit.until_reset(now) <= ahead_opens(key, unit, interval)
            && counter.ahead(next) == 0
            && counter.lease(next) == 0;
        // Whether a unit may yet be leased ahead for a key this replica did not see here,
        // once a read shows the rest of the fleet admitted it.
        let mut awaits_elsewhere = false;
        // Sized only in the rounds that may lease ahead.
        let ahead_wanted = if ahead_round {
            let elapsed = unit.elapsed_ms(now);
            let interval_ms = interval.as_millis() as u64;
            let near = contended(found.fleet_leased, limits.requests);
            // Admitted elsewhere, not only leased: replicas that each hold an idle unit of
            // a key no one calls would otherwise lease it ahead for each other forever.
            let elsewhere = counter.admitted_elsewhere(window);
            awaits_elsewhere = own.requests == 0 && !near && !elsewhere;
            ahead_target(own.requests, elapsed, interval_ms, near, elsewhere)
        } else {
            0
        };
        // A short window (a second at the default interval) is leased ahead only by a counter
        // busy in it (two 64ths of the limit admitted here), and no more than a replica may
        // hold unused (a 64th): a replica that dies, or gets no call in the next window,
        // strands that much of it, as it does of this one. Not under 64 a window, where a
        // unit is more than a 64th. Without it, every replica's first call in every second
        // waited on the store.
        let ahead_wanted = match limits.requests {
            Some(limit) if !leases_ahead(unit, interval) => {
                let bound = unused_bound(limit);
                if limit >= 64 && own.requests >= 2 * bound {
                    ahead_wanted.min(bound)
                } else {
                    0
                }
            }
            _ => ahead_wanted,
        };
        // Not a sliding window's: a unit leased in the next window before this one ends
        // weighs fully at its start, so it is one this window can no longer lease.
        let ahead = !leaving
            && ahead_round
            && !strict
            && !overridden
            && limits.algorithm.is_fixed()
            && limits.requests.is_some()
            && ahead_wanted > 0;
        // What a sliding window's counter held unused when its last window closed goes
        // back, pushed into that window's key: the store weighs its leases in this one. A
        // token bucket's goes back into the fleet's bucket (if it was not full since).
        let gives_closed = limits.algorithm == Algorithm::SlidingWindow || refill.is_some();
        if gives_closed && !overridden {
            self.give_back_closed((key, counter, rule), (limits, in_force), batch, keys);
        }
        // A call leasing `target` of the next window (or giving `release` of it back).
        let ahead_call = |keys: &mut String, target: u32, release: u32| {
            let start = keys.len();
            if !write_key_of(fleet, keys, key, rule, next) {
                return None;
            }
            let slide_ahead = Slide::of(limits.algorithm, unit, next, now);
            let holding = counter.ahead(next).saturating_add(counter.lease(next));
            let call = LeaseCall {
                requests: Ask {
                    limit: limits.requests.map_or(NO_LIMIT, i64::from),
                    target,
                    release,
                    need: 0,
                    holding: holding + release,
                    counted: 0,
                },
                tokens: Ask::NONE,
                remember_limit: false,
                counted: None,
                expire_at_ms: Slide::keeps_until(slide_ahead, expiry_ms(unit, next)),
                replicas,
                slide: slide_ahead,
                refill: None,
            };
            Some((call, start..keys.len()))
        };
        // Leaving, a lease taken ahead of the next window goes back.
        let ahead_back = if leaving { counter.take_ahead(next) } else { 0 };
        if ahead || ahead_back > 0 {
            let target = if ahead { ahead_wanted } else { 0 };
            if let Some((call, key)) = ahead_call(keys, target, ahead_back) {
                batch.push(Work {
                    counter,
                    purpose: Purpose::Ahead,
                    long_window: true,
                    limit: None,
                    window: next,
                    call,
                    key,
                    ahead_if_elsewhere: None,
                });
            }
        }
        let on_turn = tick.is_some_and(|tick| turn(key, tick, every));
        // In the window's last round such a key is read, and its unit leased ahead in the
        // same round if the read finds the rest of the fleet admitted it: read on its turn
        // only (every `every` rounds), the fleet's calls of the window's last seconds were
        // missed (measured: 10,000 keys met once a minute by three replicas, 10 % of calls
        // leased on the request path; read in each of the last rounds but one, 1.5 %; read
        // and leased ahead in the last, 0.16-0.28 %).
        let reads_for_ahead = awaits_elsewhere
            && !leaving
            && !strict
            && !overridden
            && limits.algorithm.is_fixed()
            && limits.requests.is_some()
            && leases_ahead(unit, interval)
            && last_round;
        if !(last || closing || sync_now(found, known) || on_turn || reads_for_ahead) {
            return;
        }
        let ahead_if_elsewhere = if reads_for_ahead {
            ahead_call(keys, 1, 0)
        } else {
            None
        };
        let start = keys.len();
        if !write_key_of(fleet, keys, key, rule, window) {
            return;
        }
        // One budget's ask: an idle lease is lowered here first, then given back (no
        // request admits from what goes back); else topped up at the counter's rate. Far
        // from the limit, what a lease strands at the window's end is refused to no one: it
        // is sized by the rate alone.
        let ask = |budget, limit_arg: i64, limit: Option<u32>| {
            let (used, spent, held, fleet_leased) = found.of(budget);
            if limit_arg == NO_LIMIT {
                return Ask {
                    holding: if budget == Budget::Requests {
                        held.max(used)
                    } else {
                        0
                    },
                    counted: used,
                    ..Ask::NONE
                };
            }
            // Lowered to what it admitted when idle or leaving; in a fleet, a requests lease
            // leased while this replica saw itself alone (another has joined since, or a
            // heartbeat came late) to the bound the script keeps for every grant in a
            // fleet, so that a replica killed now strands no more than that.
            let lower_to = if leaving || gives_back(found, budget, limit) {
                Some(used)
            } else if let Some(bound) = limit.map(unused_bound)
                && budget == Budget::Requests
                && replicas > 1
                && matches!(
                    limits.algorithm,
                    Algorithm::FixedWindow | Algorithm::SlidingWindow
                )
                && held > used.saturating_add(bound)
            {
                Some(used.saturating_add(bound))
            } else {
                None
            };
            let (target, release, held) = if let Some(to) = lower_to {
                let released = match budget {
                    Budget::Requests => counter.shrink_lease(window, to).unwrap_or(0),
                    Budget::Tokens => super::narrow(counter.shrink_tokens_lease(window, to.into())),
                };
                (0, released, held - released.min(held))
            } else if contended(fleet_leased, limit) {
                let rest = rest_at_rate(counter, window, (used, spent), (unit, interval), now);
                // Near the limit, what it spent since its last push is a rate per round
                // only if that push was a round ago: one call since a push 20 s ago is a
                // twentieth of a call a round, and a top-up sized as a call a round
                // strands units other replicas are refused (counters of 3 a minute
                // admitted 2 of 3 under load).
                let since = counter
                    .pushed_ago(window, now)
                    .unwrap_or_else(|| unit.elapsed_ms(now));
                let interval_ms = interval.as_millis() as u64;
                let per_round =
                    (u64::from(spent) * interval_ms / since.max(interval_ms).max(1)) as u32;
                (target((used, per_round), every, rest), 0, held)
            } else {
                (target((used, spent), every, u32::MAX), 0, held)
            };
            Ask {
                limit: limit_arg,
                target,
                release,
                need: 0,
                holding: held.max(used),
                counted: used,
            }
        };
        let requests_limit = match (overridden, limits.requests) {
            (true, _) => STORED_LIMIT,
            (false, Some(limit)) if !strict => i64::from(limit),
            _ => NO_LIMIT,
        };
        let tokens_limit = match limits.tokens {
            Some(limit) if !strict && !overridden => i64::from(super::narrow(limit)),
            _ => NO_LIMIT,
        };
        let slide = Slide::of(limits.algorithm, unit, window, now);
        let call = LeaseCall {
            requests: ask(Budget::Requests, requests_limit, limits.requests),
            tokens: ask(
                Budget::Tokens,
                tokens_limit,
                limits.tokens.map(super::narrow),
            ),
            remember_limit: false,
            counted: Some(own),
            expire_at_ms: Slide::keeps_until(slide, expiry_ms(unit, window)),
            replicas,
            slide,
            refill,
        };
        batch.push(Work {
            counter,
            // A key with calls given up on goes as the script, which names them.
            purpose: if call.reads_only() && !fleet.given_up.has(&keys[start..]) {
                Purpose::Read
            } else {
                Purpose::Sync
            },
            long_window: leases_ahead(unit, interval),
            limit: limits.requests,
            window,
            call,
            key: start..keys.len(),
            ahead_if_elsewhere,
        });
    }

    /// Gives back what `counter` held unused of the window that closed before this one, if
    /// anything: into that window's key (a sliding window's next window weighs it) or the
    /// fleet's bucket.
    fn give_back_closed<'g>(
        &self,
        (key, counter, rule): (&CounterKey, &'g Counter, Option<&Rule>),
        (limits, in_force): (Limits, Limits),
        batch: &mut Vec<Work<'g>>,
        keys: &mut String,
    ) {
        let (unit, now) = (key.unit(), self.now);
        let previous = Window(unit.window_at(now).0.saturating_sub(1));
        let closed_unused = counter.take_closed(previous);
        if closed_unused == 0 {
            return;
        }
        let start = keys.len();
        if !write_key_of(self.fleet, keys, key, rule, previous) {
            return;
        }
        let slide = Slide::of(limits.algorithm, unit, previous, now);
        let call = LeaseCall {
            requests: Ask {
                limit: limits.requests.map_or(NO_LIMIT, i64::from),
                target: 0,
                release: closed_unused,
                need: 0,
                holding: 0,
                counted: 0,
            },
            tokens: Ask::NONE,
            remember_limit: false,
            counted: None,
            expire_at_ms: Slide::keeps_until(slide, expiry_ms(unit, previous)),
            replicas: self.replicas,
            slide,
            refill: Refill::of(in_force, previous, now),
        };
        batch.push(Work {
            counter,
            purpose: Purpose::GiveBackClosed,
            long_window: false,
            limit: None,
            window: previous,
            call,
            key: start..keys.len(),
            ahead_if_elsewhere: None,
        });
    }
}

/// Sends one batch's calls in one pipeline (the heartbeat first, if `heartbeat`) and records
/// what comes back. Reads that found the store other than this replica left it go again as
/// the script, in a second pipeline, and then units of the next window for keys any of these
/// syncs found admitted elsewhere are leased. Returns the fleet size if the heartbeat went, and the most a fleet total
/// went past its requests limit.
async fn send_batch(
    store: &mut super::store::Store,
    fleet: &Fleet,
    (batch, keys): (&[Work<'_>], &str),
    heartbeat: bool,
    now: u64,
) -> Result<(Option<u32>, u32), RedisError> {
    let mut pipe = redis::pipe();
    if heartbeat {
        fleet.queue_heartbeat(&mut pipe, now);
    }
    let replica = fleet.replica_field();
    // Script calls not answered and recorded (an error, a timeout) are given up on: the next
    // calls on their keys name them, for the store to take back what they granted.
    let mut in_flight = fleet.given_up.in_flight();
    let mut tagged = Vec::with_capacity(batch.len());
    for w in batch {
        let key = &keys[w.key.clone()];
        pipe.add_command(match w.purpose {
            Purpose::Read => {
                tagged.push(None);
                LeaseCall::read_command(key, replica)
            }
            _ => {
                let (i, tag) = in_flight.call(key, w.call.expire_at_ms);
                tagged.push(Some(i));
                w.call.command(key, replica, tag)
            }
        });
    }
    let mut replies: Vec<redis::Value> = store
        .pipeline_of_scripts(super::lease::LEASE_LUA, &pipe, fleet.timeout() * 4)
        .await?;
    let alive = if heartbeat {
        let alive = replies.drain(..1).next().unwrap_or(redis::Value::Nil);
        Some(u32::from_redis_value(alive)?.max(1))
    } else {
        None
    };
    let mut overshoot = 0;
    // Reads that found the store other than this replica left it, sent again as the script.
    let mut again = Vec::new();
    // Units of the next window for keys these syncs found admitted elsewhere.
    let mut aheads = Vec::new();
    for ((w, reply), tagged) in batch.iter().zip(replies).zip(tagged) {
        let reply: Reply = match w.purpose {
            Purpose::Read => {
                let read: Vec<Option<i64>> = redis::FromRedisValue::from_redis_value(reply)?;
                match w.call.reply_of_read(&read) {
                    Some(reply) => reply,
                    None => {
                        again.push(w);
                        continue;
                    }
                }
            }
            _ => redis::FromRedisValue::from_redis_value(reply)?,
        };
        if let Some(i) = tagged {
            // Recorded below, with nothing in between that can fail.
            in_flight.answered(i);
        }
        match w.purpose {
            Purpose::Ahead => {
                w.counter
                    .lease_ahead(w.window, w.call.stored(reply).granted.requests);
                continue;
            }
            Purpose::GiveBackClosed => continue,
            Purpose::Sync | Purpose::Read => {}
        }
        overshoot = overshoot.max(record_sync(w, reply, now));
        aheads.extend(w.ahead_if_found_elsewhere());
    }
    if !again.is_empty() {
        let mut pipe = redis::pipe();
        let first = in_flight.len();
        for w in &again {
            let (_, tag) = in_flight.call(&keys[w.key.clone()], w.call.expire_at_ms);
            pipe.add_command(w.call.command(&keys[w.key.clone()], replica, tag));
        }
        let replies: Vec<Reply> = store
            .pipeline_of_scripts(super::lease::LEASE_LUA, &pipe, fleet.timeout() * 4)
            .await?;
        for (n, (w, reply)) in again.iter().zip(replies).enumerate() {
            in_flight.answered(first + n);
            overshoot = overshoot.max(record_sync(w, reply, now));
            aheads.extend(w.ahead_if_found_elsewhere());
        }
    }
    if !aheads.is_empty() {
        let mut pipe = redis::pipe();
        let first = in_flight.len();
        for (_, call, key) in &aheads {
            let (_, tag) = in_flight.call(&keys[key.clone()], call.expire_at_ms);
            pipe.add_command(call.command(&keys[key.clone()], replica, tag));
        }
        let replies: Vec<Reply> = store
            .pipeline_of_scripts(super::lease::LEASE_LUA, &pipe, fleet.timeout() * 4)
            .await?;
        for (n, ((w, call, _), reply)) in aheads.iter().zip(replies).enumerate() {
            in_flight.answered(first + n);
            w.counter
                .lease_ahead(Window(w.window.0 + 1), call.stored(reply).granted.requests);
        }
    }
    Ok((alive, overshoot))
}

impl<'g> Work<'g> {
    /// The lease of a unit of the next window this sync leaves due: when the sync found the key
    /// admitted elsewhere ([`Work::ahead_if_elsewhere`]).
    fn ahead_if_found_elsewhere(&self) -> Option<(&Self, &LeaseCall, std::ops::Range<usize>)> {
        let (call, key) = self.ahead_if_elsewhere.as_ref()?;
        self.counter
            .admitted_elsewhere(self.window)
            .then(|| (self, call, key.clone()))
    }
}

/// Records what a sync of the counter's window found; returns how far past its requests limit
/// the fleet admitted (while Redis was away): what the accuracy model bounds.
fn record_sync(w: &Work<'_>, reply: Reply, now: u64) -> u32 {
    if w.long_window {
        w.counter
            .synced_in_long_window(w.window, w.call.stored(reply), now);
    } else {
        w.counter.synced(w.window, w.call.stored(reply), now);
    }
    let admitted = super::clamp(reply[6]);
    w.limit.map_or(0, |limit| admitted.saturating_sub(limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{CounterRef, Unit};

    /// A requests counter: `own` admitted, `pending` not yet pushed, `held` leased, the fleet
    /// having leased as much.
    fn found(own: u32, pending: (i64, i64), held: u32) -> Found {
        Found {
            own: Counts {
                requests: own,
                tokens: 0,
            },
            pending,
            held: Counts {
                requests: held,
                tokens: 0,
            },
            synced_before: true,
            synced_this_window: true,
            fleet_leased: Some(u64::from(held)),
            fleet_tokens_leased: None,
            alone: false,
        }
    }

    /// A tokens counter: `reported` of which `pending` not yet pushed, `held` leased, the
    /// fleet having leased `fleet`.
    fn found_tokens(reported: u32, pending: i64, held: u32, fleet: u64) -> Found {
        Found {
            own: Counts {
                requests: 0,
                tokens: reported.into(),
            },
            pending: (0, pending),
            held: Counts {
                requests: 0,
                tokens: held.into(),
            },
            synced_before: true,
            synced_this_window: true,
            fleet_leased: None,
            fleet_tokens_leased: Some(fleet),
            alone: false,
        }
    }

    #[test]
    fn a_counter_is_synced_now_when_its_lease_will_not_last_a_round() {
        let limits = Some(Limits {
            requests: Some(1000),
            tokens: None,
            ..Default::default()
        });
        // 40 admitted since the last sync, 100 of the 140 held spare: lasts two rounds more.
        assert!(!sync_now(found(40, (40, 0), 140), limits));
        // 79 spare for a rate of 40: would not last two rounds.
        assert!(sync_now(found(61, (40, 0), 140), limits));
        // Idle: nothing to top up, whatever is held.
        assert!(!sync_now(found(140, (0, 0), 140), limits));
        // A refund (negative pending) spends nothing.
        assert!(!sync_now(found(10, (-5, 0), 20), limits));
        // Never synced, or limits not known here (an override): now.
        let never = Found {
            synced_before: false,
            ..found(0, (1, 0), 0)
        };
        assert!(sync_now(never, limits));
        assert!(sync_now(found(0, (0, 0), 0), None));
        // Unlimited: never due but on its turn.
        assert!(!sync_now(found(9, (9, 9), 0), Some(Limits::default())));
    }

    #[test]
    fn an_idle_lease_goes_back_only_when_the_fleet_nears_its_limit() {
        use Budget::Requests;
        // Idle (nothing pending), 30 held of which 10 admitted; the fleet has leased `held`.
        let idle = found(10, (0, 0), 30);
        assert!(
            gives_back(idle, Requests, Some(60)),
            "30 of 60 leased: back"
        );
        assert!(!gives_back(idle, Requests, Some(61)), "under half: kept");
        // A window's first round, with a lease claimed from the one taken ahead: no request
        // has had a chance at it yet.
        let new_window = Found {
            synced_this_window: false,
            ..idle
        };
        assert!(!gives_back(new_window, Requests, Some(60)), "kept");
        assert!(!gives_back(idle, Requests, None));
        assert!(
            !gives_back(found(10, (2, 0), 30), Requests, Some(60)),
            "busy"
        );
        assert!(
            !gives_back(found(30, (0, 0), 30), Requests, Some(60)),
            "nothing spare"
        );
        let unknown = Found {
            fleet_leased: None,
            ..found(10, (0, 0), 30)
        };
        assert!(
            gives_back(unknown, Requests, Some(1_000)),
            "a short window, or nothing read"
        );
        let alone = Found {
            alone: true,
            ..idle
        };
        assert!(
            !gives_back(alone, Requests, Some(60)),
            "alone: refused to no one, kept"
        );
    }

    #[test]
    fn the_next_window_is_leased_ahead_at_this_windows_rate() {
        use std::time::Duration;
        let second = Duration::from_secs(1);
        assert!(leases_ahead(Unit::Minute, second));
        assert!(!leases_ahead(Unit::Second, second));
        assert!(leases_ahead(Unit::Second, Duration::from_millis(100)));
        // 1,180 admitted in 59 s: 40 for two seconds.
        assert_eq!(ahead_target(1_180, 59_000, 1_000, true, false), 40);
        // Far from the limit what it admitted in this window; a quiet counter near it, none.
        assert_eq!(ahead_target(2, 59_000, 1_000, false, false), 2);
        assert_eq!(ahead_target(2, 59_000, 1_000, true, false), 0);
        assert_eq!(ahead_target(0, 59_000, 1_000, false, false), 0);
        // Not seen here but elsewhere: one unit, far from the limit only.
        assert_eq!(ahead_target(0, 59_000, 1_000, false, true), 1);
        assert_eq!(ahead_target(0, 59_000, 1_000, true, true), 0);
        // Never more than it admitted in this window.
        assert_eq!(ahead_target(3, 1_000, 1_000, true, false), 3);
    }

    #[test]
    fn tokens_leases_are_topped_up_and_given_back_as_requests_leases() {
        use Budget::Tokens;
        let limits = Some(Limits {
            requests: None,
            tokens: Some(1000),
            ..Default::default()
        });
        // 100 reported since the last sync, 300 of the 500 held spare: lasts two rounds more.
        assert!(!sync_now(found_tokens(200, 100, 500, 600), limits));
        // 250 spare for a rate of 150 a round: now.
        assert!(sync_now(found_tokens(250, 150, 500, 600), limits));
        // Reports past the lease (calls admitted before it ran out): now.
        assert!(sync_now(found_tokens(520, 40, 500, 600), limits));
        // Nothing reported since the last sync: an idle lease goes back near the limit...
        let idle = found_tokens(200, 0, 500, 600);
        assert!(gives_back(idle, Tokens, Some(1000)) && sync_now(idle, limits));
        // ...but not while checks admitted since (requests pending) have yet to report,
        let checks_out = Found {
            pending: (3, 0),
            ..idle
        };
        assert!(!gives_back(checks_out, Tokens, Some(1000)));
        // nor far from it.
        assert!(!gives_back(
            found_tokens(200, 0, 500, 499),
            Tokens,
            Some(1000)
        ));
    }

    #[test]
    fn a_lease_asks_for_its_rate_until_its_turn_twice_over() {
        let rest = u32::MAX;
        assert_eq!(target((70, 30), 1, rest), 130);
        assert_eq!(target((70, 30), 8, rest), 70 + 480);
        assert_eq!(target((70, 0), 8, rest), 0, "idle: no grant");
        // No more than three quarters of what the rest of the window will use.
        assert_eq!(target((70, 30), 8, 40), 100);
        // 30 admitted in the last 5 s, 15 s of the minute left: 90 more at that rate.
        let now = 60_000 * 1000 + 45_000;
        assert_eq!(
            super::super::lease::rest_of_window(30, 5_000, Unit::Minute, now),
            90
        );
    }

    #[test]
    fn leases_ahead_of_many_counters_spread_over_the_windows_last_rounds() {
        use std::time::Duration;
        let second = Duration::from_secs(1);
        let mut per_round = std::collections::BTreeMap::new();
        for i in 0..1_000 {
            let part = format!("k{i}");
            let key = CounterRef {
                scope: 7,
                unit: Unit::Minute,
                parts: &[part.as_str()],
            }
            .to_key();
            *per_round
                .entry(ahead_opens(&key, Unit::Minute, second).as_secs())
                .or_insert(0) += 1;
            // A window of ten rounds: three or four before its end.
            let ten = ahead_opens(&key, Unit::Second, Duration::from_millis(100));
            assert!([300, 400].contains(&ten.as_millis()), "{ten:?}");
        }
        // A minute at one round a second: from 3 to 12 s before its end, 100 a round on average.
        assert_eq!(
            per_round.keys().copied().collect::<Vec<_>>(),
            (3..=12).collect::<Vec<_>>()
        );
        assert!(
            per_round.values().all(|&n| (50..=150).contains(&n)),
            "{per_round:?}"
        );
    }

    #[test]
    fn far_counters_take_turns_once_every_n_rounds() {
        let keys: Vec<CounterKey> = (0..800)
            .map(|i| {
                let part = format!("k{i}");
                CounterRef {
                    scope: 7,
                    unit: Unit::Minute,
                    parts: &[part.as_str()],
                }
                .to_key()
            })
            .collect();
        let mut per_round = [0usize; 8];
        for key in &keys {
            let turns: Vec<u32> = (100..116).filter(|&r| turn(key, r, 8)).collect();
            assert_eq!(turns.len(), 2, "once every 8 rounds");
            assert_eq!(turns[1] - turns[0], 8);
            per_round[(turns[0] - 100) as usize] += 1;
        }
        // Spread over the rounds, not all in one: 100 a round on average.
        assert!(
            per_round.iter().all(|&n| (50..=150).contains(&n)),
            "{per_round:?}"
        );
        // Every round when `every` is 1.
        assert!((0..10).all(|r| turn(&keys[0], r, 1)));
    }
}
