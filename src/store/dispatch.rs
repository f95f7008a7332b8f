//! The dispatchers' side of the deliveries table. Any number of controller replicas claim
//! due deliveries (`FOR UPDATE SKIP LOCKED`, so no two claim the same one); a claim is a
//! lease: the delivery is `Sending` until its `next_attempt_at`, when it is due again should
//! its dispatcher have died. What became of each attempt is written back in batches.

use std::time::Duration;

use tokio_postgres::types::{Json, ToSql};

use super::Prepared;
use super::deliveries::{AttemptColumns, from_row, insert_attempts_sql};
use super::notify::GROUPS_CHANNEL;
use super::{Store, StoreError};
use crate::delivery::{Attempt, Delivery, DeliveryState};
use crate::results::GroupRef;
use crate::trace::TraceContext;

/// A delivery a dispatcher claimed, with its body and what finding its endpoint needs.
#[derive(Clone, Debug)]
pub struct Claimed {
    /// As claimed: `Sending`, with the attempts made before this one.
    pub delivery: Delivery,
    pub group: GroupRef,
    /// The group's ImageGroup is gone: its events are no longer sent.
    pub group_deleted: bool,
    /// Which version of the group's endpoint records is current.
    pub endpoints_version: i64,
    /// The event's trace context, as recorded with it (empty when none was).
    pub trace: TraceContext,
}

/// What one claim took, and how long until the next delivery it left is due.
#[derive(Clone, Debug, Default)]
pub struct Claims {
    pub claimed: Vec<Claimed>,
    /// Until the next open delivery not claimed here is due (zero when one is due now: held
    /// by another dispatcher, or past the claim's limit); `None` when nothing else is open.
    pub next_due_in: Option<Duration>,
}

/// Where a claimed delivery stands after its dispatcher is done with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    pub id: String,
    pub group: GroupRef,
    /// The endpoint's key in the group.
    pub endpoint: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_at: Option<jiff::Timestamp>,
    pub last_error: Option<String>,
    pub delivered_at: Option<jiff::Timestamp>,
}

/// A 410 Gone: nothing more of the group goes to this endpoint at this URL.
#[derive(Clone, Debug, PartialEq)]
pub struct Stop {
    pub group: GroupRef,
    /// The endpoint's key in the group (`request`, `subscription/<name>`).
    pub endpoint: String,
    /// `<key> <url>`, as the group's status lists it.
    pub mark: String,
}

/// The record of a batch of finished claims, written in one transaction.
#[derive(Clone, Debug, Default)]
pub struct Outcomes {
    pub settled: Vec<Settled>,
    pub attempts: Vec<Attempt>,
    pub stops: Vec<Stop>,
}

impl Outcomes {
    pub fn is_empty(&self) -> bool {
        self.settled.is_empty() && self.attempts.is_empty() && self.stops.is_empty()
    }
}

/// The stop reason of deliveries an endpoint's 410 ended.
pub const GONE_ERROR: &str = "endpoint answered 410 Gone; deliveries stopped";

impl Store {
    /// Claims up to `limit` due deliveries for `owner`, oldest due first, for `lease`, and
    /// says in the same statement when the next of the others is due (the dispatcher's wait).
    pub async fn claim_due(
        &self,
        owner: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Claims, StoreError> {
        // The last part sees the table as it was before the statement: the deliveries
        // claimed here still read as due now, so they are left out of it by id. Its one row
        // comes back even when nothing was claimed (claim columns NULL).
        let rows = self
            .client()
            .await?
            .query_cached(
                "WITH due AS (
                     SELECT id, group_uid, sequence FROM deliveries
                     WHERE state IN ('Pending', 'Sending') AND next_attempt_at <= now()
                     ORDER BY next_attempt_at
                     LIMIT $1
                     FOR UPDATE SKIP LOCKED
                 ), claimed AS (
                     UPDATE deliveries d SET state = 'Sending', lease_owner = $2,
                         next_attempt_at = now() + $3 * interval '1 second'
                     FROM due
                     JOIN groups g ON g.uid = due.group_uid
                     LEFT JOIN event_bodies b
                         ON b.group_uid = due.group_uid AND b.sequence = due.sequence
                     WHERE d.id = due.id
                     RETURNING d.id, d.event, d.image_id, d.endpoint, d.sequence, d.created_at,
                         d.state, d.attempts, d.next_attempt_at, d.last_error, d.delivered_at,
                         b.payload,
                         b.traceparent, b.tracestate,
                         d.group_uid, g.namespace, g.name,
                         g.deleted_at IS NOT NULL AS group_deleted, g.endpoints_version
                 ), next AS (
                     SELECT EXTRACT(EPOCH FROM (min(next_attempt_at) - now()))::float8
                         AS next_due_s
                     FROM deliveries
                     WHERE state IN ('Pending', 'Sending')
                       AND id NOT IN (SELECT id FROM due)
                 )
                 SELECT claimed.*, next.next_due_s FROM next LEFT JOIN claimed ON true",
                &[&limit, &owner, &lease.as_secs_f64()],
            )
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        let mut next_due_s: Option<f64> = None;
        for row in &rows {
            next_due_s = row.try_get("next_due_s")?;
            // The one row of a claim that took nothing has no delivery.
            if row.try_get::<_, Option<&str>>("id")?.is_none() {
                continue;
            }
            let mut delivery = from_row(row)?;
            let payload: Option<Json<serde_json::Value>> = row.try_get("payload")?;
            delivery.payload = payload.map(|Json(p)| p);
            claimed.push(Claimed {
                delivery,
                group: GroupRef {
                    namespace: row.try_get("namespace")?,
                    name: row.try_get("name")?,
                    uid: row.try_get("group_uid")?,
                },
                group_deleted: row.try_get("group_deleted")?,
                endpoints_version: row.try_get("endpoints_version")?,
                trace: TraceContext {
                    traceparent: row.try_get("traceparent")?,
                    tracestate: row.try_get("tracestate")?,
                },
            });
        }
        Ok(Claims {
            claimed,
            next_due_in: next_due_s.map(seconds_from_now),
        })
    }

    /// Writes what became of finished claims: each delivery's new state (only while `owner`
    /// still holds it: a replay or an expired lease took it back), its attempt, the 410
    /// stops. Returns the groups (`namespace/name`) where an endpoint that had a delivery
    /// settled here has nothing left to send: their group event may be due.
    ///
    /// One statement (data-modifying CTEs) where no endpoint stopped, the dispatchers'
    /// common case; a transaction with the stops after it otherwise.
    pub async fn record_outcomes(
        &self,
        owner: &str,
        outcomes: &Outcomes,
    ) -> Result<Vec<String>, StoreError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        // Parallel arrays: `unnest` lets the planner look each row up by its key (a JSON
        // record set, estimated at 100 rows, made it scan the whole table per batch).
        let settled = &outcomes.settled;
        let ids: Vec<&str> = settled.iter().map(|s| s.id.as_str()).collect();
        let states: Vec<&str> = settled.iter().map(|s| s.state.as_str()).collect();
        let attempts: Vec<i32> = settled
            .iter()
            .map(|s| i32::try_from(s.attempts).unwrap_or(i32::MAX))
            .collect();
        let next: Vec<Option<jiff::Timestamp>> =
            settled.iter().map(|s| s.next_attempt_at).collect();
        let errors: Vec<Option<&str>> = settled.iter().map(|s| s.last_error.as_deref()).collect();
        let delivered: Vec<Option<jiff::Timestamp>> =
            settled.iter().map(|s| s.delivered_at).collect();
        let attempt_columns = AttemptColumns::new(&outcomes.attempts);
        let mut params: Vec<&(dyn ToSql + Sync)> = attempt_columns.params().to_vec();
        params.extend([
            &ids as &(dyn ToSql + Sync),
            &states,
            &attempts,
            &next,
            &errors,
            &delivered,
            &owner,
        ]);
        // Every part of one statement sees the table as it was before it: the deliveries
        // settled here still read as `Sending` in the check of what is left, so they are
        // left out of it by id.
        const SQL: &str = concat!(
            "WITH attempted AS (",
            insert_attempts_sql!(),
            "), settled AS (
                 UPDATE deliveries d SET state = r.state, attempts = r.attempts,
                     next_attempt_at = r.next_attempt_at, last_error = r.last_error,
                     delivered_at = r.delivered_at, lease_owner = NULL
                 FROM unnest($8::text[], $9::text[], $10::integer[], $11::timestamptz[],
                             $12::text[], $13::timestamptz[])
                     AS r(id, state, attempts, next_attempt_at, last_error, delivered_at)
                 WHERE d.id = r.id AND d.state = 'Sending' AND d.lease_owner = $14
                 RETURNING d.id, d.group_uid, d.endpoint, d.state
             ), closed AS (
                 SELECT id, group_uid, endpoint FROM settled
                 WHERE state NOT IN ('Pending', 'Sending')
             )
             SELECT DISTINCT g.namespace || '/' || g.name
             FROM (SELECT DISTINCT group_uid, endpoint FROM closed) p
             JOIN groups g ON g.uid = p.group_uid
             WHERE NOT EXISTS (
                 SELECT 1 FROM deliveries d
                 WHERE d.group_uid = p.group_uid AND d.endpoint = p.endpoint
                   AND d.state IN ('Pending', 'Sending')
                   AND d.id NOT IN (SELECT id FROM closed))"
        );
        let names = |rows: Vec<tokio_postgres::Row>| {
            rows.iter()
                .map(|row| row.try_get(0))
                .collect::<Result<Vec<String>, _>>()
        };
        if outcomes.stops.is_empty() {
            let rows = self.client().await?.query_cached(SQL, &params).await?;
            return Ok(names(rows)?);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut drained = names(tx.query_cached(SQL, &params).await?)?;
        for stop in &outcomes.stops {
            tx.execute_cached(
                "UPDATE deliveries SET state = 'Failed', next_attempt_at = NULL,
                     lease_owner = NULL, last_error = $3
                 WHERE group_uid = $1 AND endpoint = $2 AND state IN ('Pending', 'Sending')",
                &[&stop.group.uid, &stop.endpoint, &GONE_ERROR],
            )
            .await?;
            tx.execute_cached(
                "UPDATE groups SET stopped_endpoints = array_append(stopped_endpoints, $2)
                 WHERE uid = $1 AND NOT ($2 = ANY(stopped_endpoints))",
                &[&stop.group.uid, &stop.mark],
            )
            .await?;
            // A stopped endpoint has nothing left to send.
            drained.push(format!("{}/{}", stop.group.namespace, stop.group.name));
        }
        tx.commit().await?;
        drained.sort_unstable();
        drained.dedup();
        Ok(drained)
    }

    /// Tells the controller that these groups (`namespace/name`) changed.
    pub async fn notify_groups(&self, groups: &[String]) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute_cached(
                "SELECT pg_notify($1, key) FROM unnest($2::text[]) AS key",
                &[&GROUPS_CHANNEL, &groups],
            )
            .await?;
        Ok(())
    }

    /// Hands back the claims `owner` holds (a dispatcher starting again under the same
    /// name, or the only one: `None` takes back every claim), so they are due at once
    /// rather than when their leases run out.
    pub async fn release_claims(&self, owner: Option<&str>) -> Result<u64, StoreError> {
        Ok(self
            .client()
            .await?
            .execute_cached(
                "UPDATE deliveries SET state = 'Pending', next_attempt_at = now(),
                     lease_owner = NULL
                 WHERE state = 'Sending' AND ($1::text IS NULL OR lease_owner = $1)",
                &[&owner],
            )
            .await?)
    }

    /// Extends the claims `owner` holds by `lease` from now; only those with less than two
    /// thirds of a lease left (most claims are settled long before: they are not rewritten).
    pub async fn renew_claims(&self, owner: &str, lease: Duration) -> Result<u64, StoreError> {
        Ok(self
            .client()
            .await?
            .execute_cached(
                "UPDATE deliveries SET next_attempt_at = now() + $2 * interval '1 second'
                 WHERE state = 'Sending' AND lease_owner = $1
                   AND next_attempt_at < now() + $2 * interval '1 second' * 2 / 3",
                &[&owner, &lease.as_secs_f64()],
            )
            .await?)
    }

    /// A group's endpoint records as its last reconcile saved them, with their version.
    pub async fn group_endpoints(
        &self,
        group_uid: &str,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt_cached(
                "SELECT endpoints_version, endpoints FROM groups WHERE uid = $1",
                &[&group_uid],
            )
            .await?;
        row.map(|row| {
            let Json(endpoints): Json<serde_json::Value> = row.try_get(1)?;
            Ok((row.try_get(0)?, endpoints))
        })
        .transpose()
    }
}

/// A wait in seconds from the database's clock (negative: already due) as a duration.
fn seconds_from_now(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX)
}
