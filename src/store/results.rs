//! Per-image results: written in batches by the result ingest (one statement per batch,
//! idempotent per image and generation), read by the controller and the REST API.

use std::collections::HashMap;

use tokio_postgres::Row;
use tokio_postgres::types::Json;

use super::notify::GROUPS_CHANNEL;
use super::{Store, StoreError, record_group};
use crate::results::{GroupRef, ImageFailure, ImageResult, ModelResult, Timings};

/// Columns of `image_results`, in the order [`from_row`] reads them.
const COLUMNS: &str = "image_id, failure, width, height, outputs, timings";

impl Store {
    /// Stores a batch of results of one group and wakes whoever listens for the group.
    /// Outputs of models run earlier on the same image are kept next to the new ones, a
    /// failure once recorded stays, and the same batch written twice leaves the same rows.
    pub async fn write_results(
        &self,
        group: &GroupRef,
        generation: i64,
        results: &[ImageResult],
    ) -> Result<(), StoreError> {
        let records = serde_json::to_value(results)
            .map_err(|e| StoreError::Corrupt(format!("serialising results: {e}")))?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        record_group(&tx, group).await?;
        tx.execute(
            r#"INSERT INTO image_results
                   (group_uid, image_id, generation, failure, width, height, outputs, timings)
               SELECT $1, r."imageId", $2, r.failure, r.width, r.height,
                      COALESCE(r.outputs, '{}'::jsonb), COALESCE(r.timings, '{}'::jsonb)
               FROM jsonb_to_recordset($3::jsonb) AS r(
                   "imageId" text, failure jsonb, width integer, height integer,
                   outputs jsonb, timings jsonb)
               ON CONFLICT (group_uid, image_id) DO UPDATE SET
                   generation = GREATEST(image_results.generation, EXCLUDED.generation),
                   failure = COALESCE(EXCLUDED.failure, image_results.failure),
                   width = COALESCE(EXCLUDED.width, image_results.width),
                   height = COALESCE(EXCLUDED.height, image_results.height),
                   outputs = image_results.outputs || EXCLUDED.outputs,
                   timings = EXCLUDED.timings,
                   updated_at = now()"#,
            &[&group.uid, &generation, &Json(&records)],
        )
        .await?;
        let key = format!("{}/{}", group.namespace, group.name);
        tx.execute("SELECT pg_notify($1, $2)", &[&GROUPS_CHANNEL, &key])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every stored result of a group, by image id.
    pub async fn group_results(
        &self,
        group: &GroupRef,
    ) -> Result<HashMap<String, ImageResult>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {COLUMNS} FROM image_results WHERE group_uid = $1"),
                &[&group.uid],
            )
            .await?;
        rows.iter()
            .map(|row| from_row(&group.name, row).map(|r| (r.image_id.clone(), r)))
            .collect()
    }

    /// One image's result, if it has one.
    pub async fn image_result(
        &self,
        group: &GroupRef,
        image_id: &str,
    ) -> Result<Option<ImageResult>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM image_results WHERE group_uid = $1 AND image_id = $2"
                ),
                &[&group.uid, &image_id],
            )
            .await?;
        row.map(|row| from_row(&group.name, &row)).transpose()
    }

    /// Deletes a group that is gone from the cluster: marks it, then purges its rows in
    /// batches (see [`Store::purge_group`]); a purge cut short is finished by
    /// [`Store::purge_forgotten`].
    pub async fn remove_group(&self, uid: &str, batch: i64) -> Result<u64, StoreError> {
        self.forget_group(uid).await?;
        self.purge_group(uid, batch).await
    }

    /// Marks groups gone from the cluster; their rows are deleted by [`Store::purge_forgotten`].
    pub async fn forget_group(&self, uid: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE groups SET deleted_at = now() WHERE uid = $1 AND deleted_at IS NULL",
                &[&uid],
            )
            .await?;
        Ok(())
    }

    /// Marks every group of the store that is not among `live` (the uids of the cluster's
    /// ImageGroups, listed just before) as gone: groups deleted while no controller was
    /// watching. Groups stored in the last ten minutes are left alone: they may have been
    /// created after the list.
    pub async fn forget_groups_except(&self, live: &[String]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute(
                "UPDATE groups SET deleted_at = now()
                 WHERE deleted_at IS NULL AND uid <> ALL($1)
                   AND created_at < now() - interval '10 minutes'",
                &[&live],
            )
            .await?)
    }

    /// Deletes the rows of every forgotten group (see [`Store::purge_group`]); returns
    /// the results deleted.
    pub async fn purge_forgotten(&self, batch: i64) -> Result<u64, StoreError> {
        let uids: Vec<String> = self
            .client()
            .await?
            .query(
                "SELECT uid FROM groups WHERE deleted_at IS NOT NULL ORDER BY deleted_at LIMIT 1000",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut deleted = 0;
        for uid in uids {
            deleted += self.purge_group(&uid, batch).await?;
        }
        Ok(deleted)
    }

    /// Deletes a forgotten group's results and deliveries (with their attempts) at most
    /// `batch` rows per statement, so that no single DELETE holds locks or bloats the log for
    /// long, then the group's own row. Returns the results and deliveries deleted.
    pub async fn purge_group(&self, uid: &str, batch: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut deleted = 0;
        // (statement, whether its rows count): event bodies (one per event) do not.
        for (statement, counted) in [
            (
                "DELETE FROM image_results WHERE group_uid = $1 AND image_id IN (
                     SELECT image_id FROM image_results WHERE group_uid = $1 LIMIT $2)
                 AND EXISTS (SELECT 1 FROM groups WHERE uid = $1 AND deleted_at IS NOT NULL)",
                true,
            ),
            (
                "DELETE FROM deliveries WHERE group_uid = $1 AND id IN (
                     SELECT id FROM deliveries WHERE group_uid = $1 LIMIT $2)
                 AND EXISTS (SELECT 1 FROM groups WHERE uid = $1 AND deleted_at IS NOT NULL)",
                true,
            ),
            (
                "DELETE FROM event_bodies WHERE group_uid = $1 AND sequence IN (
                     SELECT sequence FROM event_bodies WHERE group_uid = $1 LIMIT $2)
                 AND EXISTS (SELECT 1 FROM groups WHERE uid = $1 AND deleted_at IS NOT NULL)",
                false,
            ),
        ] {
            loop {
                let n = client.execute(statement, &[&uid, &batch]).await?;
                if counted {
                    deleted += n;
                }
                if n == 0 {
                    break;
                }
            }
        }
        client
            .execute(
                "DELETE FROM groups WHERE uid = $1 AND deleted_at IS NOT NULL",
                &[&uid],
            )
            .await?;
        Ok(deleted)
    }
}

fn from_row(group: &str, row: &Row) -> Result<ImageResult, StoreError> {
    let corrupt = |what: &str, e: serde_json::Error| {
        StoreError::Corrupt(format!("{what} of a result of group {group}: {e}"))
    };
    let failure: Option<Json<serde_json::Value>> = row.try_get("failure")?;
    let failure: Option<ImageFailure> = failure
        .map(|Json(v)| serde_json::from_value(v))
        .transpose()
        .map_err(|e| corrupt("failure", e))?;
    let Json(outputs): Json<serde_json::Value> = row.try_get("outputs")?;
    let outputs: std::collections::BTreeMap<String, ModelResult> =
        serde_json::from_value(outputs).map_err(|e| corrupt("outputs", e))?;
    let Json(timings): Json<serde_json::Value> = row.try_get("timings")?;
    let timings: Timings = serde_json::from_value(timings).map_err(|e| corrupt("timings", e))?;
    let width: Option<i32> = row.try_get("width")?;
    let height: Option<i32> = row.try_get("height")?;
    Ok(ImageResult {
        group: group.to_owned(),
        image_id: row.try_get("image_id")?,
        failure,
        width: width.and_then(|w| u32::try_from(w).ok()),
        height: height.and_then(|h| u32::try_from(h).ok()),
        outputs,
        timings,
    })
}
