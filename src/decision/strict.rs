//! Strict rules (`consistency: strict`) are not settled by the local limiter: a decision hands
//! them on as jobs for the fleet store, and reports them once the store has answered.

use std::sync::Arc;
use std::time::Duration;

use super::plan::reported;
use super::report::{Nearest, Standing};
use super::{ReportedLimit, Status};
use crate::limiter::{CounterKey, Counts, Enforcement, Limits, Over};
use crate::rules::Rule;

/// One window of a strict rule for one descriptor: checked and counted in the fleet store.
#[derive(Debug, Clone)]
pub struct StrictJob {
    /// The descriptor it serves.
    pub ask: usize,
    pub rule: Arc<Rule>,
    /// Which of the rule's windows.
    pub window: usize,
    /// Whether the window's requests and tokens limits are in force (not replaced).
    pub in_force: [bool; 2],
    /// The rule's capacity factor when decided, in millionths.
    pub scale: u32,
    /// Its local counter, for when the store cannot be reached.
    pub counter: CounterKey,
    pub limits: Limits,
    pub charge: Counts,
    pub refund: bool,
    /// A release's: when the holds it gives back were taken (a concurrency limit's).
    pub hold_taken_ms: Option<u64>,
    pub enforcement: Enforcement,
}

impl StrictJob {
    /// Its requests-like and tokens limits in force, as a client sees them.
    pub fn reported(&self) -> [Option<ReportedLimit<'_>>; 2] {
        let window = &self.rule.windows()[self.window];
        let [requests, tokens] = self.in_force;
        [
            window.requests.as_ref().filter(|_| requests),
            window.tokens.as_ref().filter(|_| tokens),
        ]
        .map(|limit| limit.map(|l| reported(l, self.scale)))
    }
}

/// What one strict job came to in the store.
#[derive(Debug, Clone)]
pub struct Settled {
    pub counts: Counts,
    pub over: Over,
    pub until_reset: Duration,
    /// When the job took holds in flight (a concurrency limit's, milliseconds since the
    /// epoch), if it did.
    pub hold_taken_ms: Option<u64>,
}

/// What is left of a request once it is decided locally: its strict jobs, and the local
/// charges to give back if a strict limit denies it.
#[derive(Debug, Clone, Default)]
pub struct StrictWork {
    pub jobs: Vec<StrictJob>,
    pub charged: Vec<(CounterKey, Counts)>,
}

impl StrictWork {
    /// The status of descriptor `ask` from its settled strict jobs (`settled[j]` is job `j`'s),
    /// `None` when it has none. A limit over keeps its OVER_LIMIT code under global shadow
    /// mode (only the overall code turns OK); a rule's own `shadow_mode` answers OK.
    pub fn status_of<'w>(&'w self, ask: usize, settled: &[Settled]) -> Option<Status<'w>> {
        let mut nearest = Nearest::default();
        for (j, job) in self.jobs.iter().enumerate().filter(|(_, j)| j.ask == ask) {
            let result = &settled[j];
            let standings = Standing::pair(
                job.reported(),
                result.counts,
                result.over,
                result.until_reset,
            );
            for standing in standings.into_iter().flatten() {
                nearest.offer(standing, j);
            }
        }
        let (standing, j) = nearest.into_inner()?;
        let job = &self.jobs[j];
        let enforced = job.rule.enforcement != Enforcement::Shadow;
        Some(Status::of(standing, enforced, Some(&job.rule)))
    }
}
