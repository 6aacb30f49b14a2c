//! The answer to a ShouldRateLimit call, held as sluice's own values and written to the wire
//! as Envoy's `RateLimitResponse` by hand. prost's owned message would take an allocation for
//! every header's name and for its value, and a copy of every limit's name; this answer keeps
//! header names `'static` (or shared), short values inline, and limit names shared with the
//! rules, so an answer for a counter that exists allocates only what it must (its denial body).
//! [`Answer::to_response`] gives prost's message, for the admin API and for tests.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    DescriptorStatus, RateLimit as ProtoLimit,
};
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, Struct};
use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType, encoded_len_varint, key_len};
use prost::{DecodeError, Message};
use smallvec::SmallVec;

use crate::decision::{Code, Status};
use crate::limiter::Unit;

use super::{code, number, structure, unit_to_proto};

/// What sluice answers Envoy: the overall code, a status per descriptor, headers for the
/// client, and for a denial a body and perhaps dynamic metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// `overall_code`: allowed, or not.
    pub code: Code,
    /// One per descriptor, in the request's order.
    pub statuses: SmallVec<[AnswerStatus; 1]>,
    /// `response_headers_to_add`: what Envoy adds to the client's response.
    pub headers: Vec<Header>,
    /// `raw_body`: the body of a denial, if sluice writes one.
    pub body: Vec<u8>,
    /// `dynamic_metadata`: the rules' metadata, and the request itself when the operator asks
    /// for it (`RESPONSE_DYNAMIC_METADATA`), when there is any (boxed: the answer is moved through several futures, and most have none).
    pub metadata: Option<Box<Struct>>,
    /// `dynamic_metadata.endpoint_utilization`, one share per endpoint named: written by hand
    /// beside `metadata`, as a protobuf `Struct` of maps costs more than the decision.
    pub utilization: SmallVec<[EndpointShare; 1]>,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            code: Code::Ok,
            statuses: SmallVec::new(),
            headers: Vec::new(),
            body: Vec::new(),
            metadata: None,
            utilization: SmallVec::new(),
        }
    }
}

/// One descriptor's status as Envoy reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerStatus {
    /// Over an enforced limit, or not.
    pub code: Code,
    /// The limit reported, if a rule with a limit matched.
    pub limit: Option<AnswerLimit>,
    /// What is left of it.
    pub remaining: u32,
}

impl Default for AnswerStatus {
    fn default() -> Self {
        AnswerStatus {
            code: Code::Ok,
            limit: None,
            remaining: 0,
        }
    }
}

/// Envoy's `requests_per_unit` and `limit_remaining` are 32-bit: a tokens budget above
/// `u32::MAX` is answered as `u32::MAX`, and what remains of it as at most that. So a status
/// never shows more remaining than its limit, and 0 remaining is 0 (OpenAI headers and the
/// admin API carry the whole 64-bit figures).
use crate::limiter::saturating_u32 as clamp_to_u32;

impl From<&Status<'_>> for AnswerStatus {
    fn from(status: &Status<'_>) -> Self {
        AnswerStatus {
            code: status.code,
            limit: status.limit.map(|limit| AnswerLimit {
                name: limit.name.cloned(),
                per_unit: clamp_to_u32(limit.per_unit),
                unit: limit.unit,
                until_reset: status.until_reset,
            }),
            remaining: clamp_to_u32(status.remaining),
        }
    }
}

/// A status's `current_limit`, and the time until its window ends.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerLimit {
    /// Shared with the rule it comes from.
    pub name: Option<Arc<str>>,
    /// `requests_per_unit`: the limit in force.
    pub per_unit: u32,
    /// The unit of its window.
    pub unit: Unit,
    /// `duration_until_reset`: time until its window ends.
    pub until_reset: Duration,
}

impl Default for AnswerLimit {
    fn default() -> Self {
        AnswerLimit {
            name: None,
            per_unit: 0,
            unit: Unit::Second,
            until_reset: Duration::ZERO,
        }
    }
}

/// A header for Envoy to add to the client's response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The header's name, as written.
    pub name: Cow<'static, str>,
    /// Its value.
    pub value: ShortText,
}

impl Header {
    /// A header of `name` and `value`, the value inline when short.
    pub fn new(name: impl Into<Cow<'static, str>>, value: &str) -> Self {
        Header {
            name: name.into(),
            value: ShortText::from(value),
        }
    }
}

impl From<&str> for ShortText {
    fn from(text: &str) -> Self {
        ShortText(SmallVec::from_slice(text.as_bytes()))
    }
}

/// How much of an endpoint's nearest limit the fleet has used (0 to 1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointShare {
    /// The endpoint, as the request's `endpoint` entry names it.
    pub endpoint: ShortText,
    /// Used over the limit.
    pub share: f64,
}

/// A short text (a header's value, an endpoint's name): up to 16 bytes inline, longer on the
/// heap. Made only from a `str`, so it is always UTF-8.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShortText(SmallVec<[u8; 16]>);

impl ShortText {
    /// The value as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Answer {
    /// The same answer as prost's owned message.
    pub fn to_response(&self) -> RateLimitResponse {
        RateLimitResponse {
            overall_code: code(self.code),
            statuses: self.statuses.iter().map(AnswerStatus::to_proto).collect(),
            response_headers_to_add: self
                .headers
                .iter()
                .map(|h| HeaderValue {
                    key: h.name.to_string(),
                    value: h.value.as_str().to_string(),
                    ..Default::default()
                })
                .collect(),
            raw_body: self.body.clone(),
            dynamic_metadata: self.dynamic_metadata(),
            ..Default::default()
        }
    }

    /// `metadata` with `endpoint_utilization` in it, as prost's `Struct`.
    fn dynamic_metadata(&self) -> Option<Struct> {
        if self.utilization.is_empty() {
            return self.metadata.as_deref().cloned();
        }
        let shares = self
            .utilization
            .iter()
            .map(|s| (s.endpoint.as_str().to_string(), number(s.share)));
        let utilization = structure(Struct {
            fields: shares.collect(),
        });
        let mut metadata = self.metadata.as_deref().cloned().unwrap_or_default();
        metadata.fields.insert(UTILIZATION.into(), utilization);
        Some(metadata)
    }
}

/// The key of the endpoints' shares in the dynamic metadata.
const UTILIZATION: &str = "endpoint_utilization";

impl AnswerStatus {
    fn to_proto(&self) -> DescriptorStatus {
        DescriptorStatus {
            code: code(self.code),
            current_limit: self.limit.as_ref().map(|l| ProtoLimit {
                name: l.name.as_deref().unwrap_or_default().to_string(),
                requests_per_unit: l.per_unit,
                unit: unit_to_proto(l.unit) as i32,
            }),
            limit_remaining: self.remaining,
            duration_until_reset: self.limit.as_ref().map(|l| duration(l.until_reset)),
            quota: None,
        }
    }
}

fn duration(d: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

// The wire format, field by field as envoy/service/ratelimit/v3/rls.proto numbers them, in
// tag order and with proto3's defaults (0, "", empty) left out, as prost writes them.

/// A varint. Every key and most lengths and values of an answer fit one byte: written
/// without prost's loop, which is not inlined and was a tenth of the answer's encoding.
#[inline(always)]
fn put_varint(value: u64, buf: &mut impl BufMut) {
    if value < 0x80 {
        buf.put_u8(value as u8);
    } else {
        encoding::encode_varint(value, buf);
    }
}

#[inline(always)]
fn encode_key(tag: u32, wire_type: WireType, buf: &mut impl BufMut) {
    put_varint(u64::from(tag << 3 | wire_type as u32), buf);
}

/// A nested message: its key, its length, then its fields.
fn encode_message(tag: u32, message: &impl Message, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    put_varint(message.encoded_len() as u64, buf);
    message.encode_raw(buf);
}

/// A string or bytes field; nothing when empty.
fn encode_text(tag: u32, text: &[u8], buf: &mut impl BufMut) {
    if text.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    put_varint(text.len() as u64, buf);
    buf.put_slice(text);
}

fn text_len(tag: u32, text: &[u8]) -> usize {
    if text.is_empty() {
        return 0;
    }
    key_len(tag) + encoded_len_varint(text.len() as u64) + text.len()
}

/// A uint32 or enum field; nothing when 0.
fn encode_number(tag: u32, n: u32, buf: &mut impl BufMut) {
    if n != 0 {
        encode_key(tag, WireType::Varint, buf);
        put_varint(u64::from(n), buf);
    }
}

fn number_len(tag: u32, n: u32) -> usize {
    if n == 0 {
        0
    } else {
        encoding::uint32::encoded_len(tag, &n)
    }
}

/// The codes and units are small positive enum values, written as uint32 is.
fn enum_value(n: i32) -> u32 {
    u32::try_from(n).unwrap_or_default()
}

/// `prost::Message` for a part of the answer, which is only ever written: `encode_raw` and
/// `encoded_len` as given; reading one skips every field.
macro_rules! written_only {
    ($ty:ty, |$this:ident, $buf:ident| $encode:block, |$it:ident| $len:expr) => {
        impl Message for $ty {
            fn encode_raw(&self, $buf: &mut impl BufMut) {
                let $this = self;
                $encode
            }

            fn encoded_len(&self) -> usize {
                let $it = self;
                $len
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: WireType,
                buf: &mut impl Buf,
                ctx: DecodeContext,
            ) -> Result<(), DecodeError> {
                encoding::skip_field(wire_type, tag, buf, ctx)
            }

            fn clear(&mut self) {
                *self = <$ty>::default();
            }
        }
    };
}

written_only!(
    Answer,
    |answer, buf| {
        encode_number(1, enum_value(code(answer.code)), buf);
        for status in &answer.statuses {
            encode_message(2, status, buf);
        }
        for header in &answer.headers {
            encode_message(3, header, buf);
        }
        encode_text(5, &answer.body, buf);
        let metadata = metadata_len(answer);
        if metadata > 0 || answer.metadata.is_some() {
            encode_key(6, WireType::LengthDelimited, buf);
            put_varint(metadata as u64, buf);
            if let Some(rules) = &answer.metadata {
                rules.encode_raw(buf);
            }
            encode_utilization(&answer.utilization, buf);
        }
    },
    |answer| number_len(1, enum_value(code(answer.code)))
        + encoding::message::encoded_len_repeated(2, &answer.statuses)
        + encoding::message::encoded_len_repeated(3, &answer.headers)
        + text_len(5, &answer.body)
        + match metadata_len(answer) {
            0 if answer.metadata.is_none() => 0,
            len => key_len(6) + encoded_len_varint(len as u64) + len,
        }
);

/// The length of the `dynamic_metadata` Struct: the rules' fields, then one more map entry,
/// `endpoint_utilization`, when there are shares (a map is a repeated field: entries written
/// one after another make one map).
fn metadata_len(answer: &Answer) -> usize {
    answer.metadata.as_ref().map_or(0, |m| m.encoded_len()) + utilization_len(&answer.utilization)
}

/// `{"endpoint_utilization": {"<endpoint>": <share>, …}}` as entries of a Struct's `fields`
/// (tag 1, a map of string to Value): each entry a message of key (1) and value (2); a Value
/// holds a Struct at 5 and a number at 2 (google/protobuf/struct.proto).
fn utilization_len(shares: &[EndpointShare]) -> usize {
    if shares.is_empty() {
        return 0;
    }
    delimited_len(1, utilization_entry_len(shares_len(shares)))
}

fn encode_utilization(shares: &[EndpointShare], buf: &mut impl BufMut) {
    if shares.is_empty() {
        return;
    }
    let inner = shares_len(shares);
    encode_delimited_key(1, utilization_entry_len(inner), buf);
    encode_text(1, UTILIZATION.as_bytes(), buf);
    encode_delimited_key(2, delimited_len(5, inner), buf);
    encode_delimited_key(5, inner, buf);
    for share in shares {
        encode_delimited_key(1, share_entry_len(share), buf);
        encode_text(1, &share.endpoint.0, buf);
        encode_delimited_key(2, key_len(2) + 8, buf);
        encoding::double::encode(2, &share.share, buf);
    }
}

/// The map entry `"endpoint_utilization": Value { struct_value: <inner bytes> }`.
fn utilization_entry_len(inner: usize) -> usize {
    text_len(1, UTILIZATION.as_bytes()) + delimited_len(2, delimited_len(5, inner))
}

/// The inner Struct's entries, one per share.
fn shares_len(shares: &[EndpointShare]) -> usize {
    shares
        .iter()
        .map(|s| delimited_len(1, share_entry_len(s)))
        .sum()
}

/// The map entry `"<endpoint>": Value { number_value: share }`.
fn share_entry_len(share: &EndpointShare) -> usize {
    text_len(1, &share.endpoint.0) + delimited_len(2, key_len(2) + 8)
}

/// A length-delimited field of `len` bytes, with its key and length.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn encode_delimited_key(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    put_varint(len as u64, buf);
}

written_only!(
    AnswerStatus,
    |status, buf| {
        encode_number(1, enum_value(code(status.code)), buf);
        if let Some(limit) = &status.limit {
            encode_message(2, limit, buf);
        }
        encode_number(3, status.remaining, buf);
        if let Some(limit) = &status.limit {
            encode_message(4, &duration(limit.until_reset), buf);
        }
    },
    |status| number_len(1, enum_value(code(status.code)))
        + status.limit.as_ref().map_or(0, |limit| {
            encoding::message::encoded_len(2, limit)
                + encoding::message::encoded_len(4, &duration(limit.until_reset))
        })
        + number_len(3, status.remaining)
);

// Written as the status's `current_limit` (`RateLimit`).
written_only!(
    AnswerLimit,
    |limit, buf| {
        encode_number(1, limit.per_unit, buf);
        encode_number(2, enum_value(unit_to_proto(limit.unit) as i32), buf);
        encode_text(3, limit.name.as_deref().unwrap_or_default().as_bytes(), buf);
    },
    |limit| number_len(1, limit.per_unit)
        + number_len(2, enum_value(unit_to_proto(limit.unit) as i32))
        + text_len(3, limit.name.as_deref().unwrap_or_default().as_bytes())
);

// Written as a `HeaderValue` (`key`, `value`).
written_only!(
    Header,
    |header, buf| {
        encode_text(1, header.name.as_bytes(), buf);
        encode_text(2, &header.value.0, buf);
    },
    |header| text_len(1, header.name.as_bytes()) + text_len(2, &header.value.0)
);

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Value, value::Kind};
    use proptest::prelude::*;

    fn unit() -> impl Strategy<Value = Unit> {
        prop_oneof![
            Just(Unit::Second),
            Just(Unit::Minute),
            Just(Unit::Hour),
            Just(Unit::Day),
            Just(Unit::Week),
            Just(Unit::Month),
            Just(Unit::Year),
        ]
    }

    fn code_of(over: bool) -> Code {
        if over { Code::OverLimit } else { Code::Ok }
    }

    fn status() -> impl Strategy<Value = AnswerStatus> {
        let limit = (
            proptest::option::of("[a-z_]{0,12}"),
            any::<u32>(),
            unit(),
            0u64..100_000_000,
        )
            .prop_map(|(name, per_unit, unit, ms)| AnswerLimit {
                name: name.map(Into::into),
                per_unit,
                unit,
                until_reset: Duration::from_millis(ms) + Duration::from_nanos(ms % 7),
            });
        (any::<bool>(), proptest::option::of(limit), any::<u32>()).prop_map(
            |(over, limit, remaining)| AnswerStatus {
                code: code_of(over),
                limit,
                remaining,
            },
        )
    }

    fn header() -> impl Strategy<Value = Header> {
        // Values short enough to stay inline, and long enough to spill.
        ("[a-z-]{0,30}", "[ -~]{0,60}").prop_map(|(name, value)| Header::new(name, &value))
    }

    fn share() -> impl Strategy<Value = EndpointShare> {
        ("[a-z]{0,20}", 0.0..=1.0f64).prop_map(|(endpoint, share)| EndpointShare {
            endpoint: ShortText::from(endpoint.as_str()),
            share,
        })
    }

    fn answer() -> impl Strategy<Value = Answer> {
        (
            any::<bool>(),
            proptest::collection::vec(status(), 0..7),
            proptest::collection::vec(header(), 0..10),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of("[a-z]{1,8}"),
            proptest::collection::vec(share(), 0..3),
        )
            .prop_map(
                |(over, statuses, headers, body, metadata, utilization)| Answer {
                    code: code_of(over),
                    statuses: statuses.into(),
                    headers,
                    body,
                    metadata: metadata.map(|key| {
                        let half = Value {
                            kind: Some(Kind::NumberValue(0.5)),
                        };
                        Box::new(Struct {
                            fields: [(key, half)].into(),
                        })
                    }),
                    utilization: utilization.into(),
                },
            )
    }

    proptest! {
        /// The hand-written encoding says its own length right (tonic sizes its frame by it)
        /// and decodes to prost's owned message of the same answer; where that message's maps
        /// hold one entry each (so prost's order is not the hash map's), byte for byte.
        #[test]
        fn writes_what_prost_writes(answer in answer()) {
            let wire = answer.encode_to_vec();
            prop_assert_eq!(wire.len(), answer.encoded_len());
            let response = answer.to_response();
            prop_assert_eq!(RateLimitResponse::decode(&wire[..]).unwrap(), response.clone());
            let one_entry_maps = answer.utilization.len() <= 1
                && (answer.metadata.is_none() || answer.utilization.is_empty());
            if one_entry_maps {
                prop_assert_eq!(&wire, &response.encode_to_vec());
            }
        }
    }

    #[test]
    fn short_header_values_stay_inline() {
        let header = Header::new("x-ratelimit-reset-requests", "59m59s");
        assert_eq!(header.value.as_str(), "59m59s");
        assert!(!header.value.0.spilled());
        let long = Header::new("retry-after", &"9".repeat(40));
        assert_eq!(long.value.as_str().len(), 40);
    }
}
