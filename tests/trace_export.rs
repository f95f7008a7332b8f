//! Spans exported over OTLP/HTTP land in the client's trace: with the exporter pointed at a
//! receiver on the real node's bridge address (the API, controller and dispatcher in this
//! process; the worker, a container on the real node, by the standard
//! OTEL_EXPORTER_OTLP_ENDPOINT on its Job), a
//! group posted with a `traceparent` gets spans of that trace id from the request, the
//! reconciles, the deliveries and the worker (its per-image fetch, decode and model runs
//! included), each the child of the span that led to it. The worker exports OTLP/JSON
//! (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`), this process protobuf, the default.

mod common;

crate::real_node_tests!(spans_of_the_clients_trace_reach_the_collector);

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use common::{Harness, of_type};
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const CLIENT: &str = "00-5b8aa5a2d2c872e8321cf37308d69df2-051581bf3cb55c13-01";
const CLIENT_TRACE: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
const CLIENT_SPAN: &str = "051581bf3cb55c13";

/// One exported span: its service, name, ids and parent.
#[derive(Debug)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

/// The spans in OTLP export requests, each protobuf or JSON as its content type says.
fn decode(bodies: &[(String, Bytes)]) -> Vec<Exported> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let mut spans = Vec::new();
    for (content_type, body) in bodies {
        let request: ExportTraceServiceRequest = if content_type == "application/json" {
            serde_json::from_slice(body).expect("OTLP JSON")
        } else {
            ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf")
        };
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Exported {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex::encode(span.trace_id),
                        span_id: hex::encode(span.span_id),
                        parent: hex::encode(span.parent_span_id),
                    });
                }
            }
        }
    }
    spans
}

/// The spans of the client's trace named `name`, from `service`.
fn named<'a>(spans: &'a [Exported], service: &str, name: &str) -> Vec<&'a Exported> {
    spans
        .iter()
        .filter(|s| s.trace_id == CLIENT_TRACE && s.name == name && s.service.contains(service))
        .collect()
}

async fn spans_of_the_clients_trace_reach_the_collector() {
    let received: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let sink = received.clone();
    let collector = common::serve_on(
        common::pod_address(),
        axum::Router::new().route(
            "/v1/traces",
            post(
                move |headers: axum::http::HeaderMap, body: Bytes| async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    sink.lock().expect("lock").push((content_type, body));
                    "{}"
                },
            ),
        ),
    )
    .await;
    let provider =
        kinsight::trace::export::provider("kinsight-test", Some(&format!("{collector}/v1/traces")))
            .expect("exporter");
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(kinsight::trace::export::layer(&provider))
        .init();

    let mut h = Harness::start_configured("tenant-export", |config| {
        config
            .worker_env
            .push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.clone()));
        config
            .worker_env
            .push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/json".into()));
    })
    .await;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/image-groups", h.api_url))
        .bearer_auth(&h.api_key)
        .header("traceparent", CLIENT)
        .json(&json!({
            "images": [{ "url": h.photo_url("astronaut.png") }],
            "models": [h.models[0]],
            "webhookUrl": h.hook_url,
        }))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 202);
    let events = h
        .collect_webhooks(Duration::from_secs(180), |e| {
            !of_type(e, "image_group.completed").is_empty()
        })
        .await;

    // The worker flushed its spans as it exited; ours leave on a flush.
    let flushing = provider.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush())
        .await
        .expect("flush")
        .expect("flushed");
    let webhook_spans: Vec<String> = events
        .iter()
        .filter_map(|e| e.headers.iter().find(|(name, _)| name == "traceparent"))
        .map(|(_, value)| value.split('-').nth(2).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        webhook_spans.len(),
        events.len(),
        "every webhook has a traceparent"
    );
    let spans = common::eventually(
        "the worker's, the control plane's and every webhook's spans arrive",
        Duration::from_secs(30),
        async || {
            let spans = decode(&received.lock().expect("lock"));
            // Each webhook's traceparent names an exported delivery span (a delivery's span
            // ends after the receiver answered: it may come in a later batch).
            let delivered = named(&spans, "kinsight-test", "deliver");
            let arrived = webhook_spans
                .iter()
                .all(|id| delivered.iter().any(|s| &s.span_id == id))
                && ["create_group", "reconcile"]
                    .iter()
                    .all(|name| !named(&spans, "kinsight-test", name).is_empty())
                && ["worker", "fetch", "inference", "decode", "model"]
                    .iter()
                    .all(|name| !named(&spans, "kinsight-worker", name).is_empty());
            arrived.then_some(spans)
        },
    )
    .await;
    // The worker's requests came as JSON, ours as protobuf.
    let encodings: std::collections::BTreeSet<String> = received
        .lock()
        .expect("lock")
        .iter()
        .map(|(content_type, _)| content_type.clone())
        .collect();
    assert_eq!(
        encodings.into_iter().collect::<Vec<_>>(),
        ["application/json", "application/x-protobuf"]
    );
    // The request is a child of the client's span; reconciles and deliveries of the
    // request's; the worker of a reconcile (the one that made its Job); each image's fetch and
    // inference of the worker.
    let request = named(&spans, "kinsight-test", "create_group");
    assert_eq!(request.len(), 1, "{request:?}");
    assert_eq!(request[0].parent, CLIENT_SPAN);
    for name in ["reconcile", "deliver"] {
        for span in named(&spans, "kinsight-test", name) {
            assert_eq!(span.parent, request[0].span_id, "{span:?}");
        }
    }
    let reconciles: Vec<&str> = named(&spans, "kinsight-test", "reconcile")
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();
    let worker = named(&spans, "kinsight-worker", "worker");
    assert_eq!(worker.len(), 1, "{worker:?}");
    assert!(
        reconciles.contains(&worker[0].parent.as_str()),
        "{worker:?}"
    );
    for name in ["fetch", "inference"] {
        for span in named(&spans, "kinsight-worker", name) {
            assert_eq!(span.parent, worker[0].span_id, "{span:?}");
        }
    }
    // An image's decode and model runs are children of its inference span.
    let inference: Vec<&str> = named(&spans, "kinsight-worker", "inference")
        .iter()
        .map(|s| s.span_id.as_str())
        .collect();
    for name in ["decode", "model"] {
        for span in named(&spans, "kinsight-worker", name) {
            assert!(inference.contains(&span.parent.as_str()), "{span:?}");
        }
    }
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .expect("shutdown")
        .expect("shut down");
}
