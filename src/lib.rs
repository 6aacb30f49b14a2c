//! sluice: a rate-limit server for Envoy's `ShouldRateLimit` API.
#![forbid(unsafe_code)]

pub mod admin;
mod app;
pub mod capacity;
pub mod client;
pub mod decision;
mod grpc;
pub mod limiter;
mod openai;
mod proto;
pub mod reload;
pub mod rules;
pub mod server;
mod service;
pub mod settings;
pub mod sync;
pub mod telemetry;

pub use app::App;
