//! Images in flight per tenant: posted through the REST API and not yet given a stored
//! result. The API admits a request's images against the tenant's cap in one short
//! transaction under a per-namespace lock (replicas share it, so two cannot both take the
//! last places); the result ingest lowers the count as each image's first result is stored.

use super::Prepared;
use super::{Store, StoreError};

/// What admitting a request's images found.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Counted: the tenant's images in flight, these included.
    Admitted(u64),
    /// Over the cap: the images in flight without these; nothing was counted.
    Full(u64),
}

/// The open images of a namespace. A row without a uid is a create in progress; after a
/// minute it is one that failed midway (its process died), and no longer counts.
const IN_FLIGHT: &str = "SELECT COALESCE(SUM(images_open), 0)::bigint FROM admissions
     WHERE namespace = $1 AND images_open > 0
       AND (uid IS NOT NULL OR created_at > now() - interval '1 minute')";

impl Store {
    /// Counts `images` more in flight for group `name` of `namespace` (`uid` once the group
    /// exists) unless that would take the namespace past `cap`.
    pub async fn admit_images(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        images: u32,
        cap: u32,
    ) -> Result<Admission, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // One admission per namespace at a time, across replicas; released at commit.
        tx.execute_cached(
            "SELECT pg_advisory_xact_lock(hashtextextended('kinsight-admissions/' || $1, 0))",
            &[&namespace],
        )
        .await?;
        let open: i64 = tx.query_one_cached(IN_FLIGHT, &[&namespace]).await?.get(0);
        let open = open.max(0) as u64;
        if open + u64::from(images) > u64::from(cap) {
            return Ok(Admission::Full(open));
        }
        tx.execute_cached(
            "INSERT INTO admissions (namespace, name, uid, images_open) VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, name) DO UPDATE SET
                 images_open = admissions.images_open + EXCLUDED.images_open,
                 uid = COALESCE(EXCLUDED.uid, admissions.uid)",
            &[
                &namespace,
                &name,
                &uid,
                &i32::try_from(images).unwrap_or(i32::MAX),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(Admission::Admitted(open + u64::from(images)))
    }

    /// Records the uid of the group admitted as `name` (it exists now).
    pub async fn admitted_group(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute_cached(
                "UPDATE admissions SET uid = $3 WHERE namespace = $1 AND name = $2",
                &[&namespace, &name, &uid],
            )
            .await?;
        Ok(())
    }

    /// Takes back `images` admitted for `name` whose request failed after all.
    pub async fn withdraw_images(
        &self,
        namespace: &str,
        name: &str,
        images: u32,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lower_open(&tx, namespace, name, images.into()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The images in flight in `namespace`.
    pub async fn images_in_flight(&self, namespace: &str) -> Result<u64, StoreError> {
        let open: i64 = self
            .client()
            .await?
            .query_one_cached(IN_FLIGHT, &[&namespace])
            .await?
            .get(0);
        Ok(open.max(0) as u64)
    }
}

/// Lowers group `name`'s open images by `finished` (its first results stored, or a failed
/// request's images taken back), forgetting the group at 0.
pub(super) async fn lower_open(
    tx: &deadpool_postgres::Transaction<'_>,
    namespace: &str,
    name: &str,
    finished: i64,
) -> Result<(), StoreError> {
    if finished <= 0 {
        return Ok(());
    }
    let finished = i32::try_from(finished).unwrap_or(i32::MAX);
    let open = tx
        .query_opt_cached(
            "UPDATE admissions SET images_open = images_open - $3 WHERE namespace = $1 AND name = $2
             RETURNING images_open",
            &[&namespace, &name, &finished],
        )
        .await?;
    // Most writes leave images open: the row goes only with the last of them.
    if let Some(row) = open
        && row.try_get::<_, i32>(0)? <= 0
    {
        tx.execute_cached(
            "DELETE FROM admissions WHERE namespace = $1 AND name = $2 AND images_open <= 0",
            &[&namespace, &name],
        )
        .await?;
    }
    Ok(())
}
