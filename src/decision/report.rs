//! How a decision is reported: for each descriptor the limit nearest its end, and over the
//! whole request the requests and tokens limits nearest theirs (OpenAI's headers). "Nearest"
//! is one rule, [`Standing::nearer_than`], used everywhere a limit is picked to show.

use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use super::plan::Plan;
use super::{Ask, Code, Purpose, ReportedLimit, Status};
use crate::limiter::{Counts, Enforcement, Outcome, Over};
use crate::rules::{Measure, Policy, Rule};

/// Where one limit stands after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing<'r> {
    /// The limit, as a client sees it.
    pub limit: ReportedLimit<'r>,
    /// What the window holds, fleet-wide as this replica sees it.
    pub used: u64,
    /// Whether this call broke the limit, enforced or not.
    pub over: bool,
    /// Time until its window ends.
    pub until_reset: Duration,
}

impl<'r> Standing<'r> {
    /// Where a counter's requests-like and tokens limits (either may be absent) stand, given
    /// the window's counts and which limits the call broke.
    #[inline]
    pub fn pair(
        limits: [Option<ReportedLimit<'r>>; 2],
        counts: Counts,
        over: Over,
        until_reset: Duration,
    ) -> [Option<Standing<'r>>; 2] {
        let [requests, tokens] = limits;
        let standing = |limit: Option<ReportedLimit<'r>>, used, over| {
            limit.map(|limit| Standing {
                limit,
                used,
                over,
                until_reset,
            })
        };
        [
            standing(requests, counts.requests.into(), over.requests),
            standing(tokens, counts.tokens, over.tokens),
        ]
    }

    /// What is left of the limit (what a token bucket holds).
    #[inline]
    pub fn remaining(&self) -> u64 {
        self.limit.ceiling.saturating_sub(self.used)
    }

    /// Whether this limit is nearer its end than `other`: over beats not over, then the larger
    /// used fraction (a tie keeps the one found first).
    #[inline]
    pub fn nearer_than(&self, other: &Standing<'_>) -> bool {
        // a/b > c/d  <=>  a*d > c*b, without floats.
        (self.over && !other.over)
            || (self.over == other.over
                && u128::from(self.used) * u128::from(other.limit.ceiling)
                    > u128::from(other.used) * u128::from(self.limit.ceiling))
    }
}

/// The nearest of the standings offered, with a tag saying where it came from.
#[derive(Debug)]
pub struct Nearest<'r, T>(Option<(Standing<'r>, T)>);

impl<T> Default for Nearest<'_, T> {
    fn default() -> Self {
        Nearest(None)
    }
}

impl<'r, T> Nearest<'r, T> {
    /// Keeps `candidate` if it is nearer its end than the nearest so far.
    #[inline]
    pub fn offer(&mut self, candidate: Standing<'r>, tag: T) {
        if self
            .0
            .as_ref()
            .is_none_or(|(best, _)| candidate.nearer_than(best))
        {
            self.0 = Some((candidate, tag));
        }
    }

    /// The nearest, and its tag.
    pub fn into_inner(self) -> Option<(Standing<'r>, T)> {
        self.0
    }
}

/// The requests and tokens limits nearest their end across a request: what OpenAI-style
/// `x-ratelimit-*-requests` and `-tokens` headers report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headline<'r> {
    /// The requests-like limit nearest its end.
    pub requests: Option<Standing<'r>>,
    /// The tokens limit nearest its end.
    pub tokens: Option<Standing<'r>>,
    /// The concurrency limit with the fewest slots free (`x-ratelimit-*-concurrency`).
    pub concurrency: Option<Standing<'r>>,
}

/// Each descriptor's status and the request's headline, from one reading of each limit's
/// standing.
///
/// A status is the descriptor's limit that is over, or else the one nearest its end. Under
/// global shadow mode a limit over keeps its OVER_LIMIT code (only the overall code is OK, as
/// in envoyproxy/ratelimit); a rule's own `shadow_mode` answers OK. The headline is the
/// requests and tokens limits nearest their end among enforced limits of calls (reports and
/// shadow limits left out). `rules` holds each descriptor's matched rule; a limit sent with
/// the descriptor stands in for it.
#[inline]
pub(super) fn statuses_and_headline<'r, E>(
    asks: &[Ask<'_, E>],
    plan: &Plan<'r, '_>,
    outcomes: &[Outcome],
    rules: &[Option<&'r Arc<Rule>>],
    global_shadow: bool,
) -> (SmallVec<[Status<'r>; 8]>, Headline<'r>) {
    let (mut requests, mut tokens) = (Nearest::default(), Nearest::default());
    let mut concurrency = Nearest::default();
    let mut statuses = SmallVec::new();
    for (i, ask) in asks.iter().enumerate() {
        let is_call = !matches!(
            ask.purpose,
            Purpose::Report { .. } | Purpose::Release { .. }
        );
        let mut nearest = Nearest::default();
        for d in plan.of_ask(i) {
            let headlined = is_call && plan.demands()[d].enforcement != Enforcement::Shadow;
            let [r, t] = plan.sources()[d].standings(&outcomes[d]);
            if let Some(r) = r {
                nearest.offer(r, d);
                // The OpenAI headers speak of requests a window: streams in flight have
                // headers of their own.
                if headlined {
                    if r.limit.measure == Measure::Concurrency {
                        concurrency.offer(r, ());
                    } else {
                        requests.offer(r, ());
                    }
                }
            }
            if let Some(t) = t {
                nearest.offer(t, d);
                if headlined {
                    tokens.offer(t, ());
                }
            }
        }
        let rule = rules[i].filter(|_| ask.limit_override.is_none());
        statuses.push(match (rule, nearest.into_inner()) {
            (Some(rule), _) if matches!(rule.policy, Policy::Unlimited) => Status {
                remaining: u32::MAX.into(),
                rule: Some(rule),
                ..Status::unmatched()
            },
            (rule, None) => Status {
                rule,
                ..Status::unmatched()
            },
            (rule, Some((standing, d))) => {
                let enforced = if global_shadow {
                    rule.is_none_or(|r| r.enforcement != Enforcement::Shadow)
                } else {
                    plan.demands()[d].enforcement != Enforcement::Shadow
                };
                Status::of(standing, enforced, rule)
            }
        });
    }
    let headline = Headline {
        requests: requests.into_inner().map(|(s, ())| s),
        tokens: tokens.into_inner().map(|(s, ())| s),
        concurrency: concurrency.into_inner().map(|(s, ())| s),
    };
    (statuses, headline)
}

impl<'r> Status<'r> {
    /// A descriptor's status from the standing of its nearest limit.
    pub fn of(standing: Standing<'r>, enforced: bool, rule: Option<&'r Arc<Rule>>) -> Status<'r> {
        Status {
            code: if standing.over && enforced {
                Code::OverLimit
            } else {
                Code::Ok
            },
            over: standing.over,
            limit: Some(standing.limit),
            remaining: standing.remaining(),
            until_reset: standing.until_reset,
            rule,
        }
    }
}
