//! The Helm chart: linted and rendered with the real Helm library, every manifest validated
//! against the Kubernetes schemas (tests/helm/check_chart.py), and the rules ConfigMap it renders,
//! laid out the way the kubelet mounts it, loaded and hot-reloaded by a real sluice process.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::google::protobuf::UInt64Value;

fn checker() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm/check_chart.py")
}

/// Whether the Python Helm library and kubernetes-validate are installed: under CI=true a
/// missing one fails the test; elsewhere the test says it skips.
fn tools_present() -> bool {
    let found = Command::new(python())
        .args(["-c", "import helm_python, kubernetes_validate, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("helm-python-sdk or kubernetes-validate is missing (run scripts/test.sh)");
        }
        eprintln!(
            "SKIPPED: helm-python-sdk or kubernetes-validate is missing; run scripts/test.sh"
        );
    }
    found
}

#[test]
fn the_chart_lints_renders_and_validates_against_kubernetes() {
    if !tools_present() {
        return;
    }
    let out = Command::new(python())
        .arg(checker())
        .output()
        .expect("run check_chart.py");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for values in [
        "defaults.yaml",
        "external-redis-secret.yaml",
        "existing-configmap.yaml",
        "everything.yaml",
        "admin-loopback.yaml",
    ] {
        assert!(
            stdout.contains(&format!("{values}: ")) && stdout.contains("manifests valid"),
            "{values} not checked: {stdout}"
        );
    }
    assert_eq!(
        stdout.matches("rejected as it should be").count(),
        5,
        "{stdout}"
    );
}

/// The rules ConfigMap's files as the chart renders them with a values file.
fn rendered_rules(values: &str) -> Vec<(String, String)> {
    let values = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/helm/values")
        .join(values);
    let out = Command::new(python())
        .arg(checker())
        .arg("--rules")
        .arg(values)
        .output()
        .expect("render");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("JSON");
    data.into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn the_rendered_rules_configmap_loads_and_reloads_like_a_kubelet_mount() {
    if !tools_present() {
        return;
    }
    let files = rendered_rules("everything.yaml");
    assert_eq!(files.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let as_refs = |files: &[(String, String)]| {
        files
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    let first = as_refs(&files);
    let first: Vec<(&str, &str)> = first
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    configmap_version(dir.path(), "2026_01_01_00_00_00.000000001", &first);

    let (mut child, client) = spawn_sluice(
        &[
            "--config",
            dir.path().to_str().unwrap(),
            "--reload-debounce",
            "50ms",
        ],
        &[],
    )
    .await;
    let limit = |domain: &'static str, key: &'static str| {
        let mut client = client.clone();
        async move {
            let mut check = request(domain, &[&[(key, "x")]]);
            check.descriptors[0].hits_addend = Some(UInt64Value { value: 0 });
            limit_of(
                &client.should_rate_limit(check).await.unwrap().into_inner(),
                0,
            )
        }
    };
    assert_eq!(limit("llm_gateway", "api_key").await, Some(10));
    assert_eq!(limit("edge", "remote_address").await, Some(20));

    // `kubectl edit configmap`: the kubelet writes a new timestamped directory and swaps ..data.
    let edited: Vec<(String, String)> = files
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("requests: 10", "requests: 15")))
        .collect();
    let edited: Vec<(&str, &str)> = edited
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    configmap_version(dir.path(), "2026_01_01_00_05_00.000000002", &edited);
    std::fs::remove_dir_all(dir.path().join("..2026_01_01_00_00_00.000000001")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while limit("llm_gateway", "api_key").await != Some(15) {
        assert!(Instant::now() < deadline, "the edit never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        limit("edge", "remote_address").await,
        Some(20),
        "the other file is untouched"
    );
    signal(&child, "TERM");
    assert!(
        tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
}
