//! The decision path (match + count) allocates nothing once the counter exists, and the whole
//! answer only what prost's owned response types force, proven with a counting global
//! allocator. Counts are per thread, so other threads cannot disturb them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use sluice::{Ask, Mode, Purpose, decide};
use sluice::{Limiter, ManualClock};

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const RULES: &str = r#"
domain: llm
descriptors:
  - key: api_key
    limits:
      - { unit: minute, requests: 1000000 }
      - { unit: minute, tokens: 100000000 }
      - { unit: day, requests: 100000000 }
    descriptors:
      - key: model
        value: gpt-4*
        limits:
          - { unit: minute, requests: 1000000 }
  - key: endpoint
    value: openai
    rate_limit: { unit: second, requests_per_unit: 1000000 }
"#;

#[test]
fn deciding_on_existing_counters_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("llm.yaml"), RULES).unwrap();
    let rules = sluice::load_dir(dir.path()).unwrap();
    let limiter = Limiter::new(Arc::new(ManualClock::new(1_767_225_600_000)));
    let key = [("api_key", "k1")];
    let model = [("api_key", "k1"), ("model", "gpt-4o")];
    let endpoint = [("endpoint", "openai")];
    let ask = |entries: &'static [(&'static str, &'static str)]| Ask {
        entries,
        hits: 1,
        refund: false,
        limit_override: None,
        purpose: Purpose::Call,
        class: None,
    };
    let key: &'static [(&str, &str)] = Box::leak(Box::new(key));
    let model: &'static [(&str, &str)] = Box::leak(Box::new(model));
    let endpoint: &'static [(&str, &str)] = Box::leak(Box::new(endpoint));
    let asks = [ask(key), ask(model), ask(endpoint)];
    // The first call creates the counters: that allocates, and the allocator sees it.
    let first = allocations_during(|| {
        assert!(decide(&rules, &limiter, "llm", &asks, Mode::default()).allowed);
    });
    assert!(first > 0, "creating counters allocates, and is counted");
    for _ in 0..3 {
        let n = allocations_during(|| {
            let verdict = decide(&rules, &limiter, "llm", &asks, Mode::default());
            assert!(verdict.allowed);
        });
        assert_eq!(n, 0, "allocations on the decision path");
    }
    // One descriptor alone, and a denial with its rollback, allocate nothing either.
    let n = allocations_during(|| {
        decide(&rules, &limiter, "llm", &asks[..1], Mode::default());
    });
    assert_eq!(n, 0);
    // The LLM gateway's five descriptors (two match no rule) fit the decision's inline buffers.
    let user: &'static [(&str, &str)] = Box::leak(Box::new([("user", "u1")]));
    let route: &'static [(&str, &str)] = Box::leak(Box::new([("route", "chat")]));
    let five = [asks[0], asks[1], asks[2], ask(user), ask(route)];
    let n = allocations_during(|| {
        assert!(decide(&rules, &limiter, "llm", &five, Mode::default()).allowed);
    });
    assert_eq!(n, 0, "five descriptors");
    let tight = Ask {
        hits: 2_000_000,
        ..asks[2]
    };
    let n = allocations_during(|| {
        let verdict = decide(&rules, &limiter, "llm", &[asks[0], tight], Mode::default());
        assert!(!verdict.allowed);
    });
    assert_eq!(n, 0, "a denial rolls back without allocating");
}

/// The whole answer (read the request from its bytes, validate, decide, statuses, OpenAI headers, metrics, and writing it to the
/// wire as tonic does, into its reused buffer) for a counter that exists, on a running server's
/// state: one allocation, the headers' vector. A status sits inline in the answer, header
/// names are `'static`, short values inline, limit names shared with the rules. (prost's owned
/// `RateLimitResponse` took 8: the two vectors and a name and a value string per header.)
const ANSWER_ALLOCATIONS: usize = 1;
/// Now and then one more: the metrics histogram's sample buffer takes a new block.
const ANSWER_ALLOCATIONS_AT_MOST: usize = 2;

/// The fewest and most allocations of 200 answers to `request` on a running server whose
/// counters exist (after three calls), each answer checked by `check`.
fn allocations_per_answer(
    request: envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest,
    check: impl Fn(&envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse),
) -> (usize, usize) {
    use prost::Message;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("llm.yaml"), RULES).unwrap();
    let mut settings = sluice::settings::Settings::local(dir.path().to_path_buf());
    settings.grpc_threads = 1;
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    let running = runtime.block_on(sluice::start(settings, clock)).unwrap();
    let app = running.app.clone();
    // The request as gRPC carries it: the pipeline reads it in place, and that is counted.
    let request = bytes::Bytes::from(request.encode_to_vec());
    // The first calls create the counters and the metrics' first samples.
    for _ in 0..3 {
        runtime
            .block_on(sluice::answer(&app, request.clone()))
            .unwrap();
    }
    let (mut most, mut least) = (0, usize::MAX);
    let mut wire = Vec::with_capacity(8192);
    for _ in 0..200 {
        let call = request.clone();
        let mut answer = None;
        wire.clear();
        // Pinned on the heap before counting, as tonic's service does for every call (and
        // the no-op's too): tokio's `block_on` would box a future this large itself in a
        // debug build.
        let call = Box::pin(sluice::answer(&app, call));
        let n = allocations_during(|| {
            let answered = runtime.block_on(call).unwrap();
            answered.encode(&mut wire).unwrap();
            answer = Some(answered);
        });
        let answer = answer.unwrap();
        // What went to the wire is what the answer says, as Envoy decodes it.
        let decoded = RateLimitResponse::decode(&wire[..]).unwrap();
        assert_eq!(decoded, answer.to_response());
        check(&decoded);
        most = most.max(n);
        least = least.min(n);
    }
    let idle = allocations_during(|| runtime.block_on(async {}));
    assert_eq!(idle, 0, "block_on alone allocates nothing");
    runtime.block_on(running.stop()).unwrap();
    (least, most)
}

#[test]
fn answering_on_existing_counters_allocates_one_vector() {
    let request = envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
        domain: "llm".into(),
        descriptors: vec![descriptor(&[("api_key", "k1"), ("model", "gpt-4o")])],
        hits_addend: 0,
    };
    let (least, most) = allocations_per_answer(request, |response| {
        assert_eq!(response.statuses.len(), 1);
        assert_eq!(
            response.response_headers_to_add.len(),
            3,
            "the OpenAI requests headers"
        );
    });
    println!("allocations per answer: {least} to {most}");
    assert!(
        least <= ANSWER_ALLOCATIONS && most <= ANSWER_ALLOCATIONS_AT_MOST,
        "an answer allocated {least} to {most} times ({ANSWER_ALLOCATIONS}, now and then {ANSWER_ALLOCATIONS_AT_MOST})"
    );
}

/// The LLM gateway's request (the key, the key and model, the shared endpoint): the statuses'
/// and the six OpenAI headers' (requests and tokens) vectors (2). The endpoint's utilization
/// in the dynamic metadata is held inline and written by hand. (prost's owned response took
/// 18: the vectors, a string per header name and value, and the metadata's two maps and keys.)
const GATEWAY_ANSWER_ALLOCATIONS: usize = 2;

#[test]
fn answering_the_gateway_request_allocates_a_stated_count() {
    let request = envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
        domain: "llm".into(),
        descriptors: vec![
            descriptor(&[("api_key", "k1")]),
            descriptor(&[("api_key", "k1"), ("model", "gpt-4o")]),
            descriptor(&[("endpoint", "openai")]),
        ],
        hits_addend: 0,
    };
    let (least, most) = allocations_per_answer(request, |response| {
        assert_eq!(response.statuses.len(), 3);
        assert_eq!(response.response_headers_to_add.len(), 6);
        assert!(
            response.dynamic_metadata.is_some(),
            "the endpoint's utilization"
        );
    });
    println!("allocations per gateway answer: {least} to {most}");
    assert!(
        least <= GATEWAY_ANSWER_ALLOCATIONS && most <= GATEWAY_ANSWER_ALLOCATIONS + 1,
        "a gateway answer allocated {least} to {most} times ({GATEWAY_ANSWER_ALLOCATIONS}, now and then one more)"
    );
}

fn descriptor(
    pairs: &[(&str, &str)],
) -> envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
    envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
        entries: pairs
            .iter()
            .map(|(k, v)| {
                envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry {
                    key: k.to_string(),
                    value: v.to_string(),
                }
            })
            .collect(),
        ..Default::default()
    }
}
