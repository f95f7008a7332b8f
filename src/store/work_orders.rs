//! Worker Jobs' work orders: written by the controller before it creates a Job, read by the
//! Job's pod through the API's internal end (`GET /internal/v1/work-orders/{job}`, with the
//! pod's ServiceAccount token), deleted when the Job is deleted or with the group.
//!
//! Carriers: a worker that has done its Job's own order waits a few seconds for another of
//! its namespace and shape ([`Store::wait_as_carrier`]); the controller hands it the order of
//! a group it admits ([`Store::save_work_order`]) and makes that group's Job with no pod of
//! its own. The carrier takes the order ([`Store::take_carried`]) and marks it done; what a
//! Job carries and has not done is taken up again by its next pod, or taken back by the
//! controller when the carrier's Job ends ([`Store::take_back`]). A hand-over is announced
//! on [`CARRIERS_CHANNEL`], so the carrier's waiting request answers at once.

use std::time::Duration;

use tokio_postgres::types::Json;

use super::Prepared;
use super::notify::{CARRIERS_CHANNEL, carrier_key};
use super::{Store, StoreError, record_group};
use crate::worker::WorkOrder;

impl Store {
    /// Stores the order of the worker Job `name` in `namespace`, replacing an earlier one of
    /// that name (a Job name is the group's name and generation: a group made again under the
    /// same name has the same Job names, and the newest order is the one to run). With
    /// `carry` (the Job's pod shape, and how long a carrier waits), the order goes in the
    /// same transaction to the carrier of `namespace` and that shape that has waited longest
    /// among those that started waiting within that time; returns that carrier's Job. The
    /// wait goes with the order: a carrier takes one at a time and waits again once done.
    pub async fn save_work_order(
        &self,
        namespace: &str,
        name: &str,
        order: &WorkOrder,
        carry: Option<(&str, Duration)>,
    ) -> Result<Option<String>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The group's row is what retention and a deleted group's purge go by.
        record_group(&tx, &order.group).await?;
        let carrier: Option<String> = match carry {
            Some((shape, fresh)) => tx
                .query_opt_cached(
                    "DELETE FROM waiting_carriers WHERE (namespace, job) IN (
                         SELECT namespace, job FROM waiting_carriers
                         WHERE namespace = $1 AND shape = $2
                           AND since > now() - $3 * interval '1 second'
                         ORDER BY since LIMIT 1
                         FOR UPDATE SKIP LOCKED)
                     RETURNING job",
                    &[&namespace, &shape, &fresh.as_secs_f64()],
                )
                .await?
                .map(|row| row.try_get(0))
                .transpose()?,
            None => None,
        };
        // The carrier's long poll is told as the order is committed.
        if let Some(carrier) = &carrier {
            tx.execute_cached(
                "SELECT pg_notify($1, $2)",
                &[&CARRIERS_CHANNEL, &carrier_key(namespace, carrier)],
            )
            .await?;
        }
        tx.execute_cached(
            "INSERT INTO work_orders
                 (namespace, name, group_uid, generation, body, carrier, carried_at)
             VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $6::text IS NULL THEN NULL ELSE now() END)
             ON CONFLICT (namespace, name) DO UPDATE SET
                 group_uid = EXCLUDED.group_uid, generation = EXCLUDED.generation,
                 body = EXCLUDED.body, created_at = now(), carrier = EXCLUDED.carrier,
                 carried_at = EXCLUDED.carried_at, carrier_done_at = NULL",
            &[
                &namespace,
                &name,
                &order.group.uid,
                &order.generation,
                &Json(order),
                &carrier,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(carrier)
    }

    /// The order of the worker Job `name` in `namespace`, if there is one.
    pub async fn work_order(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<WorkOrder>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt_cached(
                "SELECT body FROM work_orders WHERE namespace = $1 AND name = $2",
                &[&namespace, &name],
            )
            .await?;
        row.map(|row| {
            let body: Json<WorkOrder> = row
                .try_get(0)
                .map_err(|e| StoreError::Corrupt(format!("work order {namespace}/{name}: {e}")))?;
            Ok(body.0)
        })
        .transpose()
    }

    /// Deletes the order of the Job `name` of group `group_uid` (a Job deleted; not the
    /// order of a later group's Job of the same name). Returns whether there was one.
    pub async fn delete_work_order(
        &self,
        namespace: &str,
        name: &str,
        group_uid: &str,
    ) -> Result<bool, StoreError> {
        let deleted = self
            .client()
            .await?
            .execute_cached(
                "DELETE FROM work_orders WHERE namespace = $1 AND name = $2 AND group_uid = $3",
                &[&namespace, &name, &group_uid],
            )
            .await?;
        Ok(deleted > 0)
    }

    /// `job` (a worker Job of `namespace` whose pod runs with `shape`) waits for an order.
    pub async fn wait_as_carrier(
        &self,
        namespace: &str,
        job: &str,
        shape: &str,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute_cached(
                "INSERT INTO waiting_carriers (namespace, job, shape) VALUES ($1, $2, $3)
                 ON CONFLICT (namespace, job) DO UPDATE SET shape = EXCLUDED.shape, since = now()",
                &[&namespace, &job, &shape],
            )
            .await?;
        Ok(())
    }

    /// The Jobs of `namespace` whose workers wait for an order now, longest first.
    pub async fn waiting_carriers(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query_cached(
                "SELECT job FROM waiting_carriers WHERE namespace = $1 ORDER BY since",
                &[&namespace],
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StoreError::from))
            .collect()
    }

    /// `job` waits no more. Returns whether it was still waiting (`false`: an order was
    /// handed to it meanwhile, or it never waited).
    pub async fn stop_waiting(&self, namespace: &str, job: &str) -> Result<bool, StoreError> {
        let deleted = self
            .client()
            .await?
            .execute_cached(
                "DELETE FROM waiting_carriers WHERE namespace = $1 AND job = $2",
                &[&namespace, &job],
            )
            .await?;
        Ok(deleted > 0)
    }

    /// The oldest order handed to `job` and not done yet (one its previous pod took and
    /// did not finish included), with its Job's name.
    pub async fn take_carried(
        &self,
        namespace: &str,
        job: &str,
    ) -> Result<Option<(String, WorkOrder)>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt_cached(
                "SELECT name, body FROM work_orders
                 WHERE namespace = $1 AND carrier = $2 AND carrier_done_at IS NULL
                 ORDER BY carried_at LIMIT 1",
                &[&namespace, &job],
            )
            .await?;
        row.map(|row| {
            let name: String = row.try_get(0)?;
            let body: Json<WorkOrder> = row
                .try_get(1)
                .map_err(|e| StoreError::Corrupt(format!("work order {namespace}/{name}: {e}")))?;
            Ok((name, body.0))
        })
        .transpose()
    }

    /// The carrier `job` has stored every result of the order `name`.
    pub async fn carried_done(
        &self,
        namespace: &str,
        name: &str,
        job: &str,
    ) -> Result<bool, StoreError> {
        let done = self
            .client()
            .await?
            .execute_cached(
                "UPDATE work_orders SET carrier_done_at = now()
                 WHERE namespace = $1 AND name = $2 AND carrier = $3",
                &[&namespace, &name, &job],
            )
            .await?;
        Ok(done > 0)
    }

    /// Takes the order `name` back from `carrier` (its Job ended or went): the order's own
    /// Job runs it. Returns whether `carrier` had it.
    pub async fn take_back(
        &self,
        namespace: &str,
        name: &str,
        carrier: &str,
    ) -> Result<bool, StoreError> {
        let taken = self
            .client()
            .await?
            .execute_cached(
                "UPDATE work_orders SET carrier = NULL, carried_at = NULL, carrier_done_at = NULL
                 WHERE namespace = $1 AND name = $2 AND carrier = $3",
                &[&namespace, &name, &carrier],
            )
            .await?;
        Ok(taken > 0)
    }

    /// Whether the Job `job` carries an order it has not done.
    pub async fn carries(&self, namespace: &str, job: &str) -> Result<bool, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt_cached(
                "SELECT 1 FROM work_orders
                 WHERE namespace = $1 AND carrier = $2 AND carrier_done_at IS NULL LIMIT 1",
                &[&namespace, &job],
            )
            .await?;
        Ok(row.is_some())
    }
}
