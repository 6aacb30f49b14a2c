//! Strict rules (`consistency: strict`): for small limits where an approximation is wrong
//! (10 a day), the decision is an atomic check-and-take in Redis, on the request path, by a Lua
//! script run by its hash (and loaded again after a Redis restart or SCRIPT FLUSH). Calls are
//! bounded by the Redis timeout; when Redis fails, the failure policy decides.

use redis::RedisError;

use super::{FailurePolicy, Fleet};
use crate::decision::{Settled, StrictJob, StrictWork};
use crate::limiter::{Counts, Demand, Enforcement, FleetView, Limiter, Outcome, Over};

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
            .arg(limit(job.limits.tokens.map(super::narrow)))
            .arg(expire_at);
        let mut store = self.store().await?;
        let (requests, tokens, took): (i64, i64, i64) =
            store.script(&invocation, self.timeout()).await?;
        Ok((
            Counts {
                requests: super::clamp(requests),
                tokens: super::clamp(tokens).into(),
            },
            took == 1,
        ))
    }
}

fn signed(c: Counts, sign: i64) -> (i64, i64) {
    (
        sign * i64::from(c.requests),
        sign * i64::from(super::narrow(c.tokens)),
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
        let unit = job.counter.unit();
        let until_reset = unit.until_reset(now);
        let sign = if job.refund { -1 } else { 1 };
        // Once denied, later jobs are only read.
        let charge = if allowed || job.refund {
            job.charge
        } else {
            Counts::ZERO
        };
        let (counts, over) = match fleet.strict_call(job, signed(charge, sign), now).await {
            Ok((counts, took)) => {
                if took && !charge.is_zero() && !job.refund {
                    taken.push(i);
                }
                let over = if took {
                    Over::default()
                } else {
                    Over::check(counts, charge, job.limits)
                };
                (counts, over)
            }
            Err(error) => {
                tracing::warn!(%error, policy = ?fleet.settings.policy, "strict limit: Redis failed; deciding by the failure policy");
                let (counts, over, counted) = fallback(fleet, limiter, job, charge, allowed);
                if counted && !job.refund {
                    taken_locally.push(i);
                }
                (counts, over)
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
        });
    }
    if !allowed {
        for &i in &taken {
            let job = &work.jobs[i];
            let _ = fleet.strict_call(job, signed(job.charge, -1), now).await;
            settled[i].counts = settled[i].counts.minus(job.charge);
        }
        for (key, charge) in &work.charged {
            limiter.give_back(key, *charge);
        }
        for &i in &taken_locally {
            limiter.give_back(&work.jobs[i].counter, work.jobs[i].charge);
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
) -> (Counts, Over, bool) {
    let view = match fleet.settings.policy {
        FailurePolicy::Allow => return (Counts::ZERO, Over::default(), false),
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
        hold_taken_ms: None,
        enforcement: Enforcement::Enforce,
    };
    let mut outcome = [Outcome::default()];
    limiter.settle_in(view, &[demand], &mut outcome);
    (outcome[0].counts, outcome[0].over, outcome[0].counted)
}
