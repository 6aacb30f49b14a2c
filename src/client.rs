//! A small ShouldRateLimit client: what `sluice check` uses to ask a running server.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as ProtoUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

use crate::proto::{EntriesError, code_name, parse_entries};

/// Why `sluice check` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A `--descriptor` is not `key=value,...`.
    #[error("descriptor {0}")]
    Descriptor(#[from] EntriesError),
    /// The address is not one to connect to.
    #[error("invalid address: {0}")]
    Address(String),
    /// No connection could be made in time.
    #[error("cannot reach sluice at {addr}: {message}")]
    Connect {
        /// Where sluice was looked for.
        addr: SocketAddr,
        /// What the connection attempt said.
        message: String,
    },
    /// The server answered with an error status.
    #[error("{code:?}: {message}")]
    Call {
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
}

/// Parses `key=value,key2=value2` into a descriptor.
pub fn parse_descriptor(text: &str) -> Result<RateLimitDescriptor, ClientError> {
    let entries = parse_entries(text)?
        .into_iter()
        .map(|(key, value)| Entry { key, value })
        .collect();
    Ok(RateLimitDescriptor {
        entries,
        ..Default::default()
    })
}

/// Sends one request and waits at most `timeout` for the answer.
pub async fn check(
    addr: SocketAddr,
    request: RateLimitRequest,
    timeout: Duration,
) -> Result<RateLimitResponse, ClientError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Address(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
        addr,
        message: e.to_string(),
    })?;
    RateLimitServiceClient::new(channel)
        .should_rate_limit(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| ClientError::Call {
            code: status.code(),
            message: status.message().to_string(),
        })
}

/// A human-readable rendering of a response, one line per descriptor.
pub fn describe(request: &RateLimitRequest, response: &RateLimitResponse) -> String {
    let mut out = format!("overall: {}\n", code_name(response.overall_code));
    for (i, status) in response.statuses.iter().enumerate() {
        let entries = request.descriptors.get(i).map_or(String::new(), |d| {
            d.entries
                .iter()
                .map(|e| format!("{}={}", e.key, e.value))
                .collect::<Vec<_>>()
                .join(",")
        });
        let _ = write!(out, "[{i}] {entries}: {}", code_name(status.code));
        match &status.current_limit {
            None if status.limit_remaining == u32::MAX => out.push_str(" unlimited"),
            None => out.push_str(" no limit"),
            Some(limit) => {
                let unit = ProtoUnit::try_from(limit.unit)
                    .map(|u| u.as_str_name().to_ascii_lowercase())
                    .unwrap_or_else(|_| "?".into());
                let name = if limit.name.is_empty() {
                    String::new()
                } else {
                    format!("{} ", limit.name)
                };
                let reset = status
                    .duration_until_reset
                    .as_ref()
                    .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
                let _ = write!(
                    out,
                    " limit {name}{}/{unit}, remaining {}, resets in {reset:.3}s",
                    limit.requests_per_unit, status.limit_remaining
                );
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_parse_from_pairs() {
        let d = parse_descriptor("api_key=k1, model=gpt-4o").unwrap();
        assert_eq!(d.entries.len(), 2);
        assert_eq!(
            (d.entries[1].key.as_str(), d.entries[1].value.as_str()),
            ("model", "gpt-4o")
        );
        assert!(parse_descriptor("api_key").is_err());
    }
}
