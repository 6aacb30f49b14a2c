//! The running server: shared state, the gRPC listener with its health service, and the
//! background sweep. `main` and the integration tests both start it through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::capacity::{Capacity, Recovery};
use crate::decision::Mode;
use crate::grpc::RateLimitGrpc;
use crate::limiter::{Clock, Limiter};
use crate::reload::{self, Catalog, ReloadSettings, ReloadStatus};
use crate::rules::{ConfigError, RuleSet};
use crate::settings::Settings;
use crate::sync::{self, Fleet};
use crate::telemetry::ProcessMetrics;

/// Everything a request needs, shared by every connection.
pub struct App {
    /// The rules in force: one atomic load per request; a reload swaps in a new set while
    /// requests in flight finish on the one they loaded.
    pub rules: ArcSwap<RuleSet>,
    pub limiter: Limiter,
    pub settings: Settings,
    pub stats: Stats,
    /// What the last reloads did (generation, hash, per-file errors).
    pub reload_status: ArcSwap<ReloadStatus>,
    /// The fleet store, when Redis is configured.
    pub fleet: Option<Arc<Fleet>>,
    pub metrics: ProcessMetrics,
    /// Capacity reductions announced, here or by the fleet.
    pub capacity: Capacity,
    /// Wakes the capacity task: an announcement arrived, or rules were reloaded.
    pub capacity_changed: tokio::sync::Notify,
}

impl App {
    pub fn new(
        settings: Settings,
        rules: RuleSet,
        clock: Arc<dyn Clock>,
        fleet: Option<Arc<Fleet>>,
    ) -> App {
        App {
            fleet,
            rules: ArcSwap::from_pointee(rules),
            limiter: Limiter::new(clock),
            settings,
            stats: Stats::default(),
            reload_status: ArcSwap::from_pointee(ReloadStatus::default()),
            metrics: ProcessMetrics::register(),
            capacity: Capacity::default(),
            capacity_changed: tokio::sync::Notify::new(),
        }
    }

    pub fn recovery(&self) -> Recovery {
        Recovery {
            factor: self.settings.capacity_recovery_factor,
            every: self.settings.capacity_recovery_interval,
        }
    }

    /// Counts an answer and how long it took.
    pub fn record_answer(
        &self,
        response: &envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse,
        started: std::time::Instant,
    ) {
        self.metrics
            .request_duration
            .record(started.elapsed().as_secs_f64());
        if response.overall_code
            == envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code::Ok as i32
        {
            self.metrics.requests_ok.increment(1);
        } else {
            self.metrics.requests_over.increment(1);
        }
    }

    pub fn mode(&self) -> Mode {
        Mode {
            shadow: self.settings.shadow_mode,
            strict_in_store: self.fleet.is_some(),
        }
    }
}

/// Process-wide event counts that are not per rule.
#[derive(Debug, Default)]
pub struct Stats {
    unknown_domains: AtomicU64,
    usage_reports: AtomicU64,
    reported_tokens: AtomicU64,
}

impl Stats {
    /// A usage report (tokens used, at stream end) and its tokens: counted apart from requests.
    pub fn usage_report(&self, tokens: u64) {
        self.usage_reports.fetch_add(1, Ordering::Relaxed);
        self.reported_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    pub fn usage_reports(&self) -> (u64, u64) {
        (
            self.usage_reports.load(Ordering::Relaxed),
            self.reported_tokens.load(Ordering::Relaxed),
        )
    }

    pub fn unknown_domain(&self) {
        self.unknown_domains.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unknown_domains(&self) -> u64 {
        self.unknown_domains.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("refusing to start: {} errors in the rule files", .0.len())]
    Rules(Vec<ConfigError>),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    BindHttp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for gRPC on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid Redis settings: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A started server. Dropping it does not stop it: call [`Running::stop`].
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: oneshot::Sender<()>,
    serving: JoinHandle<Result<(), ServerError>>,
    sweeping: JoinHandle<()>,
    reloading: JoinHandle<()>,
    syncing: Option<JoinHandle<()>>,
    capacity: JoinHandle<()>,
    http: JoinHandle<()>,
    http_stop: Arc<tokio::sync::Notify>,
}

impl Running {
    /// Stops accepting calls, lets calls in flight finish, and waits for the server to end.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(());
        self.http_stop.notify_one();
        let _ = (&mut self.http).await;
        self.sweeping.abort();
        self.reloading.abort();
        self.capacity.abort();
        if let Some(syncing) = self.syncing.take() {
            syncing.abort();
        }
        if let Some(fleet) = &self.app.fleet {
            fleet.leave().await;
        }
        match self.serving.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }

    /// Waits until the server ends on its own (it only does on error).
    pub fn serving(&mut self) -> &mut JoinHandle<Result<(), ServerError>> {
        &mut self.serving
    }
}

/// Loads the rules of `settings.config` (refusing any error), binds the gRPC address, and
/// starts serving, reloading rules as they change.
pub async fn start(settings: Settings, clock: Arc<dyn Clock>) -> Result<Running, ServerError> {
    // Before the rules load: their metric handles bind to the recorder that exists then.
    crate::telemetry::install();
    let changes = reload::Changes::watch(&settings.config, settings.watch);
    let (catalog, rules) = Catalog::load(&settings.config).map_err(ServerError::Rules)?;
    let fleet = match settings.sync() {
        Some(sync) => Some(Arc::new(Fleet::new(sync)?)),
        None => None,
    };
    tracing::info!(
        config = %settings.config.display(),
        domains = rules.domains().count(),
        rules = rules.rule_count(),
        "rules loaded"
    );
    let addr = settings.grpc_addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let http_listener = TcpListener::bind(settings.http_addr)
        .await
        .map_err(|source| ServerError::BindHttp {
            addr: settings.http_addr,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| ServerError::BindHttp {
            addr: settings.http_addr,
            source,
        })?;
    let app = Arc::new(App::new(settings, rules, clock, fleet.clone()));
    crate::reload::publish(&app, catalog.status());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RateLimitServiceServer<RateLimitGrpc>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let (shutdown, stopped) = oneshot::channel::<()>();
    let service = RateLimitServiceServer::new(RateLimitGrpc::new(app.clone()));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let serving = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            })
            .await
            .map_err(ServerError::from)
    });
    let http_stop = Arc::new(tokio::sync::Notify::new());
    let http = {
        let (router, stop) = (crate::admin::router(app.clone()), http_stop.clone());
        tokio::spawn(async move {
            let served = axum::serve(http_listener, router)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "HTTP server failed");
            }
        })
    };
    tracing::info!(%http_addr, "serving health, metrics and the admin API over HTTP");
    let sweeping = tokio::spawn(sweep(app.clone()));
    let capacity = tokio::spawn(crate::capacity::run(app.clone()));
    let reload_settings = ReloadSettings {
        debounce: app.settings.reload_debounce,
        rescan_every: app.settings.rescan_interval,
    };
    let reloading = tokio::spawn(reload::run(app.clone(), catalog, changes, reload_settings));
    let syncing = fleet.map(|fleet| {
        tracing::info!(
            namespace = %fleet.settings.namespace,
            cluster = fleet.settings.address.cluster,
            interval = ?fleet.settings.interval,
            policy = ?fleet.settings.policy,
            "fleet-wide limits through Redis"
        );
        tokio::spawn(sync::run(app.clone(), fleet))
    });
    tracing::info!(%grpc_addr, "serving ShouldRateLimit over gRPC");
    Ok(Running {
        grpc_addr,
        http_addr,
        http,
        http_stop,
        app,
        shutdown,
        serving,
        sweeping,
        reloading,
        syncing,
        capacity,
    })
}

/// Drops counters whose window has ended, so memory follows active keys.
async fn sweep(app: Arc<App>) {
    let mut every = tokio::time::interval(app.settings.sweep_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = app.limiter.clock().now_ms();
        let dropped = app.limiter.counters().sweep(now);
        app.metrics
            .active_counters
            .set(app.limiter.counters().len() as f64);
        if dropped > 0 {
            tracing::debug!(
                dropped,
                live = app.limiter.counters().len(),
                "swept idle counters"
            );
        }
    }
}
