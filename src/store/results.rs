//! Per-image results: written in batches by the result ingest (one statement per batch,
//! idempotent per image and generation), read by the controller and the REST API.

use std::collections::HashMap;

use tokio_postgres::Row;
use tokio_postgres::types::Json;

use super::Prepared;
use super::deliveries::{insert_bodies, insert_deliveries};
use super::notify::{ALL_STORED, DISPATCH_CHANNEL, RESULTS_CHANNEL};
use super::{Store, StoreError, record_group};
use crate::delivery::{Delivery, DraftEvent, EventBodies, EventLedger, EventPlanner};
use crate::results::{GroupRef, ImageFailure, ImageResult, ModelResult, Timings};

/// Columns of `image_results`, in the order [`from_row`] reads them (a macro, so that each
/// statement naming them stays one fixed text, as [`super::Prepared`] wants).
macro_rules! columns {
    () => {
        "image_id, failure, width, height, perceptual_hash, outputs, timings"
    };
}

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
        self.store_results(group, generation, results, None)
            .await
            .map(|_| ())
    }

    /// [`Store::write_results`], and in the same transaction the image events that the
    /// results call for (by `planner`'s rules, to the endpoints the group's last plan
    /// recorded), numbered under the group's row lock: the dispatchers can send them as soon
    /// as this returns, without waiting for a reconcile. An event recorded before keeps its
    /// number and body (a batch sent twice plans nothing new). Returns the deliveries added.
    pub async fn store_results(
        &self,
        group: &GroupRef,
        generation: i64,
        results: &[ImageResult],
        planner: Option<&dyn EventPlanner>,
    ) -> Result<usize, StoreError> {
        let records = serde_json::to_value(results)
            .map_err(|e| StoreError::Corrupt(format!("serialising results: {e}")))?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The group's row first: writes of the group's events take their numbers in turn.
        // It is there after the group's first write or plan: made here only when it is not.
        const LEDGER: &str = "SELECT endpoints, stopped_endpoints, last_sequence FROM groups
                              WHERE uid = $1 FOR UPDATE";
        let ledger = match planner {
            Some(_) => Some(match tx.query_opt_cached(LEDGER, &[&group.uid]).await? {
                Some(row) => row,
                None => {
                    record_group(&tx, group).await?;
                    tx.query_one_cached(LEDGER, &[&group.uid]).await?
                }
            }),
            None => {
                record_group(&tx, group).await?;
                None
            }
        };
        let rows = tx
            .query_cached(
                concat!(
                    r#"INSERT INTO image_results
                   (group_uid, image_id, generation, failure, width, height, perceptual_hash,
                    outputs, timings)
               SELECT $1, r."imageId", $2, r.failure, r.width, r.height, r."perceptualHash",
                      COALESCE(r.outputs, '{}'::jsonb), COALESCE(r.timings, '{}'::jsonb)
               FROM jsonb_to_recordset($3::jsonb) AS r(
                   "imageId" text, failure jsonb, width integer, height integer,
                   "perceptualHash" text, outputs jsonb, timings jsonb)
               ON CONFLICT (group_uid, image_id) DO UPDATE SET
                   generation = GREATEST(image_results.generation, EXCLUDED.generation),
                   failure = COALESCE(EXCLUDED.failure, image_results.failure),
                   width = COALESCE(EXCLUDED.width, image_results.width),
                   height = COALESCE(EXCLUDED.height, image_results.height),
                   perceptual_hash = COALESCE(EXCLUDED.perceptual_hash, image_results.perceptual_hash),
                   outputs = image_results.outputs || EXCLUDED.outputs,
                   timings = EXCLUDED.timings,
                   updated_at = now()
               RETURNING "#,
                    columns!(),
                    ", (xmax = 0) AS inserted"
                ),
                &[&group.uid, &generation, &Json(&records)],
            )
            .await?;
        // Images whose first result this is are no longer in flight (the row was inserted,
        // not updated: xmax is 0).
        let mut first = 0;
        for row in &rows {
            if row.try_get::<_, bool>("inserted")? {
                first += 1;
            }
        }
        super::admissions::lower_open(&tx, &group.namespace, &group.name, first).await?;
        let (mut planned, mut numbered) = (0, None);
        if let (Some(planner), Some(row)) = (planner, ledger) {
            let stored = rows
                .iter()
                .map(|row| from_row(&group.name, row))
                .collect::<Result<Vec<_>, _>>()?;
            let Json(endpoints): Json<serde_json::Value> = row.try_get("endpoints")?;
            let ledger = EventLedger {
                endpoints,
                stopped: row.try_get("stopped_endpoints")?,
            };
            let last: i64 = row.try_get("last_sequence")?;
            let drafts = planner.image_events(&stored, &ledger);
            (planned, numbered) =
                record_drafts(&tx, group, planner, &stored, &drafts, last).await?;
        }
        let mut key = format!("{}/{}", group.namespace, group.name);
        // One update of the group's row for its last event number and its count of stored
        // images. A write that stored new images may have stored the group's last: the
        // count, kept under the row lock (taken here if not above), says so in O(1) and to
        // exactly one of two writes that commit together.
        if first > 0 || numbered.is_some() {
            let stored: i64 = tx
                .query_one_cached(
                    "UPDATE groups SET results_stored = results_stored + $2,
                                       last_sequence = GREATEST(last_sequence, $3::bigint)
                     WHERE uid = $1 RETURNING results_stored",
                    &[&group.uid, &first, &numbered],
                )
                .await?
                .try_get(0)?;
            if first > 0
                && planner
                    .is_some_and(|p| usize::try_from(stored).is_ok_and(|n| n >= p.images_total()))
            {
                key.push_str(ALL_STORED);
            }
        }
        // The dispatchers are told in the same statement when there is something to send.
        let (channels, payloads): (Vec<&str>, Vec<&str>) = [(RESULTS_CHANNEL, key.as_str())]
            .into_iter()
            .chain((planned > 0).then_some((DISPATCH_CHANNEL, "")))
            .unzip();
        tx.execute_cached(
            "SELECT pg_notify(n.channel, n.payload)
             FROM unnest($1::text[], $2::text[]) AS n(channel, payload)",
            &[&channels, &payloads],
        )
        .await?;
        tx.commit().await?;
        Ok(planned)
    }

    /// Every stored result of a group, by image id.
    pub async fn group_results(
        &self,
        group: &GroupRef,
    ) -> Result<HashMap<String, ImageResult>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM image_results WHERE group_uid = $1"
                ),
                &[&group.uid],
            )
            .await?;
        rows.iter()
            .map(|row| from_row(&group.name, row).map(|r| (r.image_id.clone(), r)))
            .collect()
    }

    /// The stored results of the group's images `ids` (a page of them), by image id.
    pub async fn results_of_images(
        &self,
        group: &GroupRef,
        ids: &[String],
    ) -> Result<HashMap<String, ImageResult>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM image_results WHERE group_uid = $1 AND image_id = ANY($2)"
                ),
                &[&group.uid, &ids],
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
            .query_opt_cached(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM image_results WHERE group_uid = $1 AND image_id = $2"
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
            .execute_cached(
                "UPDATE groups SET deleted_at = now() WHERE uid = $1 AND deleted_at IS NULL",
                &[&uid],
            )
            .await?;
        // Its images left unprocessed are no longer in flight.
        client
            .execute_cached("DELETE FROM admissions WHERE uid = $1", &[&uid])
            .await?;
        Ok(())
    }

    /// Marks every group of the store (of `namespace`, or of every namespace) that is not
    /// among `live` (the uids of the cluster's ImageGroups, listed just before) as gone:
    /// groups deleted while no controller was watching. Groups stored in the last ten minutes are left alone: they may have been
    /// created after the list.
    pub async fn forget_groups_except(
        &self,
        namespace: Option<&str>,
        live: &[String],
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        // `$2` NULL: every namespace's groups; else only that namespace's (a controller
        // watching one namespace knows nothing of the others').
        client
            .execute_cached(
                "DELETE FROM admissions WHERE (uid IS NULL OR uid <> ALL($1))
                   AND ($2::text IS NULL OR namespace = $2)
                   AND created_at < now() - interval '10 minutes'",
                &[&live, &namespace],
            )
            .await?;
        Ok(client
            .execute_cached(
                "UPDATE groups SET deleted_at = now()
                 WHERE deleted_at IS NULL AND uid <> ALL($1)
                   AND ($2::text IS NULL OR namespace = $2)
                   AND created_at < now() - interval '10 minutes'",
                &[&live, &namespace],
            )
            .await?)
    }

    /// Deletes the rows of every forgotten group (see [`Store::purge_group`]); returns
    /// the results deleted.
    pub async fn purge_forgotten(&self, batch: i64) -> Result<u64, StoreError> {
        let uids: Vec<String> = self
            .client()
            .await?
            .query_cached(
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

    /// Deletes a forgotten group's results, deliveries (with their attempts) and work orders at most
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
                "DELETE FROM work_orders WHERE group_uid = $1 AND name IN (
                     SELECT name FROM work_orders WHERE group_uid = $1 LIMIT $2)
                 AND EXISTS (SELECT 1 FROM groups WHERE uid = $1 AND deleted_at IS NOT NULL)",
                false,
            ),
            (
                "DELETE FROM event_bodies WHERE group_uid = $1 AND sequence IN (
                     SELECT sequence FROM event_bodies WHERE group_uid = $1 LIMIT $2)
                 AND EXISTS (SELECT 1 FROM groups WHERE uid = $1 AND deleted_at IS NOT NULL)",
                false,
            ),
        ] {
            loop {
                let n = client.execute_cached(statement, &[&uid, &batch]).await?;
                if counted {
                    deleted += n;
                }
                if n == 0 {
                    break;
                }
            }
        }
        client
            .execute_cached(
                "DELETE FROM groups WHERE uid = $1 AND deleted_at IS NOT NULL",
                &[&uid],
            )
            .await?;
        Ok(deleted)
    }
}

/// Records the deliveries of `drafts` not recorded yet. An event takes the number it
/// already has at any endpoint, or the next after `last` (with its body, fixed now).
/// Returns the deliveries recorded and the group's new last event number, if any was
/// taken (the caller writes it to the group's row).
async fn record_drafts(
    tx: &deadpool_postgres::Transaction<'_>,
    group: &GroupRef,
    planner: &dyn EventPlanner,
    stored: &[ImageResult],
    drafts: &[DraftEvent],
    last: i64,
) -> Result<(usize, Option<i64>), StoreError> {
    let ids: Vec<&str> = drafts
        .iter()
        .flat_map(|d| d.deliveries.iter().map(|(_, id)| id.as_str()))
        .collect();
    if ids.is_empty() {
        return Ok((0, None));
    }
    // Looked up by key: a batch's events, not the group's.
    let known: HashMap<String, i64> = tx
        .query_cached(
            "SELECT id, sequence FROM deliveries WHERE id = ANY($1)",
            &[&ids],
        )
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, StoreError>>()?;
    let now = jiff::Timestamp::now();
    let start = u64::try_from(last).unwrap_or(0);
    let mut next = start;
    let mut deliveries = Vec::new();
    let mut bodies = EventBodies::new();
    for draft in drafts {
        let Some(result) = stored.get(draft.result) else {
            continue;
        };
        let fresh: Vec<&(String, String)> = draft
            .deliveries
            .iter()
            .filter(|(_, id)| !known.contains_key(id))
            .collect();
        if fresh.is_empty() {
            continue;
        }
        let recorded = draft.deliveries.iter().find_map(|(_, id)| known.get(id));
        let sequence = match recorded {
            Some(s) => u64::try_from(*s).unwrap_or(0),
            None => {
                next += 1;
                if let Some(body) = planner.body(draft, result, next, now) {
                    bodies.insert(next, body);
                }
                next
            }
        };
        deliveries.extend(fresh.into_iter().map(|(endpoint, id)| {
            Delivery::pending(
                id.clone(),
                &draft.event,
                Some(&draft.image_id),
                endpoint,
                sequence,
                now,
            )
        }));
    }
    insert_deliveries(tx, group, &deliveries).await?;
    insert_bodies(tx, group, &bodies).await?;
    let numbered = (next > start).then(|| i64::try_from(next).unwrap_or(i64::MAX));
    Ok((deliveries.len(), numbered))
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
        perceptual_hash: row.try_get("perceptual_hash")?,
        outputs,
        timings,
    })
}
