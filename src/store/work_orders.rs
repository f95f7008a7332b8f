//! Worker Jobs' work orders: written by the controller before it creates a Job, read by the
//! Job's pod through the API's internal end (`GET /internal/v1/work-orders/{job}`, with the
//! pod's ServiceAccount token), deleted when the Job is deleted or with the group.

use tokio_postgres::types::Json;

use super::{Store, StoreError, record_group};
use crate::worker::WorkOrder;

impl Store {
    /// Stores the order of the worker Job `name` in `namespace`, replacing an earlier one of
    /// that name (a Job name is the group's name and generation: a group made again under the
    /// same name has the same Job names, and the newest order is the one to run).
    pub async fn save_work_order(
        &self,
        namespace: &str,
        name: &str,
        order: &WorkOrder,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The group's row is what retention and a deleted group's purge go by.
        record_group(&tx, &order.group).await?;
        tx.execute(
            "INSERT INTO work_orders (namespace, name, group_uid, generation, body)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (namespace, name) DO UPDATE SET
                 group_uid = EXCLUDED.group_uid, generation = EXCLUDED.generation,
                 body = EXCLUDED.body, created_at = now()",
            &[
                &namespace,
                &name,
                &order.group.uid,
                &order.generation,
                &Json(order),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
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
            .query_opt(
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
            .execute(
                "DELETE FROM work_orders WHERE namespace = $1 AND name = $2 AND group_uid = $3",
                &[&namespace, &name, &group_uid],
            )
            .await?;
        Ok(deleted > 0)
    }
}
