//! Sick webhook endpoints against the real control plane: circuits that open, probe and
//! close (the backlog draining by itself), endpoints disabled after the failure window,
//! per-subscription retry policies, and per-endpoint concurrency and throttling. What is
//! checked is what an operator sees: the subscription's status and Events, the group's
//! deliveries, metrics, and what the receivers got.

mod common;

crate::real_node_tests!(
    a_sick_endpoint_is_paused_probed_and_drains_its_backlog_when_it_recovers,
    an_endpoint_failing_for_the_whole_window_is_disabled_until_its_spec_changes,
    slow_and_throttling_endpoints_are_bounded_without_holding_up_the_others,
);

use std::time::Duration;

use common::scripted_receiver::{Attempt, Reply, Scripted};
use common::{Harness, eventually};
use kinsight::crd::{CircuitState, EndpointHealth, ImageGroup, WebhookSubscription};
use kinsight::delivery::DeliveryState;
use kinsight::webhook::{CircuitConfig, RetrySchedule};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// A signing secret and one subscription per (name, url, extra spec) in the namespace,
/// each Ready.
async fn subscribe(h: &Harness, subs: &[(&str, String, serde_json::Value)]) {
    let secret = kinsight::webhook::generate_secret();
    h.subscribe("receiver-key", &secret, subs, LIMIT).await;
}

/// What the subscription's status says of its endpoint.
async fn endpoint_health(h: &Harness, name: &str) -> EndpointHealth {
    subscription(h, name)
        .await
        .status
        .and_then(|s| s.health)
        .expect("health in the subscription's status")
}

async fn subscription(h: &Harness, name: &str) -> WebhookSubscription {
    let api: Api<WebhookSubscription> = Api::namespaced(h.client.clone(), &h.namespace);
    api.get(name).await.expect("subscription")
}

/// The status of a condition, followed by its reason: e.g. `False/CircuitOpen`.
async fn condition_with_reason(h: &Harness, name: &str, kind: &str) -> String {
    let sub = subscription(h, name).await;
    sub.status
        .iter()
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == kind)
        .map(|c| format!("{}/{}", c.status, c.reason))
        .unwrap_or_default()
}

async fn post_group(h: &Harness, images: usize) -> String {
    let images: Vec<_> = (0..images)
        .map(|i| json!({ "id": format!("img-{i}"), "url": h.photo_url("coffee.png") }))
        .collect();
    let (status, body) = h
        .post(
            "/v1/image-groups",
            json!({ "images": images, "models": ["image_classification"] }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn group(h: &Harness, name: &str) -> ImageGroup {
    let api: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    api.get(name).await.expect("group")
}

fn image_events(attempts: &[Attempt]) -> Vec<&Attempt> {
    attempts
        .iter()
        .filter(|a| a.event == "image.completed")
        .collect()
}

async fn a_sick_endpoint_is_paused_probed_and_drains_its_backlog_when_it_recovers() {
    let h = Harness::start_configured("tenant-circuit", |c| {
        c.circuit = CircuitConfig {
            failure_threshold: 3,
            cool_down: Duration::from_secs(2),
            max_cool_down: Duration::from_secs(2),
            max_concurrency: 4,
            ..CircuitConfig::default()
        };
        // Without a circuit, every event would burn a retry every second.
        c.retry = RetrySchedule(vec![Duration::from_secs(1); 30]);
        c.health_sync = Duration::from_millis(500);
    })
    .await;
    let (scripted, base, _server) = Scripted::start().await;
    scripted.fallback("/sick", Reply::Status(500));
    subscribe(
        &h,
        &[
            ("sick", format!("{base}/sick"), json!({})),
            ("fine", format!("{base}/fine"), json!({})),
        ],
    )
    .await;
    let name = post_group(&h, 4).await;

    // Three failures open the circuit; the subscription says so.
    eventually("the sick endpoint's circuit opens", LIMIT, async || {
        condition_with_reason(&h, "sick", "Healthy").await == "False/CircuitOpen"
    })
    .await;
    let health = endpoint_health(&h, "sick").await;
    assert!(
        matches!(health.circuit, CircuitState::Open | CircuitState::HalfOpen),
        "{health:?}"
    );
    assert!(health.consecutive_failures >= 3, "{health:?}");
    assert!(health.failing_since.is_some(), "{health:?}");
    let last = health.last_delivery.expect("last delivery");
    assert_eq!(
        (last.outcome.as_str(), last.status_code),
        ("Failed", Some(500))
    );
    assert_eq!(h.metric("kinsight_webhook_open_circuits"), Some(1.0));

    // While it is open, its events wait: only single probes reach it, one per cool-down,
    // instead of four events retrying every second.
    let before = scripted.attempts("/sick").len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = scripted.attempts("/sick").len() - before;
    assert!(
        (1..=4).contains(&during),
        "{during} requests in 6 s while open"
    );
    let deliveries = h.deliveries(&name).await;
    let sick: Vec<_> = deliveries
        .iter()
        .filter(|d| d.endpoint == "subscription/sick")
        .collect();
    assert_eq!(sick.len(), 4, "{sick:#?}");
    assert!(
        sick.iter().all(|d| d.state == DeliveryState::Pending),
        "waiting events keep their retries: {sick:#?}"
    );
    assert!(
        sick.iter().map(|d| d.attempts).sum::<u32>() <= 3 + 4,
        "{sick:#?}"
    );
    // The other endpoint is not held up.
    assert_eq!(image_events(&scripted.attempts("/fine")).len(), 4);
    assert!(
        h.event_reasons("sick")
            .await
            .contains(&"WebhookCircuitOpened".to_owned())
    );

    // It recovers: the next probe succeeds, the circuit closes and the backlog drains,
    // followed by the group event to both endpoints.
    scripted.fallback("/sick", Reply::Status(204));
    eventually("every delivery succeeds", LIMIT, async || {
        let deliveries = h.deliveries(&name).await;
        deliveries.len() == 10
            && deliveries
                .iter()
                .all(|d| d.state == DeliveryState::Delivered)
    })
    .await;
    // The status counts them per endpoint (once the dispatcher's outcomes reached the
    // leader's next reconcile), and lists no delivery of its own.
    eventually("the status counts every delivery", LIMIT, async || {
        let counted = group(&h, &name).await.status?.deliveries;
        (counted.len() == 2
            && counted
                .iter()
                .all(|c| (c.delivered, c.pending, c.failed) == (5, 0, 0)))
        .then_some(())
    })
    .await;
    eventually("the subscription is healthy again", LIMIT, async || {
        condition_with_reason(&h, "sick", "Healthy").await == "True/Delivering"
    })
    .await;
    let health = endpoint_health(&h, "sick").await;
    assert_eq!(health.circuit, CircuitState::Closed);
    assert_eq!(health.consecutive_failures, 0);
    assert!(health.last_success_at.is_some());
    let received = scripted.attempts("/sick");
    let mut ids: Vec<&str> = image_events(&received)
        .iter()
        .map(|a| a.webhook_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        4,
        "every image event reached the recovered endpoint"
    );
    assert_eq!(h.metric("kinsight_webhook_open_circuits"), Some(0.0));
    // Subscriptions' circuits are kept (their status records them), idle or not.
    assert_eq!(h.metric("kinsight_webhook_tracked_endpoints"), Some(2.0));
    assert!(
        h.event_reasons("sick")
            .await
            .contains(&"WebhookCircuitClosed".to_owned())
    );
}

async fn an_endpoint_failing_for_the_whole_window_is_disabled_until_its_spec_changes() {
    let h = Harness::start_configured("tenant-disable", |c| {
        c.circuit = CircuitConfig {
            failure_threshold: 2,
            cool_down: Duration::from_secs(1),
            max_cool_down: Duration::from_secs(1),
            disable_after: Duration::from_secs(6),
            ..CircuitConfig::default()
        };
        c.retry = RetrySchedule(vec![Duration::from_secs(1); 30]);
        c.health_sync = Duration::from_millis(500);
    })
    .await;
    let (scripted, base, _server) = Scripted::start().await;
    scripted.fallback("/dead", Reply::Status(500));
    // Fails twice, then would accept: but its own retry policy allows one retry only.
    scripted.script("/once", vec![Reply::Status(500), Reply::Status(500)]);
    subscribe(
        &h,
        &[
            ("dead", format!("{base}/dead"), json!({})),
            (
                "impatient",
                format!("{base}/once"),
                json!({ "eventTypes": ["image.completed"], "retryPolicy": { "schedule": ["300ms"] } }),
            ),
        ],
    )
    .await;
    let name = post_group(&h, 1).await;

    eventually("the dead endpoint is disabled", LIMIT, async || {
        condition_with_reason(&h, "dead", "Healthy").await == "False/Disabled"
    })
    .await;
    assert_eq!(
        condition_with_reason(&h, "dead", "Ready").await,
        "False/Disabled"
    );
    let health = endpoint_health(&h, "dead").await;
    assert_eq!(health.circuit, CircuitState::Disabled);
    let reason = health.disabled_reason.unwrap_or_default();
    assert!(reason.contains("failure window 6s"), "{reason}");
    assert!(health.disabled_at.is_some());
    assert!(
        h.event_reasons("dead")
            .await
            .contains(&"WebhookEndpointDisabled".to_owned())
    );
    assert_eq!(h.metric("kinsight_webhook_disabled_endpoints"), Some(1.0));

    // Its events are failed, not kept forever; the group's deliveries settle.
    eventually("the group's deliveries settle", LIMIT, async || {
        group(&h, &name).await.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "WebhooksDelivered" && c.reason == "SomeFailed")
        })
    })
    .await;
    let deliveries = h.deliveries(&name).await;
    let dead: Vec<_> = deliveries
        .iter()
        .filter(|d| d.endpoint == "subscription/dead")
        .collect();
    assert_eq!(dead.len(), 2, "image and group event: {deliveries:#?}");
    for d in &dead {
        assert_eq!(d.state, DeliveryState::Failed, "{d:?}");
        let error = d.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("endpoint disabled"), "{error}");
    }
    // The per-subscription retry policy: one retry, then failed for good (the default
    // schedule would have retried thirty times, and the third attempt would have worked).
    let impatient = deliveries
        .iter()
        .find(|d| d.endpoint == "subscription/impatient")
        .expect("impatient delivery");
    assert_eq!(
        (impatient.state, impatient.attempts),
        (DeliveryState::Failed, 2),
        "{impatient:?}"
    );
    assert_eq!(image_events(&scripted.attempts("/once")).len(), 2);

    // The operator fixes the endpoint: a new spec enables it again, and a replay sends
    // what failed there, under the same webhook-id.
    scripted.fallback("/alive", Reply::Status(204));
    let subs: Api<WebhookSubscription> = Api::namespaced(h.client.clone(), &h.namespace);
    subs.patch(
        "dead",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "url": format!("{base}/alive") } })),
    )
    .await
    .expect("patch subscription");
    eventually("the subscription is enabled again", LIMIT, async || {
        condition_with_reason(&h, "dead", "Ready").await == "True/Valid"
    })
    .await;
    let health = endpoint_health(&h, "dead").await;
    assert_eq!(
        (health.circuit, health.consecutive_failures),
        (CircuitState::Closed, 0)
    );
    let since = dead
        .iter()
        .map(|d| d.created_at)
        .min()
        .expect("a failed delivery");
    let (status, body) = h
        .post(
            "/v1/deliveries/replay",
            json!({ "since": since.to_string() }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let failed_image_id = dead
        .iter()
        .find(|d| d.event == "image.completed")
        .map(|d| d.id.clone())
        .expect("image event");
    eventually("the replay reaches the fixed endpoint", LIMIT, async || {
        scripted
            .attempts("/alive")
            .iter()
            .any(|a| a.webhook_id == failed_image_id)
    })
    .await;
}

async fn slow_and_throttling_endpoints_are_bounded_without_holding_up_the_others() {
    let h = Harness::start_configured("tenant-bounds", |c| {
        c.circuit = CircuitConfig {
            max_concurrency: 3,
            ..CircuitConfig::default()
        };
        c.retry = RetrySchedule(vec![Duration::from_secs(1); 5]);
        // The bound is counted by the receiver: an attempt the sender gave up on would
        // free its slot while the receiver still held it, so none may time out here,
        // however loaded the machine.
        c.sender.timeout = Duration::from_secs(10);
    })
    .await;
    let (scripted, base, _server) = Scripted::start().await;
    // Slow but successful (well inside the timeout).
    scripted.fallback("/slow", Reply::Hang(Duration::from_millis(1000)));
    scripted.script("/throttled", vec![Reply::RetryAfter(429, 2)]);
    scripted.fallback("/throttled", Reply::Hang(Duration::from_millis(100)));
    subscribe(
        &h,
        &[
            ("slow", format!("{base}/slow"), json!({})),
            ("throttled", format!("{base}/throttled"), json!({})),
            ("quick", format!("{base}/quick"), json!({})),
        ],
    )
    .await;
    let images = 10;
    let name = post_group(&h, images).await;
    eventually("every delivery succeeds", LIMIT, async || {
        let deliveries = h.deliveries(&name).await;
        deliveries.len() == 3 * (images + 1)
            && deliveries
                .iter()
                .all(|d| d.state == DeliveryState::Delivered)
    })
    .await;

    // No more than the bound at once, and the bound is used.
    let slow_max = scripted.max_in_flight("/slow");
    assert!((2..=3).contains(&slow_max), "{slow_max} in flight at once");

    // A 429 with Retry-After pauses that whole endpoint, not just the one event: nothing
    // else arrives there until it has passed (requests already under way aside).
    let throttled = scripted.attempts("/throttled");
    let first = throttled.first().expect("an attempt").at;
    let quiet: Vec<Duration> = throttled
        .iter()
        .map(|a| a.at - first)
        .filter(|gap| *gap > Duration::from_millis(300) && *gap < Duration::from_millis(1900))
        .collect();
    assert!(quiet.is_empty(), "attempts during the pause: {quiet:?}");
    assert!(
        throttled.len() > images,
        "the throttled endpoint got every event in the end"
    );

    // Each image event reached the quick endpoint no later than the slow one: the quick
    // one never waited for the slow endpoint's slots.
    let quick = scripted.attempts("/quick");
    let slow = scripted.attempts("/slow");
    assert_eq!(image_events(&quick).len(), images);
    let mut waited_behind_slow = Vec::new();
    for q in image_events(&quick) {
        let s = image_events(&slow)
            .into_iter()
            .find(|s| s.image == q.image)
            .expect("the same event at the slow endpoint");
        if q.at > s.at + Duration::from_millis(200) {
            waited_behind_slow.push((q.image.clone(), q.at - s.at));
        }
    }
    assert!(waited_behind_slow.is_empty(), "{waited_behind_slow:?}");
}
