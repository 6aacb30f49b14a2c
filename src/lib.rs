//! sluice: a rate-limit server for Envoy's `ShouldRateLimit` API.
#![forbid(unsafe_code)]

pub mod admin;
pub mod capacity;
pub mod client;
pub mod decision;
pub mod grpc;
pub mod limiter;
pub mod reload;
pub mod rules;
pub mod server;
pub mod settings;
pub mod sync;
pub mod telemetry;
pub mod usage;
