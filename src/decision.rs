//! One rate-limit decision, from request descriptors to per-descriptor answers: find each
//! descriptor's rule, drop replaced limits, turn what is left into counter demands, let the
//! limiter settle them, and report for each descriptor the limit closest to (or over) its end.
//!
//! Independent of the wire format: the gRPC service and the admin API both call [`decide`].

use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use crate::limiter::{CounterKey, Counts, Demand, Enforcement, Limiter, Limits, Outcome, Unit};
use crate::rules::{Entry, Limit, Measure, Policy, Rule, RuleSet, override_scope};

/// A limit sent by the caller in place of the configured one (Envoy's descriptor `limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOverride {
    pub per_unit: u32,
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
    Reserve { tokens: u64 },
    /// A report of tokens used, sent at stream end: its hits are tokens, minus what the request
    /// reserved. Never denied, never counted as a request.
    Report { reserved: u64 },
}

/// One request descriptor, as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a, E> {
    pub entries: &'a [E],
    /// What this call adds: already resolved from request and descriptor `hits_addend`.
    pub hits: u64,
    /// Give `hits` back instead of taking them.
    pub refund: bool,
    pub limit_override: Option<LimitOverride>,
    pub purpose: Purpose,
}

/// The limit a status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedLimit<'r> {
    pub name: Option<&'r str>,
    pub per_unit: u32,
    pub unit: Unit,
    pub measure: Measure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    OverLimit,
}

/// The answer for one descriptor.
#[derive(Debug, Clone)]
pub struct Status<'r> {
    pub code: Code,
    /// Whether the limit reported is over, enforced or not (shadow mode).
    pub over: bool,
    /// `None` when no rule matched, or the rule is unlimited.
    pub limit: Option<ReportedLimit<'r>>,
    pub remaining: u32,
    pub until_reset: Duration,
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

#[derive(Debug)]
pub struct Verdict<'r> {
    pub allowed: bool,
    pub known_domain: bool,
    /// One per descriptor, in request order. Descriptors of strict rules get theirs once the
    /// strict work is done.
    pub statuses: SmallVec<[Status<'r>; 4]>,
    /// Limits of strict rules, still to be settled in the fleet store.
    pub strict: Option<Box<StrictWork>>,
    /// The requests limit and the tokens limit nearest their end, over all descriptors: what
    /// OpenAI-style `x-ratelimit-*-requests` and `-tokens` headers report.
    pub headline: Headline<'r>,
}

/// One limit as a client should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadlineLimit<'r> {
    pub limit: ReportedLimit<'r>,
    pub used: u32,
    pub over: bool,
    pub until_reset: Duration,
}

impl HeadlineLimit<'_> {
    pub fn remaining(&self) -> u32 {
        self.limit.per_unit.saturating_sub(self.used)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headline<'r> {
    pub requests: Option<HeadlineLimit<'r>>,
    pub tokens: Option<HeadlineLimit<'r>>,
}

/// How the process is told to treat every rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Global shadow mode: count and report, never deny.
    pub shadow: bool,
    /// Strict rules are settled in the fleet store (Redis is configured).
    pub strict_in_store: bool,
}

/// A limit reported by a strict job, owned: it outlives the rule set it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedLimit {
    pub name: Option<String>,
    pub per_unit: u32,
    pub unit: Unit,
    pub measure: Measure,
}

impl From<&Limit> for OwnedLimit {
    fn from(limit: &Limit) -> Self {
        OwnedLimit {
            name: limit.name.as_deref().map(str::to_string),
            per_unit: limit.per_unit,
            unit: limit.unit,
            measure: limit.measure,
        }
    }
}

/// One window of a strict rule for one descriptor: checked and counted in the fleet store.
#[derive(Debug, Clone)]
pub struct StrictJob {
    pub ask: usize,
    pub domain: String,
    /// The descriptor path naming its key in the store.
    pub path: String,
    /// Its local counter, for when the store cannot be reached.
    pub counter: CounterKey,
    pub limits: Limits,
    pub charge: Counts,
    pub refund: bool,
    pub enforcement: Enforcement,
    pub requests: Option<OwnedLimit>,
    pub tokens: Option<OwnedLimit>,
}

/// What is left of a request once it is decided locally: its strict jobs, and the local
/// charges to give back if a strict limit denies it.
#[derive(Debug, Clone, Default)]
pub struct StrictWork {
    pub jobs: Vec<StrictJob>,
    pub charged: Vec<(CounterKey, Counts)>,
}

/// Which limit of a descriptor a demand serves.
#[derive(Clone, Copy)]
struct Source<'r> {
    ask: usize,
    /// The rule's capacity factor when decided, in millionths.
    scale: u32,
    requests: Option<&'r Limit>,
    tokens: Option<&'r Limit>,
    over_ride: Option<LimitOverride>,
}

impl<'r> Source<'r> {
    /// The requests-like limit this demand serves, as a client sees it: the rule's, at its
    /// capacity factor, or the request's override.
    fn requests_limit(&self) -> Option<ReportedLimit<'r>> {
        self.requests
            .map(|l| reported(l, self.scale))
            .or(self.over_ride.map(|o| ReportedLimit {
                name: None,
                per_unit: o.per_unit,
                unit: o.unit,
                measure: Measure::Hits,
            }))
    }

    fn tokens_limit(&self) -> Option<ReportedLimit<'r>> {
        self.tokens.map(|l| reported(l, self.scale))
    }
}

/// Decides one request. Allocates nothing for up to 4 descriptors of up to 4 entries (8 counter
/// windows) when their counters exist; larger requests spill to the heap.
pub fn decide<'r, E: Entry>(
    rules: &'r RuleSet,
    limiter: &Limiter,
    domain: &str,
    asks: &[Ask<'_, E>],
    mode: Mode,
) -> Verdict<'r> {
    let Some(domain_rules) = rules.domain(domain) else {
        let mut statuses = SmallVec::new();
        for _ in asks {
            statuses.push(Status::unmatched());
        }
        return Verdict {
            allowed: true,
            known_domain: false,
            statuses,
            strict: None,
            headline: Headline::default(),
        };
    };
    let mut matched: SmallVec<[Option<&'r Arc<Rule>>; 4]> = SmallVec::new();
    for ask in asks {
        matched.push(domain_rules.tree.find(ask.entries));
    }
    let replaced = |limit: &Limit| -> bool {
        if !domain_rules.has_replaces {
            return false;
        }
        let Some(name) = limit.name.as_deref() else {
            return false;
        };
        matched
            .iter()
            .flatten()
            .flat_map(|rule| rule.limits())
            .any(|other| other.replaces.iter().any(|r| &**r == name))
    };

    // The values naming each descriptor's counters, in one flat buffer (a span per
    // descriptor). An override's counter is named by its domain and entries, as no rule
    // names it.
    let mut values: SmallVec<[&str; 8]> = SmallVec::new();
    let mut spans: SmallVec<[(u32, u32); 4]> = SmallVec::new();
    for (ask, rule) in asks.iter().zip(&matched) {
        let start = values.len() as u32;
        match (ask.limit_override, rule) {
            (None, Some(rule)) => {
                for value in counter_parts(rule, ask.entries) {
                    values.push(value);
                }
            }
            _ => {
                values.push(domain);
                for e in ask.entries {
                    values.push(e.key());
                    values.push(e.value());
                }
            }
        }
        spans.push((start, values.len() as u32));
    }
    let parts = |i: usize| &values[spans[i].0 as usize..spans[i].1 as usize];

    let mut demands: SmallVec<[Demand<'_>; 8]> = SmallVec::new();
    let mut sources: SmallVec<[Source<'r>; 8]> = SmallVec::new();
    // Each descriptor's demands, as a range of `demands` (they are pushed in request order).
    let mut demand_spans: SmallVec<[(u32, u32); 4]> = SmallVec::new();
    let mut strict: Vec<StrictJob> = Vec::new();
    for (i, ask) in asks.iter().enumerate() {
        let first = demands.len() as u32;
        plan_demands(
            i,
            ask,
            matched[i],
            parts(i),
            domain,
            mode,
            &replaced,
            &mut demands,
            &mut sources,
            &mut strict,
        );
        demand_spans.push((first, demands.len() as u32));
    }

    let mut outcomes: SmallVec<[Outcome; 8]> =
        SmallVec::from_elem(Outcome::default(), demands.len());
    let allowed = limiter.decide(&demands, &mut outcomes) || mode.shadow;
    let strict = (!strict.is_empty()).then(|| {
        let charged = demands
            .iter()
            .zip(&outcomes)
            .filter(|(d, o)| o.counted && !d.refund)
            .map(|(d, _)| (d.counter.to_key(), d.charge))
            .collect();
        Box::new(StrictWork {
            jobs: strict,
            charged,
        })
    });

    let mut statuses = SmallVec::new();
    for (i, ask) in asks.iter().enumerate() {
        let (from, to) = (demand_spans[i].0 as usize, demand_spans[i].1 as usize);
        let rule = matched[i].filter(|_| ask.limit_override.is_none());
        let status = match rule {
            Some(rule) if matches!(rule.policy, Policy::Unlimited) => Status {
                code: Code::Ok,
                over: false,
                limit: None,
                remaining: u32::MAX,
                until_reset: Duration::ZERO,
                rule: Some(rule),
            },
            _ => closest(
                &sources[from..to],
                &outcomes[from..to],
                &demands[from..to],
                rule,
            ),
        };
        statuses.push(status);
    }
    let headline = headline(asks, &sources, &outcomes, &demands);
    Verdict {
        allowed,
        known_domain: true,
        statuses,
        strict,
        headline,
    }
}

/// Turns one descriptor's matched limits into counter demands (and the strict jobs of its
/// strict rules).
#[allow(clippy::too_many_arguments)]
fn plan_demands<'r, 'v, E: Entry>(
    i: usize,
    ask: &Ask<'_, E>,
    rule: Option<&'r Arc<Rule>>,
    parts: &'v [&'v str],
    domain: &str,
    mode: Mode,
    replaced: &impl Fn(&Limit) -> bool,
    demands: &mut SmallVec<[Demand<'v>; 8]>,
    sources: &mut SmallVec<[Source<'r>; 8]>,
    strict: &mut Vec<StrictJob>,
) {
    let enforcement = match rule {
        _ if mode.shadow => Enforcement::Shadow,
        Some(rule) => rule.enforcement,
        None => Enforcement::Enforce,
    };
    let hits = u32::try_from(ask.hits).unwrap_or(u32::MAX);
    if let Some(over_ride) = ask.limit_override {
        let keys = ask.entries.iter().map(Entry::key);
        demands.push(Demand {
            counter: crate::limiter::CounterRef {
                scope: override_scope(domain, keys),
                unit: over_ride.unit,
                parts,
            },
            limits: Limits {
                requests: Some(over_ride.per_unit),
                tokens: None,
            },
            charge: Counts {
                requests: hits,
                tokens: 0,
            },
            refund: ask.refund,
            enforcement,
        });
        sources.push(Source {
            ask: i,
            scale: crate::capacity::Factor::FULL,
            requests: None,
            tokens: None,
            over_ride: Some(over_ride),
        });
        return;
    }
    let Some(rule) = rule else { return };
    let Policy::Limited(windows) = &rule.policy else {
        return;
    };
    for window in windows.iter() {
        let requests = window.requests.as_ref().filter(|l| !replaced(l));
        let tokens = window.tokens.as_ref().filter(|l| !replaced(l));
        if requests.is_none() && tokens.is_none() {
            continue;
        }
        let (charge, refund, enforcement) =
            charge_for(ask, requests, tokens.is_some(), hits, enforcement);
        let demand = Demand {
            counter: crate::limiter::CounterRef {
                scope: rule.id,
                unit: window.unit,
                parts,
            },
            limits: Limits {
                requests: requests.map(|l| rule.capacity.apply(l.per_unit)),
                tokens: tokens.map(|l| rule.capacity.apply(l.per_unit)),
            },
            charge,
            refund,
            enforcement,
        };
        if rule.strict && mode.strict_in_store {
            strict.push(StrictJob {
                ask: i,
                domain: rule.domain.to_string(),
                path: crate::sync::rule_path(rule, parts.iter().copied()),
                counter: demand.counter.to_key(),
                limits: demand.limits,
                charge: demand.charge,
                refund: demand.refund,
                enforcement,
                requests: requests.map(OwnedLimit::from),
                tokens: tokens.map(OwnedLimit::from),
            });
            continue;
        }
        demands.push(demand);
        sources.push(Source {
            ask: i,
            scale: rule.capacity.get(),
            requests,
            tokens,
            over_ride: None,
        });
    }
}

/// The requests and tokens limits nearest their end among enforced limits of calls (reports
/// and shadow limits left out).
fn headline<'r, E>(
    asks: &[Ask<'_, E>],
    sources: &[Source<'r>],
    outcomes: &[Outcome],
    demands: &[Demand<'_>],
) -> Headline<'r> {
    let mut headline = Headline::default();
    for (d, source) in sources.iter().enumerate() {
        if demands[d].enforcement == Enforcement::Shadow
            || matches!(asks[source.ask].purpose, Purpose::Report { .. })
        {
            continue;
        }
        let outcome = &outcomes[d];
        let requests = source.requests_limit();
        let slots = [
            (
                &mut headline.requests,
                requests,
                outcome.counts.requests,
                outcome.over.requests,
            ),
            (
                &mut headline.tokens,
                source.tokens_limit(),
                outcome.counts.tokens,
                outcome.over.tokens,
            ),
        ];
        for (best, limit, used, over) in slots {
            let Some(limit) = limit else { continue };
            let so_far = best.map(|b| (b.over, b.used, b.limit.per_unit));
            if nearer((over, used, limit.per_unit), so_far) {
                *best = Some(HeadlineLimit {
                    limit,
                    used,
                    over,
                    until_reset: outcome.until_reset,
                });
            }
        }
    }
    headline
}

/// What one window of a rule is charged for a descriptor's call: the counts, whether they are
/// given back, and how the limits take part.
fn charge_for(
    ask: &Ask<'_, impl Entry>,
    requests: Option<&Limit>,
    has_tokens: bool,
    hits: u32,
    enforcement: Enforcement,
) -> (Counts, bool, Enforcement) {
    let per_call = match requests.map(|l| l.measure) {
        Some(Measure::Requests) => u32::from(hits > 0),
        Some(_) => hits,
        None => 0,
    };
    let tokens = |n: u64| {
        if has_tokens {
            u32::try_from(n).unwrap_or(u32::MAX)
        } else {
            0
        }
    };
    match ask.purpose {
        Purpose::Call => (
            Counts {
                requests: per_call,
                tokens: 0,
            },
            ask.refund,
            enforcement,
        ),
        Purpose::Reserve { tokens: estimate } => (
            Counts {
                requests: per_call,
                tokens: tokens(estimate),
            },
            ask.refund,
            enforcement,
        ),
        // A report counts whatever it reports (even past the limit) and settles a reservation.
        Purpose::Report { reserved } => {
            let used = u64::from(hits);
            let (amount, refund) = if used >= reserved {
                (used - reserved, false)
            } else {
                (reserved - used, true)
            };
            let report = Counts {
                requests: 0,
                tokens: tokens(amount),
            };
            (report, refund, Enforcement::Shadow)
        }
    }
}

/// Whether a limit (over?, used, per unit) is nearer its end than the best so far: over beats
/// not over, then the larger used fraction.
pub fn nearer(candidate: (bool, u32, u32), best: Option<(bool, u32, u32)>) -> bool {
    let Some((best_over, best_used, best_limit)) = best else {
        return true;
    };
    let (over, used, limit) = candidate;
    // Compare used/limit fractions without floats: a/b > c/d  <=>  a*d > c*b.
    (over && !best_over)
        || (over == best_over
            && u64::from(used) * u64::from(best_limit) > u64::from(best_used) * u64::from(limit))
}

/// The values that tell one caller's counter of `rule` from another's: the request's values,
/// or the wildcard itself at levels whose matches share a counter (`share_threshold`).
pub fn counter_parts<'a, E: Entry>(
    rule: &'a Rule,
    entries: &'a [E],
) -> impl Iterator<Item = &'a str> {
    entries.iter().enumerate().map(|(level, entry)| {
        rule.shared_values
            .get(level)
            .and_then(Option::as_deref)
            .unwrap_or(entry.value())
    })
}

/// The status of one descriptor from its demands: its limit that is over, or else the one
/// nearest to being used up.
fn closest<'r>(
    sources: &[Source<'r>],
    outcomes: &[Outcome],
    demands: &[Demand<'_>],
    rule: Option<&'r Arc<Rule>>,
) -> Status<'r> {
    let mut best: Option<(bool, u32, u32, ReportedLimit<'r>, usize)> = None;
    for (d, source) in sources.iter().enumerate() {
        let outcome = &outcomes[d];
        let slots = [
            (
                source.requests_limit(),
                outcome.counts.requests,
                outcome.over.requests,
            ),
            (
                source.tokens_limit(),
                outcome.counts.tokens,
                outcome.over.tokens,
            ),
        ];
        for (limit, used, over) in slots {
            let Some(limit) = limit else { continue };
            let so_far = best.as_ref().map(|(o, u, l, _, _)| (*o, *u, *l));
            if nearer((over, used, limit.per_unit), so_far) {
                best = Some((over, used, limit.per_unit, limit, d));
            }
        }
    }
    let Some((over, used, per_unit, limit, d)) = best else {
        return Status {
            rule,
            ..Status::unmatched()
        };
    };
    let enforced = demands[d].enforcement != Enforcement::Shadow;
    Status {
        code: if over && enforced {
            Code::OverLimit
        } else {
            Code::Ok
        },
        over,
        limit: Some(limit),
        remaining: per_unit.saturating_sub(used),
        until_reset: outcomes[d].until_reset,
        rule,
    }
}

fn reported(limit: &Limit, scale: u32) -> ReportedLimit<'_> {
    let per_unit = (u64::from(limit.per_unit) * u64::from(scale)
        / u64::from(crate::capacity::Factor::FULL)) as u32;
    ReportedLimit {
        name: limit.name.as_deref(),
        per_unit,
        unit: limit.unit,
        measure: limit.measure,
    }
}
