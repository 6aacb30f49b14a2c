//! The ceiling for sluice's per-core benchmark: a ShouldRateLimit server on the same tonic stack
//! and runtime that decides nothing and answers OK with one empty status per descriptor. Built
//! with the same profile as sluice (`cargo build --release --example noop`).
//!
//!     noop serve 127.0.0.1:9000
//!     noop request OUT api_key=k1,model=gpt-4o [more descriptors…]   (a gRPC body for h2load)

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
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

struct Noop;

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let statuses = request
            .get_ref()
            .descriptors
            .iter()
            .map(|_| Default::default())
            .collect();
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: 1,
            statuses,
            ..Default::default()
        }))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let addr = args.get(1).expect("an address").parse().expect("host:port");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    tonic::transport::Server::builder()
                        .add_service(RateLimitServiceServer::new(Noop))
                        .serve(addr)
                        .await
                        .unwrap();
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
            eprintln!("usage: noop serve HOST:PORT | noop request OUT DOMAIN k=v,k2=v2 ...");
            std::process::exit(2);
        }
    }
}
