//! OpenTelemetry traces of ShouldRateLimit, received by OTLP receivers the tests start (gRPC
//! and HTTP/protobuf, on loopback): one span per call, with the domain and the outcome, a
//! caller's trace continued, the sampling rate applied, and no descriptor key or value in any
//! attribute.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use sluice::settings::Settings;

const RULES: &str = "domain: traced\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n";
const SECRET: &str = "sk-live-0123456789";

type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

struct Receiver(Received);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a free loopback port; stops when the test's runtime ends.
async fn grpc_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(Receiver(received.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), received)
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf bodies) on a free loopback port.
async fn http_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = received.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                store.lock().unwrap().push(request);
                ExportTraceServiceResponse::default().encode_to_vec()
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), received)
}

fn spans(received: &Received) -> Vec<Span> {
    received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.resource_spans.iter())
        .flat_map(|r| r.scope_spans.iter())
        .flat_map(|s| s.spans.iter().cloned())
        .collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn traced(
    endpoint: String,
    protocol: sluice::ExportProtocol,
    rate: f64,
) -> impl FnOnce(&mut Settings) {
    move |s| {
        s.tracing = true;
        s.tracing_endpoint = Some(endpoint);
        s.tracing_protocol = protocol;
        s.tracing_sampling_rate = rate;
    }
}

async fn three_calls(server: &TestServer) {
    let key = request("traced", &[&[("api_key", SECRET)]]);
    assert!(is_ok(&server.ok(key.clone()).await));
    assert!(!is_ok(&server.ok(key).await));
    let mut invalid = request("traced", &[&[("api_key", SECRET)]]);
    invalid.domain.clear();
    assert!(server.call(invalid).await.is_err());
}

fn check_spans(spans: &[Span]) {
    assert_eq!(spans.len(), 3, "{spans:?}");
    let outcomes: Vec<Option<String>> = spans
        .iter()
        .map(|s| attribute(s, "ratelimit.outcome"))
        .collect();
    for outcome in ["OK", "OVER_LIMIT", "ERROR"] {
        assert!(outcomes.contains(&Some(outcome.into())), "{outcomes:?}");
    }
    for span in spans {
        assert_eq!(span.name, "ShouldRateLimit");
        if attribute(span, "ratelimit.outcome").as_deref() != Some("ERROR") {
            assert_eq!(
                attribute(span, "ratelimit.domain").as_deref(),
                Some("traced")
            );
        }
        assert_eq!(
            attribute(span, "ratelimit.descriptors").as_deref(),
            Some("1")
        );
        for a in &span.attributes {
            let text = format!("{:?}", a.value);
            assert!(
                !text.contains(SECRET) && !text.contains("api_key"),
                "a descriptor leaked into `{}`: {text}",
                a.key
            );
        }
    }
}

#[tokio::test]
async fn calls_are_traced_over_otlp_grpc_with_the_callers_trace_continued() {
    let (endpoint, received) = grpc_receiver().await;
    let server = start_with(
        &[("traced.yaml", RULES)],
        traced(endpoint, sluice::ExportProtocol::Grpc, 1.0),
    )
    .await;
    three_calls(&server).await;
    // A caller's W3C trace context: the span is its child, in its trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut call = tonic::Request::new(request("traced", &[&[("api_key", "another")]]));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let mut client = server.client.clone();
    client.should_rate_limit(call).await.expect("answered");
    server.stop().await;
    let mut spans = spans(&received);
    let child = spans
        .iter()
        .position(|s| s.parent_span_id == [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        .expect("a span under the caller's");
    let child = spans.remove(child);
    let id: String = child.trace_id.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(id, trace_id);
    check_spans(&spans);
    let resource = received.lock().unwrap()[0].resource_spans[0]
        .resource
        .clone()
        .unwrap();
    assert!(
        resource
            .attributes
            .iter()
            .any(|a| a.key == "service.name"
                && matches!(&a.value.as_ref().unwrap().value, Some(AnyValue::StringValue(v)) if v == "sluice")),
        "{resource:?}"
    );
}

#[tokio::test]
async fn calls_are_traced_over_otlp_http_and_sampled_as_configured() {
    let (endpoint, received) = http_receiver().await;
    let server = start_with(
        &[("traced.yaml", RULES)],
        traced(endpoint, sluice::ExportProtocol::Http, 1.0),
    )
    .await;
    three_calls(&server).await;
    server.stop().await;
    check_spans(&spans(&received));

    // Sampling at 0: calls with no sampled parent are not exported.
    let (endpoint, received) = http_receiver().await;
    let server = start_with(
        &[("traced.yaml", RULES)],
        traced(endpoint, sluice::ExportProtocol::Http, 0.0),
    )
    .await;
    for _ in 0..20 {
        server.ok(request("traced", &[&[("api_key", "k")]])).await;
    }
    server.stop().await;
    assert!(spans(&received).is_empty(), "{:?}", spans(&received));
}
