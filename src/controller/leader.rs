//! Leader election: several controller replicas may run, one reconciles (every one sends
//! webhooks). Uses a
//! `coordination.k8s.io` Lease through kube-lease-manager; a replica that loses the lease
//! stops (its pod restarts and queues up again), so two never reconcile at once.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

use super::{ControllerConfig, ControllerError};

/// The Lease object the replicas compete for.
pub const LEASE_NAME: &str = "kinsight-controller";

#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub namespace: String,
    /// Unique per replica (the pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

impl LeaderElection {
    fn validate(&self) -> Result<(u64, u64), ControllerError> {
        let lease = self.lease.as_secs();
        let grace = self.grace.as_secs();
        if grace == 0 || lease <= grace {
            return Err(ControllerError::Config(format!(
                "leader election needs 0 < grace < lease (whole seconds), got lease {lease}s, grace {grace}s"
            )));
        }
        Ok((lease, grace))
    }
}

/// Dispatches webhooks at once; waits for the lease, then runs the controllers until the
/// lease is lost.
pub async fn run_as_leader(
    client: Client,
    store: crate::store::Store,
    config: ControllerConfig,
    election: LeaderElection,
) -> Result<(), ControllerError> {
    let (lease, grace) = election.validate()?;
    let ctx = super::context(client.clone(), store, config)?;
    // Every replica sends; its claims are named after it, so a restarted pod takes back
    // its own at once.
    let dispatcher = super::dispatch::run(ctx.clone(), election.identity.clone(), false);
    tokio::select! {
        result = lead(client, ctx, election, lease, grace) => result,
        () = dispatcher => Err(ControllerError::Config("the webhook dispatcher stopped".into())),
    }
}

async fn lead(
    client: Client,
    ctx: std::sync::Arc<super::Context>,
    election: LeaderElection,
    lease: u64,
    grace: u64,
) -> Result<(), ControllerError> {
    let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(&election.namespace)
        .with_identity(&election.identity)
        .with_duration(lease)
        .with_grace(grace)
        .build()
        .await
        .map_err(|e| ControllerError::Leadership(e.to_string()))?;
    let (mut leading, _task) = manager.watch().await;
    tracing::info!(identity = %election.identity, "waiting for leadership");
    while !*leading.borrow_and_update() {
        leading
            .changed()
            .await
            .map_err(|_| ControllerError::Leadership("lease manager stopped".into()))?;
    }
    tracing::info!(identity = %election.identity, "became leader");
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                break;
            }
        }
    };
    tokio::select! {
        result = super::reconcile(ctx) => result,
        () = lost => Err(ControllerError::Leadership("lost the lease".into())),
    }
}
