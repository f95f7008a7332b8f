//! Webhook deliveries and their attempts. The controller loads a group's deliveries, plans
//! new events and saves them (the dispatchers, `dispatch.rs`, send them); the REST API
//! pages through them.

use std::collections::BTreeMap;

use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};

use super::Prepared;
use super::notify::DISPATCH_CHANNEL;
use super::{Store, StoreError, record_group};
use crate::delivery::{Attempt, Delivery, DeliveryState, EventBodies};
use crate::results::GroupRef;
use crate::trace::TraceContext;

/// Columns of `deliveries d`, as [`from_row`] reads them (a macro, so that each statement
/// naming them stays one fixed text, as [`super::Prepared`] wants).
macro_rules! columns {
    () => {
        "d.id, d.event, d.image_id, d.endpoint, d.sequence, d.created_at, d.state, \
         d.attempts, d.next_attempt_at, d.last_error, d.delivered_at"
    };
}

/// Where a page of deliveries starts: after this (sequence or time, id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub after_key: i64,
    pub after_id: String,
}

impl Cursor {
    /// The next page of a group's deliveries starts after `last` (they go by sequence).
    pub fn after_sequence(last: &Delivery) -> Cursor {
        Cursor {
            after_key: i64::try_from(last.sequence).unwrap_or(i64::MAX),
            after_id: last.id.clone(),
        }
    }

    /// The next page of a namespace's deliveries starts after `last` (they go by the time
    /// their event was recorded).
    pub fn after_time(last: &Delivery) -> Cursor {
        Cursor {
            after_key: last.created_at.as_microsecond(),
            after_id: last.id.clone(),
        }
    }

    /// `key.id`, as the API hands it out.
    /// The next page of a list by name (a replay's groups) starts after `last`.
    pub fn after_name(last: &str) -> Cursor {
        Cursor {
            after_key: 0,
            after_id: last.to_owned(),
        }
    }

    pub fn encode(&self) -> String {
        format!("{}.{}", self.after_key, self.after_id)
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        let (key, id) = text.split_once('.')?;
        Some(Cursor {
            after_key: key.parse().ok()?,
            after_id: id.to_owned(),
        })
    }
}

/// Deliveries of one endpoint in one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryCount {
    pub endpoint: String,
    pub state: DeliveryState,
    pub count: u64,
}

/// What one reconcile planned for a group's deliveries.
#[derive(Debug)]
pub struct Plan<'a> {
    /// Deliveries recorded now (pending).
    pub new: &'a [Delivery],
    /// The bodies of the events recorded now, by sequence number (one per event, whichever
    /// endpoints it goes to); an event that has one already keeps it.
    pub bodies: &'a EventBodies,
    /// Deliveries a replay sends again from the start.
    pub replayed: &'a [String],
    /// Endpoint keys a replay lifts a 410 stop from.
    pub unstopped: &'a [String],
    /// Settled deliveries that a newer event about the same image supersedes.
    pub pruned: &'a [String],
    /// Where the group's events go (the controller's endpoint records).
    pub endpoints: &'a serde_json::Value,
    /// The sequence numbers the plan handed out to new events: after `.0` (the group's
    /// last number when the plan read it, [`Store::last_sequence`]) up to `.1`. Saving
    /// fails with [`StoreError::Conflict`] if anyone numbered events since.
    pub numbered: Option<(u64, u64)>,
}

/// What saving a plan changed besides its deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saved {
    /// The endpoint records differed from those stored (writes of results that committed
    /// meanwhile planned with the old ones).
    pub endpoints_changed: bool,
}

impl Store {
    /// Every delivery of a group, in sequence order.
    pub async fn group_deliveries(&self, group_uid: &str) -> Result<Vec<Delivery>, StoreError> {
        self.group_deliveries_page(group_uid, None, i64::MAX).await
    }

    /// Records deliveries as they are (new ones; one already recorded is left as it is),
    /// plus `attempts`, in one transaction.
    pub async fn record_deliveries(
        &self,
        group: &GroupRef,
        deliveries: &[Delivery],
        attempts: &[Attempt],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        record_group(&tx, group).await?;
        insert_deliveries(&tx, group, deliveries).await?;
        let bodies: EventBodies = deliveries
            .iter()
            .filter_map(|d| Some((d.sequence, d.payload.clone()?)))
            .collect();
        insert_bodies(&tx, group, &bodies).await?;
        insert_attempts(&tx, attempts).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Saves what a reconcile planned, in one transaction, and wakes the dispatchers when
    /// something became due. Only the reconcile adds, replays and prunes deliveries; the
    /// dispatchers only move them on, so the two never overwrite each other.
    pub async fn save_plan(&self, group: &GroupRef, plan: &Plan<'_>) -> Result<Saved, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        record_group(&tx, group).await?;
        if let Some((base, last)) = plan.numbered {
            let base = i64::try_from(base).unwrap_or(i64::MAX);
            let last = i64::try_from(last).unwrap_or(i64::MAX);
            let taken = tx
                .execute_cached(
                    "UPDATE groups SET last_sequence = $3 WHERE uid = $1 AND last_sequence = $2",
                    &[&group.uid, &base, &last],
                )
                .await?;
            if taken == 0 {
                // Dropping the transaction rolls it back.
                return Err(StoreError::Conflict(format!(
                    "events of group {} were numbered since the plan read them",
                    group.name
                )));
            }
        }
        // The endpoints first: a dispatcher that claims a new delivery finds where it goes.
        let changed = update_endpoints(&tx, group, plan.endpoints).await?;
        insert_deliveries(&tx, group, plan.new).await?;
        insert_bodies(&tx, group, plan.bodies).await?;
        if !plan.replayed.is_empty() {
            // A delivery being sent right now is taken back from its dispatcher: what that
            // attempt brings is still kept in the history, the delivery starts afresh.
            tx.execute_cached(
                "UPDATE deliveries SET state = 'Pending', attempts = 0, next_attempt_at = now(),
                     lease_owner = NULL
                 WHERE group_uid = $1 AND id = ANY($2)",
                &[&group.uid, &plan.replayed],
            )
            .await?;
        }
        if !plan.unstopped.is_empty() {
            tx.execute_cached(
                "UPDATE groups SET stopped_endpoints = ARRAY(
                     SELECT m FROM unnest(stopped_endpoints) m
                     WHERE NOT (split_part(m, ' ', 1) = ANY($2)))
                 WHERE uid = $1",
                &[&group.uid, &plan.unstopped],
            )
            .await?;
        }
        if !plan.pruned.is_empty() {
            tx.execute_cached(
                "DELETE FROM deliveries WHERE group_uid = $1 AND id = ANY($2)
                   AND state IN ('Delivered', 'Failed')",
                &[&group.uid, &plan.pruned],
            )
            .await?;
        }
        if !plan.new.is_empty() || !plan.replayed.is_empty() {
            tx.execute_cached("SELECT pg_notify($1, '')", &[&DISPATCH_CHANNEL])
                .await?;
        }
        tx.commit().await?;
        Ok(Saved {
            endpoints_changed: changed,
        })
    }

    /// Records where a group's events go (the controller's endpoint records), before its
    /// plan does: a worker's results may arrive first. Returns whether they changed. The
    /// group's trace context (`traceparent` and `tracestate`) goes with them: events
    /// recorded from now on carry it.
    pub async fn record_endpoints(
        &self,
        group: &GroupRef,
        endpoints: &serde_json::Value,
        trace: &TraceContext,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        record_group(&tx, group).await?;
        let changed = update_endpoints(&tx, group, endpoints).await?;
        tx.execute_cached(
            "UPDATE groups SET traceparent = $2, tracestate = $3
             WHERE uid = $1
               AND (traceparent IS DISTINCT FROM $2 OR tracestate IS DISTINCT FROM $3)",
            &[&group.uid, &trace.traceparent, &trace.tracestate],
        )
        .await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// The last sequence number handed out to an event of the group (0: none yet).
    pub async fn last_sequence(&self, group_uid: &str) -> Result<u64, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt_cached(
                "SELECT last_sequence FROM groups WHERE uid = $1",
                &[&group_uid],
            )
            .await?;
        let last: i64 = match row {
            Some(row) => row.try_get(0)?,
            None => 0,
        };
        Ok(u64::try_from(last).unwrap_or(0))
    }

    /// The endpoints of a group that answered 410 Gone, as `<key> <url>`.
    pub async fn stopped_endpoints(&self, group_uid: &str) -> Result<Vec<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt_cached(
                "SELECT stopped_endpoints FROM groups WHERE uid = $1",
                &[&group_uid],
            )
            .await?;
        Ok(match row {
            Some(row) => row.try_get(0)?,
            None => Vec::new(),
        })
    }

    /// The endpoints of a group with a delivery pending or being sent, in order: one index
    /// probe per endpoint (a loose index scan), however many deliveries are open.
    pub async fn open_endpoints(&self, group_uid: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query_cached(
                "WITH RECURSIVE open AS (
                     (SELECT endpoint FROM deliveries
                      WHERE group_uid = $1 AND state IN ('Pending', 'Sending')
                      ORDER BY endpoint LIMIT 1)
                     UNION ALL
                     SELECT (SELECT d.endpoint FROM deliveries d
                             WHERE d.group_uid = $1 AND d.state IN ('Pending', 'Sending')
                               AND d.endpoint > open.endpoint
                             ORDER BY d.endpoint LIMIT 1)
                     FROM open WHERE open.endpoint IS NOT NULL
                 )
                 SELECT endpoint FROM open WHERE endpoint IS NOT NULL",
                &[&group_uid],
            )
            .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StoreError::from))
            .collect()
    }

    /// How many of a group's deliveries each endpoint has in each state.
    pub async fn delivery_counts(&self, group_uid: &str) -> Result<Vec<DeliveryCount>, StoreError> {
        let rows = self
            .client()
            .await?
            .query_cached(
                "SELECT endpoint, state, count(*) FROM deliveries WHERE group_uid = $1
                 GROUP BY endpoint, state ORDER BY endpoint, state",
                &[&group_uid],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get(1)?;
                let count: i64 = row.try_get(2)?;
                Ok(DeliveryCount {
                    endpoint: row.try_get(0)?,
                    state: DeliveryState::parse(&state)
                        .ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?,
                    count: u64::try_from(count).unwrap_or(0),
                })
            })
            .collect()
    }

    /// A group's last `limit` deliveries that failed for good, newest event first.
    pub async fn recent_failures(
        &self,
        group_uid: &str,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows = self
            .client()
            .await?
            .query_cached(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM deliveries d
                     WHERE d.group_uid = $1 AND d.state = 'Failed'
                     ORDER BY d.sequence DESC, d.id LIMIT $2"
                ),
                &[&group_uid, &limit],
            )
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// A page of a group's deliveries in sequence order.
    pub async fn group_deliveries_page(
        &self,
        group_uid: &str,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let (key, id) = after.map_or((-1, ""), |c| (c.after_key, c.after_id.as_str()));
        let rows = self
            .client()
            .await?
            .query_cached(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM deliveries d WHERE d.group_uid = $1
                       AND (d.sequence, d.id) > ($2, $3)
                     ORDER BY d.sequence, d.id LIMIT $4"
                ),
                &[&group_uid, &key, &id, &limit],
            )
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// A page of a namespace's deliveries in `states`, oldest event first, with the name of
    /// each one's group. The cursor's key is the event's time in microseconds.
    pub async fn namespace_deliveries_page(
        &self,
        namespace: &str,
        states: &[DeliveryState],
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<(String, Delivery)>, StoreError> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        // Every event is younger than 1970: the start of the first page.
        let (key, id) = after.map_or((0, ""), |c| (c.after_key, c.after_id.as_str()));
        let after_time =
            jiff::Timestamp::from_microsecond(key).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let rows = self
            .client()
            .await?
            .query_cached(
                concat!(
                    "SELECT ",
                    columns!(),
                    ", g.name AS group_name FROM deliveries d
                     JOIN groups g ON g.uid = d.group_uid
                     WHERE d.namespace = $1 AND d.state <> 'Delivered' AND d.state = ANY($2)
                       AND (d.namespace, d.created_at, d.id) > ($1, $3, $4)
                       AND g.deleted_at IS NULL
                     ORDER BY d.namespace, d.created_at, d.id LIMIT $5"
                ),
                &[&namespace, &states, &after_time, &id, &limit],
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("group_name")?, from_row(row)?)))
            .collect()
    }

    /// One delivery of a group with its attempts, oldest first.
    pub async fn delivery_with_attempts(
        &self,
        group_uid: &str,
        id: &str,
    ) -> Result<Option<(Delivery, Vec<Attempt>)>, StoreError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt_cached(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM deliveries d WHERE d.group_uid = $1 AND d.id = $2"
                ),
                &[&group_uid, &id],
            )
            .await?
        else {
            return Ok(None);
        };
        let delivery = from_row(&row)?;
        let attempts = client
            .query_cached(
                "SELECT attempted_at, status_code, duration_ms, outcome, error, response
                 FROM delivery_attempts WHERE delivery_id = $1 ORDER BY attempted_at",
                &[&id],
            )
            .await?
            .iter()
            .map(|row| {
                let status: Option<i32> = row.try_get("status_code")?;
                Ok(Attempt {
                    delivery_id: id.to_owned(),
                    attempted_at: row.try_get("attempted_at")?,
                    status_code: status.and_then(|s| u16::try_from(s).ok()),
                    duration_ms: row.try_get("duration_ms")?,
                    outcome: row.try_get("outcome")?,
                    error: row.try_get("error")?,
                    response: row.try_get("response")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some((delivery, attempts)))
    }

    /// How many failed deliveries of events recorded since `since` each group of a
    /// namespace has (the groups a replay of them concerns).
    ///
    /// At most `limit` groups, by name, after `after` (the last group of the page before).
    pub async fn failed_since(
        &self,
        namespace: &str,
        since: jiff::Timestamp,
        after: Option<&str>,
        limit: i64,
    ) -> Result<BTreeMap<String, usize>, StoreError> {
        let rows = self
            .client()
            .await?
            .query_cached(
                "SELECT g.name, f.n FROM (
                     SELECT group_uid, count(*) AS n FROM deliveries
                     WHERE namespace = $1 AND state <> 'Delivered' AND state = 'Failed'
                       AND created_at >= $2
                     GROUP BY group_uid
                 ) f JOIN groups g ON g.uid = f.group_uid
                 WHERE g.deleted_at IS NULL AND g.name > $3
                 ORDER BY g.name LIMIT $4",
                &[&namespace, &since, &after.unwrap_or(""), &limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let n: i64 = row.try_get(1)?;
                Ok((row.try_get(0)?, usize::try_from(n).unwrap_or(0)))
            })
            .collect()
    }
}

/// Stores the group's endpoint records (a new version when they differ); returns whether
/// they did.
async fn update_endpoints(
    tx: &deadpool_postgres::Transaction<'_>,
    group: &GroupRef,
    endpoints: &serde_json::Value,
) -> Result<bool, StoreError> {
    let changed = tx
        .execute_cached(
            "UPDATE groups SET endpoints = $2, endpoints_version = endpoints_version + 1
             WHERE uid = $1 AND endpoints IS DISTINCT FROM $2",
            &[&group.uid, &Json(endpoints)],
        )
        .await?;
    Ok(changed > 0)
}

pub(super) async fn insert_deliveries(
    tx: &deadpool_postgres::Transaction<'_>,
    group: &GroupRef,
    deliveries: &[Delivery],
) -> Result<(), StoreError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    // Parallel arrays, one per column: a 10,000-image group with 21 endpoints plans
    // 210,000 rows in one reconcile.
    let column = |f: fn(&Delivery) -> Option<&str>| -> Vec<Option<&str>> {
        deliveries.iter().map(f).collect()
    };
    let ids = column(|d| Some(d.id.as_str()));
    let events = column(|d| Some(d.event.as_str()));
    let images = column(|d| d.image_id.as_deref());
    let endpoints = column(|d| Some(d.endpoint.as_str()));
    let states = column(|d| Some(d.state.as_str()));
    let errors = column(|d| d.last_error.as_deref());
    let sequences: Vec<i64> = deliveries
        .iter()
        .map(|d| i64::try_from(d.sequence).unwrap_or(i64::MAX))
        .collect();
    let created: Vec<jiff::Timestamp> = deliveries.iter().map(|d| d.created_at).collect();
    let attempts: Vec<i32> = deliveries
        .iter()
        .map(|d| i32::try_from(d.attempts).unwrap_or(i32::MAX))
        .collect();
    let next: Vec<Option<jiff::Timestamp>> = deliveries.iter().map(|d| d.next_attempt_at).collect();
    let delivered: Vec<Option<jiff::Timestamp>> =
        deliveries.iter().map(|d| d.delivered_at).collect();
    tx.execute_cached(
        "INSERT INTO deliveries (id, group_uid, namespace, event, image_id, endpoint,
             sequence, created_at, state, attempts, next_attempt_at, last_error, delivered_at)
         SELECT r.id, $1, $2, r.event, r.image_id, r.endpoint, r.sequence, r.created_at,
                r.state, r.attempts,
                CASE WHEN r.state IN ('Pending', 'Sending')
                     THEN COALESCE(r.next_attempt_at, r.created_at) END,
                r.last_error, r.delivered_at
         FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                     $8::timestamptz[], $9::text[], $10::integer[], $11::timestamptz[],
                     $12::text[], $13::timestamptz[])
              AS r(id, event, image_id, endpoint, sequence, created_at, state, attempts,
                   next_attempt_at, last_error, delivered_at)
         ON CONFLICT (id) DO NOTHING",
        &[
            &group.uid,
            &group.namespace,
            &ids,
            &events,
            &images,
            &endpoints,
            &sequences,
            &created,
            &states,
            &attempts,
            &next,
            &errors,
            &delivered,
        ],
    )
    .await?;
    Ok(())
}

/// Bodies of events by their sequence number; the first one recorded for an event stays.
pub(super) async fn insert_bodies(
    tx: &deadpool_postgres::Transaction<'_>,
    group: &GroupRef,
    bodies: &EventBodies,
) -> Result<(), StoreError> {
    if bodies.is_empty() {
        return Ok(());
    }
    let sequences: Vec<i64> = bodies
        .keys()
        .map(|s| i64::try_from(*s).unwrap_or(i64::MAX))
        .collect();
    let payloads: Vec<Json<&serde_json::Value>> = bodies.values().map(Json).collect();
    tx.execute_cached(
        "INSERT INTO event_bodies (group_uid, sequence, payload, traceparent, tracestate)
         SELECT $1, s, p, g.traceparent, g.tracestate
         FROM unnest($2::bigint[], $3::jsonb[]) AS b(s, p)
         LEFT JOIN groups g ON g.uid = $1
         ON CONFLICT (group_uid, sequence) DO NOTHING",
        &[&group.uid, &sequences, &payloads],
    )
    .await?;
    Ok(())
}

/// The INSERT of attempts, its columns `$1`..`$7` as [`AttemptColumns::params`] gives them.
/// Attempts of deliveries removed meanwhile have nothing to belong to and are dropped.
/// A macro, so that `record_outcomes` puts the same text in its one statement (`concat!`).
macro_rules! insert_attempts_sql {
    () => {
        "INSERT INTO delivery_attempts
             (delivery_id, attempted_at, status_code, duration_ms, outcome, error, response)
         SELECT r.* FROM unnest($1::text[], $2::timestamptz[], $3::integer[],
                                $4::float8[], $5::text[], $6::text[], $7::text[])
             AS r(delivery_id, attempted_at, status_code, duration_ms, outcome, error, response)
         WHERE EXISTS (SELECT 1 FROM deliveries d WHERE d.id = r.delivery_id)"
    };
}
pub(super) use insert_attempts_sql;

/// Attempts as parallel arrays: each delivery is looked up by its key.
pub(super) struct AttemptColumns<'a> {
    ids: Vec<&'a str>,
    at: Vec<jiff::Timestamp>,
    codes: Vec<Option<i32>>,
    took: Vec<f64>,
    outcomes: Vec<&'a str>,
    errors: Vec<Option<&'a str>>,
    responses: Vec<Option<&'a str>>,
}

impl<'a> AttemptColumns<'a> {
    pub(super) fn new(attempts: &'a [Attempt]) -> Self {
        AttemptColumns {
            ids: attempts.iter().map(|a| a.delivery_id.as_str()).collect(),
            at: attempts.iter().map(|a| a.attempted_at).collect(),
            codes: attempts
                .iter()
                .map(|a| a.status_code.map(i32::from))
                .collect(),
            took: attempts.iter().map(|a| a.duration_ms).collect(),
            outcomes: attempts.iter().map(|a| a.outcome.as_str()).collect(),
            errors: attempts.iter().map(|a| a.error.as_deref()).collect(),
            responses: attempts.iter().map(|a| a.response.as_deref()).collect(),
        }
    }

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.ids,
            &self.at,
            &self.codes,
            &self.took,
            &self.outcomes,
            &self.errors,
            &self.responses,
        ]
    }
}

/// Records `attempts` inside `tx` (see [`insert_attempts_sql`]).
pub(super) async fn insert_attempts(
    tx: &deadpool_postgres::Transaction<'_>,
    attempts: &[Attempt],
) -> Result<(), StoreError> {
    if attempts.is_empty() {
        return Ok(());
    }
    let columns = AttemptColumns::new(attempts);
    tx.execute_cached(insert_attempts_sql!(), &columns.params())
        .await?;
    Ok(())
}

pub(super) fn from_row(row: &Row) -> Result<Delivery, StoreError> {
    let state: String = row.try_get("state")?;
    let sequence: i64 = row.try_get("sequence")?;
    let attempts: i32 = row.try_get("attempts")?;
    Ok(Delivery {
        id: row.try_get("id")?,
        event: row.try_get("event")?,
        image_id: row.try_get("image_id")?,
        endpoint: row.try_get("endpoint")?,
        sequence: u64::try_from(sequence).unwrap_or(0),
        created_at: row.try_get("created_at")?,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        delivered_at: row.try_get("delivered_at")?,
        payload: None,
    })
}
