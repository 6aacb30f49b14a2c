//! One sync round: heartbeat, then push or read back every live counter that is due, a batch
//! at a time. Near a limit a counter is synced every round; far from its limits, on its turn
//! (`sync_now`, `turn`).

use std::collections::HashMap;
use std::sync::Arc;

use redis::RedisError;

use super::keys::{expiry_ms, write_key_of};
use super::{Fleet, SyncHandles, clamp};
use crate::limiter::{Counter, CounterKey, Counts, Limits, Window};
use crate::rules::{OVERRIDE_SCOPE, Rule, RuleSet};

/// The rules in force by counter scope, rebuilt when the rule set changes.
#[derive(Default)]
pub(super) struct RuleIndex {
    of: Arc<RuleSet>,
    by_scope: HashMap<u64, Arc<Rule>, foldhash::fast::FixedState>,
}

impl RuleIndex {
    fn follow(&mut self, rules: Arc<RuleSet>) {
        if !Arc::ptr_eq(&rules, &self.of) {
            self.by_scope = rules
                .domains()
                .flat_map(|d| d.rules.iter().map(|r| (r.id, r.clone())))
                .collect();
            self.of = rules;
        }
    }
}

struct Work<'g> {
    counter: &'g Counter,
    /// The configured limits of the counter's window (none for overrides).
    limits: Limits,
    window: Window,
    /// This replica's counts in `window` when read.
    own: Counts,
    delta: (i64, i64),
    /// Whether the fleet's tokens matter: the window limits them, or this replica counted
    /// some (overrides limit requests only). Otherwise the `tokens` field is neither written
    /// nor read.
    tokens: bool,
    /// Nothing pushed in this window yet: the key may be new and needs its expiry.
    first_push: bool,
    /// Where the key's name is in the batch's `keys`.
    key: std::ops::Range<usize>,
    expire_at_ms: u64,
}

impl Work<'_> {
    /// One command per field: HINCRBY what changed, HGET the rest; HMGET when nothing
    /// changed. A requests-only counter with a delta costs one command a round.
    fn queue(&self, keys: &str, pipe: &mut redis::Pipeline) {
        let key = &keys[self.key.clone()];
        if self.delta == (0, 0) {
            let cmd = pipe.cmd("HMGET").arg(key).arg("requests");
            if self.tokens {
                cmd.arg("tokens");
            }
            return;
        }
        let fields = [("requests", self.delta.0), ("tokens", self.delta.1)];
        for (field, delta) in &fields[..if self.tokens { 2 } else { 1 }] {
            if *delta == 0 {
                pipe.cmd("HGET").arg(key).arg(*field);
            } else {
                pipe.cmd("HINCRBY").arg(key).arg(*field).arg(*delta);
            }
        }
        if self.first_push {
            self.expire(keys, pipe);
        }
    }

    fn expire(&self, keys: &str, pipe: &mut redis::Pipeline) {
        pipe.cmd("PEXPIREAT")
            .arg(&keys[self.key.clone()])
            .arg(self.expire_at_ms)
            .ignore();
    }

    /// The fleet's totals from this counter's replies (fields not read count as this
    /// replica's own).
    fn totals(
        &self,
        replies: &mut impl Iterator<Item = redis::Value>,
    ) -> Result<Counts, RedisError> {
        let mut next = || replies.next().unwrap_or(redis::Value::Nil);
        let (requests, tokens): (Option<i64>, Option<i64>) = if self.delta == (0, 0) {
            let values: Vec<Option<i64>> = redis::FromRedisValue::from_redis_value(next())?;
            (
                values.first().copied().flatten(),
                values.get(1).copied().flatten(),
            )
        } else {
            let requests = redis::FromRedisValue::from_redis_value(next())?;
            let tokens = if self.tokens {
                redis::FromRedisValue::from_redis_value(next())?
            } else {
                None
            };
            (requests, tokens)
        };
        let tokens = if self.tokens {
            tokens.unwrap_or(0)
        } else {
            i64::from(self.own.tokens)
        };
        let requests = requests.unwrap_or(0);
        Ok(Counts {
            requests: clamp(requests),
            tokens: clamp(tokens),
        })
    }

    /// A push that found no key (the total is just this push) outside the window's first
    /// push: the key was lost mid-window (a Redis restart, a flush) and has no expiry now.
    fn recreated(&self, total: Counts) -> bool {
        let fresh = |delta: i64, total: u32| delta > 0 && i64::from(total) == delta;
        !self.first_push
            && (fresh(self.delta.0, total.requests)
                || (self.tokens && fresh(self.delta.1, total.tokens)))
    }
}

/// Pipelines are cut at this many counters, so one round never builds an unbounded request.
const BATCH: usize = 500;

/// Whether a counter is synced this round rather than on its turn (pushed if it has a pending
/// count, else read back): always while its limits are not known here (overrides) or it was
/// never synced; else when the fleet's count with this one's pending part reaches half of a
/// limit (where a stale total could let the fleet past it), or the pending part reaches half
/// of this replica's share of what the fleet has left (past the share it would be refused
/// here). A counter far from its limits can wait: the share cap bounds what any replica admits
/// unseen, however late it syncs.
pub(super) fn sync_now(
    seen: Counts,
    pending: (i64, i64),
    limits: Option<Limits>,
    synced_before: bool,
    replicas: u32,
) -> bool {
    let (Some(limits), true) = (limits, synced_before) else {
        return true;
    };
    let near = |limit: Option<u32>, seen: u32, pending: i64| {
        let Some(limit) = limit else { return false };
        let (limit, seen, pending) = (u64::from(limit), u64::from(seen), pending.max(0) as u64);
        (seen + pending) * 2 >= limit
            || pending * 2 * u64::from(replicas.max(1)) >= limit.saturating_sub(seen)
    };
    near(limits.requests, seen.requests, pending.0) || near(limits.tokens, seen.tokens, pending.1)
}

/// Whether this round is the turn of a counter far from its limits: every `every` rounds, at a
/// round set by its key, so the syncs of many such counters spread evenly over the rounds
/// instead of coming all at once. Most counters of a busy fleet are far from their limits:
/// syncing each every round made Redis work follow requests and counters alive, not the
/// counters near a limit.
pub(super) fn turn(key: &CounterKey, round_no: u32, every: u32) -> bool {
    use std::hash::BuildHasher;
    let spread = foldhash::fast::FixedState::default().hash_one(key) as u32;
    round_no.wrapping_add(spread).is_multiple_of(every.max(1))
}

/// Runs one sync round: heartbeat, then push or refresh every live counter that is due, a batch
/// at a time (the batch's work and key names reuse their buffers).
pub(super) async fn round(
    handles: &SyncHandles,
    fleet: &Fleet,
    index: &mut RuleIndex,
    round_no: u32,
) -> Result<(u32, usize), RedisError> {
    let mut store = fleet.store().await?;
    let now = handles.limiter.clock().now_ms();
    let replicas = fleet.heartbeat(&mut store, now).await?;
    index.follow(handles.rules.load_full());
    let (interval, every) = (fleet.settings.interval, fleet.settings.quiet_refresh_rounds);
    let table = handles.limiter.counters().snapshot();
    let mut entries = table.iter();
    let (mut batch, mut keys) = (Vec::with_capacity(BATCH), String::new());
    let (mut counters, mut overshoot) = (0, 0u32);
    loop {
        batch.clear();
        keys.clear();
        for (key, counter) in entries.by_ref() {
            let unit = key.unit();
            let window = unit.window_at(now);
            let rule = index.by_scope.get(&key.scope()).map(Arc::as_ref);
            let (stamp, local) = counter.local();
            let (pushed_in, pushed) = counter.pushed();
            let own = if stamp == window { local } else { Counts::ZERO };
            let base = if pushed_in == window {
                pushed
            } else {
                Counts::ZERO
            };
            let limits = rule
                .and_then(|rule| rule.windows().iter().find(|w| w.unit == unit))
                .map(|w| Limits {
                    requests: w.requests.as_ref().map(|l| l.per_unit),
                    tokens: w.tokens.as_ref().map(|l| l.per_unit),
                })
                .unwrap_or_default();
            let delta = (
                i64::from(own.requests) - i64::from(base.requests),
                i64::from(own.tokens) - i64::from(base.tokens),
            );
            let (seen, synced_in) = counter.last_synced(window);
            // Overrides carry their limits in the request: not known here.
            let known = (key.scope() & OVERRIDE_SCOPE == 0).then_some(limits);
            // A window's last round pushes what is pending, so its fleet total is whole.
            let closing = delta != (0, 0) && unit.until_reset(now) <= interval;
            if !(closing
                || sync_now(seen, delta, known, synced_in.is_some(), replicas)
                || turn(key, round_no, every))
            {
                continue;
            }
            let start = keys.len();
            if !write_key_of(fleet, &mut keys, key, rule, window) {
                continue;
            }
            batch.push(Work {
                limits,
                counter,
                window,
                own,
                delta,
                tokens: limits.tokens.is_some() || own.tokens > 0,
                first_push: pushed_in != window,
                key: start..keys.len(),
                expire_at_ms: expiry_ms(unit, window),
            });
            if batch.len() == BATCH {
                break;
            }
        }
        if batch.is_empty() {
            break;
        }
        counters += batch.len();
        let mut pipe = redis::pipe();
        for w in &batch {
            w.queue(&keys, &mut pipe);
        }
        let replies: Vec<redis::Value> = store.pipeline(&pipe, fleet.timeout() * 4).await?;
        let mut replies = replies.into_iter();
        let mut lost = redis::pipe();
        for w in &batch {
            let total = w.totals(&mut replies)?;
            if w.recreated(total) {
                w.expire(&keys, &mut lost);
            }
            w.counter.synced(w.window, w.own, total, round_no);
            // How far past a limit the fleet went: what the accuracy model bounds.
            let past = |limit: Option<u32>, used: u32| limit.map_or(0, |l| used.saturating_sub(l));
            overshoot = overshoot
                .max(past(w.limits.requests, total.requests))
                .max(past(w.limits.tokens, total.tokens));
        }
        if !lost.is_empty() {
            store
                .pipeline::<redis::Value>(&lost, fleet.timeout() * 4)
                .await?;
        }
    }
    handles.metrics.overshoot.set(overshoot as f64);
    Ok((replicas, counters))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{CounterRef, Unit};

    #[test]
    fn counters_near_a_limit_or_of_unknown_limits_are_read_every_round() {
        let limits = Limits {
            requests: Some(100),
            tokens: Some(1000),
        };
        let counts = |requests, tokens| Counts { requests, tokens };
        let read = |seen, limits, synced_in: Option<u32>| {
            sync_now(seen, (0, 0), limits, synced_in.is_some(), 3)
        };
        // Well under both limits: left to its turn.
        assert!(!read(counts(49, 499), Some(limits), Some(10)));
        // At half of either limit: every round.
        assert!(read(counts(50, 0), Some(limits), Some(10)));
        assert!(read(counts(0, 500), Some(limits), Some(10)));
        // Limits not known here (an override), or never synced: every round.
        assert!(read(counts(0, 0), None, Some(10)));
        assert!(read(counts(0, 0), Some(limits), None));
        // Unlimited: never near a limit, so its turn alone.
        assert!(!read(counts(9, 9), Some(Default::default()), Some(10)));
    }

    #[test]
    fn pending_counts_wait_only_while_far_from_every_limit() {
        let limits = Limits {
            requests: Some(120),
            tokens: Some(1000),
        };
        let counts = |requests, tokens| Counts { requests, tokens };
        let push = |seen, pending, limits, synced_in: Option<u32>| {
            sync_now(seen, pending, limits, synced_in.is_some(), 3)
        };
        // 10 of 120 seen, 5 pending: far (half is 60; the share of 110 left is 36).
        assert!(!push(counts(10, 0), (5, 0), Some(limits), Some(4)));
        // Seen and pending together reach half a limit: now.
        assert!(push(counts(50, 0), (10, 0), Some(limits), Some(4)));
        assert!(push(counts(0, 400), (0, 100), Some(limits), Some(4)));
        // Pending reaches half of this replica's share of what is left: (120 - 10) / 3 / 2.
        assert!(!push(counts(10, 0), (18, 0), Some(limits), Some(4)));
        assert!(push(counts(10, 0), (19, 0), Some(limits), Some(4)));
        // Never synced, or limits not known here (an override): now.
        assert!(push(counts(0, 0), (1, 0), Some(limits), None));
        assert!(push(counts(0, 0), (1, 0), None, Some(4)));
        // A refund (negative pending) brings nothing nearer a limit.
        assert!(!push(counts(10, 0), (-5, 0), Some(limits), Some(4)));
        // Unlimited: never near.
        assert!(!push(
            counts(9, 9),
            (9, 9),
            Some(Default::default()),
            Some(4)
        ));
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
