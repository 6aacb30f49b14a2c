//! How gRPC connections are accepted and served: on a current-thread runtime per core (the
//! default), or on the caller's runtime; with writes batched; in plain TCP or TLS.
//!
//! Per core, one accept loop on the caller's runtime deals connections round-robin to worker
//! threads, each a current-thread tokio runtime that serves its connections from start to end.
//! A call then never leaves its thread: no cross-thread wake-up, no work stealing. Measured on
//! one pinned core (BENCHMARKS.md), this layout serves 1.5–1.6× the calls per CPU-second of
//! tokio's multi-threaded scheduler, saturated, and a call from Envoy, arriving alone, costs
//! about 30 % less CPU.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::body::Body;
use tonic::transport::Server;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A gRPC call as tonic's server hands it on, and its reply.
type Request = http::Request<Body>;
type Reply = http::Response<Body>;

/// Why gRPC serving ended.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// tonic's server failed.
    #[error(transparent)]
    Serve(#[from] tonic::transport::Error),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start a gRPC worker thread: {0}")]
    Worker(io::Error),
    /// A worker thread panicked.
    #[error("a gRPC worker thread ended without an answer")]
    WorkerLost,
}

/// Where calls are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// This many worker threads, each a current-thread runtime.
    PerCore(usize),
    /// On the caller's runtime (tokio's multi-threaded scheduler, as `main` builds it).
    Shared,
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// What serves the calls of a connection: a tower service of gRPC requests, cloned for each
/// worker thread.
pub trait Calls:
    tower_service::Service<Request, Response = Reply, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S> Calls for S where
    S: tower_service::Service<Request, Response = Reply, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// Serves `calls` with `server`'s settings on the connections `listener` accepts until `stop`
/// completes; then lets calls in flight finish. `tls`: the connections are TLS.
pub fn serve(
    listener: TcpListener,
    (server, calls): (Server, impl Calls),
    threads: Threads,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<JoinHandle<Result<(), TransportError>>, TransportError> {
    let (stopping, stopped) = watch::channel(false);
    match threads {
        Threads::Shared => {
            let (accepted, incoming) = mpsc::unbounded_channel();
            Ok(tokio::spawn(async move {
                let accepting = async move {
                    tokio::select! {
                        () = stop => {}
                        () = accept(listener, vec![accepted]) => {}
                    }
                    stopping.send_replace(true);
                };
                let serving = serve_on_this_thread((server, calls), incoming, tls, stopped);
                let ((), served) = tokio::join!(accepting, serving);
                served
            }))
        }
        Threads::PerCore(count) => {
            let mut workers = Vec::with_capacity(count);
            let mut ended = Vec::with_capacity(count);
            for index in 0..count.max(1) {
                let (accepted, incoming) = mpsc::unbounded_channel();
                let (done, finished) = oneshot::channel();
                let (server, calls) = (server.clone(), calls.clone());
                let (tls, stopped) = (tls.clone(), stopped.clone());
                std::thread::Builder::new()
                    .name(format!("sluice-grpc-{index}"))
                    .spawn(move || {
                        let served = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(runtime) => runtime.block_on(serve_on_this_thread(
                                (server, calls),
                                incoming,
                                tls,
                                stopped,
                            )),
                            Err(e) => Err(TransportError::Worker(e)),
                        };
                        let _ = done.send(served);
                    })
                    .map_err(TransportError::Worker)?;
                workers.push(accepted);
                ended.push(finished);
            }
            Ok(tokio::spawn(async move {
                // Until stopped, or until no worker is left to take a connection.
                tokio::select! {
                    () = stop => {}
                    () = accept(listener, workers) => {}
                }
                stopping.send_replace(true);
                let mut result = Ok(());
                for finished in ended {
                    let served = finished.await.unwrap_or(Err(TransportError::WorkerLost));
                    result = result.and(served);
                }
                result
            }))
        }
    }
}

/// Accepts failing in a row on one listener (out of file descriptors, most likely), and since
/// when: told once as it starts and once as it clears, not every 100 ms between.
pub struct AcceptFailures {
    listener: &'static str,
    failing: Option<(u64, std::time::Instant)>,
}

impl AcceptFailures {
    pub fn new(listener: &'static str) -> AcceptFailures {
        AcceptFailures {
            listener,
            failing: None,
        }
    }

    /// An accept failed: told if it is the first in a row, then a pause rather than a spin
    /// (the connection stays in the listen queue).
    pub async fn failed(&mut self, error: &std::io::Error) {
        match &mut self.failing {
            Some((failed, _)) => *failed += 1,
            None => {
                tracing::warn!(%error, listener = self.listener, "cannot accept a connection; new connections wait until this clears (connections already open are served)");
                self.failing = Some((1, std::time::Instant::now()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// An accept succeeded: told if failures came before it.
    pub fn cleared(&mut self) {
        if let Some((failed, since)) = self.failing.take() {
            tracing::warn!(failed, after = ?since.elapsed(), listener = self.listener, "cannot accept a connection: cleared, accepting again");
        }
    }
}

/// Accepts connections, dealing them to `workers` in turn; returns when no worker is left.
async fn accept(
    listener: TcpListener,
    mut workers: Vec<mpsc::UnboundedSender<std::net::TcpStream>>,
) {
    let mut next = 0;
    let mut failures = AcceptFailures::new("gRPC");
    while !workers.is_empty() {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                failures.failed(&error).await;
                continue;
            }
        };
        failures.cleared();
        let _ = tcp.set_nodelay(true);
        // Leaves this runtime's reactor, to join the worker's.
        let Ok(mut tcp) = tcp.into_std() else {
            continue;
        };
        // A worker that has ended (its thread panicked) leaves the rotation; the connection
        // goes to the next.
        loop {
            next %= workers.len();
            match workers[next].send(tcp) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    tracing::error!("a gRPC worker thread has ended; serving on the others");
                    workers.swap_remove(next);
                    if workers.is_empty() {
                        return;
                    }
                    tcp = back;
                }
            }
        }
        next += 1;
    }
}

/// Serves the connections that arrive on `incoming` on the current runtime.
async fn serve_on_this_thread(
    (server, calls): (Server, impl Calls),
    incoming: mpsc::UnboundedReceiver<std::net::TcpStream>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), TransportError> {
    let stop = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let incoming = UnboundedReceiverStream::new(incoming);
    match tls {
        None => {
            let connections = incoming.map(|tcp| TcpStream::from_std(tcp).map(Batched));
            server
                .serve_with_incoming_shutdown(calls, connections, stop)
                .await?;
        }
        Some(config) => {
            let connections = handshakes(incoming, config);
            server
                .serve_with_incoming_shutdown(calls, connections, stop)
                .await?;
        }
    }
    Ok(())
}

/// The TLS connections made from `incoming`, each handshake in a task of its own (so a slow
/// client holds up no other), bounded by [`HANDSHAKE`].
fn handshakes(
    mut incoming: UnboundedReceiverStream<std::net::TcpStream>,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (secured, connections) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Some(tcp) = incoming.next().await {
            let Ok(tcp) = TcpStream::from_std(tcp) else {
                continue;
            };
            let peer = tcp.peer_addr().ok();
            let (acceptor, secured) = (acceptor.clone(), secured.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = secured.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(?peer, %error, "TLS handshake refused"),
                    Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(connections)
}

/// A gRPC connection that tells h2 it has no vectored writes, so that answers are written many
/// to a syscall. With vectored writes h2 (0.4) sends any DATA frame over 256 bytes in a write of
/// its own, and every answer that follows waits for it: five statuses with the OpenAI headers
/// (≈ 450 bytes) cost a `writev` each, and the kernel's share of a call grew from 12 % to 41 %.
/// Without, h2 copies frames of up to 1 KiB into its 16 KiB buffer and flushes it when full.
struct Batched(TcpStream);

impl AsyncRead for Batched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Batched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connected for Batched {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.connect_info()
    }
}
