//! Start and stop: bind the listeners, spawn the background tasks (sweep, capacity, reload,
//! sync) with the handles each uses, and shut down in order. The only wiring besides `main`;
//! `main` and the integration tests both start a server through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::background::{Background, Reloads};
use crate::grpc::{Dispatch, RateLimitGrpc, UndecodableIsInvalid};
use crate::limiter::Clock;
use crate::reload::{self, Catalog, ReloadSettings};
use crate::rules::ConfigError;
use crate::settings::{RuntimeShape, Settings};
use crate::sync::Fleet;
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
    /// Where the admin API is served apart (`--admin-addr`, the bound port), if it is.
    pub admin_addr: Option<SocketAddr>,
    /// The server's shared state.
    pub app: Arc<App>,
    shutdown: oneshot::Sender<()>,
    serving: JoinHandle<Result<(), crate::transport::TransportError>>,
    background: Option<Background>,
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
        if let Some(background) = self.background.take() {
            background.stop();
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
    let settings = &app.settings;
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(settings.grpc_max_concurrent_streams)
        .http2_keepalive_interval(Some(settings.grpc_keepalive_interval))
        .http2_keepalive_timeout(Some(settings.grpc_keepalive_timeout))
        .http2_max_header_list_size(settings.grpc_max_header_bytes);
    if let Some(timeout) = settings.grpc_call_timeout {
        builder = builder.timeout(timeout);
    }
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
    let limits = HttpLimits {
        headers: app.settings.http_header_timeout,
        request: app.settings.http_request_timeout,
    };
    let (main_routes, admin_addr) = match app.settings.admin_addr {
        None => {
            tracing::info!(%http_addr, "serving health, metrics and the admin API over HTTP");
            (crate::admin::router(app.clone()), None)
        }
        Some(addr) => {
            tracing::info!(%http_addr, "serving health and metrics over HTTP");
            (crate::admin::health_router(app.clone()), Some(addr))
        }
    };
    let mut http = vec![serve_http(http_listener, main_routes, &http_stop, limits)];
    let admin_addr = match admin_addr {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::BindHttp { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServerError::BindHttp { addr, source })?;
            let routes = crate::admin::admin_router(app.clone());
            http.push(serve_http(listener, routes, &http_stop, limits));
            tracing::info!(addr = %bound, "serving the admin API over HTTP");
            Some(bound)
        }
    };
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
        http.push(serve_http(listener, router, &http_stop, limits));
        tracing::info!(%addr, "serving {what} over HTTP");
    }
    let reloads = Reloads {
        catalog,
        changes,
        settings: ReloadSettings {
            debounce: app.settings.reload_debounce,
            rescan_every: app.settings.rescan_interval,
            on_hangup: true,
        },
        apply: {
            let applying = app.clone();
            Box::new(move |reloaded| applying.apply_reload(reloaded))
        },
    };
    let background = Background::start(&app, Some(reloads));
    tracing::info!(%grpc_addr, "serving ShouldRateLimit over gRPC");
    Ok(Running {
        grpc_addr,
        http_addr,
        admin_addr,
        http,
        http_stop,
        app,
        shutdown,
        serving,
        background: Some(background),
    })
}

/// Time limits of the HTTP listeners (`--http-header-timeout`, `--http-request-timeout`).
#[derive(Clone, Copy)]
struct HttpLimits {
    headers: Duration,
    request: Duration,
}

/// Serves `router` on `listener` until `stop` turns true, HTTP/1 or HTTP/2 on each connection.
/// A client gets `limits.headers` to send a request's headers and `limits.request` for the
/// whole request (408 past it), so a slow client holds a connection no longer than that.
fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    stop: &tokio::sync::watch::Sender<bool>,
    limits: HttpLimits,
) -> JoinHandle<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut stop = stop.subscribe();
    let router = router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(limits.request, next.run(request)).await {
                Ok(response) => response,
                // Its body may be unread: the connection ends with the answer.
                Err(_) => (
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    [(axum::http::header::CONNECTION, "close")],
                )
                    .into_response(),
            }
        },
    ));
    tokio::spawn(async move {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.headers)
            .keep_alive_timeout(limits.headers);
        let connections = hyper_util::server::graceful::GracefulShutdown::new();
        let mut failures = crate::transport::AcceptFailures::new("HTTP");
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|stop| *stop) => break,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    failures.failed(&error).await;
                    continue;
                }
            };
            failures.cleared();
            let service = hyper_util::service::TowerToHyperService::new(router.clone());
            let (builder, watcher) = (builder.clone(), connections.watcher());
            tokio::spawn(async move {
                // The first bytes tell HTTP/1 from HTTP/2, and hyper's header timer starts only
                // after them: a client silent from the start is timed here.
                match tokio::time::timeout(limits.headers, tcp.peek(&mut [0u8; 1])).await {
                    Ok(Ok(1..)) => {}
                    _ => return,
                }
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                if let Err(error) = watcher.watch(connection).await {
                    tracing::debug!(%error, "HTTP connection ended");
                }
            });
        }
        drop(listener);
        // Requests in flight finish (each within its own time limit), then the listener ends.
        let _ = tokio::time::timeout(limits.request, connections.shutdown()).await;
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
