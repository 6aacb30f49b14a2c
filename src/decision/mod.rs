//! One rate-limit decision, from request descriptors to per-descriptor answers: find each
//! descriptor's rule, drop replaced limits, turn what is left into counter demands, let the
//! limiter settle them, and report for each descriptor the limit closest to (or over) its end.
//!
//! Independent of the wire format: the gRPC service and the admin API both call [`decide`];
//! `/v1/explain` reads the same plan with [`explain`].

mod plan;
mod report;
mod strict;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use plan::Plan;
pub use report::{Headline, Standing};
pub use strict::{Settled, StrictJob, StrictWork};

use crate::limiter::{CounterKey, Counts, Enforcement, Limiter, Limits, Outcome, Unit};
use crate::rules::{Entry, Measure, Rule, RuleSet};
use plan::{CounterNames, Matched};

/// A limit sent by the caller in place of the configured one (Envoy's descriptor `limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOverride {
    /// The limit per unit.
    pub per_unit: u32,
    /// The unit of its window.
    pub unit: Unit,
}

/// What a descriptor's call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Purpose {
    /// A request asking to pass: requests are counted, token budgets only checked.
    #[default]
    Call,
    /// A request that reserves `tokens` up front (an estimate, e.g. its max tokens): they are
    /// checked and counted now, and settled by the usage report.
    Reserve {
        /// The tokens taken now.
        tokens: u64,
    },
    /// A report of tokens used, sent at stream end: its hits are tokens, minus what the request
    /// reserved. Never denied, never counted as a request.
    Report {
        /// What the request reserved up front.
        reserved: u64,
    },
    /// The end of a stream that took holds in flight (`concurrency` limits): gives them back.
    /// Never denied, never counted as a request.
    Release {
        /// When the holds were taken (milliseconds since the epoch, as the answer that took
        /// them said), which tells the window they are counted in; none gives back the oldest.
        taken_ms: Option<u64>,
    },
}

/// One request descriptor, as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a, E> {
    /// The entries matched against the rules (reserved `sluice.*` entries removed).
    pub entries: &'a [E],
    /// What this call adds: already resolved from request and descriptor `hits_addend`.
    pub hits: u64,
    /// Give `hits` back instead of taking them.
    pub refund: bool,
    /// A limit sent with the descriptor, in place of the rules'.
    pub limit_override: Option<LimitOverride>,
    /// What the call is for.
    pub purpose: Purpose,
    /// Its priority class (a rule's `reserve`), if the descriptor names one.
    pub class: Option<&'a str>,
}

/// A counter whose requests lease is spent, and what a fresh one must cover.
#[derive(Debug, Clone)]
pub struct LeaseWant {
    pub counter: CounterKey,
    /// Its rule, which names its key in the store (none for a limit override).
    pub rule: Option<Arc<Rule>>,
    /// The limits it is judged against, capacity factor applied.
    pub limits: Limits,
    /// What the request denied asks of it (a tokens check asks for none: it needs one token
    /// of lease left).
    pub need: Counts,
    /// A lease running low, topped up ahead of need (`Over::lease_low`): no
    /// request waits on it, and it asks for more than the counter holds.
    pub top_up: bool,
}

/// The limit a status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedLimit<'r> {
    /// The limit's name, if the rule file gives one.
    pub name: Option<&'r Arc<str>>,
    /// The limit in force per unit (capacity factor applied). Envoy's API carries 32 bits: an
    /// answer clamps it (`proto`); OpenAI headers and the admin API show it whole.
    pub per_unit: u64,
    /// The unit of its window.
    pub unit: Unit,
    /// What it counts.
    pub measure: Measure,
    /// What remaining counts down from: the limit, or a token bucket's burst (in force).
    pub ceiling: u64,
}

/// Allowed or not: one descriptor's code, or a request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Allowed.
    Ok,
    /// Denied: an enforced limit is spent.
    OverLimit,
}

/// The answer for one descriptor.
#[derive(Debug, Clone)]
pub struct Status<'r> {
    /// Over an enforced limit, or not.
    pub code: Code,
    /// Whether the limit reported is over, enforced or not (shadow mode).
    pub over: bool,
    /// `None` when no rule matched, or the rule is unlimited.
    pub limit: Option<ReportedLimit<'r>>,
    /// What is left of the limit reported (`u32::MAX` when unlimited).
    pub remaining: u64,
    /// Time until the limit's window ends.
    pub until_reset: Duration,
    /// The rule matched, if any.
    pub rule: Option<&'r Arc<Rule>>,
}

impl Status<'_> {
    fn unmatched() -> Self {
        Status {
            code: Code::Ok,
            over: false,
            limit: None,
            remaining: 0,
            until_reset: Duration::ZERO,
            rule: None,
        }
    }
}

/// A decision on one request.
#[derive(Debug)]
pub struct Verdict<'r> {
    /// Whether the request may pass.
    pub allowed: bool,
    /// Whether a rule file defines the request's domain.
    pub known_domain: bool,
    /// One per descriptor, in request order. Descriptors of strict rules get theirs once the
    /// strict work is done. (Inline for up to 8: the LLM gateway sends 5.)
    pub statuses: SmallVec<[Status<'r>; 8]>,
    /// Limits of strict rules, still to be settled in the fleet store.
    pub strict: Option<Box<StrictWork>>,
    /// Counters whose lease ran out while the fleet had budget left (a denied request only):
    /// leased afresh, they may admit the request when it is decided again.
    pub spent_leases: Vec<LeaseWant>,
    /// Leases to take in the background, for the calls after this one: an allowed request's
    /// counters whose requests lease it took to its low water while the fleet had budget left
    /// (`Over::lease_low`), and a denied one's counters refused on a view of
    /// the fleet spent, read a while ago (`Over::recheck`).
    pub background_leases: Vec<LeaseWant>,
    /// The requests limit and the tokens limit nearest their end, over all descriptors: what
    /// OpenAI-style `x-ratelimit-*-requests` and `-tokens` headers report.
    pub headline: Headline<'r>,
    /// When the request took holds in flight (milliseconds since the epoch), if it did: the
    /// answer tells Envoy, whose stream-done call hands it back to release them.
    pub holds_taken_ms: Option<u64>,
}

impl Verdict<'_> {
    fn unknown_domain(asks: usize) -> Self {
        let mut statuses = SmallVec::new();
        for _ in 0..asks {
            statuses.push(Status::unmatched());
        }
        Verdict {
            allowed: true,
            known_domain: false,
            statuses,
            strict: None,
            spent_leases: Vec::new(),
            background_leases: Vec::new(),
            headline: Headline::default(),
            holds_taken_ms: None,
        }
    }
}

/// How the process is told to treat every rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Global shadow mode: count and report, never deny.
    pub shadow: bool,
    /// Global quota mode: every enforced limit is a quota (envoyproxy/ratelimit's `QUOTA_MODE`).
    pub quota: bool,
    /// Strict rules are settled in the fleet store (Redis is configured).
    pub strict_in_store: bool,
}

/// Decides one request: match each descriptor's rule, plan its counter demands, let the
/// limiter settle them, report. Allocates nothing for up to 4 descriptors of up to 4 entries
/// (8 counter windows) when their counters exist; larger requests spill to the heap.
pub fn decide<'r, E: Entry>(
    rules: &'r RuleSet,
    limiter: &Limiter,
    domain: &str,
    asks: &[Ask<'_, E>],
    mode: Mode,
) -> Verdict<'r> {
    let Some(domain_rules) = rules.domain(domain) else {
        return Verdict::unknown_domain(asks.len());
    };
    let matched = Matched::find(domain_rules, asks);
    let mut names = CounterNames::default();
    names.name(&matched.rules, domain, asks);
    let mut plan = Plan::new();
    plan.build(&matched, &names, domain, asks, mode);
    let mut outcomes: SmallVec<[Outcome; 8]> =
        SmallVec::from_elem(Outcome::default(), plan.demands().len());
    let settled = limiter.settle(plan.demands(), &mut outcomes);
    let allowed = settled.allowed || mode.shadow;
    let (statuses, headline) =
        report::statuses_and_headline(asks, &plan, &outcomes, &matched.rules, mode.shadow);
    let (spent_leases, background_leases) = if allowed {
        (Vec::new(), plan.low_leases(&outcomes, &matched))
    } else {
        (
            plan.spent_leases(&outcomes, &matched),
            plan.rechecks(&outcomes, &matched),
        )
    };
    // A request denied gave its holds back (the limiter undoes an allowed charge).
    let holds_taken_ms = outcomes
        .iter()
        .any(|o| o.took_hold)
        .then_some(settled.at_ms);
    Verdict {
        allowed,
        known_domain: true,
        statuses,
        strict: plan.take_strict_work(&outcomes),
        spent_leases,
        background_leases,
        holds_taken_ms,
        headline,
    }
}

/// One descriptor as [`decide`] would see it now: its rule (if one matches) and its limits.
pub type Explained<'r> = (Option<&'r Arc<Rule>>, Vec<Judged<'r>>);

/// One limit of a descriptor as [`decide`] would judge it now.
#[derive(Debug, Clone, Copy)]
pub struct Judged<'r> {
    pub unit: Unit,
    pub standing: Standing<'r>,
    pub enforcement: Enforcement,
}

/// What [`decide`] would see for each descriptor, counting nothing: its rule and every limit
/// in force, with the capacity factor applied and replaced limits left out (`None` for an
/// unknown domain). Strict limits are read from their local counters.
pub fn explain<'r, E: Entry>(
    rules: &'r RuleSet,
    limiter: &Limiter,
    domain: &str,
    asks: &[Ask<'_, E>],
    mode: Mode,
) -> Option<Vec<Explained<'r>>> {
    let domain_rules = rules.domain(domain)?;
    let matched = Matched::find(domain_rules, asks);
    let mut names = CounterNames::default();
    names.name(&matched.rules, domain, asks);
    let local = Mode {
        strict_in_store: false,
        ..mode
    };
    let mut plan = Plan::new();
    plan.build(&matched, &names, domain, asks, local);
    let mut outcomes = vec![Outcome::default(); plan.demands().len()];
    limiter.assess(plan.demands(), &mut outcomes);
    let judged = (0..asks.len())
        .map(|i| {
            let limits = plan
                .of_ask(i)
                .flat_map(|d| {
                    let demand = &plan.demands()[d];
                    let [r, t] = plan.sources()[d].standings(&outcomes[d]);
                    [r, t].into_iter().flatten().map(move |standing| Judged {
                        unit: demand.counter.unit,
                        standing,
                        enforcement: demand.enforcement,
                    })
                })
                .collect();
            (matched.rules[i], limits)
        })
        .collect();
    Some(judged)
}
