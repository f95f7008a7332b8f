//! Webhook delivery against misbehaving receivers, on the real control plane: each receiver
//! gets its own group, and each shows the right attempts, spacing and final state in the
//! group's status. Test retry schedule: immediately, 1 s, 2 s (±20% jitter); timeout 2 s.

mod common;

crate::real_node_tests!(each_misbehaving_receiver_gets_the_right_treatment,);

use std::collections::HashMap;
use std::time::Duration;

use common::Harness;
use common::scripted_receiver::{Reply, Scripted, flapping};
use kinsight::crd::ImageGroup;
use kinsight::delivery::{Delivery, DeliveryState};
use kube::Api;
use serde_json::json;

async fn each_misbehaving_receiver_gets_the_right_treatment() {
    let h = Harness::start("tenant-matrix").await;
    let (scripted, base, _server) = Scripted::start().await;
    scripted.script("/flaky", vec![Reply::Status(500), Reply::Status(503)]);
    scripted.script("/throttled", vec![Reply::RetryAfter(429, 3)]);
    scripted.script("/slow", vec![Reply::Hang(Duration::from_secs(5))]);
    scripted.script("/reset", vec![Reply::Reset]);
    scripted.script("/redirect", vec![Reply::Status(302); 3]);
    scripted.script("/huge", vec![Reply::HugeBody]);
    scripted.script("/gone", vec![Reply::Status(410)]);
    let (flap_addr, _flap) = flapping(scripted.clone(), Duration::from_millis(1500)).await;

    let cases = [
        "flaky",
        "throttled",
        "slow",
        "reset",
        "redirect",
        "huge",
        "gone",
        "flapping",
    ];
    let mut groups = HashMap::new();
    for case in cases {
        let hook = if case == "flapping" {
            format!("http://{flap_addr}/flapping")
        } else {
            format!("{base}/{case}")
        };
        let (status, body) = h
            .post(
                "/v1/image-groups",
                json!({ "images": [{ "id": "coffee", "url": h.photo_url("coffee.png") }], "models": ["image_classification"], "webhookUrl": hook }),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        groups.insert(case, body["id"].as_str().expect("id").to_owned());
    }

    // Wait until every group has settled all its deliveries.
    let api: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    let mut settled: HashMap<&str, Vec<Delivery>> = HashMap::new();
    // Eight groups a round: every 500 ms, not the default interval.
    let every = Duration::from_millis(500);
    let all_settled = common::poll_every(every, Duration::from_secs(180), async || {
        for case in cases {
            let Some(status) = api.get(&groups[case]).await.expect("group").status else {
                continue;
            };
            let delivered = status
                .conditions
                .iter()
                .any(|c| c.type_ == "WebhooksDelivered" && c.status == "True");
            let deliveries = h.deliveries(&groups[case]).await;
            let group_event_planned = deliveries.iter().any(|d| d.event != "image.completed");
            let gone_stopped = case == "gone"
                && status.stopped_endpoints.len() == 1
                && status.stopped_endpoints[0].starts_with("request http://");
            if status.images_done == 1 && delivered && (group_event_planned || gone_stopped) {
                settled.insert(case, deliveries);
            }
        }
        settled.len() == cases.len()
    })
    .await;
    assert!(
        all_settled.is_some(),
        "not settled in time: {:?}",
        settled.keys()
    );

    let image_delivery = |case: &str| -> Delivery {
        settled[case]
            .iter()
            .find(|d| d.event == "image.completed")
            .cloned()
            .expect("image event")
    };
    let gaps = |case: &str| -> Vec<Duration> {
        let attempts: Vec<_> = scripted
            .attempts(&format!("/{case}"))
            .into_iter()
            .filter(|a| a.event == "image.completed")
            .collect();
        attempts.windows(2).map(|w| w[1].at - w[0].at).collect()
    };
    // The event arrived, and every attempt of it carried the same webhook-id.
    let same_id_for = |case: &str, event: &str| {
        let ids: Vec<String> = scripted
            .attempts(&format!("/{case}"))
            .into_iter()
            .filter(|a| a.event == event)
            .map(|a| a.webhook_id)
            .collect();
        assert!(
            !ids.is_empty() && ids.iter().all(|i| *i == ids[0]),
            "{case}: {event} arrived, and retries keep the webhook-id: {ids:?}"
        );
    };
    let same_id = |case: &str| same_id_for(case, "image.completed");

    // 500, 503, then success: three attempts, spaced by the schedule.
    let d = image_delivery("flaky");
    assert_eq!(
        (d.state, d.attempts),
        (DeliveryState::Delivered, 3),
        "{d:?}"
    );
    let g = gaps("flaky");
    assert!(
        g[0] >= Duration::from_millis(750) && g[1] >= Duration::from_millis(1550),
        "{g:?}"
    );
    same_id("flaky");

    // 429 with Retry-After: 3 is honoured over the 1 s schedule.
    let d = image_delivery("throttled");
    assert_eq!(
        (d.state, d.attempts),
        (DeliveryState::Delivered, 2),
        "{d:?}"
    );
    assert!(
        gaps("throttled")[0] >= Duration::from_millis(2900),
        "{:?}",
        gaps("throttled")
    );

    // A receiver slower than the timeout fails that attempt; the retry succeeds.
    let d = image_delivery("slow");
    assert_eq!(
        (d.state, d.attempts),
        (DeliveryState::Delivered, 2),
        "{d:?}"
    );
    same_id("slow");

    // A reset connection is a failed attempt too.
    let d = image_delivery("reset");
    assert_eq!(
        (d.state, d.attempts),
        (DeliveryState::Delivered, 2),
        "{d:?}"
    );

    // Redirects are not followed: each 302 fails, and after the schedule the event fails for good.
    let d = image_delivery("redirect");
    assert_eq!((d.state, d.attempts), (DeliveryState::Failed, 3), "{d:?}");
    assert!(
        d.last_error.as_deref().is_some_and(|e| e.contains("302")),
        "{d:?}"
    );
    assert_eq!(
        scripted
            .attempts("/redirect")
            .iter()
            .filter(|a| a.event == "image.completed")
            .count(),
        3
    );

    // A 2xx with an endless body is a success, and reading it stops early.
    let d = image_delivery("huge");
    assert_eq!(
        (d.state, d.attempts),
        (DeliveryState::Delivered, 1),
        "{d:?}"
    );

    // 410 Gone: one attempt, then nothing more to that endpoint, not even the group event.
    let d = image_delivery("gone");
    assert_eq!((d.state, d.attempts), (DeliveryState::Failed, 1), "{d:?}");
    assert_eq!(
        scripted.attempts("/gone").len(),
        1,
        "nothing is sent after 410"
    );
    assert!(
        settled["gone"]
            .iter()
            .all(|d| d.event != "image_group.completed")
    );

    // Down for a while (reset, then refused), then back: delivered by a retry.
    let d = image_delivery("flapping");
    assert_eq!(d.state, DeliveryState::Delivered, "{d:?}");
    assert!(d.attempts >= 2, "{d:?}");

    // What operators see: metrics by outcome, and a Warning Event on the group whose
    // webhook failed for good.
    let text = h.metrics.encode();
    let count = |outcome: &str| -> f64 {
        common::metric(
            &text,
            &format!("kinsight_webhook_attempts_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(count("delivered") >= 12.0, "{text}");
    assert!(count("failed") >= 8.0, "{text}");
    assert!(count("exhausted") >= 1.0 && count("gone") >= 1.0, "{text}");
    assert!(
        text.contains("kinsight_webhook_delivery_latency_seconds_count"),
        "{text}"
    );
    for case in ["redirect", "gone", "flaky"] {
        let reasons = h.event_reasons(&groups[case]).await;
        assert_eq!(
            reasons.contains(&"WebhookDeliveryFailed".to_owned()),
            case != "flaky",
            "{case}: a Warning only for a delivery that failed for good: {reasons:?}"
        );
    }

    // What was not delivered is listed over REST, and a replay sends it again (same id).
    let (status, listed) = h.get("/v1/deliveries?state=failed").await;
    assert_eq!(status, 200, "{listed}");
    let redirect_failed = image_delivery("redirect");
    let failed_ids: Vec<&str> = listed["deliveries"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert!(
        failed_ids.contains(&redirect_failed.id.as_str()),
        "{listed}"
    );
    let (status, per_group) = h
        .get(&format!(
            "/v1/image-groups/{}/deliveries",
            groups["redirect"]
        ))
        .await;
    assert_eq!(status, 200);
    assert!(
        per_group["deliveries"].as_array().is_some_and(|d| d
            .iter()
            .any(|d| d["state"] == "failed" && d["attempts"] == 3)),
        "{per_group}"
    );
    // A group per request (`limit: 1`), following `nextCursor` to the end: each group
    // once.
    let mut request = json!({ "since": "2000-01-01T00:00:00Z", "limit": 1 });
    let (mut replayed, mut pages) = (0, Vec::new());
    loop {
        let (status, page) = h.post("/v1/deliveries/replay", request.clone()).await;
        assert_eq!(status, 202, "{page}");
        let on_page = page["groups"].as_object().expect("groups");
        assert!(on_page.len() <= 1, "{page}");
        replayed += page["replayed"].as_u64().expect("replayed");
        pages.extend(on_page.keys().cloned());
        match page["nextCursor"].as_str() {
            Some(cursor) => request["cursor"] = json!(cursor),
            None => break,
        }
        assert!(pages.len() <= groups.len(), "{pages:?}");
    }
    assert!(replayed >= 2, "{replayed} {pages:?}");
    let mut unique = pages.clone();
    unique.dedup();
    assert_eq!(unique, pages, "every group once, in name order");
    let (status, problem) = h
        .post(
            "/v1/deliveries/replay",
            json!({ "since": "2000-01-01T00:00:00Z", "cursor": "not-a-cursor" }),
        )
        .await;
    assert_eq!(
        (status, &problem["code"]),
        (400, &json!("invalid_parameter")),
        "{problem}"
    );
    let d = common::eventually(
        "the replayed event to be delivered",
        Duration::from_secs(30),
        async || {
            let d = h
                .deliveries(&groups["redirect"])
                .await
                .into_iter()
                .find(|d| d.id == redirect_failed.id)
                .expect("same delivery");
            (d.state == DeliveryState::Delivered).then_some(d)
        },
    )
    .await;
    assert_eq!(d.attempts, 1, "a replay starts a fresh schedule: {d:?}");
    let ids: Vec<String> = scripted
        .attempts("/redirect")
        .into_iter()
        .filter(|a| a.event == "image.completed")
        .map(|a| a.webhook_id)
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(
        ids.iter().all(|i| *i == redirect_failed.id),
        "a replay keeps the webhook-id"
    );
    // ... and the attempt history: every attempt before the replay, then the one after.
    let (status, history) = h
        .get(&format!(
            "/v1/image-groups/{}/deliveries/{}",
            groups["redirect"], redirect_failed.id
        ))
        .await;
    assert_eq!(status, 200, "{history}");
    let outcomes: Vec<&str> = history["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["outcome"].as_str())
        .collect();
    assert_eq!(
        outcomes,
        ["failed", "failed", "failed", "delivered"],
        "{history}"
    );
    assert_eq!(history["attempts"][0]["statusCode"], 302, "{history}");

    // Every receiver that accepted anything got each of its events, with stable ids.
    for case in ["flaky", "throttled", "slow", "reset", "huge", "flapping"] {
        same_id_for(case, "image.completed");
        same_id_for(case, "image_group.completed");
    }
}
