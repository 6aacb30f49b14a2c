//! Prometheus metrics: every name lives here. Per-rule handles are registered when rules load,
//! so the request path increments an atomic and formats no label. Raw descriptor values (API
//! keys) never become labels, unless a rule asks for them with `detailed_metric`.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub mod names {
    pub const RULE_HITS: &str = "sluice_rule_hits_total";
    pub const RULE_OVER_LIMIT: &str = "sluice_rule_over_limit_total";
    pub const RULE_NEAR_LIMIT: &str = "sluice_rule_near_limit_total";
    pub const RULE_WITHIN_LIMIT: &str = "sluice_rule_within_limit_total";
    pub const RULE_SHADOW_MODE: &str = "sluice_rule_shadow_mode_total";
    pub const RULE_TOKENS: &str = "sluice_rule_tokens_total";
    pub const RULE_HOLDS_TAKEN: &str = "sluice_rule_holds_taken_total";
    pub const RULE_HOLDS_RELEASED: &str = "sluice_rule_holds_released_total";
    pub const REQUESTS: &str = "sluice_requests_total";
    pub const REQUEST_DURATION: &str = "sluice_request_duration_seconds";
    pub const UNKNOWN_DOMAIN: &str = "sluice_unknown_domain_total";
    pub const INVALID_REQUESTS: &str = "sluice_invalid_requests_total";
    pub const USAGE_REPORTS: &str = "sluice_usage_reports_total";
    pub const REPORTED_TOKENS: &str = "sluice_reported_tokens_total";
    pub const CONFIG_GENERATION: &str = "sluice_config_generation";
    pub const RELOADS: &str = "sluice_config_reloads_total";
    pub const RELOAD_FAILURES: &str = "sluice_config_reload_failures_total";
    pub const LAST_RELOAD: &str = "sluice_config_last_reload_timestamp_seconds";
    pub const RULES: &str = "sluice_rules";
    pub const ACTIVE_COUNTERS: &str = "sluice_active_counters";
    pub const SYNC_DURATION: &str = "sluice_sync_duration_seconds";
    pub const SYNC_ERRORS: &str = "sluice_sync_errors_total";
    pub const SYNC_LAG: &str = "sluice_sync_lag_seconds";
    pub const SYNC_COUNTERS: &str = "sluice_sync_counters";
    pub const FLEET_SIZE: &str = "sluice_fleet_replicas";
    pub const OVERSHOOT: &str = "sluice_fleet_overshoot";
    pub const REDIS_UP: &str = "sluice_redis_up";
    pub const CAPACITY_FACTOR: &str = "sluice_capacity_factor";
    pub const LEASE_CALLS: &str = "sluice_lease_request_path_calls_total";
    pub const LEASE_FAILURES: &str = "sluice_lease_request_path_failures_total";
    pub const LEASE_TOP_UPS: &str = "sluice_lease_top_up_calls_total";
    pub const WAITS: &str = "sluice_waits_total";
    pub const WAIT_DURATION: &str = "sluice_wait_duration_seconds";
}

/// envoyproxy/ratelimit's names, as its `default_mapper.yaml` maps its stats to Prometheus.
pub mod peer_names {
    pub const TOTAL_HITS: &str = "ratelimit_service_rate_limit_total_hits";
    pub const OVER_LIMIT: &str = "ratelimit_service_rate_limit_over_limit";
    pub const NEAR_LIMIT: &str = "ratelimit_service_rate_limit_near_limit";
    pub const WITHIN_LIMIT: &str = "ratelimit_service_rate_limit_within_limit";
    pub const SHADOW_MODE: &str = "ratelimit_service_rate_limit_shadow_mode";
    pub const SHOULD_RATE_LIMIT_ERROR: &str = "ratelimit_service_should_rate_limit_error";
    pub const TOTAL_REQUESTS: &str = "ratelimit_service_total_requests";
    pub const CONFIG_LOAD_SUCCESS: &str = "ratelimit_service_config_load_success";
    pub const CONFIG_LOAD_ERROR: &str = "ratelimit_service_config_load_error";
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();
static PEER_NAMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether rules loaded from now on also count under envoyproxy/ratelimit's names.
pub fn serve_peer_names(on: bool) {
    PEER_NAMES.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn peer_names_on() -> bool {
    PEER_NAMES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the process's Prometheus recorder (once) and returns its handle. Handles
/// registered before this are no-ops, so the server calls it before loading rules.
pub fn install() -> &'static PrometheusHandle {
    RECORDER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ])
            .expect("static buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program's): keep it.
        if metrics::set_global_recorder(recorder).is_ok() {
            keep_up(handle.clone());
        }
        handle
    })
}

/// Histogram samples pile up in the recorder until drained: a scrape drains them, and so
/// does upkeep. Without it a server nobody scrapes grows by ~20 bytes a request. Every second:
/// at 150k calls a second, 5 s of samples took fresh pages from the kernel each round (page
/// clearing was 4 % of an answer's CPU); a second's worth is reused from the allocator.
fn keep_up(handle: PrometheusHandle) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start metrics upkeep; histograms are drained only by scrapes");
    }
}

/// The counters of one rule, labelled by domain and rule (the descriptor path as written in
/// the file, API keys of the shorthand as a short hash).
#[derive(Debug, Clone)]
pub struct RuleMetrics {
    pub hits: Counter,
    pub over_limit: Counter,
    pub near_limit: Counter,
    pub within_limit: Counter,
    pub shadow_mode: Counter,
    pub tokens: Counter,
    /// For a rule with a concurrency limit, its holds.
    pub holds: Option<Box<HoldMetrics>>,
    /// The same hits under envoyproxy/ratelimit's names, unless turned off.
    pub peer: Option<Box<PeerRuleMetrics>>,
}

/// One rule's counters as envoyproxy/ratelimit names them: labelled `domain`, `key1` and
/// (for a nested rule) `key2`, the first levels of its stats key `key_value.key2_value2`.
/// Each counts hits (a call's `hits_addend`), as the peer does.
#[derive(Debug, Clone)]
pub struct PeerRuleMetrics {
    pub total_hits: Counter,
    pub over_limit: Counter,
    pub near_limit: Counter,
    pub within_limit: Counter,
    pub shadow_mode: Counter,
}

impl PeerRuleMetrics {
    fn register(domain: &str, path: &str) -> PeerRuleMetrics {
        let mut levels = path.split('.');
        let mut labels = vec![("domain", domain.to_string())];
        labels.push(("key1", levels.next().unwrap_or_default().to_string()));
        if let Some(second) = levels.next() {
            labels.push(("key2", second.to_string()));
        }
        PeerRuleMetrics {
            total_hits: counter!(peer_names::TOTAL_HITS, &labels),
            over_limit: counter!(peer_names::OVER_LIMIT, &labels),
            near_limit: counter!(peer_names::NEAR_LIMIT, &labels),
            within_limit: counter!(peer_names::WITHIN_LIMIT, &labels),
            shadow_mode: counter!(peer_names::SHADOW_MODE, &labels),
        }
    }
}

/// Holds in flight taken by admitted calls, and given back by `sluice.release` calls, of one
/// rule with a concurrency limit: their difference is its streams in flight, plus holds lapsed.
#[derive(Debug, Clone)]
pub struct HoldMetrics {
    pub taken: Counter,
    pub released: Counter,
}

impl RuleMetrics {
    /// Registers the counters of one rule; `rule` is its label (its stats key, `key_value.key`);
    /// `holds` for a rule with a concurrency limit.
    pub fn register(domain: &str, rule: &str, holds: bool) -> RuleMetrics {
        let labels = [("domain", domain.to_string()), ("rule", rule.to_string())];
        RuleMetrics {
            peer: peer_names_on().then(|| Box::new(PeerRuleMetrics::register(domain, rule))),
            hits: counter!(names::RULE_HITS, &labels),
            over_limit: counter!(names::RULE_OVER_LIMIT, &labels),
            near_limit: counter!(names::RULE_NEAR_LIMIT, &labels),
            within_limit: counter!(names::RULE_WITHIN_LIMIT, &labels),
            shadow_mode: counter!(names::RULE_SHADOW_MODE, &labels),
            tokens: counter!(names::RULE_TOKENS, &labels),
            holds: holds.then(|| {
                Box::new(HoldMetrics {
                    taken: counter!(names::RULE_HOLDS_TAKEN, &labels),
                    released: counter!(names::RULE_HOLDS_RELEASED, &labels),
                })
            }),
        }
    }
}

/// What the request path counts, process-wide.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    /// envoyproxy/ratelimit's `total_requests{grpc_method="ShouldRateLimit"}`, when on.
    pub peer_total: Option<Counter>,
    /// envoyproxy/ratelimit's `should_rate_limit_error{err_type="service_error"}`, when on.
    pub peer_service_error: Option<Counter>,
    pub ok: Counter,
    pub over_limit: Counter,
    pub duration: Histogram,
    pub unknown_domain: Counter,
    pub invalid: Counter,
    pub usage_reports: Counter,
    pub reported_tokens: Counter,
    /// Requests that called Redis for a lease before their answer.
    pub lease_calls: Counter,
    /// Of which Redis failed.
    pub lease_failures: Counter,
    /// Leases taken in the background: topped up when an admission found them running low,
    /// or asked again for a fleet a refusal found spent on a view read a while ago.
    pub lease_top_ups: Counter,
    /// Calls that waited for capacity (a rule's `wait:`), then were admitted or refused.
    pub waited_admitted: Counter,
    pub waited_refused: Counter,
    /// How long they waited.
    pub wait_duration: Histogram,
}

/// What rule reloads report.
#[derive(Debug, Clone)]
pub struct ReloadMetrics {
    /// envoyproxy/ratelimit's `config_load_success` and `config_load_error`, when on.
    pub peer_loads: Option<[Counter; 2]>,
    pub generation: Gauge,
    pub applied: Counter,
    pub failed: Counter,
    pub last_success: Gauge,
    pub rules: Gauge,
}

/// What the fleet sync reports.
#[derive(Debug, Clone)]
pub struct SyncMetrics {
    pub duration: Histogram,
    pub errors: Counter,
    pub lag: Gauge,
    pub counters: Gauge,
    pub fleet_size: Gauge,
    pub redis_up: Gauge,
    pub overshoot: Gauge,
}

/// Process-wide handles, registered once at start, grouped by the part that records them.
#[derive(Debug, Clone)]
pub struct ProcessMetrics {
    pub requests: RequestMetrics,
    pub reload: ReloadMetrics,
    pub sync: SyncMetrics,
    pub active_counters: Gauge,
}

impl ProcessMetrics {
    /// Registers every process-wide handle with the recorder installed now.
    pub fn register() -> ProcessMetrics {
        ProcessMetrics {
            requests: RequestMetrics {
                peer_total: peer_names_on().then(
                    || counter!(peer_names::TOTAL_REQUESTS, "grpc_method" => "ShouldRateLimit"),
                ),
                peer_service_error: peer_names_on().then(
                    || counter!(peer_names::SHOULD_RATE_LIMIT_ERROR, "err_type" => "service_error"),
                ),
                ok: counter!(names::REQUESTS, "code" => "ok"),
                over_limit: counter!(names::REQUESTS, "code" => "over_limit"),
                duration: histogram!(names::REQUEST_DURATION),
                unknown_domain: counter!(names::UNKNOWN_DOMAIN),
                invalid: counter!(names::INVALID_REQUESTS),
                usage_reports: counter!(names::USAGE_REPORTS),
                reported_tokens: counter!(names::REPORTED_TOKENS),
                lease_calls: counter!(names::LEASE_CALLS),
                lease_failures: counter!(names::LEASE_FAILURES),
                lease_top_ups: counter!(names::LEASE_TOP_UPS),
                waited_admitted: counter!(names::WAITS, "outcome" => "admitted"),
                waited_refused: counter!(names::WAITS, "outcome" => "refused"),
                wait_duration: histogram!(names::WAIT_DURATION),
            },
            reload: ReloadMetrics {
                peer_loads: peer_names_on().then(|| {
                    [
                        counter!(peer_names::CONFIG_LOAD_SUCCESS),
                        counter!(peer_names::CONFIG_LOAD_ERROR),
                    ]
                }),
                generation: gauge!(names::CONFIG_GENERATION),
                applied: counter!(names::RELOADS),
                failed: counter!(names::RELOAD_FAILURES),
                last_success: gauge!(names::LAST_RELOAD),
                rules: gauge!(names::RULES),
            },
            sync: SyncMetrics {
                duration: histogram!(names::SYNC_DURATION),
                errors: counter!(names::SYNC_ERRORS),
                lag: gauge!(names::SYNC_LAG),
                counters: gauge!(names::SYNC_COUNTERS),
                fleet_size: gauge!(names::FLEET_SIZE),
                redis_up: gauge!(names::REDIS_UP),
                overshoot: gauge!(names::OVERSHOOT),
            },
            active_counters: gauge!(names::ACTIVE_COUNTERS),
        }
    }
}

/// Sets the capacity factor gauge of one rule.
pub fn capacity_factor(domain: String, rule: String, factor: f64) {
    gauge!(names::CAPACITY_FACTOR, "domain" => domain, "rule" => rule).set(factor);
}
