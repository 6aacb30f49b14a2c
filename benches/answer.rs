//! What sluice adds to a call beyond the gRPC stack, measured in process: the whole answer
//! (read the request's bytes, validate, decide, statuses, OpenAI headers, metrics) and its
//! encoding, beside the no-op server's answer to the same request (decoded by prost, one empty
//! status per descriptor), encoded alike.
//!
//!     cargo bench --bench answer
//!
//! The difference is the CPU sluice spends per call that a no-op does not; the per-core
//! benchmark (scripts/bench-core.sh) shows what that is worth against the whole stack.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::Message;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RULES: &str = r#"
domain: bench
descriptors:
  - key: api_key
    limits:
      - { unit: minute, requests: 4000000000 }
      - { unit: minute, tokens: 4000000000 }
    descriptors:
      - key: model
        rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: endpoint
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: user
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
  - key: route
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
"#;

/// A request as gRPC carries it: its protobuf bytes.
fn request(descriptors: &[&[(&str, &str)]]) -> bytes::Bytes {
    let request = RateLimitRequest {
        domain: "bench".into(),
        descriptors: descriptors
            .iter()
            .map(|pairs| RateLimitDescriptor {
                entries: pairs
                    .iter()
                    .map(|(k, v)| Entry {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    };
    request.encode_to_vec().into()
}

fn answers(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.yaml"), RULES).unwrap();
    let mut settings = sluice::settings::Settings::local(dir.path().to_path_buf());
    settings.grpc_threads = 1;
    let running = runtime
        .block_on(sluice::start(settings, Arc::new(sluice::SystemClock)))
        .unwrap();
    let app = running.app.clone();
    let one = request(&[&[("api_key", "k1"), ("model", "gpt-4o")]]);
    let five = request(&[
        &[("api_key", "k1")],
        &[("api_key", "k1"), ("model", "gpt-4o")],
        &[("endpoint", "openai")],
        &[("user", "u1")],
        &[("route", "chat")],
    ]);
    // ANSWER_LOOP=N: N answers of the 1-descriptor request (5 with ANSWER_FIVE=1) and no
    // statistics, for a profiler.
    if let Some(n) = std::env::var("ANSWER_LOOP")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        let request = if std::env::var_os("ANSWER_FIVE").is_some() {
            &five
        } else {
            &one
        };
        let mut buf = Vec::with_capacity(4096);
        for _ in 0..n {
            let response = runtime
                .block_on(sluice::answer(&app, request.clone()))
                .unwrap();
            buf.clear();
            response.encode(&mut buf).unwrap();
            black_box(&buf);
        }
        runtime.block_on(running.stop()).unwrap();
        return;
    }
    let mut group = c.benchmark_group("answer");
    group.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(4096);
    for (name, request) in [("1 descriptor", &one), ("5 descriptors", &five)] {
        group.bench_function(format!("sluice/{name}"), |b| {
            b.iter(|| {
                let response = runtime
                    .block_on(sluice::answer(&app, black_box(request.clone())))
                    .unwrap();
                buf.clear();
                response.encode(&mut buf).unwrap();
                black_box(&buf);
            })
        });
        group.bench_function(format!("no-op/{name}"), |b| {
            b.iter(|| {
                let request = RateLimitRequest::decode(black_box(request.clone())).unwrap();
                let response = runtime.block_on(async {
                    RateLimitResponse {
                        overall_code: 1,
                        statuses: request
                            .descriptors
                            .iter()
                            .map(|_| Default::default())
                            .collect(),
                        ..Default::default()
                    }
                });
                buf.clear();
                response.encode(&mut buf).unwrap();
                black_box(&buf);
            })
        });
    }
    group.finish();
    runtime.block_on(running.stop()).unwrap();
}

criterion_group!(benches, answers);
criterion_main!(benches);
