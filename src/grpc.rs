//! `RateLimitService` over tonic: the ShouldRateLimit route handed to
//! [`service::answer`](crate::service::answer), its errors turned into gRPC statuses.
//!
//! tonic's generated server (envoy-types') would answer with prost's owned `RateLimitResponse`;
//! this one is the same glue with sluice's [`Answer`], which writes itself to the wire without
//! an allocation per header.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::future::{Either, Ready, ready};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, StdError};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::proto::{Answer, Call, code, code_name};
use crate::service::{self, AnswerError};
use crate::traces::CallSpan;

/// The one method, as gRPC paths name it.
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The gRPC face of a server.
#[derive(Clone)]
pub struct RateLimitGrpc {
    app: Arc<App>,
}

impl RateLimitGrpc {
    /// Serves ShouldRateLimit for `app`.
    pub fn new(app: Arc<App>) -> Self {
        RateLimitGrpc { app }
    }
}

impl NamedService for RateLimitGrpc {
    const NAME: &'static str = "envoy.service.ratelimit.v3.RateLimitService";
}

impl<B> tower_service::Service<http::Request<B>> for RateLimitGrpc
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = BoxFuture<Result<Reply, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SHOULD_RATE_LIMIT {
            let unknown = Status::unimplemented(format!("{} is not served", request.uri().path()));
            return Box::pin(std::future::ready(Ok(unknown.into_http())));
        }
        let method = ShouldRateLimit(self.app.clone());
        Box::pin(async move {
            let mut grpc = Grpc::new(ShouldRateLimitCodec);
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// The gRPC server's calls: ShouldRateLimit on its exact path straight to its service, every
/// other call (health, an unknown method) through tonic's router. The router is axum's path
/// routing with the wildcard tonic registers per service, which cost a ShouldRateLimit call
/// about 4,200 instructions (8 % of a call, BENCHMARKS.md) to find a route that is known.
#[derive(Clone)]
pub struct Dispatch {
    rate_limit: UndecodableIsInvalid<RateLimitGrpc>,
    others: Routes,
}

impl Dispatch {
    /// ShouldRateLimit served by `rate_limit` straight; every other call through tonic's
    /// router, which holds `health` and `rate_limit` (for the service's other paths, which it
    /// answers UNIMPLEMENTED).
    pub fn new<S>(rate_limit: UndecodableIsInvalid<RateLimitGrpc>, health: S) -> Self
    where
        S: tower_service::Service<HttpRequest, Error = Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        let others = Routes::new(health).add_service(rate_limit.clone());
        Dispatch {
            rate_limit,
            others: others.prepare(),
        }
    }
}

type HttpRequest = http::Request<tonic::body::Body>;

impl tower_service::Service<HttpRequest> for Dispatch {
    type Response = Reply;
    type Error = Infallible;
    type Future = Either<
        Answered<BoxFuture<Result<Reply, Infallible>>>,
        <Routes as tower_service::Service<HttpRequest>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        std::task::ready!(tower_service::Service::<HttpRequest>::poll_ready(
            &mut self.rate_limit,
            cx
        ))?;
        tower_service::Service::<HttpRequest>::poll_ready(&mut self.others, cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        if request.uri().path() == SHOULD_RATE_LIMIT {
            Either::Left(tower_service::Service::call(&mut self.rate_limit, request))
        } else {
            Either::Right(tower_service::Service::call(&mut self.others, request))
        }
    }
}

/// One ShouldRateLimit call.
struct ShouldRateLimit(Arc<App>);

/// Most answers are decided at once and need no future of their own; only those that wait on
/// Redis (leases, strict limits) are boxed.
type Replied = Result<Response<Answer>, Status>;

impl UnaryService<Bytes> for ShouldRateLimit {
    type Response = Answer;
    type Future = Either<Ready<Replied>, BoxFuture<Replied>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let app = &self.0;
        let span = app.traces.as_ref().map(|traces| {
            // Read here for the span; the pipeline reads (and checks) it again.
            let call = Call::read(request.get_ref()).unwrap_or_default();
            traces.call(request.metadata(), call.domain, call.descriptor_count())
        });
        match service::answer_at_once(app, request.into_inner(), service::Patience::AsRules) {
            service::Answered::Now(answer) => Either::Left(ready(reply(span, answer))),
            service::Answered::Later(unfinished) => {
                let app = app.clone();
                Either::Right(Box::pin(async move {
                    reply(span, unfinished.finish(&app).await)
                }))
            }
        }
    }
}

/// The route's codec: the answer written by [`Answer`]'s own encoding, the request handed on
/// as its bytes (a slice of the frame tonic read, not a copy), which the pipeline reads in
/// place ([`Call::read`]).
struct ShouldRateLimitCodec;

impl Codec for ShouldRateLimitCodec {
    type Encode = Answer;
    type Decode = Bytes;
    type Encoder = AnswerWriter;
    type Decoder = RequestBytes;

    fn encoder(&mut self) -> Self::Encoder {
        AnswerWriter
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestBytes
    }
}

/// Writes an answer into tonic's buffer. prost's `Message::encode` (what tonic-prost's encoder
/// calls) first sums the whole answer's length to check the buffer has room, then each
/// status's length again as it writes it; tonic's buffer grows as it is written, so the first
/// pass only cost time (about 700 instructions at five descriptors).
struct AnswerWriter;

impl Encoder for AnswerWriter {
    type Item = Answer;
    type Error = Status;

    fn encode(&mut self, answer: Answer, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        answer.encode_raw(buf);
        Ok(())
    }
}

/// Hands on a request message's bytes.
struct RequestBytes;

impl Decoder for RequestBytes {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// The answer as tonic sends it, its outcome recorded on the call's span.
fn reply(span: Option<CallSpan>, answer: Result<Answer, AnswerError>) -> Replied {
    let answered = answer.map_err(status);
    if let Some(span) = span {
        match &answered {
            Ok(answer) => span.answered(code_name(code(answer.code))),
            Err(status) => span.failed(status.code(), status.message()),
        }
    }
    answered.map(Response::new)
}

/// The one place errors become gRPC statuses. Envoy reads UNKNOWN as "allow"; a bug must
/// surface as UNAVAILABLE, which Envoy hands to its `failure_mode_deny` setting.
fn status(error: AnswerError) -> Status {
    match error {
        AnswerError::Invalid(e) => Status::invalid_argument(e.to_string()),
        AnswerError::Internal => Status::unavailable(error.to_string()),
    }
}

/// A gRPC service whose undecodable requests are answered INVALID_ARGUMENT. tonic answers a
/// body that is not the expected protobuf (or not a valid gRPC frame) with INTERNAL, which
/// reads as a server fault; the fault is the caller's. sluice itself never answers INTERNAL
/// (see [`status`]), so an INTERNAL in the response headers can only be tonic's decode error.
#[derive(Debug, Clone)]
pub struct UndecodableIsInvalid<S>(pub S);

impl<S: NamedService> NamedService for UndecodableIsInvalid<S> {
    const NAME: &'static str = S::NAME;
}

type Reply = http::Response<tonic::body::Body>;

impl<S, B> tower_service::Service<http::Request<B>> for UndecodableIsInvalid<S>
where
    S: tower_service::Service<http::Request<B>, Response = Reply, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = Answered<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        Answered(self.0.call(request))
    }
}

/// The inner service's reply, with a decode failure turned into INVALID_ARGUMENT. Polls the
/// inner future in place: no allocation on the request path.
pub struct Answered<F>(F);

impl<F: Future<Output = Result<Reply, Infallible>> + Unpin> Future for Answered<F> {
    type Output = Result<Reply, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let reply = std::task::ready!(Pin::new(&mut self.0).poll(cx))?;
        // An answer has a body; an error status comes alone, in the headers.
        if !reply.body().is_end_stream() {
            return Poll::Ready(Ok(reply));
        }
        Poll::Ready(Ok(match Status::from_header_map(reply.headers()) {
            Some(status) if status.code() == tonic::Code::Internal => {
                let message = format!("not a valid RateLimitRequest: {}", status.message());
                Status::invalid_argument(message).into_http()
            }
            _ => reply,
        }))
    }
}
