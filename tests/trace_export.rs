//! Spans exported over OTLP/HTTP land in the client's trace: with the exporter pointed at a
//! loopback receiver (the API, controller and dispatcher in this process; the worker, a
//! `kinsight worker` process, by the standard OTEL_EXPORTER_OTLP_ENDPOINT on its Job), a
//! group posted with a `traceparent` gets spans of that trace id from the request, the
//! reconciles, the deliveries and the worker (its per-image fetches included).

mod common;

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

/// OTLP/protobuf bodies carry each span's trace id as its 16 raw bytes and names as text:
/// whether a body of `service` has a span `name` of the trace.
fn has_span(bodies: &[Bytes], service: &str, name: &str) -> bool {
    let trace = hex::decode(CLIENT_TRACE).expect("hex");
    let contains = |body: &[u8], what: &[u8]| body.windows(what.len()).any(|w| w == what);
    bodies.iter().any(|body| {
        contains(body, service.as_bytes())
            && contains(body, &trace)
            && contains(body, name.as_bytes())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_the_clients_trace_reach_the_collector() {
    let received: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let sink = received.clone();
    let collector = common::serve_on_loopback(axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| async move {
            sink.lock().expect("lock").push(body);
            "{}"
        }),
    ))
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
    h.collect_webhooks(Duration::from_secs(180), |e| {
        !of_type(e, "image_group.completed").is_empty()
    })
    .await;

    // The worker flushed its spans as it exited; ours leave on a flush.
    let flushing = provider.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush())
        .await
        .expect("flush")
        .expect("flushed");
    common::eventually(
        "the worker's and the control plane's spans arrive",
        Duration::from_secs(30),
        async || {
            let bodies = received.lock().expect("lock").clone();
            has_span(&bodies, "kinsight-test", "create_group")
                && has_span(&bodies, "kinsight-test", "reconcile")
                && has_span(&bodies, "kinsight-test", "deliver")
                && has_span(&bodies, "kinsight-worker", "worker")
                && has_span(&bodies, "kinsight-worker", "fetch")
        },
    )
    .await;
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .expect("shutdown")
        .expect("shut down");
}
