//! The ceiling for sluice's per-core benchmark: a ShouldRateLimit server on the same tonic stack
//! and runtime that decides nothing and answers OK with one empty status per descriptor. Built
//! with the same profile as sluice (`cargo build --release --example noop`).
//!
//!     noop serve 127.0.0.1:9000
//!     noop serve 127.0.0.1:9000 sized   (answers as large as sluice's: a limit, a reset and
//!                                        the three OpenAI requests headers per answer)
//!     noop serve 127.0.0.1:9000 graceful   (with a shutdown signal, as sluice serves)
//!     noop serve 127.0.0.1:9000 direct   (no router: the service's path matched as sluice
//!                                         matches ShouldRateLimit's, not by axum's routing)
//!     noop serve 127.0.0.1:9000 multi-thread   (on tokio's multi-threaded scheduler, as
//!                                               `sluice serve --runtime multi-thread`; by
//!                                               default one thread, as each of sluice's)
//!     noop request OUT api_key=k1,model=gpt-4o [more descriptors…]   (a gRPC body for h2load)

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::Message;

// The same allocator as the sluice binary, so the ceiling differs from sluice only in the work
// sluice does.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Noop {
    /// Answer with what sluice's answers carry (a limit and a reset per status, the OpenAI
    /// requests headers), built afresh each call, deciding nothing: the same bytes and
    /// allocations on the wire, none of the work.
    sized: bool,
}

fn sized_status() -> DescriptorStatus {
    DescriptorStatus {
        code: 1,
        current_limit: Some(RateLimit {
            name: String::new(),
            requests_per_unit: 4_000_000_000,
            unit: 2,
        }),
        limit_remaining: 3_999_999_000,
        duration_until_reset: Some(prost_types_duration(41, 250_000_000)),
        quota: None,
    }
}

fn prost_types_duration(seconds: i64, nanos: i32) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration { seconds, nanos }
}

fn header(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value: value.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let descriptors = request.get_ref().descriptors.len();
        if !self.sized {
            return Ok(tonic::Response::new(RateLimitResponse {
                overall_code: 1,
                statuses: (0..descriptors).map(|_| Default::default()).collect(),
                ..Default::default()
            }));
        }
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: 1,
            statuses: (0..descriptors).map(|_| sized_status()).collect(),
            response_headers_to_add: vec![
                header("x-ratelimit-limit-requests", "4000000000"),
                header("x-ratelimit-remaining-requests", "3999999000"),
                header("x-ratelimit-reset-requests", "41.250s"),
            ],
            ..Default::default()
        }))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let addr = args.get(1).expect("an address").parse().expect("host:port");
            let sized = args[2..].iter().any(|a| a == "sized");
            // One thread, as each of sluice's gRPC threads (`--runtime per-core`, the default);
            // `multi-thread` as `sluice serve --runtime multi-thread`.
            let mut runtime = if args[2..].iter().any(|a| a == "multi-thread") {
                tokio::runtime::Builder::new_multi_thread()
            } else {
                tokio::runtime::Builder::new_current_thread()
            };
            // `graceful`: served as sluice serves, with a shutdown signal (tonic then watches
            // every connection for it, to drain them on stop).
            let graceful = args[2..].iter().any(|a| a == "graceful");
            // `direct`: the one service served without tonic's router (axum's path routing),
            // as sluice serves ShouldRateLimit; the generated service matches the path itself.
            let direct = args[2..].iter().any(|a| a == "direct");
            runtime.enable_all().build().unwrap().block_on(async move {
                let service = RateLimitServiceServer::new(Noop { sized });
                let mut server = tonic::transport::Server::builder();
                match (direct, graceful) {
                    (true, true) => server
                        .serve_with_shutdown(addr, service, std::future::pending())
                        .await
                        .unwrap(),
                    (true, false) => server.serve(addr, service).await.unwrap(),
                    (false, true) => server
                        .add_service(service)
                        .serve_with_shutdown(addr, std::future::pending())
                        .await
                        .unwrap(),
                    (false, false) => server.add_service(service).serve(addr).await.unwrap(),
                }
            });
        }
        Some("request") => {
            let out = args.get(1).expect("an output file");
            let (domain, descriptors) = args[2..].split_first().expect("a domain");
            let descriptors = descriptors
                .iter()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .split(',')
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').expect("key=value");
                            Entry {
                                key: key.into(),
                                value: value.into(),
                            }
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect();
            let message = RateLimitRequest {
                domain: domain.clone(),
                descriptors,
                hits_addend: 0,
            }
            .encode_to_vec();
            // One gRPC frame: not compressed, the length, the message.
            let mut body = vec![0u8];
            body.extend_from_slice(&(message.len() as u32).to_be_bytes());
            body.extend_from_slice(&message);
            std::fs::write(out, body).expect("write the request");
        }
        _ => {
            eprintln!(
                "usage: noop serve HOST:PORT [sized] [multi-thread] [graceful] [direct] | noop request OUT DOMAIN k=v,k2=v2 ..."
            );
            std::process::exit(2);
        }
    }
}
