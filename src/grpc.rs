//! `RateLimitService` for tonic: hands each call to [`service::answer`](crate::service::answer)
//! and turns its errors into gRPC statuses.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use crate::app::App;
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
        service::answer(&self.app, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
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
