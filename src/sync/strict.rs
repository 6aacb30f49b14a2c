//! Strict rules (`consistency: strict`): for small limits where an approximation is wrong
//! (10 a day), the decision is an atomic check-and-take in Redis, on the request path, by a Lua
//! script run by its hash (and loaded again after a Redis restart or SCRIPT FLUSH). Calls are
//! bounded by the Redis timeout; when Redis fails, the failure policy decides. Rules with a
//! `reserve` are settled here too (each class's share is a limit on the fleet's one count), and
//! so are holds in flight (`concurrency`): a stream's take and its release, which may reach any
//! replica, in the two windows of the hold's time to live.

use std::time::Duration;

use redis::RedisError;

use super::{FailurePolicy, Fleet};
use crate::decision::{Settled, StrictJob, StrictWork};
use crate::limiter::{
    Algorithm, Counts, Demand, Enforcement, FleetView, Limiter, Outcome, Over, Rate, Window,
    bucket_standing, bucket_terms, one_measure, sliding_standing,
};

impl Fleet {
    /// One check-and-take of a strict job in Redis: the counts after it, and whether it took.
    async fn strict_call(
        &self,
        job: &StrictJob,
        charge: (i64, i64),
        now_ms: u64,
    ) -> Result<(Counts, bool), RedisError> {
        let unit = job.counter.unit();
        let window = unit.window_at(now_ms);
        let mut key = String::new();
        // A strict job's counter always has its rule: the key is always written.
        super::keys::write_key_of(self, &mut key, &job.counter, Some(&job.rule), window);
        let expire_at = super::keys::expiry_ms(unit, window);
        let limit = |l: Option<u32>| l.map_or(-1, i64::from);
        let script = self.strict_script();
        let mut invocation = script.key(key);
        invocation
            .arg(charge.0)
            .arg(limit(job.limits.requests))
            .arg(charge.1)
            // Whole: a tokens budget above 32 bits is settled here (Redis counts in 64 bits).
            .arg(
                job.limits
                    .tokens
                    .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)),
            )
            .arg(expire_at);
        let mut store = self.store().await?;
        let (requests, tokens, took): (i64, i64, i64) =
            store.script(&invocation, self.timeout()).await?;
        Ok((
            Counts {
                requests: super::clamp(requests),
                tokens: u64::try_from(tokens).unwrap_or(0),
            },
            took == 1,
        ))
    }
}

impl Fleet {
    /// The keys of a job's counter in `window` and in the window before it: one hash tag, so
    /// one cluster slot for a script that reads both.
    fn this_and_previous_keys(&self, job: &StrictJob, window: Window) -> [String; 2] {
        let previous = Window(window.0.saturating_sub(1));
        [window, previous].map(|w| {
            let mut key = String::new();
            super::keys::write_key_of(self, &mut key, &job.counter, Some(&job.rule), w);
            key
        })
    }

    /// One take (or, negative, give-back) of holds in flight of a concurrency job in Redis:
    /// the holds after it, whether it took, and the time until the holds counted lapse (for a
    /// refusal, until one more would fit), as a replica's own counter reports them.
    async fn holds_call(
        &self,
        job: &StrictJob,
        charge: i64,
        now_ms: u64,
    ) -> Result<(Counts, bool, Duration), RedisError> {
        let unit = job.counter.unit();
        let window = unit.window_at(now_ms);
        let keys = self.this_and_previous_keys(job, window);
        // A release names the window its holds were taken in: gone from both, they lapsed.
        let from = match job.hold_taken_ms.map(|t| unit.window_at(t)) {
            None => "oldest",
            Some(taken) if taken >= window => "current",
            Some(taken) if taken.0 + 1 == window.0 => "previous",
            Some(_) => "none",
        };
        // The current window's holds count until the next window ends.
        let next = Window(window.0.saturating_add(1));
        let expire_at = super::keys::expiry_ms(unit, next);
        let limit = job.limits.requests.map_or(i64::MAX, i64::from);
        let [current_key, previous_key] = keys;
        let script = self.holds_script();
        let mut invocation = script.key(current_key);
        invocation
            .key(previous_key)
            .arg(charge)
            .arg(limit)
            .arg(from)
            .arg(expire_at);
        let mut store = self.store().await?;
        let (current, previous, took): (i64, i64, i64) =
            store.script(&invocation, self.timeout()).await?;
        let this_end = unit.window_end_ms(window);
        let next_end = unit.window_end_ms(next);
        let lapse_at = if took == 0 {
            // Enough of the previous window's lapse when this one ends, or none do.
            if current + charge.max(1) <= limit {
                this_end
            } else {
                next_end
            }
        } else if current > 0 {
            next_end
        } else if previous > 0 {
            this_end
        } else {
            now_ms
        };
        let held = super::clamp(current.saturating_add(previous));
        Ok((
            Counts {
                requests: held,
                tokens: 0,
            },
            took == 1,
            Duration::from_millis(lapse_at.saturating_sub(now_ms)),
        ))
    }

    /// One check-and-take (or, negative, give-back) of a sliding window's job in Redis: the
    /// estimates after it, whether it took, and the time until the limit is free again (for
    /// a refusal, until the charge would fit), as a replica's own sliding window reports them.
    async fn sliding_call(
        &self,
        job: &StrictJob,
        charge: (i64, i64),
        now_ms: u64,
    ) -> Result<(Counts, bool, Duration), RedisError> {
        let unit = job.counter.unit();
        let window = unit.window_at(now_ms);
        let keys = self.this_and_previous_keys(job, window);
        // The current window's counts weigh until the next window ends.
        let expire_at = super::keys::expiry_ms(unit, Window(window.0.saturating_add(1)));
        let (requests_limit, tokens_limit) = (
            job.limits.requests.map(u64::from),
            job.limits.tokens.map(|t| u64::from(super::narrow(t))),
        );
        let arg = |l: Option<u64>| l.map_or(-1, |l| l as i64);
        let unit_ms = unit.millis();
        let elapsed = now_ms - unit.window_start_ms(window);
        let [current_key, previous_key] = keys;
        let script = self.sliding_script();
        let mut invocation = script.key(current_key);
        invocation
            .key(previous_key)
            .arg(charge.0)
            .arg(arg(requests_limit))
            .arg(charge.1)
            .arg(arg(tokens_limit))
            .arg(expire_at)
            .arg(unit_ms)
            .arg(elapsed);
        let mut store = self.store().await?;
        let (rc, tc, rp, tp, took): (i64, i64, i64, i64, i64) =
            store.script(&invocation, self.timeout()).await?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let standing = |(current, previous), limit: Option<u64>, charge: i64| {
            let rate = Rate {
                limit: super::clamp(limit.map_or(0, |l| l as i64)),
                unit_ms,
            };
            let fits = took == 1
                || limit.is_none()
                || sliding_standing((current, previous), now_ms, rate, None).0 as u64
                    + count(charge).max(1)
                    <= limit.unwrap_or(0);
            let refused = (!fits).then_some(count(charge));
            let (used, wait) = sliding_standing((current, previous), now_ms, rate, refused);
            (used, wait, refused.is_some())
        };
        let requests = standing((count(rc), count(rp)), requests_limit, charge.0);
        let tokens = standing((count(tc), count(tp)), tokens_limit, charge.1);
        // Refused: until every refused measure would fit; else until the window ends.
        let until_reset = [requests, tokens]
            .iter()
            .filter(|(_, _, refused)| *refused || took == 1)
            .map(|(_, wait, _)| *wait)
            .max()
            .unwrap_or(requests.1);
        let (requests, tokens) = (requests.0, tokens.0);
        Ok((
            Counts {
                requests,
                tokens: tokens.into(),
            },
            took == 1,
            until_reset,
        ))
    }

    /// One check-and-take (or, negative, give-back) of a token bucket's job in Redis: what is
    /// used of the burst after it, whether it took, and the time until the bucket is full (for
    /// a refusal, until the charge would fit), as a replica's own bucket reports them. The
    /// bucket refills at the rule's rate; a priority class's share narrows only its burst.
    async fn bucket_call(
        &self,
        job: &StrictJob,
        charge: (i64, i64),
        now_ms: u64,
    ) -> Result<(Counts, bool, Duration), RedisError> {
        let Algorithm::TokenBucket { burst } = job.limits.algorithm else {
            return Ok((Counts::ZERO, true, Duration::ZERO));
        };
        let unit_ms = job.counter.unit().millis();
        // The rule's own rate (the capacity factor applied, not a class's share).
        let full = job.rule.windows()[job.window].in_force(job.rule.capacity.get(), |_| true);
        let Some((rate, _, tokens)) = one_measure(full, Counts::ZERO, unit_ms) else {
            return Ok((Counts::ZERO, true, Duration::ZERO));
        };
        let (tick, w) = bucket_terms(rate);
        let n = if tokens { charge.1 } else { charge.0 };
        let mut key = String::new();
        // One key for the bucket, whatever the window.
        super::keys::write_key_of(self, &mut key, &job.counter, Some(&job.rule), Window(0));
        let script = self.bucket_script();
        let mut invocation = script.key(key);
        invocation
            .arg(n)
            .arg(burst)
            .arg(rate.limit)
            .arg(w)
            .arg(now_ms / tick)
            .arg(tick);
        let mut store = self.store().await?;
        let (fill, took): (i64, i64) = store.script(&invocation, self.timeout()).await?;
        let fill = u128::try_from(fill).unwrap_or(0);
        let refused = (took == 0).then(|| u64::try_from(n).unwrap_or(0));
        let (used, until_reset) = bucket_standing(fill, now_ms, rate, burst, refused);
        Ok((Counts::in_slot(used, tokens), took == 1, until_reset))
    }

    /// A strict job's call: a fixed window's check-and-take, or a concurrency limit's holds.
    async fn job_call(
        &self,
        job: &StrictJob,
        charge: (i64, i64),
        now_ms: u64,
    ) -> Result<(Counts, bool, Duration), RedisError> {
        match job.limits.algorithm {
            Algorithm::InFlight => return self.holds_call(job, charge.0, now_ms).await,
            Algorithm::SlidingWindow => return self.sliding_call(job, charge, now_ms).await,
            Algorithm::TokenBucket { .. } => return self.bucket_call(job, charge, now_ms).await,
            _ => {}
        }
        let (counts, took) = self.strict_call(job, charge, now_ms).await?;
        Ok((counts, took, job.counter.unit().until_reset(now_ms)))
    }
}

fn signed(c: Counts, sign: i64) -> (i64, i64) {
    (
        sign * i64::from(c.requests),
        sign * i64::try_from(c.tokens).unwrap_or(i64::MAX),
    )
}

/// Settles a request's strict jobs after its local limits allowed it (`allowed`), or only reads
/// them when it is already denied. If a strict limit denies, what the request took, in Redis
/// and locally, is given back. Returns whether the request stays allowed, and each job's result.
pub async fn settle(
    fleet: &Fleet,
    limiter: &Limiter,
    work: &StrictWork,
    mut allowed: bool,
    shadow: bool,
) -> (bool, Vec<Settled>) {
    let now = limiter.clock().now_ms();
    let mut settled = Vec::with_capacity(work.jobs.len());
    let mut taken: Vec<usize> = Vec::new();
    let mut taken_locally: Vec<usize> = Vec::new();
    for (i, job) in work.jobs.iter().enumerate() {
        let holds = job.limits.algorithm == Algorithm::InFlight;
        let sign = if job.refund { -1 } else { 1 };
        // Once denied, later jobs are only read.
        let charge = if allowed || job.refund {
            job.charge
        } else {
            Counts::ZERO
        };
        let mut took_holds = false;
        let (counts, over, until_reset) = match fleet.job_call(job, signed(charge, sign), now).await
        {
            Ok((counts, took, until_reset)) => {
                if took && !charge.is_zero() && !job.refund {
                    taken.push(i);
                    took_holds = holds;
                }
                let over = match job.limits.algorithm {
                    _ if took => Over::default(),
                    // Refused against its burst, which `check` does not know.
                    Algorithm::TokenBucket { .. } => Over {
                        requests: job.limits.requests.is_some(),
                        tokens: job.limits.requests.is_none(),
                        ..Over::default()
                    },
                    _ => Over::check(counts, charge, job.limits),
                };
                (counts, over, until_reset)
            }
            Err(error) => {
                fleet.request_path_failed("a limit settled in Redis", &error);
                let (outcome, counted) = fallback(fleet, limiter, job, charge, allowed);
                if counted && !job.refund {
                    taken_locally.push(i);
                    took_holds = holds;
                }
                (outcome.counts, outcome.over, outcome.until_reset)
            }
        };
        let enforced = job.enforcement != Enforcement::Shadow && !shadow;
        if over.any() && enforced && !job.refund {
            allowed = false;
        }
        settled.push(Settled {
            counts,
            over,
            until_reset,
            hold_taken_ms: took_holds.then_some(now),
        });
    }
    if !allowed {
        for &i in &taken {
            let job = &work.jobs[i];
            // Holds just taken are the current window's.
            let given_back = StrictJob {
                hold_taken_ms: Some(now),
                ..job.clone()
            };
            let _ = fleet
                .job_call(&given_back, signed(job.charge, -1), now)
                .await;
            settled[i].counts = settled[i].counts.minus(job.charge);
            settled[i].hold_taken_ms = None;
        }
        for (key, charge) in &work.charged {
            limiter.give_back(key, *charge);
        }
        for &i in &taken_locally {
            limiter.give_back(&work.jobs[i].counter, work.jobs[i].charge);
            settled[i].hold_taken_ms = None;
        }
    }
    (allowed, settled)
}

/// A strict job while Redis fails: the failure policy, with local counting for `local_share`.
fn fallback(
    fleet: &Fleet,
    limiter: &Limiter,
    job: &StrictJob,
    charge: Counts,
    allowed: bool,
) -> (Outcome, bool) {
    let view = match fleet.settings.policy {
        FailurePolicy::Allow => return (Outcome::default(), false),
        FailurePolicy::Deny => FleetView::DenyAll,
        FailurePolicy::LocalShare => FleetView::LocalShare {
            replicas: fleet.status.load().replicas.max(1),
        },
    };
    let parts: Vec<&str> = job.counter.parts().collect();
    let demand = Demand {
        counter: job.counter.with_parts(&parts),
        limits: job.limits,
        charge: if allowed { charge } else { Counts::ZERO },
        refund: job.refund,
        hold_taken_ms: job.hold_taken_ms,
        enforcement: Enforcement::Enforce,
    };
    let mut outcome = [Outcome::default()];
    limiter.settle_in(view, &[demand], &mut outcome);
    let [outcome] = outcome;
    let counted = outcome.counted;
    (outcome, counted)
}
