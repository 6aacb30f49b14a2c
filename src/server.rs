//! Start and stop: bind the listeners, spawn the background tasks (sweep, capacity, reload,
//! sync) with the handles each uses, and shut down in order. The only wiring besides `main`;
//! `main` and the integration tests both start a server through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::capacity::RuleName;
use crate::grpc::{Dispatch, RateLimitGrpc, UndecodableIsInvalid};
use crate::limiter::{Clock, Limiter};
use crate::reload::{self, Catalog, ReloadSettings};
use crate::rules::ConfigError;
use crate::settings::{RuntimeShape, Settings};
use crate::sync::{self, Fleet};
use crate::transport::Threads;

/// Why a server did not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The rule files have errors: a server never starts on broken rules.
    #[error("refusing to start: {} errors in the rule files", .0.len())]
    Rules(Vec<ConfigError>),
    /// The HTTP address cannot be bound.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    BindHttp {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it cannot be bound.
        source: std::io::Error,
    },
    /// The gRPC address cannot be bound.
    #[error("cannot listen for gRPC on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it cannot be bound.
        source: std::io::Error,
    },
    /// The trace exporter cannot be set up.
    #[error(transparent)]
    Traces(#[from] crate::traces::TraceError),
    /// The gRPC listener's TLS files do not load.
    #[error("gRPC TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The Redis URLs are not valid.
    #[error("invalid Redis settings: {0}")]
    Redis(#[from] redis::RedisError),
    /// The gRPC server ended with an error, or could not start its threads.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] crate::transport::TransportError),
}

/// A started server. Dropping it does not stop it: call [`Running::stop`].
pub struct Running {
    /// Where gRPC is served (the bound port when 0 was asked for).
    pub grpc_addr: SocketAddr,
    /// Where HTTP is served.
    pub http_addr: SocketAddr,
    /// The server's shared state.
    pub app: Arc<App>,
    shutdown: oneshot::Sender<()>,
    serving: JoinHandle<Result<(), crate::transport::TransportError>>,
    sweeping: JoinHandle<()>,
    reloading: JoinHandle<()>,
    syncing: Option<JoinHandle<()>>,
    capacity: JoinHandle<()>,
    http: Vec<JoinHandle<()>>,
    http_stop: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// Stops accepting calls, lets calls in flight finish, and waits for the server to end.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(());
        self.http_stop.send_replace(true);
        for http in &mut self.http {
            let _ = http.await;
        }
        self.sweeping.abort();
        self.reloading.abort();
        self.capacity.abort();
        if let Some(syncing) = self.syncing.take() {
            syncing.abort();
        }
        // No new call comes in: give back what the leases hold unused now (a call in flight
        // that needs more leases it afresh), rather than once the last connection closes.
        if let Some(fleet) = &self.app.fleet {
            fleet.give_back(&self.app.sync_handles()).await;
        }
        if self.app.traces.is_some() {
            // Flushing waits on the exporter's thread.
            let app = self.app.clone();
            let flushed = tokio::task::spawn_blocking(move || {
                if let Some(traces) = &app.traces {
                    traces.shutdown();
                }
            });
            let _ = flushed.await;
        }
        let served = match self.serving.await {
            Ok(result) => result.map_err(ServerError::from),
            Err(_) => Ok(()),
        };
        // Once no call is left to admit: push the last counts, give back what was leased since,
        // and leave the fleet.
        if let Some(fleet) = &self.app.fleet {
            fleet.leave(&self.app.sync_handles()).await;
        }
        served
    }

    /// Waits until the server ends on its own (it only does on error).
    pub fn serving(&mut self) -> &mut JoinHandle<Result<(), crate::transport::TransportError>> {
        &mut self.serving
    }
}

/// The names grpc.health.v1 answers for: the whole server, the service's full name, and
/// `ratelimit`, which envoyproxy/ratelimit's probes ask for.
const HEALTH_NAMES: [&str; 3] = [
    "",
    <RateLimitGrpc as tonic::server::NamedService>::NAME,
    "ratelimit",
];

/// Loads the rules of `settings.config` (refusing any error), binds the gRPC address, and
/// starts serving, reloading rules as they change.
pub async fn start(settings: Settings, clock: Arc<dyn Clock>) -> Result<Running, ServerError> {
    // Before the rules load: their metric handles bind to the recorder that exists then.
    crate::telemetry::install();
    crate::telemetry::serve_peer_names(settings.peer_metrics);
    let changes = reload::Changes::watch(&settings.config, settings.watch);
    let (catalog, rules) = if settings.force_start_without_initial_config {
        let (catalog, rules, errors) = Catalog::load_anyway(
            &settings.config,
            clock.now_ms(),
            settings.domain_files(),
            settings.redis_url.is_some(),
        );
        for error in &errors {
            tracing::error!(%error, "rule file rejected; starting without it (--force-start-without-initial-config)");
        }
        (catalog, rules)
    } else {
        Catalog::load(
            &settings.config,
            clock.now_ms(),
            settings.domain_files(),
            settings.redis_url.is_some(),
        )
        .map_err(ServerError::Rules)?
    };
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
    let tls = match settings.grpc_tls() {
        Some(files) => Some(Arc::new(crate::tls::server_config(&files)?)),
        None => None,
    };
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
    let traces = match settings.traces() {
        Some(traces) => {
            tracing::info!(protocol = ?traces.protocol, endpoint = ?traces.endpoint, rate = traces.sampling_rate, "tracing ShouldRateLimit over OTLP");
            Some(crate::traces::Traces::start(&traces)?)
        }
        None => None,
    };
    let mut app = App::new(settings, rules, clock, fleet.clone());
    app.traces = traces;
    let app = Arc::new(app);
    app.publish_reload(catalog.status());

    let (health, health_service) = tonic_health::server::health_reporter();
    let loaded = app.domains_loaded.subscribe();
    set_health(&app, &health).await;
    let following = tokio::spawn(health_follows_rules(app.clone(), health.clone(), loaded));

    let (shutdown, stopped) = oneshot::channel::<()>();
    let service = UndecodableIsInvalid(RateLimitGrpc::new(app.clone()));
    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = app.settings.grpc_max_connection_age {
        builder = builder.max_connection_age(age);
    }
    if let Some(grace) = app.settings.grpc_max_connection_age_grace {
        builder = builder.max_connection_age_grace(grace);
    }
    let calls = Dispatch::new(service, health_service);
    let stopping = async move {
        let _ = stopped.await;
        following.abort();
        for name in HEALTH_NAMES {
            health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    let threads = match app.settings.runtime {
        RuntimeShape::PerCore => Threads::PerCore(app.settings.grpc_threads()),
        RuntimeShape::MultiThread => Threads::Shared,
    };
    let serving = crate::transport::serve(listener, (builder, calls), threads, tls, stopping)?;
    let (http_stop, _) = tokio::sync::watch::channel(false);
    let mut http = vec![serve_http(
        http_listener,
        crate::admin::router(app.clone()),
        &http_stop,
    )];
    tracing::info!(%http_addr, "serving health, metrics and the admin API over HTTP");
    let extra = [
        (app.settings.metrics_addr, "metrics"),
        (app.settings.debug_addr, "debug (/rlconfig)"),
    ];
    for (addr, what) in extra {
        let Some(addr) = addr else { continue };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::BindHttp { addr, source })?;
        let router = if what == "metrics" {
            crate::admin::metrics_router(app.clone(), &app.settings.metrics_path)
        } else {
            crate::admin::debug_router(app.clone())
        };
        http.push(serve_http(listener, router, &http_stop));
        tracing::info!(%addr, "serving {what} over HTTP");
    }
    let sweeping = tokio::spawn(sweep(
        app.limiter.clone(),
        app.settings.sweep_interval,
        app.metrics.active_counters.clone(),
    ));
    let capacity = tokio::spawn(keep_capacity(app.clone()));
    let reload_settings = ReloadSettings {
        debounce: app.settings.reload_debounce,
        rescan_every: app.settings.rescan_interval,
    };
    let reloading = {
        let (limiter, applying) = (app.limiter.clone(), app.clone());
        tokio::spawn(reload::run(
            catalog,
            changes,
            reload_settings,
            move || limiter.clock().now_ms(),
            move |reloaded| applying.apply_reload(reloaded),
        ))
    };
    let syncing = fleet.map(|fleet| {
        tracing::info!(
            namespace = %fleet.settings.namespace,
            cluster = fleet.settings.address.cluster,
            interval = ?fleet.settings.interval,
            policy = ?fleet.settings.policy,
            "fleet-wide limits through Redis"
        );
        tokio::spawn(sync::run(app.sync_handles(), fleet))
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

/// Serves `router` on `listener` until `stop` turns true.
fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    stop: &tokio::sync::watch::Sender<bool>,
) -> JoinHandle<()> {
    let mut stop = stop.subscribe();
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed");
        }
    })
}

/// Keeps the gRPC health service SERVING, or, under
/// `--healthy-with-at-least-one-config-loaded`, SERVING only while a domain is loaded.
async fn health_follows_rules(
    app: Arc<App>,
    health: tonic_health::server::HealthReporter,
    mut loaded: tokio::sync::watch::Receiver<bool>,
) {
    while loaded.changed().await.is_ok() {
        set_health(&app, &health).await;
    }
}

async fn set_health(app: &App, health: &tonic_health::server::HealthReporter) {
    let status = if app.healthy() {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// Drops counters whose window has ended, so memory follows active keys.
async fn sweep(limiter: Arc<Limiter>, every: Duration, live: metrics::Gauge) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let dropped = sweep_once(limiter.clone()).await;
        live.set(limiter.counters().len() as f64);
        if dropped > 0 {
            tracing::debug!(
                dropped,
                live = limiter.counters().len(),
                "swept idle counters"
            );
        }
    }
}

/// Drops every counter whose window has ended, on a blocking-pool thread. This runtime's
/// thread also accepts gRPC connections and serves the admin API, and a sweep of a million
/// counters takes 50-300 ms of CPU: run here, in pieces or whole, it held a new connection's
/// first call for 84-204 ms (load bench, 1M keys; `perf sched`: this thread busy throughout).
async fn sweep_once(limiter: Arc<Limiter>) -> usize {
    let sweeping = tokio::task::spawn_blocking(move || {
        let now = limiter.clock().now_ms();
        limiter.counters().sweep(now)
    });
    match sweeping.await {
        Ok(dropped) => dropped,
        Err(error) => {
            tracing::error!(%error, "the counter sweep failed; it runs again at the next interval");
            0
        }
    }
}

/// Keeps capacity factors current: applies announcements (local, and with Redis the fleet's,
/// also followed as they are published) and their recovery, logs each change and sets its
/// gauge.
async fn keep_capacity(app: Arc<App>) {
    let follow = async {
        match &app.fleet {
            Some(fleet) => fleet.follow_capacity(&app.capacity_changed).await,
            None => std::future::pending().await,
        }
    };
    let recovery = app.recovery();
    let tick = (recovery.every / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let apply = async {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = app.capacity_changed.notified() => {}
            }
            if let Some(fleet) = &app.fleet {
                match fleet.capacity_announcements().await {
                    Ok(found) => {
                        for (name, a) in found {
                            app.capacity.record(name, a);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cannot read capacity announcements from Redis")
                    }
                }
            }
            let rules = app.rules.load_full();
            let now = app.limiter.clock().now_ms();
            for changed in app.capacity.apply(&rules, recovery, now) {
                let (RuleName { domain, rule }, factor) = (changed.name, changed.factor);
                tracing::info!(%domain, %rule, factor, "capacity factor changed");
                crate::telemetry::capacity_factor(domain, rule, factor);
            }
        }
    };
    tokio::select! {
        () = follow => {}
        () = apply => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{CounterRef, Counts, Enforcement, Limits, ManualClock, Unit};

    /// While a large sweep runs, the runtime that started it (a one-thread runtime, as the
    /// server's is) goes on serving its other tasks: here one that watches the table shrink.
    #[tokio::test(flavor = "current_thread")]
    async fn the_runtime_serves_other_tasks_while_a_large_sweep_runs() {
        let clock = Arc::new(ManualClock::new(60_000));
        let limiter = Arc::new(Limiter::new(clock.clone()));
        let one = Counts {
            requests: 1,
            tokens: 0,
        };
        let total = 200_000;
        let names: Vec<String> = (0..total).map(|i| format!("key-{i}")).collect();
        let pinned = limiter.counters().pin();
        for name in &names {
            let parts = [name.as_str()];
            let key = CounterRef {
                scope: 1,
                unit: Unit::Minute,
                parts: &parts,
            };
            pinned.with_counter(key, |c| {
                let window = Unit::Minute.window_at(60_000);
                c.charge(window, one, Limits::default(), Enforcement::Enforce)
            });
        }
        drop(pinned);
        clock.set_ms(10 * 60_000);
        let sweeping = tokio::spawn(sweep_once(limiter.clone()));
        // This task runs only when the runtime is free; before the sweep's end it sees the
        // table partly swept (a sweep on this thread would show it whole, then empty).
        let mut left = total;
        while left == total {
            tokio::task::yield_now().await;
            left = limiter.counters().len();
        }
        assert!(
            left > 0,
            "this runtime ran nothing else until the sweep of {total} counters had ended"
        );
        assert_eq!(sweeping.await.unwrap(), total);
        assert!(limiter.counters().is_empty());
    }
}
