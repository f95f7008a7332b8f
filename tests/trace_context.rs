//! One trace from the POST to every webhook (W3C `traceparent`): a group posted with a
//! client's `traceparent` records it on the ImageGroup, answers it in the response, and
//! every webhook of the group (each image's event and the group's) carries a `traceparent`
//! of that trace id, each with a span id of its own, and the client's `tracestate` as it
//! sent it (a `tracestate` without a valid `traceparent` is dropped, as the spec asks).
//! A group posted without one, or with
//! one that does not parse, gets a new trace, the same across all its webhooks; one applied
//! with kubectl, the trace its uid names. A PATCH with its own trace context moves the
//! group's later events (the new image's, the group's update) to it.

mod common;

crate::real_node_tests!(every_webhook_of_a_group_carries_its_trace);

use std::collections::HashSet;
use std::time::Duration;

use common::{Harness, of_type};
use kinsight::crd::ImageGroup;
use kinsight::dev::ReceivedWebhook;
use kinsight::trace::TraceParent;
use kube::{Api, ResourceExt};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(180);
const CLIENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_STATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// Posts a group of two photos with `traceparent` (when given) and the client's
/// `tracestate`; returns its id and the `traceparent` the answer carries.
async fn post_group(h: &Harness, traceparent: Option<&str>) -> (String, TraceParent) {
    let images: Vec<_> = ["astronaut.png", "coffee.png"]
        .iter()
        .map(|n| json!({ "url": h.photo_url(n) }))
        .collect();
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/image-groups", h.api_url))
        .bearer_auth(&h.api_key)
        .header("tracestate", CLIENT_STATE)
        .json(&json!({ "images": images, "models": [h.models[0]], "webhookUrl": h.hook_url }));
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.expect("POST");
    assert_eq!(response.status().as_u16(), 202);
    let answered = answered_trace(&response);
    let body: serde_json::Value = response.json().await.expect("JSON");
    (body["id"].as_str().expect("id").to_owned(), answered)
}

/// The `traceparent` an answer carries; fails the test when it has none or an invalid one.
fn answered_trace(response: &reqwest::Response) -> TraceParent {
    response
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .expect("the answer carries a valid traceparent")
}

/// The group's webhooks, each event once, once its group event (`image_group.completed`,
/// or `image_group.updated` after a PATCH) arrived.
async fn webhooks_of(h: &mut Harness, group: &str) -> Vec<ReceivedWebhook> {
    webhooks_until(h, group, "image_group.completed").await
}

async fn webhooks_until(h: &mut Harness, group: &str, last: &str) -> Vec<ReceivedWebhook> {
    let mut events: Vec<ReceivedWebhook> = h
        .collect_webhooks(LIMIT, |e| {
            of_type(e, last)
                .iter()
                .any(|g| g.payload["data"]["groupId"] == group)
        })
        .await
        .into_iter()
        .filter(|e| e.payload["data"]["groupId"] == group)
        .collect();
    events.sort_by_key(|e| e.id.clone());
    events.dedup_by_key(|e| e.id.clone());
    events
}

/// Each webhook's `tracestate` header, if any.
fn trace_states(events: &[ReceivedWebhook]) -> Vec<Option<&str>> {
    events
        .iter()
        .map(|e| {
            e.headers
                .iter()
                .find(|(name, _)| name == "tracestate")
                .map(|(_, value)| value.as_str())
        })
        .collect()
}

/// Each webhook's `traceparent`, parsed; fails the test when one lacks it or it is invalid.
fn traces(events: &[ReceivedWebhook]) -> Vec<TraceParent> {
    events
        .iter()
        .map(|e| {
            let header = e
                .headers
                .iter()
                .find(|(name, _)| name == "traceparent")
                .map(|(_, value)| value.as_str())
                .unwrap_or_else(|| panic!("{} has no traceparent", e.payload["type"]));
            TraceParent::parse(header).unwrap_or_else(|| panic!("invalid traceparent {header}"))
        })
        .collect()
}

async fn every_webhook_of_a_group_carries_its_trace() {
    let mut h = Harness::start("tenant-trace").await;

    // The client's trace: answered, recorded on the group, on every webhook.
    let (group, answered) = post_group(&h, Some(CLIENT)).await;
    assert_eq!(answered.trace_id_hex(), CLIENT_TRACE);
    let api: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    let object = api.get(&group).await.expect("the group");
    let recorded = object
        .annotations()
        .get("kinsight.io/traceparent")
        .and_then(|t| TraceParent::parse(t))
        .expect("the group records its trace context");
    assert_eq!(recorded.trace_id_hex(), CLIENT_TRACE);
    assert_eq!(
        object
            .annotations()
            .get("kinsight.io/tracestate")
            .map(String::as_str),
        Some(CLIENT_STATE)
    );

    let events = webhooks_of(&mut h, &group).await;
    // Two images' events and the group's.
    assert_eq!(events.len(), 3, "{events:#?}");
    let traced = traces(&events);
    for trace in &traced {
        assert_eq!(trace.trace_id_hex(), CLIENT_TRACE);
        assert_ne!(hex::encode(trace.span_id), "b7ad6b7169203331");
    }
    // Each delivery is a span of its own.
    let spans: HashSet<[u8; 8]> = traced.iter().map(|t| t.span_id).collect();
    assert_eq!(spans.len(), traced.len(), "{traced:?}");
    // The client's tracestate, on each, as sent.
    assert_eq!(trace_states(&events), vec![Some(CLIENT_STATE); 3]);

    // A PATCH with a traceparent moves the group's later events to that trace, with the
    // PATCH's tracestate: the new image's event and the group's update.
    const PATCHED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = reqwest::Client::new()
        .patch(format!("{}/v1/image-groups/{group}", h.api_url))
        .bearer_auth(&h.api_key)
        .header("traceparent", PATCHED)
        .header("tracestate", "patched=1")
        .json(&json!({ "addImages": [{ "id": "cat", "url": h.photo_url("chelsea.png") }] }))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status().as_u16(), 202);
    let patched_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answered = answered_trace(&response);
    assert_eq!(answered.trace_id_hex(), patched_trace);
    let update = webhooks_until(&mut h, &group, "image_group.updated").await;
    let kinds: Vec<&str> = update
        .iter()
        .filter_map(|e| e.payload["type"].as_str())
        .collect();
    assert!(kinds.contains(&"image_group.updated"), "{kinds:?}");
    assert!(
        of_type(&update, "image.completed")
            .iter()
            .any(|e| e.payload["data"]["imageId"] == "cat"),
        "{update:#?}"
    );
    for event in &update {
        if event.payload["type"] == "image.completed" && event.payload["data"]["imageId"] != "cat" {
            continue;
        }
        let trace = traces(std::slice::from_ref(event)).remove(0);
        assert_eq!(
            trace.trace_id_hex(),
            patched_trace,
            "{}",
            event.payload["type"]
        );
        assert_eq!(
            trace_states(std::slice::from_ref(event)),
            vec![Some("patched=1")]
        );
    }

    // Without a traceparent, and with one that does not parse (ignored, never an error):
    // a new trace each, the same across the group's webhooks.
    let mut seen = HashSet::from([CLIENT_TRACE.to_owned()]);
    for given in [None, Some("00-not-a-trace-01")] {
        let (group, answered) = post_group(&h, given).await;
        let events = webhooks_of(&mut h, &group).await;
        assert_eq!(events.len(), 3, "{events:#?}");
        for trace in traces(&events) {
            assert_eq!(trace.trace_id, answered.trace_id, "{given:?}");
        }
        // Its tracestate belonged to no trace we continue: not sent on.
        assert_eq!(trace_states(&events), vec![None; 3], "{given:?}");
        assert!(
            seen.insert(answered.trace_id_hex()),
            "a new trace for {given:?}"
        );
    }

    // A group applied with kubectl (no annotation): its uid is its trace id.
    let groups = h.create_unreachable_group("applied", 2, json!({})).await;
    let uid = groups
        .get("applied")
        .await
        .expect("the group")
        .uid()
        .expect("uid");
    let events = webhooks_of(&mut h, "applied").await;
    assert_eq!(events.len(), 3, "{events:#?}");
    for trace in traces(&events) {
        assert_eq!(trace.trace_id_hex(), uid.replace('-', ""));
    }
}
