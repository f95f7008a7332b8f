//! Webhooks are sent by a dispatcher in every controller replica, from the database: two
//! replicas share a group's deliveries and send each event once (claims are `FOR UPDATE
//! SKIP LOCKED`). Both replicas are then killed and PostgreSQL restarted mid-delivery; new
//! replicas finish the work: no event is lost (a repeat keeps its `webhook-id`), no Job is
//! made twice, no result is lost.

mod common;

crate::real_node_tests!(replicas_share_deliveries_and_survive_being_killed_with_a_database_restart);

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, eventually, metric};
use k8s_openapi::api::batch::v1::Job;
use kinsight::controller::{ControllerConfig, LeaderElection, Metrics, run_as_leader};
use kinsight::crd::GroupPhase;
use kinsight::delivery::DeliveryState;
use kinsight::dev::ReceivedWebhook;
use kinsight::shutdown::Shutdown;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

const IMAGES: usize = 150;
/// The group's own webhook and two subscriptions.
const ENDPOINTS: usize = 3;
/// Claimed deliveries each replica works on at once.
const IN_FLIGHT: usize = 25;
const LIMIT: Duration = Duration::from_secs(240);

/// A replica's task: aborting it is the replica dying (its dispatcher's tasks go with it).
struct Replica {
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

impl Replica {
    fn start(h: &Harness, identity: &str) -> Replica {
        let metrics = Arc::new(Metrics::default());
        let config = ControllerConfig {
            metrics: metrics.clone(),
            // A replica holds at most this many claims: the backlog is left for the other
            // one (by default one replica could take a few hundred at once on its own).
            dispatch_in_flight: IN_FLIGHT,
            ..h.controller_config()
        };
        let election = LeaderElection {
            // The installation's own namespace (the chart's `POD_NAMESPACE`).
            namespace: h.keys_namespace.clone(),
            identity: identity.into(),
            lease: Duration::from_secs(3),
            grace: Duration::from_secs(1),
        };
        let (client, store) = (h.client.clone(), h.store.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = run_as_leader(client, store, config, election, Shutdown::never()).await
            {
                eprintln!("replica stopped: {e}");
            }
        });
        Replica { task, metrics }
    }

    /// Events this replica delivered.
    fn delivered(&self) -> f64 {
        metric(
            &self.metrics.encode(),
            r#"kinsight_webhook_attempts_total{outcome="delivered"}"#,
        )
        .unwrap_or(0.0)
    }

    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn distinct(events: &[ReceivedWebhook]) -> HashSet<&str> {
    events.iter().map(|e| e.id.as_str()).collect()
}

async fn replicas_share_deliveries_and_survive_being_killed_with_a_database_restart() {
    let mut h = Harness::start_with_own_database("tenant-dispatch").await;
    // Only the replicas below run the controller.
    h.kill_controller().await;
    let mut replicas = vec![
        Replica::start(&h, "replica-a"),
        Replica::start(&h, "replica-b"),
    ];
    let secret = h.webhook_secret.clone();
    h.subscribe(
        "hook-key",
        &secret,
        &[
            ("first", h.hook_url.clone(), json!({})),
            ("second", h.hook_url.clone(), json!({})),
        ],
        LIMIT,
    )
    .await;
    let groups = h
        .create_unreachable_group("shared", IMAGES, json!({}))
        .await;
    let total = ENDPOINTS * (IMAGES + 1);

    // Both replicas dispatch while delivery runs; none sends an event twice.
    let mut events = h.collect_webhooks(LIMIT, |e| distinct(e).len() >= 30).await;
    let in_before_kill = distinct(&events).len();
    assert_eq!(
        events.len(),
        in_before_kill,
        "no event is sent twice while every replica lives"
    );
    for replica in &mut replicas {
        replica.kill().await;
    }
    h.cluster
        .postgres_mut()
        .expect("the testbed's PostgreSQL")
        .restart()
        .await
        .expect("PostgreSQL restarts");
    // The same pods come back (a restarted pod keeps its name, and takes its claims back).
    replicas.push(Replica::start(&h, "replica-a"));
    replicas.push(Replica::start(&h, "replica-b"));

    let deadline = tokio::time::Instant::now() + LIMIT;
    let everything = |e: &[ReceivedWebhook]| distinct(e).len() >= total;
    if h.collect_webhooks_into(&mut events, deadline, everything, |_| {})
        .await
        .is_err()
    {
        panic!(
            "{} of {total} events arrived: {:#?}",
            distinct(&events).len(),
            common::webhook_summary(&events)
        );
    }
    assert!(
        in_before_kill < total,
        "every event arrived before the replicas were killed; the test shows nothing"
    );
    // A late repeat would show now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(e) = h.webhooks.try_recv() {
        events.push(e);
    }

    // Each image to each endpoint, and the group's completion to each, under one id.
    let mut per_image: HashMap<&str, HashSet<&str>> = HashMap::new();
    for e in &events {
        if let Some(image) = e.payload["data"]["imageId"].as_str() {
            per_image.entry(image).or_default().insert(e.id.as_str());
        }
    }
    assert_eq!(per_image.len(), IMAGES);
    assert!(per_image.values().all(|ids| ids.len() == ENDPOINTS));
    let completed: HashSet<&str> = events
        .iter()
        .filter(|e| e.payload["type"] == "image_group.completed")
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(completed.len(), ENDPOINTS);
    assert_eq!(distinct(&events).len(), total);

    // Claims never overlap (tests/store.rs shows it query by query). The two replicas that
    // finished the work both sent part of it: the backlog left at the kill was shared.
    let delivered: Vec<f64> = replicas.iter().map(Replica::delivered).collect();
    eprintln!("delivered per replica (killed a, killed b, a, b): {delivered:?}");
    assert!(
        delivered[2] > 0.0 && delivered[3] > 0.0,
        "one replica did all the work after the restart: {delivered:?}"
    );
    // Attempts whose answer was still on its way at the kill are made again.
    assert!(
        delivered.iter().sum::<f64>() >= total as f64,
        "{delivered:?}"
    );

    // The store agrees; one Job did the images; every result is kept.
    let stored = eventually("every delivery settled", LIMIT, async || {
        let stored = h.deliveries("shared").await;
        stored
            .iter()
            .all(|d| d.state == DeliveryState::Delivered)
            .then_some(stored)
    })
    .await;
    assert_eq!(stored.len(), total);
    let jobs = Api::<Job>::namespaced(h.client.clone(), &h.namespace)
        .list(&ListParams::default())
        .await
        .expect("jobs");
    assert_eq!(
        jobs.items.len(),
        1,
        "one Job for the group's one generation"
    );
    assert_eq!(h.stored_results("shared").await.len(), IMAGES);
    let status = eventually("the group's final status", LIMIT, async || {
        let status = groups.get("shared").await.ok()?.status?;
        let delivered = status
            .conditions
            .iter()
            .any(|c| c.type_ == "WebhooksDelivered" && c.reason == "AllDelivered");
        (status.phase == GroupPhase::Completed && delivered).then_some(status)
    })
    .await;
    assert_eq!(status.images_failed as usize, IMAGES);
}
