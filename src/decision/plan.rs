//! A request's plan: every counter its descriptors draw from, what each is charged, and the
//! limit each serves, in three aligned buffers that stay on the stack for common requests.
//! Built once per request; `decide` settles it and `explain` reads it, so both see the same
//! limits (replaced ones left out, capacity factors applied).

use std::ops::Range;
use std::sync::Arc;

use smallvec::SmallVec;

use super::LeaseWant;
use super::report::Standing;
use super::strict::{StrictJob, StrictWork};
use super::{Ask, LimitOverride, Mode, Purpose, ReportedLimit};
use crate::limiter::{CounterRef, Counts, Demand, Enforcement, Limits, Outcome};
use crate::rules::{
    Consistency, Domain, Entry, Factor, Limit, Measure, Rule, narrowed, override_scope,
};

/// Each descriptor's rule, found in its domain.
pub(super) struct Matched<'r> {
    domain: &'r Domain,
    pub rules: SmallVec<[Option<&'r Arc<Rule>>; 8]>,
}

impl<'r> Matched<'r> {
    // Pushed one by one: `collect` into a SmallVec goes through its generic `extend`, which
    // cost ~200 instructions a request more (callgrind).
    #[inline]
    pub fn find<E: Entry>(domain: &'r Domain, asks: &[Ask<'_, E>]) -> Self {
        let mut rules = SmallVec::new();
        for ask in asks {
            rules.push(domain.tree.find(ask.entries));
        }
        Matched { domain, rules }
    }

    /// Whether another matched limit replaces `limit` (`replaces:` by name).
    pub fn replaced(&self, limit: &Limit) -> bool {
        if !self.domain.has_replaces {
            return false;
        }
        let Some(name) = limit.name.as_deref() else {
            return false;
        };
        self.rules
            .iter()
            .flatten()
            .flat_map(|rule| rule.limits())
            .any(|other| other.replaces.iter().any(|r| &**r == name))
    }
}

/// The values naming each descriptor's counters, in one buffer (a span per descriptor). An
/// override's counter is named by its domain and entries, as no rule names it.
#[derive(Default)]
pub(super) struct CounterNames<'v> {
    values: SmallVec<[&'v str; 16]>,
    spans: SmallVec<[(u32, u32); 8]>,
}

impl<'v> CounterNames<'v> {
    /// Names each descriptor's counters; `rules` are their matched rules (a slice: the matched
    /// set outlives this). Filled in place: moved, the buffers would be copied on every
    /// request (measured: a 176-byte memcpy a decision).
    #[inline]
    pub fn name<E: Entry>(
        &mut self,
        rules: &[Option<&'v Arc<Rule>>],
        domain: &'v str,
        asks: &'v [Ask<'v, E>],
    ) {
        for (ask, rule) in asks.iter().zip(rules) {
            let start = self.values.len() as u32;
            match (ask.limit_override, rule) {
                (None, Some(rule)) => {
                    for value in rule.counter_parts(ask.entries) {
                        self.values.push(value);
                    }
                }
                _ => {
                    self.values.push(domain);
                    for e in ask.entries {
                        self.values.push(e.key());
                        self.values.push(e.value());
                    }
                }
            }
            self.spans.push((start, self.values.len() as u32));
        }
    }

    fn of_ask(&self, i: usize) -> &[&'v str] {
        let (from, to) = self.spans[i];
        &self.values[from as usize..to as usize]
    }
}

/// Which limit of a descriptor a demand serves.
/// Why a counter's lease is wanted: a denied request needs it now (`Spent`); the calls after
/// this one will (`Low`, `Recheck`: taken in the background, a top-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Spent,
    Low,
    Recheck,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Source<'r> {
    pub ask: usize,
    /// The rule's capacity factor when planned, in millionths.
    scale: u32,
    requests: Option<&'r Limit>,
    tokens: Option<&'r Limit>,
    over_ride: Option<LimitOverride>,
}

impl<'r> Source<'r> {
    /// Where the demand's requests-like and tokens limits stand after `outcome`, as a client
    /// sees them: the rule's limits at their capacity factor, or the request's override.
    // Always: out of line it costs ~100 instructions a descriptor (callgrind, 5 descriptors).
    #[inline(always)]
    pub fn standings(&self, outcome: &Outcome) -> [Option<Standing<'r>>; 2] {
        let requests = self
            .requests
            .map(|l| reported(l, self.scale))
            .or(self.over_ride.map(|o| ReportedLimit {
                name: None,
                per_unit: o.per_unit.into(),
                unit: o.unit,
                measure: Measure::Hits,
                ceiling: o.per_unit.into(),
            }));
        let tokens = self.tokens.map(|l| reported(l, self.scale));
        Standing::pair(
            [requests, tokens],
            outcome.counts,
            outcome.over,
            outcome.until_reset,
        )
    }
}

/// A limit as a client sees it, at a capacity factor of `scale` millionths.
#[inline]
pub(super) fn reported(limit: &Limit, scale: u32) -> ReportedLimit<'_> {
    let per_unit = limit.in_force(scale);
    ReportedLimit {
        name: limit.name.as_ref(),
        per_unit,
        unit: limit.unit,
        measure: limit.measure,
        ceiling: crate::rules::scale(limit.ceiling(), scale),
    }
}

/// Every counter demand of a request, with the limit each serves, and its strict jobs.
pub struct Plan<'r, 'v> {
    demands: SmallVec<[Demand<'v>; 8]>,
    sources: SmallVec<[Source<'r>; 8]>,
    /// Each descriptor's demands, as a range of `demands` (pushed in request order).
    spans: SmallVec<[(u32, u32); 8]>,
    strict: Vec<StrictJob>,
}

impl<'r, 'v> Plan<'r, 'v> {
    /// An empty plan.
    pub(super) fn new() -> Self {
        Plan {
            demands: SmallVec::new(),
            sources: SmallVec::new(),
            spans: SmallVec::new(),
            strict: Vec::new(),
        }
    }

    /// Plans every descriptor's matched limits. Filled in place: a plan moved after building
    /// is a 912-byte memcpy a request (measured).
    #[inline]
    pub(super) fn build<E: Entry>(
        &mut self,
        matched: &Matched<'r>,
        names: &'v CounterNames<'_>,
        domain: &str,
        asks: &[Ask<'_, E>],
        mode: Mode,
    ) {
        for (i, ask) in asks.iter().enumerate() {
            let first = self.demands.len() as u32;
            self.add(i, ask, matched, names.of_ask(i), domain, mode);
            self.spans.push((first, self.demands.len() as u32));
        }
    }

    /// The counter demands, in request order: what the limiter settles.
    #[inline]
    pub fn demands(&self) -> &[Demand<'v>] {
        &self.demands
    }

    #[inline]
    pub(super) fn sources(&self) -> &[Source<'r>] {
        &self.sources
    }

    /// The indices of descriptor `i`'s demands (in `demands()`, its sources and outcomes).
    #[inline]
    pub fn of_ask(&self, i: usize) -> Range<usize> {
        let (from, to) = self.spans[i];
        from as usize..to as usize
    }

    /// The counters whose requests lease ran out while the fleet had budget left (`outcomes`
    /// of a denied request): a fresh lease from the store may admit the request.
    pub(super) fn spent_leases(
        &self,
        outcomes: &[Outcome],
        matched: &Matched<'r>,
    ) -> Vec<LeaseWant> {
        self.lease_wants(outcomes, matched, Want::Spent)
    }

    /// The counters a denied request (`outcomes`) was refused on a view of the fleet spent,
    /// read a while ago ([`crate::limiter::Over::recheck`]): asked again in the background.
    /// None in nearly every request, and then nothing is allocated.
    pub(super) fn rechecks(&self, outcomes: &[Outcome], matched: &Matched<'r>) -> Vec<LeaseWant> {
        if !outcomes.iter().any(|o| o.over.recheck) {
            return Vec::new();
        }
        self.lease_wants(outcomes, matched, Want::Recheck)
    }

    /// The counters whose requests lease this admission (`outcomes` of an allowed request)
    /// took to its low water while the fleet had budget left: worth topping up now. None in
    /// nearly every request, and then nothing is allocated.
    pub(super) fn low_leases(&self, outcomes: &[Outcome], matched: &Matched<'r>) -> Vec<LeaseWant> {
        if !outcomes.iter().any(|o| o.over.lease_low && o.counted) {
            return Vec::new();
        }
        self.lease_wants(outcomes, matched, Want::Low)
    }

    fn lease_wants(
        &self,
        outcomes: &[Outcome],
        matched: &Matched<'r>,
        want: Want,
    ) -> Vec<LeaseWant> {
        let top_up = want != Want::Spent;
        self.demands
            .iter()
            .zip(outcomes)
            .zip(&self.sources)
            .filter(|((_, o), _)| match want {
                Want::Spent => o.over.lease_spent,
                Want::Low => o.over.lease_low && o.counted,
                Want::Recheck => o.over.recheck,
            })
            .map(|((d, _), source)| LeaseWant {
                counter: d.counter.to_key(),
                rule: matched.rules[source.ask]
                    .filter(|_| source.over_ride.is_none())
                    .cloned(),
                limits: d.limits,
                need: if top_up { Counts::ZERO } else { d.charge },
                top_up,
            })
            .collect()
    }

    /// The strict jobs left once the local demands are settled, with the local charges to
    /// give back if a strict limit denies.
    pub(super) fn take_strict_work(&mut self, outcomes: &[Outcome]) -> Option<Box<StrictWork>> {
        if self.strict.is_empty() {
            return None;
        }
        let charged = self
            .demands
            .iter()
            .zip(outcomes)
            .filter(|(d, o)| o.counted && !d.refund)
            .map(|(d, _)| (d.counter.to_key(), d.charge))
            .collect();
        Some(Box::new(StrictWork {
            jobs: std::mem::take(&mut self.strict),
            charged,
        }))
    }

    /// Turns one descriptor's matched limits into counter demands (and the strict jobs of its
    /// strict rules).
    #[inline]
    fn add<E: Entry>(
        &mut self,
        i: usize,
        ask: &Ask<'_, E>,
        matched: &Matched<'r>,
        parts: &'v [&'v str],
        domain: &str,
        mode: Mode,
    ) {
        let rule = matched.rules[i];
        let enforcement = match rule.map_or(Enforcement::Enforce, |r| r.enforcement) {
            _ if mode.shadow => Enforcement::Shadow,
            Enforcement::Enforce if mode.quota => Enforcement::Quota,
            own => own,
        };
        let hits = u32::try_from(ask.hits).unwrap_or(u32::MAX);
        if let Some(over_ride) = ask.limit_override {
            self.demands.push(Demand {
                counter: CounterRef {
                    scope: override_scope(domain, ask.entries.iter().map(Entry::key)),
                    unit: over_ride.unit,
                    parts,
                },
                limits: Limits {
                    requests: Some(over_ride.per_unit),
                    tokens: None,
                    ..Default::default()
                },
                charge: Counts {
                    requests: hits,
                    tokens: 0,
                },
                refund: ask.refund,
                hold_taken_ms: None,
                enforcement,
            });
            self.sources.push(Source {
                ask: i,
                scale: Factor::FULL,
                requests: None,
                tokens: None,
                over_ride: Some(over_ride),
            });
            return;
        }
        let Some(rule) = rule else { return };
        // A priority class's share of the limits, within the capacity factor.
        let scale = narrowed(rule.capacity.get(), rule.reserve.share(ask.class));
        for (w, window) in rule.windows().iter().enumerate() {
            let requests = window.requests.as_ref().filter(|l| !matched.replaced(l));
            let tokens = window.tokens.as_ref().filter(|l| !matched.replaced(l));
            if requests.is_none() && tokens.is_none() {
                continue;
            }
            let (charge, refund, enforcement) =
                charge_for(ask, requests, tokens.is_some(), hits, enforcement);
            let demand = Demand {
                counter: CounterRef {
                    scope: window.counter_scope(rule.id),
                    unit: window.counter_unit(),
                    parts,
                },
                limits: window.in_force(scale, |l| !matched.replaced(l)),
                charge,
                refund,
                hold_taken_ms: match ask.purpose {
                    Purpose::Release { taken_ms } => taken_ms,
                    _ => None,
                },
                enforcement,
            };
            // Holds in flight are taken and given back in the store, call by call, when
            // there is one: a stream's release may reach any replica.
            let in_store = rule.consistency == Consistency::Strict
                || window.algorithm == crate::limiter::Algorithm::InFlight;
            if in_store && mode.strict_in_store {
                self.strict.push(StrictJob {
                    ask: i,
                    rule: rule.clone(),
                    window: w,
                    in_force: [requests.is_some(), tokens.is_some()],
                    scale,
                    counter: demand.counter.to_key(),
                    limits: demand.limits,
                    charge: demand.charge,
                    refund: demand.refund,
                    hold_taken_ms: demand.hold_taken_ms,
                    enforcement,
                });
                continue;
            }
            self.demands.push(demand);
            self.sources.push(Source {
                ask: i,
                scale,
                requests,
                tokens,
                over_ride: None,
            });
        }
    }
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
        Some(Measure::Requests | Measure::Concurrency) => u32::from(hits > 0),
        Some(_) => hits,
        None => 0,
    };
    let tokens = |n: u64| if has_tokens { n } else { 0 };
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
        // A stream's end gives back its hold; the descriptor's other limits are only read.
        Purpose::Release { .. } => {
            let holds = requests.is_some_and(|l| l.measure == Measure::Concurrency);
            let release = Counts {
                requests: u32::from(holds),
                tokens: 0,
            };
            (release, holds, Enforcement::Shadow)
        }
    }
}
