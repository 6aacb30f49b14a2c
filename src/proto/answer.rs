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
use prost::encoding::{
    self, DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len,
};
use prost::{DecodeError, Message};
use smallvec::SmallVec;

use crate::decision::{Code, Status};
use crate::limiter::Unit;

use super::{code, unit_to_proto};

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
    /// `dynamic_metadata`: the rules' metadata and endpoint utilization, when there is any
    /// (boxed: the answer is moved through several futures, and most have none).
    pub metadata: Option<Box<Struct>>,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            code: Code::Ok,
            statuses: SmallVec::new(),
            headers: Vec::new(),
            body: Vec::new(),
            metadata: None,
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

impl From<&Status<'_>> for AnswerStatus {
    fn from(status: &Status<'_>) -> Self {
        AnswerStatus {
            code: status.code,
            limit: status.limit.map(|limit| AnswerLimit {
                name: limit.name.cloned(),
                per_unit: limit.per_unit,
                unit: limit.unit,
                until_reset: status.until_reset,
            }),
            remaining: status.remaining,
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
    pub value: HeaderText,
}

impl Header {
    /// A header of `name` and `value`, the value inline when short.
    pub fn new(name: impl Into<Cow<'static, str>>, value: &str) -> Self {
        Header {
            name: name.into(),
            value: HeaderText(SmallVec::from_slice(value.as_bytes())),
        }
    }
}

/// A header's value: up to 16 bytes inline (numbers, resets), longer on the heap. Made only
/// from a `str`, so it is always UTF-8.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderText(SmallVec<[u8; 16]>);

impl HeaderText {
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
            dynamic_metadata: self.metadata.as_deref().cloned(),
            ..Default::default()
        }
    }
}

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

/// A string or bytes field; nothing when empty.
fn encode_text(tag: u32, text: &[u8], buf: &mut impl BufMut) {
    if text.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(text.len() as u64, buf);
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
        encoding::uint32::encode(tag, &n, buf);
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
            encoding::message::encode(2, status, buf);
        }
        for header in &answer.headers {
            encoding::message::encode(3, header, buf);
        }
        encode_text(5, &answer.body, buf);
        if let Some(metadata) = &answer.metadata {
            encoding::message::encode(6, metadata.as_ref(), buf);
        }
    },
    |answer| number_len(1, enum_value(code(answer.code)))
        + encoding::message::encoded_len_repeated(2, &answer.statuses)
        + encoding::message::encoded_len_repeated(3, &answer.headers)
        + text_len(5, &answer.body)
        + answer
            .metadata
            .as_ref()
            .map_or(0, |m| encoding::message::encoded_len(6, m.as_ref()))
);

written_only!(
    AnswerStatus,
    |status, buf| {
        encode_number(1, enum_value(code(status.code)), buf);
        if let Some(limit) = &status.limit {
            encoding::message::encode(2, limit, buf);
        }
        encode_number(3, status.remaining, buf);
        if let Some(limit) = &status.limit {
            encoding::message::encode(4, &duration(limit.until_reset), buf);
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

    fn answer() -> impl Strategy<Value = Answer> {
        (
            any::<bool>(),
            proptest::collection::vec(status(), 0..7),
            proptest::collection::vec(header(), 0..10),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of("[a-z]{1,8}"),
        )
            .prop_map(|(over, statuses, headers, body, metadata)| Answer {
                code: code_of(over),
                statuses: statuses.into(),
                headers,
                body,
                metadata: metadata.map(|key| {
                    Box::new(Struct {
                        fields: [(
                            key,
                            Value {
                                kind: Some(Kind::NumberValue(0.5)),
                            },
                        )]
                        .into(),
                    })
                }),
            })
    }

    proptest! {
        /// The hand-written encoding is byte for byte what prost writes for the same answer
        /// as its owned message, and says its own length right (tonic sizes its frame by it).
        #[test]
        fn writes_what_prost_writes(answer in answer()) {
            let wire = answer.encode_to_vec();
            prop_assert_eq!(wire.len(), answer.encoded_len());
            let response = answer.to_response();
            prop_assert_eq!(&wire, &response.encode_to_vec());
            prop_assert_eq!(RateLimitResponse::decode(&wire[..]).unwrap(), response);
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
