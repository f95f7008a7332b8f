//! Stored results go with their group: a deleted group's rows are marked by its last
//! reconcile (or, for groups deleted while no controller ran, by a periodic comparison with
//! the cluster's groups) and deleted here in bounded batches, never by one giant DELETE.
//! The REST API's expired Idempotency-Keys go here too, in the same bounded batches.

use std::time::Duration;

use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::PURGE_BATCH;
use crate::crd::ImageGroup;
use crate::store::{IDEMPOTENCY_KEEP, Store};

const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How often the store's groups are compared with the cluster's.
const SWEEP_EVERY: u32 = 10;

/// `namespace`: the one namespace the controller watches, `None`: all of them.
pub async fn run(client: Client, namespace: Option<String>, store: Store) {
    let groups: Api<ImageGroup> = super::watched(&client, namespace.as_deref());
    let mut round = 0_u32;
    let mut tick = tokio::time::interval(PURGE_EVERY);
    loop {
        tick.tick().await;
        if round.is_multiple_of(SWEEP_EVERY) {
            match groups.list_metadata(&ListParams::default()).await {
                Ok(list) => {
                    let live: Vec<String> = list.items.iter().filter_map(|g| g.uid()).collect();
                    match store
                        .forget_groups_except(namespace.as_deref(), &live)
                        .await
                    {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            groups = n,
                            "groups gone from the cluster; their results go"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "comparing stored groups with the cluster's")
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "listing groups for retention"),
            }
        }
        round = round.wrapping_add(1);
        match store.purge_forgotten(PURGE_BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "results and deliveries of deleted groups removed"),
            Err(e) => tracing::warn!(error = %e, "removing the rows of deleted groups"),
        }
        // The REST API's Idempotency-Keys live their 24 h, then go in batches.
        match store
            .purge_idempotency_keys(IDEMPOTENCY_KEEP, PURGE_BATCH)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "expired idempotency keys removed"),
            Err(e) => tracing::warn!(error = %e, "removing expired idempotency keys"),
        }
    }
}
