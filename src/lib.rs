//! sluice: a rate-limit server for Envoy's `ShouldRateLimit` API, with LLM token limits, and
//! the same limiter as a library.
//!
//! # The public API
//!
//! - **In-process limits:** [`RateLimiter`] (built with [`Builder`]) decides [`Descriptor`]s
//!   into [`Decision`]s, holds slots in flight as [`Hold`]s, reads [`Capacity`], and announces
//!   and follows [`CapacityChange`]s; its errors are [`BuildError`], [`AcquireError`] and
//!   [`CapacityError`]. Time comes from a [`Clock`] ([`SystemClock`], or [`ManualClock`] in
//!   tests); windows are [`Unit`]s.
//! - **The server in a process of yours:** [`start`] with [`settings::Settings`] gives a
//!   [`Running`] server ([`ServerError`], [`TransportError`]); [`FailurePolicy`] and
//!   [`ExportProtocol`] are settings' types.
//! - **Rule files:** [`load_dir`] / [`load_dir_with`] ([`DomainFiles`]) check a directory as
//!   `sluice validate` does, into a [`RuleSet`] or [`ConfigError`]s.
//! - **A client:** [`client`] asks a running server, as `sluice check` does.
//!
//! Anything else this crate exports is hidden from these docs: it serves sluice's own tests,
//! benches and binary, and may change in any release.
//!
//! # One request, in reading order
//!
//! 1. `grpc` receives a `ShouldRateLimit` call and hands it to
//!    `service::answer`, the one pipeline every protocol shares (`/v1/check` too).
//! 2. `proto` checks it against the request bounds and reads each descriptor into an
//!    [`Ask`].
//! 3. [`decide`] finds each ask's rule in the [`RuleSet`] in force, builds the
//!    request's plan (every counter it draws from, replaced limits left out, capacity
//!    factors applied), and lets the [`Limiter`] settle it: one compare-and-swap per counter,
//!    all given back if any enforced limit denies.
//! 4. The [`Verdict`] reports, per descriptor, the limit nearest its end ([`Standing`]).
//! 5. `service` settles strict limits in Redis, records metrics, and `proto` and `openai`
//!    build the [`Answer`], with OpenAI-style headers and 429 body, which writes itself to the
//!    wire as Envoy's `RateLimitResponse`.
//!
//! Beside the request path: `sync` pushes counts to Redis and reads fleet totals back into the
//! counters; `reload` watches the rule files; `capacity` lowers limits while an upstream is
//! saturated; `server` wires it all and `admin` serves the operator's HTTP API.
//!
//! # Words
//!
//! - **ask**: one request descriptor, as the decision needs it (entries, hits, purpose).
//! - **demand**: what an ask asks of one counter: a charge against its limits.
//! - **plan**: every demand of a request, with the limit each serves.
//! - **verdict**: the decision: allowed or not, and each descriptor's status.
//! - **window**: a fixed span of a limit's unit, aligned to the Unix epoch.
//! - **counter**: one caller's counts in one window of one rule, in one atomic word.
//! - **share**: with Redis, the part of what the fleet has left that one replica may take
//!   between syncs.
//! - **standing**: where one limit stands after a decision: used, remaining, over.
// One exception, allowed where it stands: limiter/table.rs hands papaya's reclaimer its
// placeholders (`release_retired`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod app;
mod background;
mod capacity;
pub mod client;
mod decision;
mod embedded;
mod grpc;
mod limiter;
mod openai;
mod proto;
mod reload;
mod rules;
mod server;
mod service;
pub mod settings;
mod sync;
mod telemetry;
mod tls;
mod traces;
mod transport;

// The public API: what a service embedding sluice, or starting its server, uses. The items
// below it are for sluice's own tests, benches and binary; they may change in any release.
pub use embedded::{
    Acquire, AcquireError, BuildError, Builder, Capacity, CapacityChange, CapacityError, Decision,
    Descriptor, Hold, Limit, RESOURCE_KEY, RateLimiter, Why,
};
pub use limiter::{Clock, ManualClock, SystemClock, Unit};
pub use rules::{ConfigError, DomainFiles, RuleSet, load_dir, load_dir_with};
pub use server::{Running, ServerError, start};
pub use sync::FailurePolicy;
pub use traces::ExportProtocol;
pub use transport::TransportError;

#[doc(hidden)]
pub use admin::counters;
#[doc(hidden)]
pub use app::App;
#[doc(hidden)]
pub use decision::{
    Ask, Code, Headline, LimitOverride, Mode, Purpose, ReportedLimit, Standing, Status, Verdict,
    decide, explain,
};
#[doc(hidden)]
pub use limiter::{
    Algorithm, CounterRef, Counts, Demand, Enforcement, FleetState, FleetView, Limiter, Limits,
    Outcome,
};
#[doc(hidden)]
pub use proto::Answer;
#[doc(hidden)]
pub use reload::ReloadStatus;
#[doc(hidden)]
pub use rules::{SourceFile, compile_file};
#[doc(hidden)]
pub use service::{AnswerError, answer, answer_request};
#[doc(hidden)]
pub use sync::{Fleet, LEASE_SCRIPT, SyncStatus};
