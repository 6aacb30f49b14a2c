//! sluice: a rate-limit server for Envoy's `ShouldRateLimit` API.
#![forbid(unsafe_code)]

pub mod limiter;
pub mod rules;
