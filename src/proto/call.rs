//! A ShouldRateLimit request read in place from its protobuf bytes.
//!
//! prost's owned `RateLimitRequest` takes an allocation for every string (the domain, each
//! entry's key and value) and every list: seven for one descriptor of two entries, nineteen
//! for the LLM gateway's five. sluice only reads them, so [`Call`] borrows them from the gRPC
//! frame instead: the strings are slices of it, the lists inline up to 8 descriptors and 16
//! entries. It accepts and rejects exactly what prost's decoding of `RateLimitRequest` does
//! (the key, varint and unknown-field rules are prost's own `encoding` functions; a proptest
//! below holds the two to the same answers).

use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use smallvec::SmallVec;

use crate::rules::Entry;

/// Why bytes are not a RateLimitRequest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A field key, varint or unknown field that prost refuses.
    #[error(transparent)]
    Protobuf(#[from] prost::DecodeError),
    #[error("{field}: wire type {found:?} where {expected:?} belongs")]
    WireType {
        field: &'static str,
        found: WireType,
        expected: WireType,
    },
    #[error("{0}: its length runs past the end of the message")]
    Truncated(&'static str),
    #[error("{0}: not UTF-8")]
    NotUtf8(&'static str),
}

/// One RateLimitRequest, its strings borrowed from the bytes it was read from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Call<'a> {
    /// `domain`.
    pub domain: &'a str,
    /// `hits_addend` (0 when unset).
    pub hits_addend: u32,
    descriptors: SmallVec<[DescriptorFields; 8]>,
    /// Every descriptor's entries, one after another.
    entries: SmallVec<[CallEntry<'a>; 16]>,
}

/// One entry of a descriptor: `key=value`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallEntry<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

impl Entry for CallEntry<'_> {
    fn key(&self) -> &str {
        self.key
    }
    fn value(&self) -> &str {
        self.value
    }
}

/// A descriptor's limit override, as sent (the unit not yet checked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentLimit {
    pub requests_per_unit: u32,
    /// The protobuf's `RateLimitUnit` number.
    pub unit: i32,
}

/// One descriptor of a [`Call`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallDescriptor<'c, 'a> {
    pub entries: &'c [CallEntry<'a>],
    pub limit: Option<SentLimit>,
    /// The descriptor's own `hits_addend`, when set.
    pub hits_addend: Option<u64>,
    pub is_negative_hits: bool,
}

/// A descriptor as read, its entries a range of [`Call::entries`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct DescriptorFields {
    entries: (u32, u32),
    limit: Option<SentLimit>,
    hits_addend: Option<u64>,
    is_negative_hits: bool,
}

// Field numbers, as envoy's ratelimit protos give them.
const REQUEST_DOMAIN: u32 = 1;
const REQUEST_DESCRIPTORS: u32 = 2;
const REQUEST_HITS_ADDEND: u32 = 3;
const DESCRIPTOR_ENTRIES: u32 = 1;
const DESCRIPTOR_LIMIT: u32 = 2;
const DESCRIPTOR_HITS_ADDEND: u32 = 3;
const DESCRIPTOR_IS_NEGATIVE_HITS: u32 = 4;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
const OVERRIDE_REQUESTS_PER_UNIT: u32 = 1;
const OVERRIDE_UNIT: u32 = 2;
/// `google.protobuf.UInt64Value.value`.
const WRAPPER_VALUE: u32 = 1;

impl<'a> Call<'a> {
    /// Reads a RateLimitRequest from its protobuf encoding.
    pub fn read(mut wire: &'a [u8]) -> Result<Call<'a>, ReadError> {
        let text = Text::of(wire);
        let mut call = Call::default();
        while !wire.is_empty() {
            let (field, wire_type) = decode_key(&mut wire)?;
            match field {
                REQUEST_DOMAIN => call.domain = text.string("domain", wire_type, &mut wire)?,
                REQUEST_DESCRIPTORS => {
                    let bytes = message("descriptors", wire_type, &mut wire)?;
                    call.read_descriptor(bytes, text)?;
                }
                REQUEST_HITS_ADDEND => {
                    call.hits_addend = varint("hits_addend", wire_type, &mut wire)? as u32;
                }
                _ => skip_field(wire_type, field, &mut wire, DecodeContext::default())?,
            }
        }
        Ok(call)
    }

    fn read_descriptor(&mut self, mut wire: &'a [u8], text: Text<'a>) -> Result<(), ReadError> {
        let first = self.entries.len() as u32;
        let mut fields = DescriptorFields::default();
        while !wire.is_empty() {
            let (field, wire_type) = decode_key(&mut wire)?;
            match field {
                DESCRIPTOR_ENTRIES => {
                    let entry = entry(message("entries", wire_type, &mut wire)?, text)?;
                    self.entries.push(entry);
                }
                // A message field sent twice merges, as protobuf says: the later fields win.
                DESCRIPTOR_LIMIT => {
                    let bytes = message("limit", wire_type, &mut wire)?;
                    fields.limit = Some(limit(bytes, fields.limit.unwrap_or_default())?);
                }
                DESCRIPTOR_HITS_ADDEND => {
                    let bytes = message("descriptor hits_addend", wire_type, &mut wire)?;
                    fields.hits_addend = Some(wrapped_u64(bytes, fields.hits_addend)?);
                }
                DESCRIPTOR_IS_NEGATIVE_HITS => {
                    fields.is_negative_hits =
                        varint("is_negative_hits", wire_type, &mut wire)? != 0;
                }
                _ => skip_field(wire_type, field, &mut wire, DecodeContext::default())?,
            }
        }
        fields.entries = (first, self.entries.len() as u32);
        self.descriptors.push(fields);
        Ok(())
    }

    /// How many descriptors the call carries.
    pub fn descriptor_count(&self) -> usize {
        self.descriptors.len()
    }

    /// The descriptors, in the order sent.
    pub fn descriptors(&self) -> impl ExactSizeIterator<Item = CallDescriptor<'_, 'a>> {
        self.descriptors.iter().map(|d| CallDescriptor {
            entries: &self.entries[d.entries.0 as usize..d.entries.1 as usize],
            limit: d.limit,
            hits_addend: d.hits_addend,
            is_negative_hits: d.is_negative_hits,
        })
    }
}

fn entry<'a>(mut wire: &'a [u8], text: Text<'a>) -> Result<CallEntry<'a>, ReadError> {
    let mut entry = CallEntry::default();
    while !wire.is_empty() {
        let (field, wire_type) = decode_key(&mut wire)?;
        match field {
            ENTRY_KEY => entry.key = text.string("entry key", wire_type, &mut wire)?,
            ENTRY_VALUE => entry.value = text.string("entry value", wire_type, &mut wire)?,
            _ => skip_field(wire_type, field, &mut wire, DecodeContext::default())?,
        }
    }
    Ok(entry)
}

fn limit(mut wire: &[u8], mut limit: SentLimit) -> Result<SentLimit, ReadError> {
    while !wire.is_empty() {
        let (field, wire_type) = decode_key(&mut wire)?;
        match field {
            OVERRIDE_REQUESTS_PER_UNIT => {
                limit.requests_per_unit = varint("requests_per_unit", wire_type, &mut wire)? as u32;
            }
            OVERRIDE_UNIT => limit.unit = varint("unit", wire_type, &mut wire)? as i32,
            _ => skip_field(wire_type, field, &mut wire, DecodeContext::default())?,
        }
    }
    Ok(limit)
}

fn wrapped_u64(mut wire: &[u8], merged_into: Option<u64>) -> Result<u64, ReadError> {
    let mut value = merged_into.unwrap_or(0);
    while !wire.is_empty() {
        let (field, wire_type) = decode_key(&mut wire)?;
        match field {
            WRAPPER_VALUE => value = varint("descriptor hits_addend", wire_type, &mut wire)?,
            _ => skip_field(wire_type, field, &mut wire, DecodeContext::default())?,
        }
    }
    Ok(value)
}

fn expect(field: &'static str, found: WireType, expected: WireType) -> Result<(), ReadError> {
    if found == expected {
        Ok(())
    } else {
        Err(ReadError::WireType {
            field,
            found,
            expected,
        })
    }
}

fn varint(field: &'static str, wire_type: WireType, wire: &mut &[u8]) -> Result<u64, ReadError> {
    expect(field, wire_type, WireType::Varint)?;
    Ok(decode_varint(wire)?)
}

/// A length-delimited field's bytes.
fn message<'a>(
    field: &'static str,
    wire_type: WireType,
    wire: &mut &'a [u8],
) -> Result<&'a [u8], ReadError> {
    expect(field, wire_type, WireType::LengthDelimited)?;
    let len = decode_varint(wire)?;
    if len > wire.len() as u64 {
        return Err(ReadError::Truncated(field));
    }
    let (bytes, rest) = wire.split_at(len as usize);
    *wire = rest;
    Ok(bytes)
}

/// The message's strings as text. A request is nearly always valid UTF-8 as a whole (its
/// strings are ASCII, and so are its field keys and lengths below 128), so the whole is checked
/// once and each string taken as a slice of it: a slice of valid UTF-8 is valid exactly when it
/// falls on character boundaries, which `str::get` checks. Otherwise each string is checked on
/// its own.
#[derive(Clone, Copy)]
struct Text<'a> {
    wire: &'a [u8],
    whole: Option<&'a str>,
}

impl<'a> Text<'a> {
    fn of(wire: &'a [u8]) -> Self {
        Text {
            wire,
            whole: std::str::from_utf8(wire).ok(),
        }
    }

    /// A string field's text, read from `rest` (a part of the whole).
    fn string(
        self,
        field: &'static str,
        wire_type: WireType,
        rest: &mut &'a [u8],
    ) -> Result<&'a str, ReadError> {
        let bytes = message(field, wire_type, rest)?;
        let text = match self.whole {
            Some(whole) => {
                let start = bytes.as_ptr() as usize - self.wire.as_ptr() as usize;
                whole.get(start..start + bytes.len())
            }
            None => std::str::from_utf8(bytes).ok(),
        };
        text.ok_or(ReadError::NotUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry as ProtoEntry, RateLimitOverride,
    };
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::google::protobuf::UInt64Value;
    use proptest::prelude::*;
    use prost::Message;

    /// The call as prost's owned request.
    fn owned(call: &Call<'_>) -> RateLimitRequest {
        RateLimitRequest {
            domain: call.domain.to_string(),
            descriptors: call
                .descriptors()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .entries
                        .iter()
                        .map(|e| ProtoEntry {
                            key: e.key.to_string(),
                            value: e.value.to_string(),
                        })
                        .collect(),
                    limit: d.limit.map(|l| RateLimitOverride {
                        requests_per_unit: l.requests_per_unit,
                        unit: l.unit,
                    }),
                    hits_addend: d.hits_addend.map(|value| UInt64Value { value }),
                    is_negative_hits: d.is_negative_hits,
                })
                .collect(),
            hits_addend: call.hits_addend,
        }
    }

    fn entry() -> impl Strategy<Value = ProtoEntry> {
        ("[a-z_.]{0,6}", "\\PC{0,6}").prop_map(|(key, value)| ProtoEntry { key, value })
    }

    fn descriptor() -> impl Strategy<Value = RateLimitDescriptor> {
        (
            prop::collection::vec(entry(), 0..20),
            prop::option::of((any::<u32>(), -2i32..10)),
            prop::option::of(any::<u64>()),
            any::<bool>(),
        )
            .prop_map(|(entries, limit, hits, negative)| RateLimitDescriptor {
                entries,
                limit: limit.map(|(requests_per_unit, unit)| RateLimitOverride {
                    requests_per_unit,
                    unit,
                }),
                hits_addend: hits.map(|value| UInt64Value { value }),
                is_negative_hits: negative,
            })
    }

    fn request() -> impl Strategy<Value = RateLimitRequest> {
        (
            "\\PC{0,8}",
            prop::collection::vec(descriptor(), 0..12),
            any::<u32>(),
        )
            .prop_map(|(domain, descriptors, hits_addend)| RateLimitRequest {
                domain,
                descriptors,
                hits_addend,
            })
    }

    /// One field as it may appear on the wire: a number, a wire type (sometimes not the one
    /// the field has) and its content.
    #[derive(Debug, Clone)]
    enum Field {
        Varint(u32, u64),
        Fixed32(u32),
        Bytes(u32, Vec<u8>),
        Message(u32, Vec<Field>),
    }

    fn write(fields: &[Field], out: &mut Vec<u8>) {
        use prost::encoding::{encode_key, encode_varint};
        for field in fields {
            match field {
                Field::Varint(n, v) => {
                    encode_key(*n, WireType::Varint, out);
                    encode_varint(*v, out);
                }
                Field::Fixed32(n) => {
                    encode_key(*n, WireType::ThirtyTwoBit, out);
                    out.extend([1, 2, 3, 4]);
                }
                Field::Bytes(n, bytes) => {
                    encode_key(*n, WireType::LengthDelimited, out);
                    encode_varint(bytes.len() as u64, out);
                    out.extend(bytes);
                }
                Field::Message(n, inner) => {
                    let mut bytes = Vec::new();
                    write(inner, &mut bytes);
                    encode_key(*n, WireType::LengthDelimited, out);
                    encode_varint(bytes.len() as u64, out);
                    out.extend(bytes);
                }
            }
        }
    }

    /// A varint worth sending: small, at a type's edge, or any.
    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..4,
            Just(u64::from(u32::MAX)),
            Just(u64::from(u32::MAX) + 1),
            Just(u64::MAX),
            any::<u64>(),
        ]
    }

    /// Text, sometimes not UTF-8.
    fn text() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => "[a-z]{0,4}".prop_map(String::into_bytes),
            1 => prop::collection::vec(any::<u8>(), 0..4),
        ]
    }

    /// A field that is none of the message's own, or one of its own with another wire type.
    fn stray() -> impl Strategy<Value = Field> {
        prop_oneof![
            ((1u32..40), number()).prop_map(|(n, v)| Field::Varint(n, v)),
            (1u32..40).prop_map(Field::Fixed32),
            ((1u32..40), text()).prop_map(|(n, t)| Field::Bytes(n, t)),
        ]
    }

    fn entry_fields() -> impl Strategy<Value = Vec<Field>> {
        let field = prop_oneof![
            4 => text().prop_map(|t| Field::Bytes(ENTRY_KEY, t)),
            4 => text().prop_map(|t| Field::Bytes(ENTRY_VALUE, t)),
            1 => stray(),
        ];
        prop::collection::vec(field, 0..4)
    }

    fn override_fields() -> impl Strategy<Value = Vec<Field>> {
        let field = prop_oneof![
            4 => number().prop_map(|v| Field::Varint(OVERRIDE_REQUESTS_PER_UNIT, v)),
            4 => number().prop_map(|v| Field::Varint(OVERRIDE_UNIT, v)),
            1 => stray(),
        ];
        prop::collection::vec(field, 0..3)
    }

    fn wrapper_fields() -> impl Strategy<Value = Vec<Field>> {
        let field = prop_oneof![
            4 => number().prop_map(|v| Field::Varint(WRAPPER_VALUE, v)),
            1 => stray(),
        ];
        prop::collection::vec(field, 0..3)
    }

    fn descriptor_fields() -> impl Strategy<Value = Vec<Field>> {
        let field = prop_oneof![
            6 => entry_fields().prop_map(|f| Field::Message(DESCRIPTOR_ENTRIES, f)),
            2 => override_fields().prop_map(|f| Field::Message(DESCRIPTOR_LIMIT, f)),
            2 => wrapper_fields().prop_map(|f| Field::Message(DESCRIPTOR_HITS_ADDEND, f)),
            2 => number().prop_map(|v| Field::Varint(DESCRIPTOR_IS_NEGATIVE_HITS, v)),
            1 => stray(),
        ];
        prop::collection::vec(field, 0..6)
    }

    /// A request as fields on the wire: each message's own fields, repeated (a message sent
    /// twice merges, a number twice keeps the last), numbers past their field's width, text
    /// that is not UTF-8, unknown fields and fields with the wrong wire type.
    fn request_fields() -> impl Strategy<Value = Vec<Field>> {
        let field = prop_oneof![
            2 => text().prop_map(|t| Field::Bytes(REQUEST_DOMAIN, t)),
            6 => descriptor_fields().prop_map(|f| Field::Message(REQUEST_DESCRIPTORS, f)),
            2 => number().prop_map(|v| Field::Varint(REQUEST_HITS_ADDEND, v)),
            1 => stray(),
        ];
        prop::collection::vec(field, 0..6)
    }

    /// prost's reading and ours, side by side: the same request, or both refuse.
    fn agree(bytes: &[u8]) -> Result<(), TestCaseError> {
        let ours = Call::read(bytes).map(|c| owned(&c));
        let prost = RateLimitRequest::decode(bytes);
        match (ours, prost) {
            (Ok(ours), Ok(prost)) => prop_assert_eq!(ours, prost),
            (Err(_), Err(_)) => {}
            (ours, prost) => {
                prop_assert!(false, "ours {ours:?}, prost {prost:?}, bytes {bytes:?}")
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn reads_what_prost_encodes(request in request()) {
            let bytes = request.encode_to_vec();
            let call = Call::read(&bytes).unwrap();
            prop_assert_eq!(call.descriptor_count(), request.descriptors.len());
            prop_assert_eq!(owned(&call), request);
        }

        /// Bytes changed, cut or inserted anywhere: the same verdict as prost, the same
        /// request when both accept (unknown fields skipped, repeated scalars last-wins,
        /// repeated messages merged, bad UTF-8 and wire types refused).
        #[test]
        fn agrees_with_prost_on_damaged_bytes(
            request in request(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
        ) {
            let mut bytes = request.encode_to_vec();
            for (at, byte, how) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let at = at.index(bytes.len());
                match how {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => bytes.truncate(at),
                }
            }
            agree(&bytes)?;
        }

        #[test]
        fn agrees_with_prost_on_any_fields(fields in request_fields()) {
            let mut bytes = Vec::new();
            write(&fields, &mut bytes);
            agree(&bytes)?;
        }

        #[test]
        fn agrees_with_prost_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            agree(&bytes)?;
        }
    }

    #[test]
    fn merges_and_skips_as_protobuf_says() {
        // An unknown field of each wire type, a limit sent twice (merged), the domain twice
        // (the last wins), a group skipped whole.
        let mut bytes = RateLimitRequest {
            domain: "first".into(),
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend([0x48, 0x05]); // field 9, varint
        bytes.extend([0x55, 1, 2, 3, 4]); // field 10, 32-bit
        bytes.extend([0x5b, 0x08, 0x01, 0x5c]); // field 11, a group holding a varint
        let first = RateLimitDescriptor {
            entries: vec![ProtoEntry {
                key: "k".into(),
                value: "v".into(),
            }],
            limit: Some(RateLimitOverride {
                requests_per_unit: 7,
                unit: 2,
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let again = RateLimitDescriptor {
            limit: Some(RateLimitOverride {
                requests_per_unit: 0,
                unit: 3,
            }),
            ..Default::default()
        }
        .encode_to_vec();
        // One descriptor whose limit comes in two parts, then the domain again.
        let descriptor = [first, again].concat();
        bytes.extend([0x12, descriptor.len() as u8]);
        bytes.extend(&descriptor);
        RateLimitRequest {
            domain: "last".into(),
            ..Default::default()
        }
        .encode(&mut bytes)
        .unwrap();
        let call = Call::read(&bytes).unwrap();
        assert_eq!(call.domain, "last");
        let d = call.descriptors().next().unwrap();
        assert_eq!(
            d.limit,
            Some(SentLimit {
                requests_per_unit: 7,
                unit: 3
            })
        );
        assert_eq!(owned(&call), RateLimitRequest::decode(&bytes[..]).unwrap());
    }

    #[test]
    fn refuses_what_prost_refuses_with_a_reason() {
        // The domain with a bad UTF-8 byte.
        let error = Call::read(&[0x0a, 0x01, 0xff]).unwrap_err();
        assert_eq!(error.to_string(), "domain: not UTF-8");
        // A domain that ends inside a character whose last byte begins the next field: the
        // whole message is UTF-8 (`é` spans the two), the domain alone is not.
        let mut split = vec![0x0a, 0x01, 0xc3, 0xa9, 0x01];
        split.extend(b"abcdefgh");
        assert!(std::str::from_utf8(&split).is_ok());
        assert!(RateLimitRequest::decode(&split[..]).is_err());
        assert_eq!(
            Call::read(&split).unwrap_err(),
            ReadError::NotUtf8("domain")
        );
        // The domain sent as a varint.
        assert!(Call::read(&[0x08, 0x01]).is_err());
        // A descriptor longer than what is left.
        assert!(Call::read(&[0x12, 0x05, 0x0a]).is_err());
        // Field number 0.
        assert!(Call::read(&[0x00, 0x01]).is_err());
    }
}
