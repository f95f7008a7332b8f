//! Chaos on the state plane's database: PostgreSQL (the testbed's real server) restarts
//! while a group's results are being stored and its events delivered. Workers retry their
//! batches, the controller's pool and its LISTEN connection come back by themselves, and
//! nothing is lost: every result is stored and every event arrives (with the same
//! `webhook-id` if it arrives twice).

mod common;

crate::real_node_tests!(a_database_restart_mid_delivery_loses_no_result_and_no_event);

use std::collections::HashSet;
use std::time::Duration;

use common::{Harness, eventually, of_type};
use kinsight::crd::{GroupPhase, ImageGroup};
use kube::Api;

/// Enough that the worker is still storing results when the restart comes.
const IMAGES: usize = 40;
const LIMIT: Duration = Duration::from_secs(240);

async fn a_database_restart_mid_delivery_loses_no_result_and_no_event() {
    let mut h = Harness::start_with_own_database("tenant-pg-restart").await;
    let group_id = h
        .post_photo_group(IMAGES, &["image_classification"], &h.hook_url)
        .await;

    // The restart lands once results flow: the first image event is in.
    let mut events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image.completed").is_empty())
        .await;
    let before = events.len();
    h.cluster
        .postgres_mut()
        .expect("the testbed's PostgreSQL")
        .restart()
        .await
        .expect("PostgreSQL restarts");

    let after = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;
    // The test shows what it claims only if images were still under way.
    let images_after = of_type(&after, "image.completed").len();
    assert!(
        images_after > 0,
        "every image event came before the restart ({before} in)"
    );
    events.extend(after);
    // Every image's event, each under one id (a repeat after the restart keeps it).
    let image_events = of_type(&events, "image.completed");
    let ids: HashSet<&str> = image_events.iter().map(|e| e.id.as_str()).collect();
    let images_announced: HashSet<&str> = image_events
        .iter()
        .filter_map(|e| e.payload["data"]["imageId"].as_str())
        .collect();
    assert_eq!(images_announced.len(), IMAGES, "{images_announced:?}");
    assert_eq!(ids.len(), IMAGES, "one webhook-id per image event");
    assert_eq!(of_type(&events, "image_group.completed").len(), 1);

    assert_eq!(h.stored_results(&group_id).await.len(), IMAGES);
    // The group event is saved before the status that says Completed (the ledger first), so
    // the dispatchers may send it a moment before that status is written.
    let groups = Api::<ImageGroup>::namespaced(h.client.clone(), &h.namespace);
    let status = eventually("the group's status says Completed", LIMIT, async || {
        let status = groups.get(&group_id).await.expect("group").status?;
        (status.phase == GroupPhase::Completed).then_some(status)
    })
    .await;
    assert_eq!(status.images_done as usize, IMAGES);
    assert_eq!(status.images_failed, 0, "{status:?}");
}
