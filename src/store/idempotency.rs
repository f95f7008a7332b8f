//! The REST API's `Idempotency-Key`s: a request claims its tenant's key atomically (replicas
//! share the table), then records its answer, which every retry gets back, or releases the key
//! when it failed in a way a retry may not (a 5xx).

use std::time::Duration;

use tokio_postgres::types::Json;

use super::Prepared;
use super::{Store, StoreError};

/// How long a key is kept (at least; Stripe's 24 h): a retry within that gets the first answer.
pub const IDEMPOTENCY_KEEP: Duration = Duration::from_secs(24 * 60 * 60);

/// An answer kept for the retries of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// The headers worth answering again (`content-type`, `location`), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a request found when it claimed its key.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyClaim {
    /// The key is this request's: carry it out, then record the answer or release the key,
    /// naming this claim.
    Claimed(String),
    /// An earlier request with the same key and the same request finished: its answer.
    Done(StoredResponse),
    /// An earlier request with the same key is still being carried out.
    InProgress,
    /// The key was used for another request (method, path or body).
    Reused,
}

/// Claims before giving up on a key that keeps going away meanwhile (released or expired
/// between the claim and the look at who holds it).
const CLAIM_TRIES: u32 = 3;

impl Store {
    /// Claims `key` of `namespace` for the request hashing to `request_hash`, for `lease`:
    /// a claim older than that whose request never finished (its process died) may be taken
    /// over by a retry of the same request. Keys older than `keep` count as unused.
    pub async fn claim_idempotency_key(
        &self,
        namespace: &str,
        key: &str,
        request_hash: &str,
        lease: Duration,
        keep: Duration,
    ) -> Result<KeyClaim, StoreError> {
        let client = self.client().await?;
        let claim = hex::encode(rand::random::<[u8; 16]>());
        for _ in 0..CLAIM_TRIES {
            // One statement: two replicas claiming at once cannot both win.
            let claimed = client
                .query_opt_cached(
                    "INSERT INTO idempotency_keys AS k
                         (namespace, key, request_hash, claim, claimed_until)
                     VALUES ($1, $2, $3, $4, now() + $5 * interval '1 second')
                     ON CONFLICT (namespace, key) DO UPDATE
                     SET request_hash = EXCLUDED.request_hash, claim = EXCLUDED.claim,
                         claimed_until = EXCLUDED.claimed_until, created_at = now(),
                         status = NULL, response_headers = NULL, response_body = NULL,
                         completed_at = NULL
                     WHERE k.created_at < now() - $6 * interval '1 second'
                        OR (k.status IS NULL AND k.claimed_until < now()
                            AND k.request_hash = EXCLUDED.request_hash)
                     RETURNING claim",
                    &[
                        &namespace,
                        &key,
                        &request_hash,
                        &claim,
                        &lease.as_secs_f64(),
                        &keep.as_secs_f64(),
                    ],
                )
                .await?;
            if claimed.is_some() {
                return Ok(KeyClaim::Claimed(claim));
            }
            let held = client
                .query_opt_cached(
                    "SELECT request_hash, status, response_headers, response_body
                     FROM idempotency_keys WHERE namespace = $1 AND key = $2",
                    &[&namespace, &key],
                )
                .await?;
            let Some(row) = held else {
                // Released or purged since the claim was tried: try again.
                continue;
            };
            let held_hash: String = row.try_get("request_hash")?;
            if held_hash != request_hash {
                return Ok(KeyClaim::Reused);
            }
            let Some(status) = row.try_get::<_, Option<i16>>("status")? else {
                return Ok(KeyClaim::InProgress);
            };
            let status = u16::try_from(status)
                .map_err(|_| StoreError::Corrupt(format!("idempotent answer status {status}")))?;
            let headers: Option<Json<Vec<(String, String)>>> = row.try_get("response_headers")?;
            let body: Option<Vec<u8>> = row.try_get("response_body")?;
            return Ok(KeyClaim::Done(StoredResponse {
                status,
                headers: headers.map(|Json(h)| h).unwrap_or_default(),
                body: body.unwrap_or_default(),
            }));
        }
        // It went away and came back every time: as busy as a request in progress.
        Ok(KeyClaim::InProgress)
    }

    /// Records the answer of the request holding `claim`; returns whether it still held it.
    pub async fn record_idempotent_response(
        &self,
        namespace: &str,
        key: &str,
        claim: &str,
        response: &StoredResponse,
    ) -> Result<bool, StoreError> {
        let status = i16::try_from(response.status)
            .map_err(|_| StoreError::Corrupt(format!("HTTP status {}", response.status)))?;
        let updated = self
            .client()
            .await?
            .execute_cached(
                "UPDATE idempotency_keys
                 SET status = $4, response_headers = $5, response_body = $6, completed_at = now()
                 WHERE namespace = $1 AND key = $2 AND claim = $3 AND status IS NULL",
                &[
                    &namespace,
                    &key,
                    &claim,
                    &status,
                    &Json(&response.headers),
                    &response.body,
                ],
            )
            .await?;
        Ok(updated == 1)
    }

    /// Gives the key up, so that a retry of the request that held `claim` runs again.
    pub async fn release_idempotency_key(
        &self,
        namespace: &str,
        key: &str,
        claim: &str,
    ) -> Result<bool, StoreError> {
        let deleted = self
            .client()
            .await?
            .execute_cached(
                "DELETE FROM idempotency_keys
                 WHERE namespace = $1 AND key = $2 AND claim = $3 AND status IS NULL",
                &[&namespace, &key, &claim],
            )
            .await?;
        Ok(deleted == 1)
    }

    /// Deletes the keys older than `keep`, at most `batch` rows per statement; returns how
    /// many went.
    pub async fn purge_idempotency_keys(
        &self,
        keep: Duration,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut deleted = 0;
        loop {
            let n = client
                .execute_cached(
                    "DELETE FROM idempotency_keys WHERE (namespace, key) IN (
                         SELECT namespace, key FROM idempotency_keys
                         WHERE created_at < now() - $1 * interval '1 second'
                         LIMIT $2)
                     AND created_at < now() - $1 * interval '1 second'",
                    &[&keep.as_secs_f64(), &batch],
                )
                .await?;
            deleted += n;
            if n == 0 {
                return Ok(deleted);
            }
        }
    }
}
