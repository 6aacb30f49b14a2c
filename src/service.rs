//! The request pipeline, one function for every protocol: validate → decide → strict limits
//! → metrics → answer. The gRPC service and the admin API's `/v1/check` both call [`answer`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

use crate::app::App;
use crate::decision::{Ask, Code, LeaseWant, Purpose, StrictWork, Verdict, decide};
use crate::limiter::{Enforcement, FleetView};
use crate::proto::{
    self, Answer, AnswerStatus, Call, CallEntry, Header, MetadataDetail, RequestError,
};
use crate::rules::MetricDetail;
use crate::sync::strict;
use crate::telemetry::RuleMetrics;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The request breaks the protocol or the configured bounds.
    #[error(transparent)]
    Invalid(#[from] RequestError),
    /// A bug: the decision panicked. Never shown to Envoy as an allow.
    #[error("sluice: internal error")]
    Internal,
}

/// Answers one RateLimitRequest, given in its protobuf encoding as gRPC carries it:
/// validation, the local decision, strict rules in Redis, metrics.
pub async fn answer(app: &Arc<App>, request: Bytes) -> Result<Answer, AnswerError> {
    answer_with(app, request, Patience::AsRules).await
}

/// [`answer`], a refusal waiting for capacity as `patience` says rather than as the rules do.
pub async fn answer_with(
    app: &Arc<App>,
    request: Bytes,
    patience: Patience,
) -> Result<Answer, AnswerError> {
    match answer_at_once(app, request, patience) {
        Answered::Now(answer) => answer,
        Answered::Later(unfinished) => unfinished.finish(app).await,
    }
}

/// An answer given at once, or the part of one that waits on Redis.
pub enum Answered {
    /// Decided from what the replica holds: the common case, with no future to poll.
    Now(Result<Answer, AnswerError>),
    /// Needs leases taken or strict limits settled in Redis first.
    Later(Unfinished),
}

/// [`answer`] for a request in prost's owned form (the admin API's, read from JSON).
pub async fn answer_request(
    app: &Arc<App>,
    request: &RateLimitRequest,
) -> Result<Answer, AnswerError> {
    answer(app, prost::Message::encode_to_vec(request).into()).await
}

/// A request whose answer waits on Redis: see [`Unfinished::finish`].
pub struct Unfinished {
    /// The request's bytes, read again once Redis has answered.
    request: Bytes,
    started: Instant,
    wait: Wait,
    patience: Patience,
}

/// How long a call refused may wait for capacity to come back, from its arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Not at all: answered at once.
    Never,
    /// As its rules say (`wait:`): a call waits only when every descriptor refused allows it,
    /// for the shortest of their waits. What a ShouldRateLimit call gets.
    AsRules,
    /// Up to this long, whatever the rules say (an embedded limiter's `acquire`).
    UpTo(std::time::Duration),
}

enum Wait {
    /// Denied for spent leases: lease, then decide again (nothing was counted).
    Leases(Vec<LeaseWant>),
    /// Denied by rules that let a call wait (`wait:`): queue, and decide again as capacity
    /// comes back, until admitted or `wait` has passed (nothing was counted or recorded).
    Capacity(Waitable),
    /// Decided locally; its strict limits are still to settle.
    Strict(Answer, Box<StrictWork>),
}

/// [`answer`] without waiting: the request path as a plain function, so that the gRPC
/// service needs no boxed future for the answers that need no Redis call (nearly all).
pub fn answer_at_once(app: &Arc<App>, request: Bytes, patience: Patience) -> Answered {
    let started = Instant::now();
    if let Some(total) = &app.metrics.requests.peer_total {
        total.increment(1);
    }
    let call = match Call::read(&request) {
        Ok(call) => call,
        Err(error) => return invalid(app, RequestError::Undecodable(error)),
    };
    let asks = match proto::asks(&call, &app.settings.request_bounds) {
        Ok(asks) => asks,
        Err(error) => return invalid(app, error),
    };
    let responded = match decide_once(app, &call, &asks, false, patience) {
        Ok(Responded::LeasesSpent(wants)) => {
            // A lease the sync took ahead of this window, claimed with no call to the store.
            let claimed = app
                .fleet
                .as_ref()
                .is_some_and(|fleet| fleet.claim_ahead(&app.limiter, &wants));
            if claimed {
                decide_once(app, &call, &asks, false, patience)
            } else {
                Ok(Responded::LeasesSpent(wants))
            }
        }
        other => other,
    };
    let wait = match responded {
        Err(error) => return Answered::Now(Err(error)),
        Ok(Responded::LeasesSpent(wants)) => Wait::Leases(wants),
        Ok(Responded::Wait(waitable)) => Wait::Capacity(waitable),
        Ok(Responded::Answer(response, strict, background)) => {
            lease_in_background(app, background);
            match (strict, &app.fleet) {
                (Some(work), Some(_)) => Wait::Strict(response, work),
                _ => return Answered::Now(Ok(finish(app, response, started))),
            }
        }
    };
    drop(asks);
    drop(call);
    Answered::Later(Unfinished {
        // A copy of the call's few bytes: the bytes given are a slice of the frame buffer the
        // gRPC codec read them into (8 KiB each), which a call waiting on Redis kept alive.
        request: Bytes::copy_from_slice(&request),
        started,
        wait,
        patience,
    })
}

impl Unfinished {
    /// Takes the leases or settles the strict limits, then answers.
    pub async fn finish(self, app: &Arc<App>) -> Result<Answer, AnswerError> {
        let Unfinished {
            request,
            started,
            wait,
            patience,
        } = self;
        let (response, work) = match wait {
            Wait::Strict(response, work) => (response, work),
            Wait::Capacity(waitable) => {
                let responded =
                    wait_for_capacity(app, &request, waitable, started, patience).await?;
                match strict_left(app, responded)? {
                    Decided::Unsettled(response, work) => (response, work),
                    Decided::Done(response) => return Ok(finish(app, response, started)),
                }
            }
            Wait::Leases(wants) => {
                take_leases(app, wants).await;
                let call = Call::read(&request).map_err(RequestError::Undecodable)?;
                let asks = proto::asks(&call, &app.settings.request_bounds)?;
                let responded = match decide_once(app, &call, &asks, false, Patience::Never)? {
                    // Still short of a lease the fleet may have: the window ended while the
                    // store answered (what it granted went to the window gone), or the grant
                    // fell short. Once more, then decided on what is held. A fleet found spent
                    // is not asked again: the view just read says so.
                    Responded::LeasesSpent(wants) => {
                        take_leases(app, wants).await;
                        decide_once(app, &call, &asks, true, Patience::Never)?
                    }
                    answered => answered,
                };
                match strict_left(app, responded)? {
                    Decided::Unsettled(response, work) => (response, work),
                    Decided::Done(response) => return Ok(finish(app, response, started)),
                }
            }
        };
        let (response, store_wait) = settle_in_task(app, response, work, patience).await?;
        // Refused by limits settled in the store whose rules let a call wait: it waits for
        // them as for a replica's own.
        if let Some(store_wait) = store_wait {
            let waitable = Waitable::in_store(&request, app, store_wait)?;
            let responded = wait_for_capacity(app, &request, waitable, started, patience).await?;
            if let Decided::Done(response) = strict_left(app, responded)? {
                return Ok(finish(app, response, started));
            }
            return Err(internal());
        }
        Ok(finish(app, response, started))
    }
}

/// Settles the limits of a request kept in the fleet store (strict rules, reserves, holds in
/// flight), in a task of its own so a panic there is caught too: the answer, and for a denial
/// the call may wait out, how long and the descriptor denied first.
async fn settle_in_task(
    app: &Arc<App>,
    response: Answer,
    work: Box<StrictWork>,
    patience: Patience,
) -> Result<(Answer, Option<(std::time::Duration, usize)>), AnswerError> {
    let settling = app.clone();
    tokio::spawn(async move { settle_strict(&settling, response, &work, patience).await })
        .await
        .map_err(|_| internal())
}

/// A final decision's answer: with strict limits still to settle, or done.
enum Decided {
    Unsettled(Answer, Box<StrictWork>),
    Done(Answer),
}

/// What a final decision leaves to do; leases running low are topped up in the background.
fn strict_left(app: &Arc<App>, responded: Responded) -> Result<Decided, AnswerError> {
    let Responded::Answer(response, strict, background) = responded else {
        return Err(internal());
    };
    lease_in_background(app, background);
    Ok(match (strict, &app.fleet) {
        (Some(work), Some(_)) => Decided::Unsettled(response, work),
        _ => Decided::Done(response),
    })
}

/// A request refused before deciding: counted, and answered INVALID_ARGUMENT.
fn invalid(app: &App, error: RequestError) -> Answered {
    app.metrics.requests.invalid.increment(1);
    if let Some(errors) = &app.metrics.requests.peer_service_error {
        errors.increment(1);
    }
    Answered::Now(Err(error.into()))
}

/// A bug: logged, and answered as one.
fn internal() -> AnswerError {
    tracing::error!("internal error while deciding a request");
    AnswerError::Internal
}

/// [`respond`], with a panic in it caught and answered as a bug.
fn decide_once(
    app: &App,
    request: &Call<'_>,
    asks: &[Ask<'_, CallEntry<'_>>],
    last_try: bool,
    patience: Patience,
) -> Result<Responded, AnswerError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        respond(app, request, asks, last_try, patience)
    }))
    .map_err(|_| internal())
}

/// A denial the call may wait out: how long at most (from its start), when to try again if
/// nothing wakes it sooner, and the queue it waits in (its first refused descriptor's).
struct Waitable {
    wait: std::time::Duration,
    retry_in: std::time::Duration,
    queue: u64,
}

impl Waitable {
    /// The wait a denial allows: as the call's patience says, or, as the rules say, when
    /// every descriptor refused is of a rule with `wait:`, the shortest of them.
    fn of(
        request: &Call<'_>,
        asks: &[Ask<'_, CallEntry<'_>>],
        verdict: &Verdict<'_>,
        patience: Patience,
    ) -> Option<Waitable> {
        if patience == Patience::Never {
            return None;
        }
        let mut refused = verdict
            .statuses
            .iter()
            .zip(asks)
            .filter(|(s, _)| s.code == Code::OverLimit)
            .peekable();
        let (_, first) = refused.peek()?;
        let domain_and_entries = (request.domain, first.entries);
        let (mut wait, mut retry_in) = (std::time::Duration::MAX, std::time::Duration::MAX);
        for (status, _) in refused {
            if let Patience::UpTo(up_to) = patience {
                wait = up_to;
            } else {
                wait = wait.min(status.rule?.wait?);
            }
            retry_in = retry_in.min(status.until_reset);
        }
        Some(Waitable {
            wait,
            retry_in: retry_in.max(std::time::Duration::from_millis(1)),
            queue: queue_of(domain_and_entries.0, domain_and_entries.1),
        })
    }

    /// A denial by limits settled in the fleet store that let the call wait (`wait` and the
    /// descriptor denied first, from [`settle_strict`]): retried every [`STORE_RETRY`], as a
    /// stream's release that reaches another replica wakes no waiter here.
    fn in_store(
        request: &Bytes,
        app: &App,
        (wait, ask): (std::time::Duration, usize),
    ) -> Result<Waitable, AnswerError> {
        let call = Call::read(request).map_err(RequestError::Undecodable)?;
        let asks = proto::asks(&call, &app.settings.request_bounds)?;
        let entries = asks.get(ask).map_or(&[][..], |a| a.entries);
        Ok(Waitable {
            wait,
            retry_in: STORE_RETRY,
            queue: queue_of(call.domain, entries),
        })
    }
}

/// How often a call waiting on limits settled in the fleet store asks it again.
const STORE_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// The wait queue of a descriptor: its domain and entries, hashed.
fn queue_of(domain: &str, entries: &[CallEntry<'_>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    domain.hash(&mut hasher);
    for e in entries {
        (e.key, e.value).hash(&mut hasher);
    }
    hasher.finish()
}

/// Waits in the descriptor's queue, first come first served, then decides again each time
/// capacity may have come back (the time the denial named, or a release of holds), until the
/// call is admitted or its wait is over; then decides it for good. A waiter is a sleeping
/// future: no thread, no polling loop. Dropped (the client gone), it leaves the queue.
async fn wait_for_capacity(
    app: &Arc<App>,
    request: &Bytes,
    first: Waitable,
    started: Instant,
    patience: Patience,
) -> Result<Responded, AnswerError> {
    let deadline = tokio::time::Instant::from_std(started) + first.wait;
    let queue = app.waiting.queue(first.queue);
    let queued = tokio::time::Instant::now();
    let turn = tokio::time::timeout_at(deadline, queue.acquire_owned())
        .await
        .ok()
        .and_then(Result::ok);
    // Its turn came after others' waits: capacity may be back already, so it decides first.
    let mut sleep_first = queued.elapsed() < std::time::Duration::from_millis(1);
    let mut retry_in = first.retry_in;
    loop {
        let now = tokio::time::Instant::now();
        let last = turn.is_none() || now >= deadline;
        if !last && std::mem::replace(&mut sleep_first, true) {
            let released = app.waiting.released.notified();
            tokio::select! {
                _ = tokio::time::sleep_until((now + retry_in).min(deadline)) => {}
                _ = released => {}
            }
        }
        let last = last || tokio::time::Instant::now() >= deadline;
        let call = Call::read(request).map_err(RequestError::Undecodable)?;
        let asks = proto::asks(&call, &app.settings.request_bounds)?;
        let patience = if last { Patience::Never } else { patience };
        let answered = match decide_once(app, &call, &asks, true, patience)? {
            Responded::Wait(again) => {
                retry_in = again.retry_in;
                continue;
            }
            // Allowed here: the limits settled in the store decide, and may refuse again.
            Responded::Answer(response, Some(work), background) if app.fleet.is_some() => {
                lease_in_background(app, background);
                let (response, store_wait) = settle_in_task(app, response, work, patience).await?;
                if store_wait.is_some() && !last {
                    retry_in = STORE_RETRY;
                    continue;
                }
                Responded::Answer(response, None, Vec::new())
            }
            answered => answered,
        };
        let metrics = &app.metrics.requests;
        metrics
            .wait_duration
            .record(started.elapsed().as_secs_f64());
        match &answered {
            Responded::Answer(response, ..) if response.code == Code::Ok => {
                metrics.waited_admitted.increment(1)
            }
            _ => metrics.waited_refused.increment(1),
        }
        return Ok(answered);
    }
}

/// Leases afresh the counters a request found spent, on the request path (bounded by the
/// Redis timeout). A store that fails switches the request path to the failure policy until
/// the sync reaches it again, so that a Redis down costs one timeout, not one per request.
async fn take_leases(app: &App, wants: Vec<LeaseWant>) {
    let Some(fleet) = &app.fleet else { return };
    let FleetView::Synced { replicas } = app.limiter.fleet().get() else {
        return;
    };
    app.metrics.requests.lease_calls.increment(1);
    if let Err(error) = fleet.take_leases(&app.limiter, wants, replicas).await {
        fleet.request_path_failed("a lease", &error);
        app.metrics.requests.lease_failures.increment(1);
        app.limiter.fleet().set(fleet.outage_view(replicas));
    }
}

/// Tops up the leases an admission found running low, and asks again of a fleet a refusal
/// found spent on a view read a while ago, in the fleet's next lease pipeline: no request
/// waits on it. Each lease crosses its low water once per grant, so top-ups follow what the
/// fleet admits, never more than a few for each 64th of a limit; a recheck goes once per
/// stale view, the calls refused meanwhile deciding on the view it marks read.
fn lease_in_background(app: &Arc<App>, wants: Vec<LeaseWant>) {
    if wants.is_empty() || tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let Some(fleet) = &app.fleet else { return };
    let wants = fleet.unasked(&app.limiter, wants);
    if wants.is_empty() {
        return;
    }
    let FleetView::Synced { replicas } = app.limiter.fleet().get() else {
        return;
    };
    app.metrics.requests.lease_top_ups.increment(1);
    fleet.top_up_leases(&app.limiter, wants, replicas);
}

/// Adds what reads the final statuses (envoyproxy/ratelimit's headers) and counts the answer.
fn finish(app: &App, mut response: Answer, started: Instant) -> Answer {
    let settings = &app.settings;
    if settings.limit_response_headers {
        let names = proto::LimitHeaderNames {
            limit: &settings.limit_limit_header,
            remaining: &settings.limit_remaining_header,
            reset: &settings.limit_reset_header,
        };
        proto::add_limit_headers(&mut response, names);
    }
    record_answer(app, &response, started);
    response
}

/// Counts an answer and how long it took.
fn record_answer(app: &App, response: &Answer, started: Instant) {
    let metrics = &app.metrics.requests;
    metrics.duration.record(started.elapsed().as_secs_f64());
    if response.code == Code::Ok {
        metrics.ok.increment(1);
    } else {
        metrics.over_limit.increment(1);
    }
}

/// A decision, or the leases it needs first.
enum Responded {
    /// The answer; strict limits still to settle; leases to take in the background after
    /// (running low, or a spent fleet to ask again).
    Answer(Answer, Option<Box<StrictWork>>, Vec<LeaseWant>),
    /// Denied because leases ran out while the fleet had budget left: worth deciding again
    /// once leased. Nothing was counted or recorded.
    LeasesSpent(Vec<LeaseWant>),
    /// Denied by rules that let the call wait for capacity. Nothing was counted or recorded.
    Wait(Waitable),
}

/// Decides the request and builds its answer; unless `last_try`, a denial that fresh leases
/// may turn into an admission comes back as the leases to take first.
fn respond(
    app: &App,
    request: &Call<'_>,
    asks: &[Ask<'_, CallEntry<'_>>],
    last_try: bool,
    patience: Patience,
) -> Responded {
    let rules = app.rules.load();
    let mut verdict = decide(&rules, &app.limiter, request.domain, asks, app.mode());
    if !last_try && !verdict.spent_leases.is_empty() && app.fleet.is_some() {
        return Responded::LeasesSpent(std::mem::take(&mut verdict.spent_leases));
    }
    if !verdict.allowed
        && let Some(waitable) = Waitable::of(request, asks, &verdict, patience)
    {
        return Responded::Wait(waitable);
    }
    if asks
        .iter()
        .any(|a| matches!(a.purpose, Purpose::Release { .. }))
    {
        app.waiting.released.notify_waiters();
    }
    // One usage report per call, however many descriptors carry it.
    let reported = asks
        .iter()
        .filter(|a| matches!(a.purpose, Purpose::Report { .. }))
        .map(|a| a.hits)
        .max();
    if let Some(tokens) = reported {
        app.metrics.requests.usage_reports.increment(1);
        app.metrics.requests.reported_tokens.increment(tokens);
    }
    if !verdict.known_domain {
        tracing::debug!(domain = %request.domain, "request for an unknown domain");
        app.metrics.requests.unknown_domain.increment(1);
    }
    record_rules(
        asks,
        &verdict,
        app.settings.near_limit_ratio,
        app.settings.shadow_mode,
    );
    let detail = if app.settings.response_dynamic_metadata {
        MetadataDetail::Request
    } else {
        MetadataDetail::Rules
    };
    let mut response = proto::answer(request, &verdict, asks, detail);
    if app.settings.openai_headers {
        // Room for the requests and tokens headers of a denial (8) in one allocation.
        response.headers.reserve_exact(8);
        response.body = crate::openai::answer(&verdict, |name, value| {
            response.headers.push(Header::new(name, value));
        });
    }
    Responded::Answer(
        response,
        verdict.strict.take(),
        std::mem::take(&mut verdict.background_leases),
    )
}

/// Counts each matched rule's hit: over, near or within its limit, shadowed, tokens reported.
fn record_rules(
    asks: &[Ask<'_, CallEntry<'_>>],
    verdict: &Verdict<'_>,
    near_ratio: f64,
    global_shadow: bool,
) {
    for (ask, status) in asks.iter().zip(&verdict.statuses) {
        let Some(rule) = status.rule else { continue };
        let detailed;
        // Callers' values in a label only where a rule asks for them.
        let values = match rule.metric_detail {
            MetricDetail::Rule => None,
            MetricDetail::LastValue => Some(&ask.entries[ask.entries.len().saturating_sub(1)..]),
            MetricDetail::AllValues => Some(ask.entries),
        };
        let metrics = match values {
            None => &rule.metrics,
            Some(entries) => {
                let values: Vec<&str> = entries.iter().map(|e| e.value).collect();
                let label = format!("{}[{}]", rule.path, values.join("."));
                detailed =
                    RuleMetrics::register(&rule.domain, &label, rule.metrics.holds.is_some());
                &detailed
            }
        };
        match ask.purpose {
            Purpose::Report { .. } => {
                metrics.tokens.increment(ask.hits);
                continue;
            }
            // A stream's end, not a call: its hold was counted when it was taken.
            Purpose::Release { .. } => {
                if let Some(holds) = &metrics.holds {
                    holds.released.increment(1);
                }
                continue;
            }
            Purpose::Call | Purpose::Reserve { .. } => {}
        }
        // Holds taken, less those released: the rule's streams in flight (or lapsed).
        if let Some(holds) = &metrics.holds
            && verdict.holds_taken_ms.is_some()
            && verdict.allowed
        {
            holds.taken.increment(1);
        }
        metrics.hits.increment(ask.hits);
        let peer = metrics.peer.as_deref();
        if let Some(peer) = peer {
            peer.total_hits.increment(ask.hits);
        }
        let Some(limit) = status.limit else { continue };
        let shadowed = global_shadow || rule.enforcement == Enforcement::Shadow;
        // Of what remaining counts down from: the limit, or a token bucket's burst.
        let near = limit.ceiling.saturating_sub(status.remaining) as f64
            >= near_ratio * limit.ceiling as f64;
        if status.over {
            metrics.over_limit.increment(1);
            if shadowed {
                metrics.shadow_mode.increment(1);
            }
        } else if near {
            metrics.near_limit.increment(1);
        } else {
            metrics.within_limit.increment(1);
        }
        // The peer counts hits, and a near hit as within the limit too.
        if let Some(peer) = peer {
            if status.over {
                peer.over_limit.increment(ask.hits);
                if shadowed {
                    peer.shadow_mode.increment(ask.hits);
                }
            } else {
                peer.within_limit.increment(ask.hits);
                if near {
                    peer.near_limit.increment(ask.hits);
                }
            }
        }
    }
}

/// Settles the strict limits of a request decided locally, and reports them.
async fn settle_strict(
    app: &App,
    mut response: Answer,
    work: &StrictWork,
    patience: Patience,
) -> (Answer, Option<(std::time::Duration, usize)>) {
    let Some(fleet) = &app.fleet else {
        return (response, None);
    };
    let allowed = response.code == Code::Ok;
    let shadow = app.settings.shadow_mode;
    let (allowed, settled) = strict::settle(fleet, &app.limiter, work, allowed, shadow).await;
    let denied_here = response.code == Code::Ok && !allowed;
    response.code = if allowed { Code::Ok } else { Code::OverLimit };
    let mut statuses = Vec::with_capacity(response.statuses.len());
    for (ask, status) in response.statuses.iter_mut().enumerate() {
        if let Some(strict) = work.status_of(ask, &settled) {
            *status = AnswerStatus::from(&strict);
            statuses.push(strict);
        }
    }
    // Holds taken in the store: Envoy hands the time back to release them; counted once
    // per rule, as a replica's own holds are.
    if allowed {
        let taken = work.jobs.iter().zip(&settled);
        let mut told = false;
        for (job, result) in taken.filter(|(_, r)| r.hold_taken_ms.is_some()) {
            if let Some(holds) = &job.rule.metrics.holds {
                holds.taken.increment(1);
            }
            if !std::mem::replace(&mut told, true)
                && let Some(taken_ms) = result.hold_taken_ms
            {
                proto::tell_holds_taken(&mut response, taken_ms);
            }
        }
    }
    // Streams in flight settled in the store: their headers, as a replica's own have them.
    if app.settings.openai_headers {
        let fewest = work
            .jobs
            .iter()
            .zip(&settled)
            .filter(|(job, _)| {
                job.limits.algorithm == crate::limiter::Algorithm::InFlight && !job.refund
            })
            .filter_map(|(job, result)| {
                let limit = u64::from(job.limits.requests?);
                Some((limit, limit.saturating_sub(result.counts.requests.into())))
            })
            .min_by_key(|(_, remaining)| *remaining);
        if let Some((limit, remaining)) = fewest {
            crate::openai::concurrency_headers(limit, remaining, |name, value| {
                response.headers.push(Header::new(name, value));
            });
        }
    }
    // A denial by a limit settled in the store says why, as a local one does.
    if denied_here && app.settings.openai_headers && response.body.is_empty() {
        response.body = crate::openai::store_refusal(&statuses, |name, value| {
            response.headers.push(Header::new(name, value));
        });
    }
    // Waitable when every enforced limit over is of a rule with `wait:`.
    let store_wait = denied_here
        .then(|| {
            let mut over = work
                .jobs
                .iter()
                .zip(&settled)
                .filter(|(job, r)| r.over.any() && job.enforcement != Enforcement::Shadow)
                .peekable();
            let first = over.peek()?.0.ask;
            let wait = match patience {
                Patience::Never => return None,
                Patience::AsRules => over.map(|(job, _)| job.rule.wait).min()??,
                Patience::UpTo(up_to) => up_to,
            };
            Some((wait, first))
        })
        .flatten();
    (response, store_wait)
}
