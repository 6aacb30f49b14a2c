//! OpenTelemetry traces of ShouldRateLimit, exported over OTLP (gRPC or HTTP/protobuf), off
//! by default. A call's span carries its domain, how many descriptors it held and its outcome;
//! never a descriptor's key or value (API keys travel in them). A caller's `traceparent`
//! (Envoy propagates it) makes the span its child, sampled as the caller decided; otherwise
//! the sampling rate decides. When tracing is off nothing is built and a call pays one branch.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

/// How spans leave the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportProtocol {
    /// OTLP over gRPC (a collector's port 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (a collector's port 4318, path `/v1/traces`).
    Http,
}

/// What tracing needs to start.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// Where the collector listens; `None`: the OTLP default (or `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: Option<String>,
    pub protocol: ExportProtocol,
    /// The share of calls without a sampled parent that are traced (0 to 1).
    pub sampling_rate: f64,
    pub service_name: String,
    /// Resource attributes besides the service name (`service.namespace`, …).
    pub resource: Vec<(String, String)>,
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP trace exporter: {0}")]
pub struct TraceError(#[from] opentelemetry_otlp::ExporterBuildError);

/// The tracer of a running server.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Traces {
    /// Builds the exporter and the tracer. Must run inside the tokio runtime (gRPC export).
    pub fn start(settings: &TraceSettings) -> Result<Traces, TraceError> {
        const TIMEOUT: Duration = Duration::from_secs(5);
        let exporter = match settings.protocol {
            ExportProtocol::Grpc => {
                let builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(TIMEOUT);
                match &settings.endpoint {
                    Some(endpoint) => builder.with_endpoint(endpoint).build()?,
                    None => builder.build()?,
                }
            }
            ExportProtocol::Http => {
                let builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_timeout(TIMEOUT);
                match &settings.endpoint {
                    // The variable names the collector; its traces path is OTLP's.
                    Some(endpoint) => builder
                        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                        .build()?,
                    None => builder.build()?,
                }
            }
        };
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attributes(
                settings
                    .resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sampling_rate)));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sluice");
        Ok(Traces { provider, tracer })
    }

    /// Starts the span of one ShouldRateLimit call, a child of the caller's trace if its
    /// metadata carries one.
    pub fn call(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        domain: &str,
        descriptors: usize,
    ) -> CallSpan {
        let parent = TraceContextPropagator::new().extract(&Headers(metadata));
        let span = self
            .tracer
            .span_builder("ShouldRateLimit")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "envoy.service.ratelimit.v3.RateLimitService"),
                KeyValue::new("rpc.method", "ShouldRateLimit"),
                KeyValue::new("ratelimit.domain", domain.to_string()),
                KeyValue::new("ratelimit.descriptors", descriptors as i64),
            ])
            .start_with_context(&self.tracer, &parent);
        CallSpan(span)
    }

    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "trace exporter did not shut down cleanly");
        }
    }
}

/// The span of one call, ended by [`CallSpan::answered`] or [`CallSpan::failed`].
pub struct CallSpan(opentelemetry_sdk::trace::Span);

impl CallSpan {
    /// The call was answered with `overall` (`OK` or `OVER_LIMIT`).
    pub fn answered(mut self, overall: &'static str) {
        self.0
            .set_attribute(KeyValue::new("ratelimit.outcome", overall));
        self.0.end();
    }

    /// The call got no answer: the gRPC code and why.
    pub fn failed(mut self, code: tonic::Code, message: &str) {
        self.0
            .set_attribute(KeyValue::new("ratelimit.outcome", "ERROR"));
        self.0
            .set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        self.0.set_status(Status::error(message.to_string()));
        self.0.end();
    }
}

/// gRPC metadata as the propagator reads it.
struct Headers<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}
