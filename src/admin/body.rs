//! The JSON bodies the admin API takes, typed: unknown fields are refused.

use axum::http::StatusCode;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry as ProtoEntry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;
use serde::Deserialize;

use super::Failure;
use crate::limiter::Unit;

/// A RateLimitRequest in JSON, as envoyproxy/ratelimit's `/json` takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckBody {
    pub domain: String,
    pub descriptors: Vec<DescriptorBody>,
    #[serde(default)]
    pub hits_addend: u32,
    /// Answer as a check would, counting nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// One descriptor of a body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DescriptorBody {
    pub entries: Vec<EntryBody>,
    #[serde(default)]
    pub hits_addend: Option<u64>,
    #[serde(default)]
    pub limit: Option<LimitBody>,
}

/// One entry of a descriptor.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EntryBody {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

/// A descriptor's limit override.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitBody {
    pub requests_per_unit: u32,
    pub unit: String,
}

impl CheckBody {
    /// The body as the RateLimitRequest it stands for.
    pub fn to_proto(&self) -> Result<RateLimitRequest, Failure> {
        let mut descriptors = Vec::new();
        for (i, d) in self.descriptors.iter().enumerate() {
            let limit = match &d.limit {
                None => None,
                Some(l) => {
                    let unit = Unit::parse(&l.unit).ok_or_else(|| {
                        Failure(
                            StatusCode::BAD_REQUEST,
                            format!("descriptors[{i}].limit.unit: unknown unit `{}`", l.unit),
                        )
                    })?;
                    Some(RateLimitOverride {
                        requests_per_unit: l.requests_per_unit,
                        unit: crate::proto::unit_to_proto(unit) as i32,
                    })
                }
            };
            descriptors.push(RateLimitDescriptor {
                entries: d
                    .entries
                    .iter()
                    .map(|e| ProtoEntry {
                        key: e.key.clone(),
                        value: e.value.clone(),
                    })
                    .collect(),
                limit,
                // A dry run only checks: every descriptor counts 0.
                hits_addend: if self.dry_run {
                    Some(UInt64Value { value: 0 })
                } else {
                    d.hits_addend.map(|value| UInt64Value { value })
                },
                is_negative_hits: false,
            });
        }
        Ok(RateLimitRequest {
            domain: self.domain.clone(),
            descriptors,
            hits_addend: self.hits_addend,
        })
    }
}

/// `POST /v1/explain`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExplainBody {
    pub domain: String,
    pub descriptors: Vec<DescriptorBody>,
}

/// `GET /v1/usage?domain=..&descriptor=k=v,k2=v2`.
#[derive(Debug, Deserialize)]
pub(super) struct UsageQuery {
    pub domain: String,
    /// `key=value,key2=value2`
    pub descriptor: String,
}

/// `POST /v1/reset`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetBody {
    pub domain: String,
    pub entries: Vec<EntryBody>,
}

/// `POST /v1/capacity/reduce`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReduceBody {
    pub domain: String,
    /// The rule's descriptor path, as `GET /v1/rules` lists it.
    pub rule: String,
    /// The share of the current limit to keep (default 0.5).
    #[serde(default)]
    pub factor: Option<f64>,
}
