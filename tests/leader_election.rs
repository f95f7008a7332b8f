//! Two controller replicas against a real API server: one holds the Lease and reconciles;
//! when it dies the other takes over and finishes the work; when it is asked to stop it
//! hands the lease over at once.

mod common;

crate::real_node_tests!(
    a_standby_replica_takes_over_when_the_leader_dies,
    a_leader_asked_to_stop_hands_the_lease_to_the_standby_at_once,
    nonsensical_lease_timings_are_refused_not_panicked_on
);

use std::time::Duration;

use common::{Harness, eventually};
use kinsight::controller::{LeaderElection, run_as_leader};
use kinsight::shutdown::Shutdown;
use serde_json::json;

/// The Lease lives in the API keys' namespace, the installation's own (the chart's
/// `POD_NAMESPACE`).
fn election(namespace: &str, identity: &str) -> LeaderElection {
    LeaderElection {
        namespace: namespace.to_owned(),
        identity: identity.into(),
        lease: Duration::from_secs(3),
        grace: Duration::from_secs(1),
    }
}

type Replica = tokio::task::JoinHandle<Result<(), kinsight::controller::ControllerError>>;

/// Replica A (stopped by `a_shutdown`) leads; then standby B starts and waits while A renews.
async fn leader_and_standby(
    h: &mut Harness,
    a: LeaderElection,
    a_shutdown: Shutdown,
    b: LeaderElection,
) -> (Replica, Replica) {
    // The harness' own (unelected) controller stays out of these tests.
    h.kill_controller().await;
    let config = h.controller_config();
    let first = tokio::spawn(run_as_leader(
        h.client.clone(),
        h.store.clone(),
        config.clone(),
        a,
        a_shutdown,
    ));
    let leader = eventually("a Lease holder", Duration::from_secs(10), async || {
        h.lease_holder().await
    })
    .await;
    assert_eq!(leader, "replica-a");
    let second = tokio::spawn(run_as_leader(
        h.client.clone(),
        h.store.clone(),
        config,
        b,
        Shutdown::never(),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        h.lease_holder().await.as_deref(),
        Some("replica-a"),
        "the standby waits while the leader renews"
    );
    assert!(!second.is_finished());
    (first, second)
}

/// An image posted now is processed and its events delivered (by whoever leads).
async fn an_image_gets_its_events(h: &mut Harness) {
    let (status, body) = h
        .post("/v1/images", json!({ "url": h.photo_url("coffee.png"), "models": ["image_classification"], "webhookUrl": h.hook_url }))
        .await;
    assert_eq!(status, 202, "{body}");
    let events = h
        .collect_webhooks(Duration::from_secs(120), |e| {
            e.iter()
                .any(|e| e.payload["type"] == "image_group.completed")
        })
        .await;
    assert!(
        events
            .iter()
            .any(|e| e.payload["type"] == "image.completed")
    );
}

async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let mut h = Harness::start("tenant-leader").await;
    let (a, b) = (
        election(&h.keys_namespace, "replica-a"),
        election(&h.keys_namespace, "replica-b"),
    );
    let (first, second) = leader_and_standby(&mut h, a, Shutdown::never(), b).await;

    // The leader dies without releasing the lease; the standby takes over and does the work.
    first.abort();
    an_image_gets_its_events(&mut h).await;
    assert_eq!(h.lease_holder().await.as_deref(), Some("replica-b"));
    second.abort();
}

async fn a_leader_asked_to_stop_hands_the_lease_to_the_standby_at_once() {
    let mut h = Harness::start("tenant-handover").await;
    // A lease far longer than the hand-over may take: without the release, the standby
    // would wait for it to run out.
    let long = |h: &Harness, identity: &str| LeaderElection {
        lease: Duration::from_secs(40),
        grace: Duration::from_secs(10),
        ..election(&h.keys_namespace, identity)
    };
    let (a, b) = (long(&h, "replica-a"), long(&h, "replica-b"));
    let (stop_first, first_shutdown) = Shutdown::new();
    let (first, second) = leader_and_standby(&mut h, a, first_shutdown, b).await;

    stop_first.fire();
    let asked = std::time::Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(15), first)
        .await
        .expect("the leader stops within 15 s of being asked")
        .expect("no panic");
    assert!(stopped.is_ok(), "a requested stop is no error: {stopped:?}");
    let next = eventually("the standby leads", Duration::from_secs(10), async || {
        h.lease_holder()
            .await
            .filter(|holder| holder == "replica-b")
    })
    .await;
    let took = asked.elapsed();
    eprintln!("hand-over took {:.1} s (lease 40 s)", took.as_secs_f64());
    assert_eq!(next, "replica-b");
    assert!(
        took < Duration::from_secs(15),
        "the standby took {took:?}: it waited for the lease to run out"
    );
    an_image_gets_its_events(&mut h).await;
    second.abort();
}

async fn nonsensical_lease_timings_are_refused_not_panicked_on() {
    kinsight::install_crypto_provider();
    let client = kube::Client::try_from(kube::Config::new(
        "https://127.0.0.1:1".parse().expect("url"),
    ))
    .expect("client");
    let mut bad = election("kinsight-system", "x");
    bad.grace = Duration::from_secs(5);
    let nowhere = kinsight::store::Store::lazy("postgres://kinsight@127.0.0.1:1/kinsight")
        .expect("a database URL");
    let err = run_as_leader(
        client,
        nowhere,
        kinsight::controller::ControllerConfig::default(),
        bad,
        Shutdown::never(),
    )
    .await
    .expect_err("refused");
    assert_eq!(err.category(), "configuration");
}
