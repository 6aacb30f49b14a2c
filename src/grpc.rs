//! `RateLimitService` for tonic: hands each call to [`service::answer`](crate::service::answer)
//! and turns its errors into gRPC statuses.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::proto::code_name;
use crate::service::{self, AnswerError};

/// The gRPC face of a server.
pub struct RateLimitGrpc {
    app: Arc<App>,
}

impl RateLimitGrpc {
    /// Serves ShouldRateLimit for `app`.
    pub fn new(app: Arc<App>) -> Self {
        RateLimitGrpc { app }
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let span = self.app.traces.as_ref().map(|traces| {
            let call = request.get_ref();
            traces.call(request.metadata(), &call.domain, call.descriptors.len())
        });
        let answered = service::answer(&self.app, request.into_inner())
            .await
            .map_err(status);
        if let Some(span) = span {
            match &answered {
                Ok(response) => span.answered(code_name(response.overall_code)),
                Err(status) => span.failed(status.code(), status.message()),
            }
        }
        answered.map(Response::new)
    }
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

impl<S: tonic::server::NamedService> tonic::server::NamedService for UndecodableIsInvalid<S> {
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
        Poll::Ready(Ok(match Status::from_header_map(reply.headers()) {
            Some(status) if status.code() == tonic::Code::Internal => {
                let message = format!("not a valid RateLimitRequest: {}", status.message());
                Status::invalid_argument(message).into_http()
            }
            _ => reply,
        }))
    }
}
