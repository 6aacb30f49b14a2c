//! The examples users copy: the Istio manifests are valid YAML of the right kinds and agree with
//! the Envoy example and its rules; the README's picture of the algorithms is what the limiter
//! does now.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_yaml::Value;

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

use serde::Deserialize;

#[test]
fn istio_manifests_are_envoy_filters_that_match_the_envoy_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/istio");
    let mut filters = 0;
    let mut text = String::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        text.push_str(&std::fs::read_to_string(&path).unwrap());
        for doc in documents(&path) {
            assert_eq!(
                doc["apiVersion"].as_str(),
                Some("networking.istio.io/v1alpha3"),
                "{}",
                path.display()
            );
            assert_eq!(
                doc["kind"].as_str(),
                Some("EnvoyFilter"),
                "{}",
                path.display()
            );
            assert!(doc["metadata"]["name"].is_string());
            let patches = doc["spec"]["configPatches"]
                .as_sequence()
                .expect("configPatches");
            assert!(!patches.is_empty());
            for patch in patches {
                assert!(patch["applyTo"].is_string() && patch["patch"]["value"].is_mapping());
            }
            filters += 1;
        }
    }
    assert_eq!(filters, 2);
    // Same domain, same reserved descriptor entries, same usage metadata as the Envoy example.
    let envoy = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy/envoy.yaml"),
    )
    .unwrap();
    for shared in [
        "domain: llm_gateway",
        "descriptor_key: sluice.report",
        "descriptor_key: sluice.estimate",
        "descriptor_key: sluice.release",
        "path: [{ key: sluice.hold }]",
        "%DYNAMIC_METADATA(sluice:tokens)%",
        "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
        "apply_on_stream_done: true",
    ] {
        assert!(text.contains(shared) && envoy.contains(shared), "{shared}");
    }
}

#[test]
fn the_envoy_example_rules_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy/rules");
    let rules = sluice::load_dir(&dir).expect("example rules load");
    assert!(rules.domain("llm_gateway").is_some());
}

#[allow(dead_code)] // its main() is the example's, not this test's
#[path = "../examples/algorithms_plot.rs"]
mod algorithms_plot;

#[test]
fn the_readmes_picture_of_the_algorithms_is_what_the_limiter_does_now() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/algorithms.svg");
    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(
        stored == algorithms_plot::picture(),
        "docs/algorithms.svg is out of date: cargo run --example algorithms_plot > docs/algorithms.svg"
    );
}

/// [7/8]'s crate hygiene: what `cargo package` would publish is the library, the server, their
/// default rules and examples and the docs; no test, fixture, bench or chart, and no file over
/// 128 kB (the README is the largest).
#[test]
fn the_package_ships_the_crate_and_no_test_fixtures() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let listed = std::process::Command::new(cargo)
        .args(["package", "--list", "--allow-dirty", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let files: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert!(files.iter().any(|f| f == "src/lib.rs"), "{files:?}");
    assert!(
        files.iter().any(|f| f == "examples/embedded.rs"),
        "{files:?}"
    );
    for file in &files {
        for kept_out in [
            "tests/", "benches/", "helm/", "scripts/", "docs/", "target/",
        ] {
            assert!(!file.starts_with(kept_out), "{file} would be published");
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        if let Ok(meta) = std::fs::metadata(&path) {
            assert!(meta.len() <= 128 * 1024, "{file}: {} bytes", meta.len());
        }
    }
}

/// The examples that are tools for profilers and the benches run, on small counts: the
/// decision loops (one key, many keys, keys met once, several descriptors, a synced view),
/// and the no-op server answers a real ShouldRateLimit call. (`embedded.rs` and `swarm.rs`
/// run in tests/embedded.rs, `algorithms_plot.rs` above, the Envoy example's mock upstream in
/// tests/envoy.rs.)
#[tokio::test]
async fn the_profiler_and_bench_examples_run() {
    let decide_loop = common::example_binary("decide_loop");
    common::runs(&decide_loop, &["2000"], &[]);
    common::runs(&decide_loop, &["2000", "500"], &[]);
    let slowest = common::runs(&decide_loop, &["new", "2000"], &[]);
    assert!(
        !slowest.trim().is_empty(),
        "decide_loop new printed nothing"
    );
    let decide_many = common::example_binary("decide_many");
    common::runs(&decide_many, &["2000", "5"], &[]);
    common::runs(&decide_many, &["2000", "10"], &[("SYNCED", "1")]);
    let noop = common::example_binary("noop");
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut child = tokio::process::Command::new(&noop)
        .args(["serve", &addr])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let client = loop {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        if let Ok(channel) = endpoint.connect().await {
            break envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(channel);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the no-op server never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut client = client;
    let answer = client
        .should_rate_limit(common::request("d", &[&[("k", "v")]]))
        .await
        .expect("the no-op answers")
        .into_inner();
    assert!(common::is_ok(&answer));
    common::signal(&child, "KILL");
    let _ = child.wait().await;
}
