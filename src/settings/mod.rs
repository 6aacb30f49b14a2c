//! Process knobs, from flags or their environment variables, validated at start. Never rule
//! content: that lives in the rule files.

pub mod peer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::proto::RequestBounds;
use crate::rules::DomainFiles;
use crate::sync::{FailurePolicy, StoreAddress, SyncSettings, TlsFiles};

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "A rate-limit server for Envoy's ShouldRateLimit gRPC API, with LLM token limits."
)]
/// The command line.
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// sluice's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve ShouldRateLimit over gRPC, enforcing the rules of a directory.
    Serve(Box<Settings>),
    /// Check the rule files of a directory; exit 1 and print every error if any is wrong.
    Validate {
        /// Directory of rule files (*.yaml, *.yml).
        dir: PathBuf,
        /// Merge the files that define one domain, as `serve --merge-domain-config` does.
        #[arg(
            long,
            env = "SLUICE_MERGE_DOMAIN_CONFIG",
            num_args = 0..=1,
            default_missing_value = "true",
            default_value = "false",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        merge_domain_config: bool,
    },
    /// Ask a running server once, as Envoy would, and print its answer.
    Check(CheckArgs),
}

/// What `sluice check` asks, and of whom.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Address of the sluice gRPC server.
    #[arg(long, env = "SLUICE_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: SocketAddr,

    /// The rate-limit domain.
    #[arg(long)]
    pub domain: String,

    /// A descriptor as key=value,key2=value2; repeat for several.
    #[arg(long = "descriptor", required = true)]
    pub descriptors: Vec<String>,

    /// Hits this call adds (Envoy's hits_addend; 0 means 1).
    #[arg(long, default_value_t = 0)]
    pub hits: u32,

    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// How the server's threads are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeShape {
    /// gRPC on `--grpc-threads` threads, each with a runtime of its own that serves its
    /// connections from start to end: a call never changes thread. The rest (admin API,
    /// sync, reload) on one more thread.
    PerCore,
    /// Everything on tokio's work-stealing scheduler, a worker per core.
    MultiThread,
}

/// The settings of `sluice serve`, one per flag.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Directory of rule files (*.yaml, *.yml).
    #[arg(long, env = "SLUICE_CONFIG", default_value = "config")]
    pub config: PathBuf,

    /// Address of the gRPC server (ShouldRateLimit and grpc.health.v1).
    #[arg(long, env = "SLUICE_GRPC_ADDR", default_value = "0.0.0.0:8081")]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP server (health, metrics and admin API).
    #[arg(long, env = "SLUICE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Address of an HTTP listener of its own for the admin API (`/v1/*`, and
    /// envoyproxy/ratelimit's `/json` and `/rlconfig`), e.g. `127.0.0.1:8082` to keep it off
    /// the network while health and metrics stay on --http-addr. Unset: all on --http-addr.
    #[arg(long, env = "SLUICE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// Address of a second HTTP listener serving only `/metrics` (envoyproxy/ratelimit's
    /// `USE_PROMETHEUS` listener). Unset: metrics are on --http-addr only.
    #[arg(long, env = "SLUICE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Path of the metrics on --metrics-addr.
    #[arg(long, env = "SLUICE_METRICS_PATH", default_value = "/metrics")]
    pub metrics_path: String,

    /// Address of a debug HTTP listener serving `/rlconfig` (the loaded rules as text), as
    /// envoyproxy/ratelimit's debug port does. Unset: `/rlconfig` is on --http-addr only.
    #[arg(long, env = "SLUICE_DEBUG_ADDR")]
    pub debug_addr: Option<SocketAddr>,

    /// Serve gRPC over TLS with this certificate chain (PEM), with --grpc-tls-key. The files
    /// are read again when they change: rotation needs no restart.
    #[arg(long, env = "SLUICE_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --grpc-tls-cert.
    #[arg(long, env = "SLUICE_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,

    /// Mutual TLS: clients must present a certificate signed by this CA (PEM).
    #[arg(long, env = "SLUICE_GRPC_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_client_ca: Option<PathBuf>,

    /// Mutual TLS: the client certificate must be valid for this DNS name.
    #[arg(long, env = "SLUICE_GRPC_CLIENT_SAN", requires = "grpc_client_ca")]
    pub grpc_client_san: Option<String>,

    /// Trace ShouldRateLimit with OpenTelemetry, exported over OTLP.
    #[arg(
        long,
        env = "SLUICE_TRACING",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub tracing: bool,

    /// The OTLP collector, e.g. http://collector:4317 [default: OTEL_EXPORTER_OTLP_ENDPOINT,
    /// else OTLP's localhost port].
    #[arg(long, env = "SLUICE_TRACING_ENDPOINT")]
    pub tracing_endpoint: Option<String>,

    /// OTLP over gRPC, or over HTTP with protobuf bodies.
    #[arg(
        long,
        env = "SLUICE_TRACING_PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    pub tracing_protocol: crate::traces::ExportProtocol,

    /// The share of calls traced when the caller has not decided (0 to 1).
    #[arg(long, env = "SLUICE_TRACING_SAMPLING_RATE", default_value_t = 1.0, value_parser = parse_share)]
    pub tracing_sampling_rate: f64,

    /// The `service.name` of the spans.
    #[arg(long, env = "SLUICE_TRACING_SERVICE_NAME", default_value = "sluice")]
    pub tracing_service_name: String,

    /// More resource attributes of the spans, as key=value,key2=value2.
    #[arg(long, env = "SLUICE_TRACING_RESOURCE", default_value = "")]
    pub tracing_resource: String,

    /// Close each gRPC connection after this long (with a GOAWAY), so clients spread over new
    /// replicas. Unset: connections live as long as their clients keep them.
    #[arg(long, env = "SLUICE_GRPC_MAX_CONNECTION_AGE", value_parser = parse_duration)]
    pub grpc_max_connection_age: Option<Duration>,

    /// After --grpc-max-connection-age, how long calls in flight may take before the
    /// connection is closed.
    #[arg(long, env = "SLUICE_GRPC_MAX_CONNECTION_AGE_GRACE", value_parser = parse_duration)]
    pub grpc_max_connection_age_grace: Option<Duration>,

    /// Most calls in flight on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a client past it waits for a stream. Calls waiting for capacity (`wait:`) hold theirs.
    #[arg(long, env = "SLUICE_GRPC_MAX_CONCURRENT_STREAMS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_concurrent_streams: u32,

    /// How often an idle gRPC connection is pinged (HTTP/2 PING); one whose peer does not
    /// answer within --grpc-keepalive-timeout is closed, so dead or silent peers free their
    /// connections.
    #[arg(long, env = "SLUICE_GRPC_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub grpc_keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered.
    #[arg(long, env = "SLUICE_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub grpc_keepalive_timeout: Duration,

    /// Largest header block a gRPC call may send (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
    #[arg(long, env = "SLUICE_GRPC_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub grpc_max_header_bytes: u32,

    /// Longest a gRPC call may take, its request read included: a client that opens a call
    /// and sends nothing more is answered CANCELLED ("Timeout expired") after this. Set it above the
    /// longest `wait:` (30 s at most). Unset: no limit (a timer a call costs CPU), and a
    /// client that never finishes its calls holds at most --grpc-max-concurrent-streams
    /// streams a connection.
    #[arg(long, env = "SLUICE_GRPC_CALL_TIMEOUT", value_parser = parse_duration)]
    pub grpc_call_timeout: Option<Duration>,

    /// How long an HTTP client (health, metrics, the admin API) has to send a request's headers,
    /// on a new connection or a kept-alive one; one slower is disconnected, so slow or silent
    /// clients cannot hold connections.
    #[arg(long, env = "SLUICE_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Longest an HTTP request may take, reading its body included; past it the answer is
    /// 408 Request Timeout.
    #[arg(long, env = "SLUICE_HTTP_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_request_timeout: Duration,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// The server's thread layout.
    #[arg(long, env = "SLUICE_RUNTIME", value_enum, default_value = "per-core")]
    pub runtime: RuntimeShape,

    /// gRPC threads with `--runtime per-core`; 0: one per core this process may run on.
    #[arg(long, env = "SLUICE_GRPC_THREADS", default_value_t = 0)]
    pub grpc_threads: usize,

    /// Global shadow mode: count and report every limit, never deny.
    #[arg(
        long,
        env = "SLUICE_SHADOW_MODE",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub shadow_mode: bool,

    /// Global quota mode: every limit is a quota (a request is denied only when every quota
    /// it touches is spent), as envoyproxy/ratelimit's `QUOTA_MODE`.
    #[arg(
        long,
        env = "SLUICE_QUOTA_MODE",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub quota_mode: bool,

    /// Add envoyproxy/ratelimit's response headers (`RateLimit-Limit`, `RateLimit-Remaining`,
    /// `RateLimit-Reset`, of the limit nearest its end) to every answer that has a limit.
    #[arg(
        long,
        env = "SLUICE_LIMIT_RESPONSE_HEADERS",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub limit_response_headers: bool,

    /// Name of the limit header of --limit-response-headers.
    #[arg(
        long,
        env = "SLUICE_LIMIT_LIMIT_HEADER",
        default_value = "RateLimit-Limit"
    )]
    pub limit_limit_header: String,

    /// Name of the remaining header of --limit-response-headers.
    #[arg(
        long,
        env = "SLUICE_LIMIT_REMAINING_HEADER",
        default_value = "RateLimit-Remaining"
    )]
    pub limit_remaining_header: String,

    /// Name of the reset header (seconds) of --limit-response-headers.
    #[arg(
        long,
        env = "SLUICE_LIMIT_RESET_HEADER",
        default_value = "RateLimit-Reset"
    )]
    pub limit_reset_header: String,

    /// Start even when the rule files are missing or broken, with no rules, and load them
    /// once they are good (envoyproxy/ratelimit's `FORCE_START_WITHOUT_INITIAL_CONFIG`).
    #[arg(
        long,
        env = "SLUICE_FORCE_START_WITHOUT_INITIAL_CONFIG",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub force_start_without_initial_config: bool,

    /// Report unhealthy (gRPC health and `/healthcheck`) while no domain is loaded.
    #[arg(
        long,
        env = "SLUICE_HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub healthy_with_at_least_one_config_loaded: bool,

    /// Also serve envoyproxy/ratelimit's metric names
    /// (`ratelimit_service_rate_limit_total_hits{domain,key1,key2}` and the like), so its
    /// dashboards and alerts keep working.
    #[arg(
        long,
        env = "SLUICE_PEER_METRICS",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub peer_metrics: bool,

    /// Add OpenAI-style rate-limit headers (x-ratelimit-*-requests, -tokens, retry-after) to
    /// every answer, and an OpenAI-style JSON error body to denials.
    #[arg(
        long,
        env = "SLUICE_OPENAI_HEADERS",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub openai_headers: bool,

    /// Write the request into each response's dynamic metadata as envoyproxy/ratelimit does
    /// (`domain`, `descriptors`, `hitsAddend`). The rules' `metadata` is written either way.
    #[arg(
        long,
        env = "SLUICE_RESPONSE_DYNAMIC_METADATA",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub response_dynamic_metadata: bool,

    /// Bearer token of the mutating admin endpoints. Unset (and no --admin-token-file): they
    /// are disabled.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A file holding the admin bearer token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// After a capacity reduction, limits grow back by this factor every --capacity-recovery-interval.
    #[arg(long, env = "SLUICE_CAPACITY_RECOVERY_FACTOR", default_value_t = 1.1, value_parser = parse_growth)]
    pub capacity_recovery_factor: f64,

    /// How often a reduced capacity grows back.
    #[arg(long, env = "SLUICE_CAPACITY_RECOVERY_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub capacity_recovery_interval: Duration,

    /// A rule's hit counts as near its limit from this fraction of the limit on (metrics).
    #[arg(long, env = "SLUICE_NEAR_LIMIT_RATIO", default_value_t = 0.8, value_parser = parse_ratio)]
    pub near_limit_ratio: f64,

    /// Let several files define one domain: their descriptors are merged (a top-level
    /// descriptor defined twice is an error naming both files).
    #[arg(
        long,
        env = "SLUICE_MERGE_DOMAIN_CONFIG",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub merge_domain_config: bool,

    /// Watch the config directory and reload rules when files change.
    #[arg(
        long,
        env = "SLUICE_WATCH",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub watch: bool,

    /// Quiet time after the last file event before rules reload.
    #[arg(long, env = "SLUICE_RELOAD_DEBOUNCE", default_value = "200ms", value_parser = parse_duration)]
    pub reload_debounce: Duration,

    /// Rescan the config directory this often, whatever the file events say.
    #[arg(long, env = "SLUICE_RESCAN_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub rescan_interval: Duration,

    // clap prints this doc as the flag's help, as written: brackets are not links here.
    #[allow(rustdoc::broken_intra_doc_links)]
    /// Redis for fleet-wide limits: redis://[user:password@]host:port[/db] or rediss:// (TLS).
    /// With --redis-cluster, comma-separated seed URLs of the cluster. Unset: sluice runs alone.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// The Redis URLs are seeds of a Redis Cluster.
    #[arg(
        long,
        env = "REDIS_CLUSTER",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub redis_cluster: bool,

    /// The Redis URLs are Sentinels; sluice follows the master they name this (and fails over
    /// with it).
    #[arg(long, env = "SLUICE_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// PEM file of the CA that signs the Redis server's certificate (rediss://), in place of the
    /// system's roots.
    #[arg(long, env = "SLUICE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM file of sluice's client certificate for Redis (mutual TLS), with --redis-key-file.
    #[arg(long, env = "SLUICE_REDIS_CERT_FILE", requires = "redis_key_file")]
    pub redis_cert_file: Option<PathBuf>,

    /// PEM file of the key of --redis-cert-file.
    #[arg(long, env = "SLUICE_REDIS_KEY_FILE", requires = "redis_cert_file")]
    pub redis_key_file: Option<PathBuf>,

    /// Prefix of every Redis key [default: the environment, else `default`].
    #[arg(long, env = "REDIS_NAMESPACE")]
    pub redis_namespace: Option<String>,

    /// The environment this fleet serves (dev, staging, production); names Redis keys when
    /// --redis-namespace is not set.
    #[arg(long, env = "SLUICE_ENVIRONMENT")]
    pub environment: Option<String>,

    /// How often counts are pushed to Redis and fleet totals read back (10ms or more).
    #[arg(long, env = "SLUICE_SYNC_INTERVAL", default_value = "1s", value_parser = parse_sync_interval)]
    pub sync_interval: Duration,

    /// How often a counter far from its limits is synced, its counts pushed or, with nothing
    /// to push, its fleet total read back [default: 8 × --sync-interval]. Far: under half of
    /// each limit, and what it has not pushed under half of this replica's share. Near a limit
    /// a counter is synced every round. Set it to --sync-interval to sync every counter every
    /// round.
    #[arg(long, env = "SLUICE_SYNC_QUIET_REFRESH", value_parser = parse_duration)]
    pub sync_quiet_refresh: Option<Duration>,

    /// Bound on every Redis call.
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// What the request path does while Redis cannot be reached.
    #[arg(
        long,
        env = "SLUICE_REDIS_FAILURE_POLICY",
        value_enum,
        default_value = "local_share"
    )]
    pub redis_failure_policy: FailurePolicy,

    /// How often counters of ended windows are dropped: just after each multiple of it since
    /// the epoch, where fixed windows end.
    #[arg(long, env = "SLUICE_SWEEP_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Let the kernel back this process's memory with transparent huge pages (Linux). Off by
    /// default: each time the counter table doubles, its new array is faulted in 2 MiB pages
    /// within a few calls, and at a million counters no call was answered for 25-31 ms.
    #[arg(
        long,
        env = "SLUICE_TRANSPARENT_HUGE_PAGES",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub transparent_huge_pages: bool,

    /// How long in-flight calls may take to finish after SIGTERM or SIGINT.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Bounds on what one request may carry.
    #[command(flatten)]
    pub request_bounds: RequestBounds,
}

/// `--merge-domain-config` as the rules read it.
pub fn domain_files(merge: bool) -> DomainFiles {
    if merge {
        DomainFiles::Merged
    } else {
        DomainFiles::One
    }
}

fn parse_growth(text: &str) -> Result<f64, String> {
    let r: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if !(r > 1.0 && r <= 10.0) {
        return Err("must be more than 1 and at most 10".into());
    }
    Ok(r)
}

pub(crate) fn parse_share(text: &str) -> Result<f64, String> {
    let r: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err("must be from 0 to 1".into());
    }
    Ok(r)
}

pub(crate) fn parse_ratio(text: &str) -> Result<f64, String> {
    let r: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if !(r > 0.0 && r <= 1.0) {
        return Err("must be more than 0 and at most 1".into());
    }
    Ok(r)
}

fn parse_sync_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_millis(10) {
        return Err("must be 10ms or more".into());
    }
    Ok(d)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

impl Settings {
    /// How many threads serve gRPC with `--runtime per-core`.
    pub fn grpc_threads(&self) -> usize {
        match self.grpc_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// The admin token, from the flag or environment, else the token file (read on each use,
    /// so a rotated Secret applies without a restart).
    pub fn admin_token(&self) -> Option<String> {
        if let Some(token) = self.admin_token.as_ref().filter(|t| !t.is_empty()) {
            return Some(token.clone());
        }
        let file = self.admin_token_file.as_ref()?;
        let token = std::fs::read_to_string(file).ok()?.trim().to_string();
        (!token.is_empty()).then_some(token)
    }

    /// The gRPC listener's TLS files, when TLS is on.
    pub(crate) fn grpc_tls(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.grpc_tls_cert.clone()?,
            key: self.grpc_tls_key.clone()?,
            client_ca: self.grpc_client_ca.clone(),
            client_san: self.grpc_client_san.clone(),
        })
    }

    /// What tracing needs, when it is on.
    pub(crate) fn traces(&self) -> Option<crate::traces::TraceSettings> {
        self.tracing.then(|| crate::traces::TraceSettings {
            endpoint: self.tracing_endpoint.clone(),
            protocol: self.tracing_protocol,
            sampling_rate: self.tracing_sampling_rate,
            service_name: self.tracing_service_name.clone(),
            resource: self
                .tracing_resource
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        })
    }

    /// Whether several files may define one domain.
    pub fn domain_files(&self) -> DomainFiles {
        domain_files(self.merge_domain_config)
    }

    /// The fleet sync settings, when a Redis URL is set.
    pub fn sync(&self) -> Option<SyncSettings> {
        let url = self.redis_url.as_ref()?;
        Some(SyncSettings {
            address: StoreAddress {
                urls: url
                    .split(',')
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
                    .collect(),
                cluster: self.redis_cluster,
                sentinel_master: self.redis_sentinel_master.clone(),
                tls: TlsFiles {
                    ca: self.redis_ca_file.clone(),
                    client: self
                        .redis_cert_file
                        .clone()
                        .zip(self.redis_key_file.clone()),
                },
                timeout: self.redis_timeout,
            },
            namespace: self
                .redis_namespace
                .clone()
                .or_else(|| self.environment.clone())
                .unwrap_or_else(|| "default".into()),
            interval: self.sync_interval,
            quiet_refresh_rounds: self.sync_quiet_refresh.map_or(8, |every| {
                (every.as_secs_f64() / self.sync_interval.as_secs_f64()).round() as u32
            }),
            policy: self.redis_failure_policy,
        })
    }

    /// Settings for a server on loopback with ephemeral ports: what tests and examples start.
    /// Every other setting is its default, as `sluice serve` has it with no flag and no
    /// environment variable set.
    pub fn local(config: PathBuf) -> Settings {
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            settings: Settings,
        }
        // The environment is left out: a test's server must not pick up REDIS_URL and the like.
        let command = Serve::command().mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from([
                "sluice".as_ref(),
                "--grpc-addr".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--http-addr".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
            ])
            .expect("the defaults parse");
        Serve::from_arg_matches(&matches)
            .expect("the defaults parse")
            .settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_settings_are_the_defaults_on_loopback() {
        let local = Settings::local("rules".into());
        assert_eq!(local.grpc_addr.to_string(), "127.0.0.1:0");
        assert_eq!(local.config, PathBuf::from("rules"));
        assert_eq!(local.sync_interval, Duration::from_secs(1));
        assert_eq!(local.redis_timeout, Duration::from_millis(250));
        assert_eq!(local.request_bounds.max_descriptors, 64);
        assert!(local.redis_url.is_none() && local.watch && local.openai_headers);
        assert!(!local.transparent_huge_pages);
    }
}
