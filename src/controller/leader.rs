//! Leader election: several controller replicas may run, one reconciles (every one sends
//! webhooks). Uses a
//! `coordination.k8s.io` Lease through kube-lease-manager; a replica that loses the lease
//! stops (its pod restarts and queues up again), so two never reconcile at once.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;

use super::{ControllerConfig, ControllerError};
use crate::shutdown::Shutdown;

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
/// lease is lost or `shutdown` fires. On `shutdown` it stops reconciling, hands the lease
/// back (a standby leads within a second or two instead of after the lease runs out) and
/// lets the dispatcher finish the sends in hand.
pub async fn run_as_leader(
    client: Client,
    store: crate::store::Store,
    config: ControllerConfig,
    election: LeaderElection,
    shutdown: Shutdown,
) -> Result<(), ControllerError> {
    let (lease, grace) = election.validate()?;
    let ctx = super::context(client.clone(), store, config)?;
    // Every replica sends; its claims are named after it, so a restarted pod takes back
    // its own at once.
    let dispatcher = super::dispatch::run(
        ctx.clone(),
        election.identity.clone(),
        false,
        shutdown.clone(),
    );
    let leading = lead(client, ctx, election, lease, grace, shutdown.clone());
    tokio::pin!(dispatcher, leading);
    // On a requested stop both return, in either order; anything else ends the process.
    tokio::select! {
        result = &mut leading => {
            if result.is_ok() {
                dispatcher.await;
            }
            result
        }
        () = &mut dispatcher => {
            if shutdown.is_requested() {
                leading.await
            } else {
                Err(ControllerError::Config("the webhook dispatcher stopped".into()))
            }
        }
    }
}

async fn lead(
    client: Client,
    ctx: std::sync::Arc<super::Context>,
    election: LeaderElection,
    lease: u64,
    grace: u64,
    shutdown: Shutdown,
) -> Result<(), ControllerError> {
    let new_manager = || {
        LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(lease)
            .with_grace(grace)
            .build()
    };
    let (mut leading, mut task) = new_manager().await.map_err(leadership)?.watch().await;
    tracing::info!(identity = %election.identity, "waiting for leadership");
    // A standby's lease manager sleeps until the lease it saw would expire; a leader that
    // stops hands the lease back, and this watch notices that at once: a fresh manager then
    // takes the free lease without waiting out the old one.
    let released = released_leases(client.clone(), &election.namespace);
    futures::pin_mut!(released);
    loop {
        enum Next {
            Leading,
            Released,
            Stop,
        }
        let next = tokio::select! {
            became = leading.wait_for(|leads| *leads) => {
                became.map_err(|_| ControllerError::Leadership("lease manager stopped".into()))?;
                Next::Leading
            }
            Some(()) = released.next() => Next::Released,
            () = shutdown.clone().requested() => Next::Stop,
        };
        match next {
            Next::Leading => break,
            Next::Stop => return Ok(()),
            Next::Released => {
                tracing::info!(identity = %election.identity, "the lease was handed back; taking it");
                drop(leading);
                task.abort();
                (leading, task) = new_manager().await.map_err(leadership)?.watch().await;
            }
        }
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
        result = super::reconcile(ctx) => return result,
        () = lost => return Err(ControllerError::Leadership("lost the lease".into())),
        () = shutdown.requested() => {}
    }
    // The lease manager releases the lease once nobody listens to it any more.
    drop(leading);
    match tokio::time::timeout(RELEASE_WAIT, task).await {
        Ok(Ok(Ok(_))) => tracing::info!(identity = %election.identity, "handed the lease back"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(identity = %election.identity, error = %e, "handing the lease back")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "the lease manager's task failed"),
        Err(_) => tracing::warn!("the lease was not handed back within {RELEASE_WAIT:?}"),
    }
    Ok(())
}

fn leadership(e: kube_lease_manager::LeaseManagerError) -> ControllerError {
    ControllerError::Leadership(e.to_string())
}

/// Yields each time the Lease is seen without a holder (handed back, or never taken).
fn released_leases(client: Client, namespace: &str) -> impl futures::Stream<Item = ()> + Send {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={LEASE_NAME}"));
    watcher(leases, config)
        .default_backoff()
        .applied_objects()
        .filter_map(|lease| async move {
            let holder = lease.ok()?.spec?.holder_identity;
            holder.is_none_or(|h| h.is_empty()).then_some(())
        })
}

/// How long a stopping leader waits for the API server to record the lease's release.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
