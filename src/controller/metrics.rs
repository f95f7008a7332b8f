//! Prometheus metrics of the controller, in the OpenMetrics text format (prometheus-client,
//! the official Rust client). Labels are bounded enums, never error texts or ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, atomic::AtomicI64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::webhook::CircuitCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `delivered`, `failed` (will retry), `exhausted` (failed for good), `gone` (410),
    /// `disabled` (given up without an attempt: the endpoint is disabled).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    /// `main` (counted against the caps) or `small` (the small-work lane).
    pub lane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub attempts: Family<OutcomeLabels, Counter>,
    /// From the moment an event is recorded (its result was seen) to its delivery.
    pub delivery_latency: Histogram,
    /// Webhook events waiting for delivery, across groups.
    pub pending: Gauge<i64, AtomicI64>,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    /// Endpoints whose circuit is open (or probing), and endpoints disabled.
    pub open_circuits: Gauge<i64, AtomicI64>,
    pub disabled_endpoints: Gauge<i64, AtomicI64>,
    /// Endpoints whose circuit the controller holds in memory.
    pub tracked_endpoints: Gauge<i64, AtomicI64>,
    /// Worker Jobs kinsight counts as running, by lane (Kueue's not included).
    pub worker_jobs: Family<LaneLabels, Gauge<i64, AtomicI64>>,
    /// Groups waiting for a worker slot.
    pub groups_waiting: Gauge<i64, AtomicI64>,
    pending_by_group: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kinsight");
        let attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome",
            attempts.clone(),
        );
        let delivery_latency = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "webhook_delivery_latency_seconds",
            "Time from an event's result being seen to its delivery",
            delivery_latency.clone(),
        );
        let pending = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "webhook_pending_events",
            "Webhook events waiting for delivery",
            pending.clone(),
        );
        let reconcile_errors = Family::<CategoryLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error category",
            reconcile_errors.clone(),
        );
        let open_circuits = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "webhook_open_circuits",
            "Webhook endpoints whose circuit is open: deliveries paused until a probe succeeds",
            open_circuits.clone(),
        );
        let disabled_endpoints = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "webhook_disabled_endpoints",
            "Webhook endpoints disabled after failing for the whole failure window",
            disabled_endpoints.clone(),
        );
        let tracked_endpoints = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "webhook_tracked_endpoints",
            "Webhook endpoints whose circuit the controller holds in memory (idle group URLs as good as new are forgotten)",
            tracked_endpoints.clone(),
        );
        let worker_jobs = Family::<LaneLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "worker_jobs_running",
            "Worker Jobs running (or admitted and being created), by lane; Kueue's are not counted",
            worker_jobs.clone(),
        );
        let groups_waiting = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "groups_waiting_for_slot",
            "Image groups with worker Jobs waiting for a slot under the caps",
            groups_waiting.clone(),
        );
        Self {
            registry,
            worker_jobs,
            groups_waiting,
            open_circuits,
            disabled_endpoints,
            tracked_endpoints,
            attempts,
            delivery_latency,
            pending,
            reconcile_errors,
            pending_by_group: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn attempt(&self, outcome: &'static str) {
        self.attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn set_circuits(&self, counts: CircuitCounts) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.open_circuits.set(gauge(counts.open));
        self.disabled_endpoints.set(gauge(counts.disabled));
        self.tracked_endpoints.set(gauge(counts.tracked));
    }

    /// Records how many events of one group wait; the gauge is the sum over groups.
    pub fn set_pending(&self, group: &str, pending: usize) {
        let mut by_group = crate::sync::lock(&self.pending_by_group);
        if pending == 0 {
            by_group.remove(group);
        } else {
            by_group.insert(group.to_owned(), i64::try_from(pending).unwrap_or(i64::MAX));
        }
        self.pending.set(by_group.values().sum());
    }

    /// `GET /metrics`, in the OpenMetrics text format (with its content type, so
    /// Prometheus parses it as such).
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    self.encode(),
                )
            }),
        )
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn served_over_http_as_openmetrics() {
        crate::install_crypto_provider();
        let metrics = Arc::new(Metrics::default());
        metrics.attempt("delivered");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(axum::serve(listener, metrics.router()).into_future());
        let response = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("GET /metrics");
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.text().await.expect("body");
        server.abort();
        assert_eq!(
            kind.as_deref(),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        assert!(
            body.contains(r#"kinsight_webhook_attempts_total{outcome="delivered"} 1"#),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[test]
    fn exposes_attempts_latency_and_pending() {
        let m = Metrics::default();
        m.attempt("delivered");
        m.attempt("delivered");
        m.attempt("failed");
        m.delivery_latency.observe(0.2);
        m.set_pending("ns/a", 3);
        m.set_pending("ns/b", 2);
        m.set_pending("ns/a", 0);
        let text = m.encode();
        assert!(
            text.contains(r#"kinsight_webhook_attempts_total{outcome="delivered"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kinsight_webhook_attempts_total{outcome="failed"} 1"#),
            "{text}"
        );
        assert!(text.contains("kinsight_webhook_pending_events 2"), "{text}");
        assert!(
            text.contains("kinsight_webhook_delivery_latency_seconds_count 1"),
            "{text}"
        );
    }
}
