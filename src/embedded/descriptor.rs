//! What an embedded caller asks ([`Descriptor`]) and what it is told ([`Decision`], [`Hold`],
//! [`Capacity`]), with how each crosses to the server's pipeline: a descriptor is written as the
//! `ShouldRateLimit` request Envoy would send, and the answer is read back.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;

use crate::decision::Code;
use crate::limiter::Unit;
use crate::proto::{
    Answer, ESTIMATE_KEY, HOLD_METADATA_KEY, PRIORITY_KEY, RELEASE_KEY, REPORT_KEY,
};

/// The entry key of a resource's descriptor, in the domain
/// [`RateLimiter::set_capacity`](super::RateLimiter::set_capacity) makes.
pub const RESOURCE_KEY: &str = "resource";

/// What a call asks of the limiter: a domain and its entries, as an Envoy descriptor has them
/// (`api_key=k1`, `model=gpt-4o`), matched against the rules of that domain.
///
/// ```
/// use sluice::Descriptor;
///
/// let call = Descriptor::new("llm_gateway")
///     .entry("api_key", "k1")
///     .entry("model", "gpt-4o")
///     .estimate_tokens(2_000);
/// assert_eq!(call.domain(), "llm_gateway");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    domain: String,
    entries: Vec<(String, String)>,
    hits: u32,
    class: Option<String>,
    estimate: Option<u64>,
}

impl Descriptor {
    /// A descriptor of `domain` with no entries yet (a call needs at least one).
    pub fn new(domain: impl Into<String>) -> Descriptor {
        Descriptor {
            domain: domain.into(),
            entries: Vec::new(),
            hits: 1,
            class: None,
            estimate: None,
        }
    }

    /// The descriptor of a resource whose capacity was set with
    /// [`RateLimiter::set_capacity`](super::RateLimiter::set_capacity): its domain is the
    /// resource's name, and its one entry `resource=<name>`.
    pub fn resource(name: &str) -> Descriptor {
        Descriptor::new(name).entry(RESOURCE_KEY, name)
    }

    /// Adds an entry, after those already given (order matters, as in Envoy's descriptors).
    pub fn entry(mut self, key: impl Into<String>, value: impl Into<String>) -> Descriptor {
        self.entries.push((key.into(), value.into()));
        self
    }

    /// How many units the call takes of each requests limit it meets (Envoy's `hits_addend`;
    /// 1 unless set). 0 asks without taking anything.
    pub fn hits(mut self, hits: u32) -> Descriptor {
        self.hits = hits;
        self
    }

    /// The call's priority class, for rules with a `reserve` (`sluice.priority`).
    pub fn priority(mut self, class: impl Into<String>) -> Descriptor {
        self.class = Some(class.into());
        self
    }

    /// Reserves `tokens` of the descriptor's tokens limits when the call is admitted (say, its
    /// `max_tokens`); [`RateLimiter::report_tokens`](super::RateLimiter::report_tokens) with the
    /// same descriptor settles what it really used.
    pub fn estimate_tokens(mut self, tokens: u64) -> Descriptor {
        self.estimate = Some(tokens);
        self
    }

    /// The domain whose rules it is matched against.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Its entries, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The request Envoy would send for it, to do `what`.
    pub(super) fn request(&self, what: Purpose) -> RateLimitRequest {
        let entry = |key: &str, value: &str| Entry {
            key: key.to_string(),
            value: value.to_string(),
        };
        let mut entries: Vec<Entry> = self.entries.iter().map(|(k, v)| entry(k, v)).collect();
        let mut hits = u64::from(self.hits);
        match what {
            Purpose::Call => {
                if let Some(class) = &self.class {
                    entries.push(entry(PRIORITY_KEY, class));
                }
                if let Some(tokens) = self.estimate {
                    entries.push(entry(ESTIMATE_KEY, &tokens.to_string()));
                }
            }
            Purpose::Report { tokens } => {
                entries.push(entry(REPORT_KEY, "tokens"));
                if let Some(tokens) = self.estimate {
                    entries.push(entry(ESTIMATE_KEY, &tokens.to_string()));
                }
                hits = tokens;
            }
            Purpose::Release { taken_ms } => {
                entries.push(entry(RELEASE_KEY, &taken_ms.to_string()));
            }
        }
        RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: vec![RateLimitDescriptor {
                entries,
                hits_addend: Some(UInt64Value { value: hits }),
                ..Default::default()
            }],
            hits_addend: 0,
        }
    }
}

/// What a request written for a descriptor does.
#[derive(Debug, Clone, Copy)]
pub(super) enum Purpose {
    /// Asks to pass.
    Call,
    /// Reports tokens used.
    Report { tokens: u64 },
    /// Gives back the holds in flight taken at `taken_ms`.
    Release { taken_ms: u64 },
}

/// Why a call was allowed or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Within every limit it met.
    Within,
    /// No rule limits it: no rule of its domain matches its entries, the domain is unknown,
    /// or the rule is `unlimited`.
    NoLimit,
    /// A limit is spent: [`Decision::limit`] names it, [`Decision::retry_after`] says when it
    /// may pass.
    OverLimit,
}

/// A limit as a decision reports it: the one nearest its end among those the call met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Its name in the rule file, if it has one.
    pub name: Option<Arc<str>>,
    /// What it allows a window (capacity reductions applied; a token bucket's rate). Clamped
    /// to 32 bits, as Envoy's API carries it.
    pub per_unit: u32,
    /// Its window.
    pub unit: Unit,
}

/// What [`RateLimiter::try_acquire`](super::RateLimiter::try_acquire) decided.
#[derive(Debug)]
#[must_use = "a decision says whether the call may go ahead, and may hold a slot in flight"]
pub struct Decision {
    pub(super) why: Why,
    pub(super) limit: Option<Limit>,
    pub(super) remaining: u32,
    pub(super) reset_after: Duration,
    pub(super) hold: Option<Hold>,
}

impl Decision {
    /// Whether the call may go ahead.
    pub fn is_allowed(&self) -> bool {
        self.why != Why::OverLimit
    }

    /// Why.
    pub fn why(&self) -> Why {
        self.why
    }

    /// The limit nearest its end among those the call met (none when no limit applies).
    pub fn limit(&self) -> Option<&Limit> {
        self.limit.as_ref()
    }

    /// What that limit has left after this call.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// For a refusal, how long until the call would pass if nothing else took the capacity
    /// (a window's end, a bucket's refill for these hits, holds lapsing); none if allowed.
    pub fn retry_after(&self) -> Option<Duration> {
        (self.why == Why::OverLimit).then_some(self.reset_after)
    }

    /// How long until the limit reported resets (a window's end; a bucket full again).
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }

    /// The slot in flight the call took, when one of its limits is a `concurrency` limit:
    /// keep it for as long as the call runs; dropping it gives the slot back.
    ///
    /// ```
    /// use sluice::{Descriptor, RateLimiter};
    ///
    /// let limiter = RateLimiter::builder()
    ///     .rules_yaml("domain: llm\ndescriptors:\n  - key: api_key\n    limits:\n      - { concurrency: 1, hold_ttl: 5m }\n")
    ///     .build()?;
    /// let stream = Descriptor::new("llm").entry("api_key", "k1");
    /// let mut first = limiter.try_acquire(&stream)?;
    /// let hold = first.take_hold().expect("a slot in flight");
    /// assert!(!limiter.try_acquire(&stream)?.is_allowed()); // the one slot is taken
    /// hold.release(); // or drop it: the stream has ended
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn take_hold(&mut self) -> Option<Hold> {
        self.hold.take()
    }

    /// Reads the answer the pipeline gave to a one-descriptor request.
    pub(super) fn read(answer: &Answer) -> (Decision, Option<u64>) {
        let status = answer.statuses.first();
        let limit = status.and_then(|s| s.limit.as_ref());
        let why = match (answer.code, limit) {
            (Code::OverLimit, _) => Why::OverLimit,
            (_, None) => Why::NoLimit,
            (_, Some(_)) => Why::Within,
        };
        let decision = Decision {
            why,
            limit: limit.map(|l| Limit {
                name: l.name.clone(),
                per_unit: l.per_unit,
                unit: l.unit,
            }),
            remaining: status.map_or(0, |s| s.remaining),
            reset_after: limit.map_or(Duration::ZERO, |l| l.until_reset),
            hold: None,
        };
        (decision, hold_taken_ms(answer))
    }
}

/// When the answer's holds in flight were taken, if it took any.
fn hold_taken_ms(answer: &Answer) -> Option<u64> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let metadata = answer.metadata.as_ref()?;
    match &metadata.fields.get(HOLD_METADATA_KEY)?.kind {
        Some(Kind::StringValue(text)) => text.parse().ok(),
        _ => None,
    }
}

/// A slot in flight, held by a call admitted under a `concurrency` limit. Dropping it gives
/// the slot back (with a fleet store, in the background); [`Hold::release`] says so outright.
/// A hold never given back lapses after the rule's `hold_ttl`.
#[must_use = "dropping a hold gives its slot back at once"]
pub struct Hold {
    pub(super) release: Option<Box<dyn FnOnce() + Send + Sync>>,
    pub(super) taken_ms: u64,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("taken_ms", &self.taken_ms)
            .field("released", &self.release.is_none())
            .finish()
    }
}

impl Hold {
    /// When it was taken (milliseconds since the epoch).
    pub fn taken_ms(&self) -> u64 {
        self.taken_ms
    }

    /// Gives the slot back now.
    pub fn release(mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

/// Where a descriptor's limits stand now, counting nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// The requests limit nearest its end, in force (capacity reductions applied); none when
    /// no requests limit applies.
    pub total: Option<u64>,
    /// What it has left now, fleet-wide as this process sees it.
    pub available: Option<u64>,
    /// Its window.
    pub window: Option<Unit>,
    /// Calls holding a slot now, under the descriptor's `concurrency` limit.
    pub in_flight: u64,
    /// That `concurrency` limit, if it has one.
    pub in_flight_limit: Option<u64>,
}

/// A rule's capacity factor, as it changed (a reduction announced anywhere in the fleet, or a
/// step of its recovery).
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityChange {
    /// The rule's domain.
    pub domain: String,
    /// The rule's descriptor path (as `/v1/rules` lists it).
    pub rule: String,
    /// The share of its configured limit now in force, above 0 and at most 1.
    pub factor: f64,
}
