//! Two controller replicas against a real API server: one holds the Lease and reconciles;
//! when it dies the other takes over and finishes the work.

mod common;

use std::time::Duration;

use common::{Harness, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use kinsight::controller::{LEASE_NAME, LeaderElection, run_as_leader};
use kube::Api;
use serde_json::json;

fn election(identity: &str) -> LeaderElection {
    LeaderElection {
        namespace: "kinsight-system".into(),
        identity: identity.into(),
        lease: Duration::from_secs(3),
        grace: Duration::from_secs(1),
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let mut h = Harness::start("tenant-leader").await;
    // The harness' own (unelected) controller stays out of this test.
    h.kill_controller().await;
    let config = h.controller_config();
    let first = tokio::spawn(run_as_leader(
        h.client.clone(),
        h.store.clone(),
        config.clone(),
        election("replica-a"),
    ));
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), "kinsight-system");
    let leader = eventually("a Lease holder", Duration::from_secs(10), async || {
        holder(&leases).await
    })
    .await;
    assert_eq!(leader, "replica-a");
    let second = tokio::spawn(run_as_leader(
        h.client.clone(),
        h.store.clone(),
        config,
        election("replica-b"),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        holder(&leases).await.as_deref(),
        Some("replica-a"),
        "the standby waits while the leader renews"
    );
    assert!(!second.is_finished());

    // The leader dies without releasing the lease; the standby takes over and does the work.
    first.abort();
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
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-b"));
    second.abort();
}

#[tokio::test]
async fn nonsensical_lease_timings_are_refused_not_panicked_on() {
    kinsight::install_crypto_provider();
    let client = kube::Client::try_from(kube::Config::new(
        "https://127.0.0.1:1".parse().expect("url"),
    ))
    .expect("client");
    let mut bad = election("x");
    bad.grace = Duration::from_secs(5);
    let nowhere = kinsight::store::Store::lazy("postgres://kinsight@127.0.0.1:1/kinsight")
        .expect("a database URL");
    let err = run_as_leader(
        client,
        nowhere,
        kinsight::controller::ControllerConfig::default(),
        bad,
    )
    .await
    .expect_err("refused");
    assert_eq!(err.category(), "configuration");
}
