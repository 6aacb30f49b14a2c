//! Envoy's protocol ⇄ sluice's domain: a `RateLimitRequest` checked against the configured
//! bounds and read into asks, and a verdict written back as a `RateLimitResponse`.

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code as ProtoCode, rate_limit::Unit as ProtoUnit,
};
use std::collections::HashMap;

use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use smallvec::SmallVec;

mod answer;
mod call;
pub use answer::{Answer, AnswerStatus, EndpointShare, Header, ShortText};
pub use call::{Call, CallDescriptor, CallEntry, ReadError};

use crate::decision::{Ask, Code, LimitOverride, Purpose, Verdict};
use crate::limiter::Unit;
use crate::rules::ENDPOINT_KEY;

/// Entries whose keys start with this are sluice's own, not part of the descriptor matched.
pub const RESERVED_PREFIX: &str = "sluice.";
/// `sluice.report=tokens`: the descriptor reports tokens used (its hits), at stream end.
pub const REPORT_KEY: &str = "sluice.report";
/// `sluice.estimate=N`: the request reserves N tokens now; its report settles the difference.
pub const ESTIMATE_KEY: &str = "sluice.estimate";
/// The reserved entry that picks a call's priority class, unless `--priority-key` names another.
pub const PRIORITY_KEY: &str = "sluice.priority";
/// The reserved entry that gives back the holds in flight a stream took, at its end: its value
/// is when they were taken, as the answer's dynamic metadata said ([`HOLD_METADATA_KEY`]).
pub const RELEASE_KEY: &str = "sluice.release";
/// The dynamic metadata field of an answer that took holds in flight: when (milliseconds since
/// the epoch, as text), for Envoy to send back in [`RELEASE_KEY`] when the stream ends. Only
/// streams that took a hold have it, so only they release one.
pub const HOLD_METADATA_KEY: &str = "sluice.hold";

/// Bounds on what one ShouldRateLimit call may carry; larger calls get INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RequestBounds {
    /// Most descriptors in one request.
    #[arg(long, env = "SLUICE_MAX_DESCRIPTORS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_descriptors: u32,

    /// Most entries in one descriptor.
    #[arg(long, env = "SLUICE_MAX_ENTRIES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_entries: u32,

    /// Longest domain, entry key or entry value, in bytes.
    #[arg(long, env = "SLUICE_MAX_VALUE_BYTES", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub max_value_bytes: u32,

    /// The descriptor entry key whose value picks a call's priority class (a rule's
    /// `reserve`); the entry comes last among the descriptor's own entries and is not matched.
    /// The default is reserved, so descriptors written for envoyproxy/ratelimit never lose an
    /// entry to it; `--priority-key priority` takes `priority=high`.
    #[arg(long, env = "SLUICE_PRIORITY_KEY", default_value = PRIORITY_KEY)]
    pub priority_key: String,
}

/// A request sluice will not decide: answered INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not a valid RateLimitRequest: {0}")]
    Undecodable(ReadError),
    #[error("domain must not be empty")]
    EmptyDomain,
    #[error("domain is longer than {max} bytes")]
    LongDomain { max: u32 },
    #[error("at least one descriptor is required")]
    NoDescriptors,
    #[error("{count} descriptors; at most {max} are accepted")]
    TooManyDescriptors { count: usize, max: u32 },
    #[error("descriptors[{index}]: {problem}")]
    Descriptor {
        index: usize,
        problem: DescriptorError,
    },
}

/// What is wrong with one descriptor of a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("{count} entries; at most {max} are accepted")]
    TooManyEntries { count: usize, max: u32 },
    #[error("entries[{entry}]: key must not be empty")]
    EmptyKey { entry: usize },
    #[error("entries[{entry}]: key or value is longer than {max} bytes")]
    TooLong { entry: usize, max: u32 },
    #[error("limit: unit {unit} is not a known unit")]
    UnknownUnit { unit: i32 },
    #[error("needs an entry besides the {RESERVED_PREFIX}* ones")]
    OnlyReserved,
    #[error("entries[{entry}]: {ESTIMATE_KEY} must be a number of tokens, not `{value}`")]
    BadEstimate { entry: usize, value: String },
    #[error(
        "entries[{entry}]: {RELEASE_KEY} must be when the hold was taken, as the answer's `{HOLD_METADATA_KEY}` metadata gives it (milliseconds since the epoch), not `{value}`"
    )]
    BadRelease { entry: usize, value: String },
    #[error(
        "entries[{entry}]: {RELEASE_KEY} gives back holds and stands alone: send {REPORT_KEY} and {ESTIMATE_KEY} in a descriptor of their own"
    )]
    ReleaseWithOthers { entry: usize },
    #[error(
        "entries[{entry}]: unknown reserved entry `{key}={value}` (known: {REPORT_KEY}=tokens, {ESTIMATE_KEY}=N, {RELEASE_KEY}=T, {PRIORITY_KEY}=CLASS)"
    )]
    UnknownReserved {
        entry: usize,
        key: String,
        value: String,
    },
    #[error(
        "entries[{entry}]: `{key}` follows a {RESERVED_PREFIX}* entry; reserved entries go last"
    )]
    AfterReserved { entry: usize, key: String },
}

/// Checks a request against the protocol and `bounds`, and resolves each descriptor's hits:
/// the descriptor's `hits_addend` wins when set (0 means check only), else the request's,
/// where 0 means 1.
pub fn asks<'c, 'a>(
    request: &'c Call<'a>,
    bounds: &RequestBounds,
) -> Result<SmallVec<[Ask<'c, CallEntry<'a>>; 8]>, RequestError> {
    let max = bounds.max_value_bytes;
    if request.domain.is_empty() {
        return Err(RequestError::EmptyDomain);
    }
    if request.domain.len() > max as usize {
        return Err(RequestError::LongDomain { max });
    }
    let count = request.descriptor_count();
    if count == 0 {
        return Err(RequestError::NoDescriptors);
    }
    if count > bounds.max_descriptors as usize {
        return Err(RequestError::TooManyDescriptors {
            count,
            max: bounds.max_descriptors,
        });
    }
    let request_hits = match request.hits_addend {
        0 => 1,
        n => u64::from(n),
    };
    let mut asks = SmallVec::new();
    for (index, descriptor) in request.descriptors().enumerate() {
        let ask = ask(descriptor, request_hits, bounds)
            .map_err(|problem| RequestError::Descriptor { index, problem })?;
        asks.push(ask);
    }
    Ok(asks)
}

fn ask<'c, 'a>(
    descriptor: CallDescriptor<'c, 'a>,
    request_hits: u64,
    bounds: &RequestBounds,
) -> Result<Ask<'c, CallEntry<'a>>, DescriptorError> {
    let max = bounds.max_value_bytes;
    if descriptor.entries.is_empty() {
        // As envoyproxy/ratelimit: nothing to match, so no limit (its override too).
        return Ok(Ask {
            entries: &[],
            hits: descriptor.hits_addend.unwrap_or(request_hits),
            refund: descriptor.is_negative_hits,
            limit_override: None,
            purpose: Purpose::Call,
            class: None,
        });
    }
    if descriptor.entries.len() > bounds.max_entries as usize {
        return Err(DescriptorError::TooManyEntries {
            count: descriptor.entries.len(),
            max: bounds.max_entries,
        });
    }
    for (entry, e) in descriptor.entries.iter().enumerate() {
        if e.key.is_empty() {
            return Err(DescriptorError::EmptyKey { entry });
        }
        if e.key.len() > max as usize || e.value.len() > max as usize {
            return Err(DescriptorError::TooLong { entry, max });
        }
    }
    let limit_override = match descriptor.limit {
        None => None,
        Some(o) => match unit_of(o.unit) {
            Some(unit) => Some(LimitOverride {
                per_unit: o.requests_per_unit,
                unit,
            }),
            None => return Err(DescriptorError::UnknownUnit { unit: o.unit }),
        },
    };
    // sluice's reserved entries come after the descriptor's own and are not matched.
    let priority = bounds.priority_key.as_str();
    let mut own = descriptor
        .entries
        .iter()
        .position(|e| e.key.starts_with(RESERVED_PREFIX))
        .unwrap_or(descriptor.entries.len());
    // A priority entry of a plain key is the last of the descriptor's own; a reserved one is
    // read with the other reserved entries below.
    let mut class = None;
    let plain_priority = !priority.starts_with(RESERVED_PREFIX);
    if plain_priority && own > 0 && descriptor.entries[own - 1].key == priority {
        own -= 1;
        class = Some(descriptor.entries[own].value);
    }
    if own == 0 {
        return Err(DescriptorError::OnlyReserved);
    }
    // The common call: no reserved entry, no class.
    if own == descriptor.entries.len() && class.is_none() {
        return Ok(Ask {
            entries: descriptor.entries,
            hits: descriptor.hits_addend.unwrap_or(request_hits),
            refund: descriptor.is_negative_hits,
            limit_override,
            purpose: Purpose::Call,
            class: None,
        });
    }
    let (mut report, mut estimate, mut release) = (false, None, None);
    let reserved_from = own + usize::from(class.is_some());
    for (entry, e) in descriptor.entries.iter().enumerate().skip(reserved_from) {
        match (e.key, e.value) {
            (RELEASE_KEY, value) => match value.trim().parse::<u64>() {
                Ok(taken_ms) => release = Some((entry, taken_ms)),
                Err(_) => {
                    let value = value.to_string();
                    return Err(DescriptorError::BadRelease { entry, value });
                }
            },
            (key, value) if key == priority && class.is_none() => class = Some(value),
            (REPORT_KEY, "tokens") => report = true,
            (ESTIMATE_KEY, value) => match value.trim().parse::<u64>() {
                Ok(n) => estimate = Some(n),
                Err(_) => {
                    let value = value.to_string();
                    return Err(DescriptorError::BadEstimate { entry, value });
                }
            },
            (key, value) if key.starts_with(RESERVED_PREFIX) => {
                return Err(DescriptorError::UnknownReserved {
                    entry,
                    key: key.to_string(),
                    value: value.to_string(),
                });
            }
            (key, _) => {
                let key = key.to_string();
                return Err(DescriptorError::AfterReserved { entry, key });
            }
        }
    }
    let purpose = match (report, estimate, release) {
        (false, None, Some((_, taken_ms))) => Purpose::Release {
            taken_ms: Some(taken_ms),
        },
        (_, _, Some((entry, _))) => return Err(DescriptorError::ReleaseWithOthers { entry }),
        (true, reserved, None) => Purpose::Report {
            reserved: reserved.unwrap_or(0),
        },
        (false, Some(tokens), None) => Purpose::Reserve { tokens },
        (false, None, None) => Purpose::Call,
    };
    Ok(Ask {
        entries: &descriptor.entries[..own],
        hits: descriptor.hits_addend.unwrap_or(request_hits),
        refund: descriptor.is_negative_hits,
        limit_override,
        purpose,
        class,
    })
}

/// A protobuf unit as sluice's; `None` for UNKNOWN and values the proto does not know.
pub fn unit_of(unit: i32) -> Option<Unit> {
    Some(match ProtoUnit::try_from(unit).ok()? {
        ProtoUnit::Unknown => return None,
        ProtoUnit::Second => Unit::Second,
        ProtoUnit::Minute => Unit::Minute,
        ProtoUnit::Hour => Unit::Hour,
        ProtoUnit::Day => Unit::Day,
        ProtoUnit::Week => Unit::Week,
        ProtoUnit::Month => Unit::Month,
        ProtoUnit::Year => Unit::Year,
    })
}

/// sluice's unit as the protobuf's; a span as the named unit nearest its length (the API names
/// no other; `duration_until_reset` stays exact).
#[inline]
pub fn unit_to_proto(unit: Unit) -> ProtoUnit {
    match unit {
        Unit::Span(_) | Unit::Calendar(_) => unnamed_to_proto(unit),
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    }
}

/// A span's or a calendar period's unit as the protobuf's (out of the common path).
#[cold]
fn unnamed_to_proto(unit: Unit) -> ProtoUnit {
    unit_to_proto(unit.nearest_named())
}

/// A code as the protobuf's.
pub fn code(code: Code) -> i32 {
    match code {
        Code::Ok => ProtoCode::Ok as i32,
        Code::OverLimit => ProtoCode::OverLimit as i32,
    }
}

/// Whether a response's code allows the request.
pub fn allows(code: i32) -> bool {
    code == ProtoCode::Ok as i32
}

/// `OK`, `OVER_LIMIT` or `UNKNOWN`, as Envoy's enum names them.
pub fn code_name(code: i32) -> &'static str {
    match ProtoCode::try_from(code) {
        Ok(ProtoCode::Ok) => "OK",
        Ok(ProtoCode::OverLimit) => "OVER_LIMIT",
        _ => "UNKNOWN",
    }
}

/// What goes into a response's `dynamic_metadata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetadataDetail {
    /// The rules' `metadata` (under `metadata`) and the endpoints' utilization.
    #[default]
    Rules,
    /// Also the request as envoyproxy/ratelimit writes it with `RESPONSE_DYNAMIC_METADATA`:
    /// `domain`, `descriptors` and `hitsAddend`.
    Request,
}

/// Envoy's answer to a verdict, without headers or body (the caller adds those): statuses,
/// and the dynamic metadata.
pub fn answer(
    request: &Call<'_>,
    verdict: &Verdict<'_>,
    asks: &[Ask<'_, CallEntry<'_>>],
    detail: MetadataDetail,
) -> Answer {
    Answer {
        code: if verdict.allowed {
            Code::Ok
        } else {
            Code::OverLimit
        },
        statuses: verdict.statuses.iter().map(AnswerStatus::from).collect(),
        headers: Vec::new(),
        body: Vec::new(),
        metadata: dynamic_metadata(request, verdict, asks, detail).map(Box::new),
        utilization: endpoint_utilization(verdict, asks),
    }
}

/// The dynamic metadata field that names the priority class a decision used.
pub const PRIORITY_METADATA_KEY: &str = "sluice.priority";

/// The class whose share of a rule with a `reserve` decided the first such descriptor: the
/// class the call named, if the reserve names it, else `ordinary`.
fn class_used<'a>(verdict: &Verdict<'a>, asks: &[Ask<'_, CallEntry<'_>>]) -> Option<&'a str> {
    verdict.statuses.iter().zip(asks).find_map(|(status, ask)| {
        let reserve = &status.rule?.reserve;
        (!reserve.is_empty()).then(|| reserve.named(ask.class).unwrap_or("ordinary"))
    })
}

/// The response's dynamic metadata, laid out as envoyproxy/ratelimit lays it out (Envoy
/// configurations read `metadata.<key>`); `None` when there is nothing to say. sluice's
/// `endpoint_utilization` joins it in the answer (see [`Answer::utilization`]).
fn dynamic_metadata(
    request: &Call<'_>,
    verdict: &Verdict<'_>,
    asks: &[Ask<'_, CallEntry<'_>>],
    detail: MetadataDetail,
) -> Option<Struct> {
    // The common answer has nothing to say: no maps built (each seeds a hasher).
    let (rule_metadata, reserve) = verdict.statuses.iter().filter_map(|s| s.rule).fold(
        (false, false),
        |(metadata, reserve), rule| {
            (
                metadata || rule.metadata.is_some(),
                reserve || !rule.reserve.is_empty(),
            )
        },
    );
    let holds_taken_ms = verdict.holds_taken_ms.filter(|_| verdict.allowed);
    if detail == MetadataDetail::Rules && !rule_metadata && !reserve && holds_taken_ms.is_none() {
        return None;
    }
    let mut fields = HashMap::new();
    if let Some(taken_ms) = holds_taken_ms {
        fields.insert(HOLD_METADATA_KEY.into(), text(&taken_ms.to_string()));
    }
    if let Some(class) = class_used(verdict, asks).filter(|_| reserve) {
        fields.insert(PRIORITY_METADATA_KEY.into(), text(class));
    }
    if detail == MetadataDetail::Request {
        fields.insert("domain".into(), text(request.domain));
        let descriptors = request.descriptors().map(descriptor_value).collect();
        fields.insert("descriptors".into(), list(descriptors));
        if request.hits_addend != 0 {
            fields.insert("hitsAddend".into(), number(request.hits_addend.into()));
        }
    }
    // Only descriptors that passed contribute, so routing on `metadata` never picks a target
    // that is spent; where two rules set one key the first wins, nested structs merge.
    let mut merged = Struct::default();
    for status in &verdict.statuses {
        if let (Some(rule), Some(_), Code::Ok) = (status.rule, status.limit, status.code)
            && let Some(own) = &rule.metadata
        {
            merge_first_wins(&mut merged, own);
        }
    }
    if !merged.fields.is_empty() {
        fields.insert("metadata".into(), structure(merged));
    }
    (!fields.is_empty()).then_some(Struct { fields })
}

/// Tells Envoy, in the answer's dynamic metadata, when the request took holds in flight that
/// were settled in the fleet store (a replica's own are written with the answer).
pub fn tell_holds_taken(answer: &mut Answer, taken_ms: u64) {
    let metadata = answer.metadata.get_or_insert_with(Default::default);
    metadata
        .fields
        .insert(HOLD_METADATA_KEY.into(), text(&taken_ms.to_string()));
}

/// A request descriptor as envoyproxy/ratelimit reports it: `{entries: ["k=v", …], limit,
/// hitsAddend}`, the last two only when the descriptor sets them.
fn descriptor_value(descriptor: CallDescriptor<'_, '_>) -> Value {
    let entries = descriptor
        .entries
        .iter()
        .map(|e| text(&format!("{}={}", e.key, e.value)))
        .collect();
    let mut fields: HashMap<String, Value> = [("entries".to_string(), list(entries))].into();
    if let Some(limit) = descriptor.limit {
        let unit = ProtoUnit::try_from(limit.unit).map_or("UNKNOWN", |u| u.as_str_name());
        let limit = format!("requests_per_unit:{} unit:{unit}", limit.requests_per_unit);
        fields.insert("limit".into(), text(&limit));
    }
    if let Some(hits) = descriptor.hits_addend {
        fields.insert("hitsAddend".into(), number(hits as f64));
    }
    structure(Struct { fields })
}

/// Adds `from`'s fields missing from `into`; where both hold a struct, merges them the same way.
fn merge_first_wins(into: &mut Struct, from: &Struct) {
    for (key, value) in &from.fields {
        match into.fields.get_mut(key) {
            None => {
                into.fields.insert(key.clone(), value.clone());
            }
            Some(Value {
                kind: Some(Kind::StructValue(mine)),
            }) => {
                if let Some(Kind::StructValue(theirs)) = &value.kind {
                    merge_first_wins(mine, theirs);
                }
            }
            Some(_) => {}
        }
    }
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}

fn structure(s: Struct) -> Value {
    Value {
        kind: Some(Kind::StructValue(s)),
    }
}

/// The names of envoyproxy/ratelimit's response headers (`LIMIT_*_HEADER`).
#[derive(Debug, Clone, Copy)]
pub struct LimitHeaderNames<'a> {
    pub limit: &'a str,
    pub remaining: &'a str,
    pub reset: &'a str,
}

/// envoyproxy/ratelimit's `RateLimit-Limit`, `-Remaining` and `-Reset` (whole seconds) headers,
/// of the status it would pick: an OVER_LIMIT one if any, else the one with a limit and the
/// least remaining. None when no status has a limit.
pub fn add_limit_headers(answer: &mut Answer, names: LimitHeaderNames<'_>) {
    let nearest = answer
        .statuses
        .iter()
        .filter_map(|s| s.limit.as_ref().map(|limit| (s, limit)))
        .min_by_key(|(s, _)| (s.code != Code::OverLimit, s.remaining));
    let Some((status, limit)) = nearest else {
        return;
    };
    // Whole seconds, rounded up: a client waiting that long finds the window reset.
    let reset = limit.until_reset.as_secs() + u64::from(limit.until_reset.subsec_nanos() > 0);
    // The peer reports nothing remaining once a limit is over.
    let remaining = if status.code == Code::OverLimit {
        0
    } else {
        status.remaining
    };
    let mut number = itoa::Buffer::new();
    let mut header = |name: &str, value: u64| {
        let header = Header::new(name.to_string(), number.format(value));
        answer.headers.push(header);
    };
    header(names.limit, limit.per_unit.into());
    header(names.remaining, remaining.into());
    header(names.reset, reset);
}

/// For each descriptor naming an endpoint, how much of its nearest limit the fleet has used
/// (0 to 1): `{"openai": 0.42}`, under `endpoint_utilization`, so Envoy can route away from
/// an endpoint the fleet has saturated.
fn endpoint_utilization(
    verdict: &Verdict<'_>,
    asks: &[Ask<'_, CallEntry<'_>>],
) -> SmallVec<[EndpointShare; 1]> {
    let mut shares = SmallVec::new();
    for (ask, status) in asks.iter().zip(&verdict.statuses) {
        let (Some(endpoint), Some(limit)) = (
            ask.entries.iter().find(|e| e.key == ENDPOINT_KEY),
            status.limit,
        ) else {
            continue;
        };
        let used = limit.ceiling.saturating_sub(status.remaining);
        let share = if limit.ceiling == 0 || status.code == Code::OverLimit {
            1.0
        } else {
            (used as f64 / limit.ceiling as f64).min(1.0)
        };
        // As a map would keep it: one share per endpoint, the last written.
        match shares
            .iter_mut()
            .find(|s: &&mut EndpointShare| s.endpoint.as_str() == endpoint.value)
        {
            Some(known) => known.share = share,
            None => shares.push(EndpointShare {
                endpoint: ShortText::from(endpoint.value),
                share,
            }),
        }
    }
    shares
}

/// Reads `key=value,key2=value2` (as `sluice check` and `/v1/usage` take descriptors).
pub fn parse_entries(text: &str) -> Result<Vec<(String, String)>, EntriesError> {
    text.split(',')
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| EntriesError(pair.to_string()))
        })
        .collect()
}

/// A `key=value` list with a pair that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not key=value")]
pub struct EntriesError(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry as ProtoEntry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

    #[test]
    fn entries_parse_from_pairs() {
        let entries = parse_entries("api_key=k1, model=gpt-4o").unwrap();
        assert_eq!(entries[1], ("model".to_string(), "gpt-4o".to_string()));
        assert_eq!(
            parse_entries("api_key"),
            Err(EntriesError("api_key".into()))
        );
        assert!(parse_entries("=v").is_err(), "a key is needed");
    }

    #[test]
    fn descriptor_problems_name_where_they_are() {
        let bounds = RequestBounds {
            max_descriptors: 2,
            max_entries: 2,
            max_value_bytes: 16,
            priority_key: PRIORITY_KEY.into(),
        };
        let entry = |key: &str, value: &str| ProtoEntry {
            key: key.into(),
            value: value.into(),
        };
        let request = |entries: Vec<ProtoEntry>| RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                entries,
                ..Default::default()
            }],
            hits_addend: 0,
        };
        let message = |r: &RateLimitRequest| {
            let wire = prost::Message::encode_to_vec(r);
            let call = Call::read(&wire).unwrap();
            asks(&call, &bounds).err().map(|e| e.to_string())
        };
        assert_eq!(
            message(&request(vec![entry("k", "v"), entry("sluice.estimate", "lots")])),
            Some("descriptors[0]: entries[1]: sluice.estimate must be a number of tokens, not `lots`".into())
        );
        assert_eq!(
            message(&request(vec![entry("sluice.report", "tokens")])),
            Some("descriptors[0]: needs an entry besides the sluice.* ones".into())
        );
        assert_eq!(
            message(&request(vec![entry("k", "0123456789abcdefg")])),
            Some("descriptors[0]: entries[0]: key or value is longer than 16 bytes".into())
        );
        let ok = request(vec![entry("k", "v"), entry("sluice.estimate", "300")]);
        let wire = prost::Message::encode_to_vec(&ok);
        let call = Call::read(&wire).unwrap();
        let asks = asks(&call, &bounds).unwrap();
        assert_eq!(asks[0].purpose, Purpose::Reserve { tokens: 300 });
        assert_eq!((asks[0].entries.len(), asks[0].hits), (1, 1));

        // The priority class: a reserved entry, or the last own entry of a plain key.
        let classed = |bounds: &RequestBounds, entries: Vec<ProtoEntry>| {
            let wire = prost::Message::encode_to_vec(&request(entries));
            let call = Call::read(&wire).unwrap();
            super::asks(&call, bounds)
                .map(|a| (a[0].entries.len(), a[0].class.map(str::to_string)))
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            classed(
                &bounds,
                vec![entry("k", "v"), entry("sluice.priority", "hi")]
            ),
            Ok((1, Some("hi".into())))
        );
        assert_eq!(
            classed(
                &bounds,
                vec![entry("sluice.priority", "hi"), entry("k", "v")]
            ),
            Err("descriptors[0]: needs an entry besides the sluice.* ones".into())
        );
        let plain = RequestBounds {
            priority_key: "priority".into(),
            ..bounds.clone()
        };
        assert_eq!(
            classed(&plain, vec![entry("k", "v"), entry("priority", "hi")]),
            Ok((1, Some("hi".into())))
        );
        assert_eq!(
            classed(&plain, vec![entry("priority", "hi"), entry("k", "v")]),
            Ok((2, None))
        );
    }
}
