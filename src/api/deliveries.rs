//! Webhook deliveries over REST: a group's deliveries (paged), one delivery with its
//! attempts, what was not delivered across the tenant (paged), and replays. Deliveries are
//! read from the database. Replays are requests to the controller (an annotation on the
//! group), which owns delivery state; they are carried out within a reconcile.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::auth::authenticate;
use super::images::{find_group, parse_json};
use super::openapi::{
    DeliveryDetailOut, DeliveryPage, IdempotencyKey, Paging, Problems, ReplayedOut, StateFilter,
    WriteProblems,
};
use super::problem::ApiError;
use super::retry;
use crate::crd::{ImageGroup, REPLAY_ANNOTATION, ReplayRequest};
use crate::delivery::{Delivery, DeliveryState};
use crate::store::Cursor;

/// Deliveries per page unless `limit` says otherwise, and at most.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<i64>,
    cursor: Option<String>,
    /// Only for `GET /v1/deliveries`.
    state: Option<String>,
}

impl PageQuery {
    /// Refuses `state` where the list has no such filter.
    pub(super) fn no_state(&self) -> Result<(), ApiError> {
        match &self.state {
            None => Ok(()),
            Some(_) => Err(ApiError::InvalidParameter(
                "state: this list takes no state filter".to_owned(),
            )),
        }
    }

    pub(super) fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::InvalidParameter(format!(
                "limit: {n} is not between 1 and {MAX_LIMIT}"
            ))),
        }
    }

    pub(super) fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.cursor
            .as_deref()
            .map(|text| {
                Cursor::decode(text).ok_or_else(|| {
                    ApiError::InvalidParameter(format!(
                        "cursor: {text:?} is not a cursor this API handed out"
                    ))
                })
            })
            .transpose()
    }
}

fn uid_of(group: &ImageGroup) -> String {
    group.uid().unwrap_or_default()
}

fn delivery_out(group: &str, d: &Delivery) -> Value {
    json!({
        "groupId": group,
        "id": d.id,
        "event": d.event,
        "imageId": d.image_id,
        "endpoint": d.endpoint,
        "sequence": d.sequence,
        "state": d.state.as_str().to_ascii_lowercase(),
        "attempts": d.attempts,
        "createdAt": d.created_at.to_string(),
        "nextAttemptAt": d.next_attempt_at.map(|t| t.to_string()),
        "deliveredAt": d.delivered_at.map(|t| t.to_string()),
        "lastError": d.last_error,
    })
}

/// `GET /v1/image-groups/{id}/deliveries?limit=&cursor=`: in sequence order.
#[utoipa::path(get, path = "/v1/image-groups/{id}/deliveries", tag = "deliveries",
    params(("id" = String, Path, description = "The group's id"),
        Paging),
    responses((status = 200, description = "A page of the group's deliveries, in sequence order.", body = DeliveryPage), Problems))]
pub async fn list_group(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let Query(query) = query.map_err(|e| ApiError::InvalidParameter(e.body_text()))?;
    let (limit, cursor) = (query.limit()?, query.cursor()?);
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let group = find_group(&api, &id, "image group").await?;
    let page = state
        .store
        .group_deliveries_page(&uid_of(&group), cursor.as_ref(), limit)
        .await?;
    let next = (page.len() as i64 == limit)
        .then(|| page.last())
        .flatten()
        .map(|d| Cursor::after_sequence(d).encode());
    let deliveries: Vec<Value> = page.iter().map(|d| delivery_out(&id, d)).collect();
    Ok(Json(
        json!({ "deliveries": deliveries, "nextCursor": next }),
    ))
}

/// `GET /v1/image-groups/{id}/deliveries/{delivery}`: one delivery and every attempt.
#[utoipa::path(get, path = "/v1/image-groups/{id}/deliveries/{delivery}", tag = "deliveries",
    params(("id" = String, Path, description = "The group's id"),
        ("delivery" = String, Path, description = "The delivery's id (its `webhook-id`)")),
    responses((status = 200, description = "The delivery and every attempt.", body = DeliveryDetailOut), Problems))]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let group = find_group(&api, &id, "image group").await?;
    let (found, attempts) = state
        .store
        .delivery_with_attempts(&uid_of(&group), &delivery)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("delivery {delivery}")))?;
    let mut out = delivery_out(&id, &found);
    out["attempts"] = json!(
        attempts
            .iter()
            .map(|a| json!({
                "at": a.attempted_at.to_string(),
                "outcome": a.outcome,
                "statusCode": a.status_code,
                "durationMs": a.duration_ms,
                "error": a.error,
                "response": a.response,
            }))
            .collect::<Vec<_>>()
    );
    Ok(Json(out))
}

/// `GET /v1/deliveries?state=failed|pending&limit=&cursor=`: what was not delivered, across
/// the tenant's groups, oldest event first.
#[utoipa::path(get, path = "/v1/deliveries", tag = "deliveries",
    params(("state" = Option<StateFilter>, Query, description = "Only these (default: both)"),
        Paging),
    responses((status = 200, description = "A page of what was not delivered, oldest event first.", body = DeliveryPage), Problems))]
pub async fn list_undelivered(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let Query(query) = query.map_err(|e| ApiError::InvalidParameter(e.body_text()))?;
    let (limit, cursor) = (query.limit()?, query.cursor()?);
    let wanted: Vec<DeliveryState> = match query.state.as_deref() {
        None => vec![
            DeliveryState::Failed,
            DeliveryState::Pending,
            DeliveryState::Sending,
        ],
        Some("failed") => vec![DeliveryState::Failed],
        // Being sent right now is still pending to the customer.
        Some("pending") => vec![DeliveryState::Pending, DeliveryState::Sending],
        Some(other) => {
            return Err(ApiError::InvalidParameter(format!(
                "state: {other:?} is not one of failed, pending"
            )));
        }
    };
    let page = state
        .store
        .namespace_deliveries_page(&tenant.namespace, &wanted, cursor.as_ref(), limit)
        .await?;
    let next = (page.len() as i64 == limit)
        .then(|| page.last())
        .flatten()
        .map(|(_, d)| Cursor::after_time(d).encode());
    let out: Vec<Value> = page.iter().map(|(g, d)| delivery_out(g, d)).collect();
    Ok(Json(json!({ "deliveries": out, "nextCursor": next })))
}

/// `POST /v1/image-groups/{id}/deliveries/{delivery}/replay`
#[utoipa::path(post, path = "/v1/image-groups/{id}/deliveries/{delivery}/replay", tag = "deliveries",
    params(("id" = String, Path, description = "The group's id"),
        ("delivery" = String, Path, description = "A failed delivery's id"),
        IdempotencyKey),
    responses((status = 202, description = "The delivery will be sent again.", body = ReplayedOut), Problems, WriteProblems))]
pub async fn replay_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let group = find_group(&api, &id, "image group").await?;
    let known = state
        .store
        .delivery_with_attempts(&uid_of(&group), &delivery)
        .await?;
    match known {
        None => return Err(ApiError::NotFound(format!("delivery {delivery}"))),
        Some((d, _)) if d.state != DeliveryState::Failed => {
            return Err(ApiError::InvalidRequest(format!(
                "delivery {delivery} has not failed; only failed deliveries are replayed"
            )));
        }
        Some(_) => {}
    }
    request_replay(
        &api,
        &id,
        ReplayRequest {
            request: new_request_id(),
            ids: vec![delivery],
            since: None,
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": 1 }))).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaySinceIn {
    #[schema(value_type = String, format = DateTime)]
    since: jiff::Timestamp,
    /// Groups this request replays at most (1-1000, default 100); `nextCursor` in the
    /// answer continues with the next ones.
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous answer.
    cursor: Option<String>,
}

/// `POST /v1/deliveries/replay {"since": "2026-11-29T10:00:00Z"}`: every failed delivery of
/// events recorded since then, across the tenant's groups, `limit` groups per request (each
/// costs a write to its ImageGroup): an answer with a `nextCursor` is continued by posting
/// the same `since` with that `cursor`.
#[utoipa::path(post, path = "/v1/deliveries/replay", tag = "deliveries",
    params(IdempotencyKey),
    request_body = ReplaySinceIn,
    responses((status = 202, description = "The failed deliveries of events since then, in the groups of this page, will be sent again.", body = ReplayedOut), Problems, WriteProblems))]
pub async fn replay_since(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let input: ReplaySinceIn = parse_json(&headers, body)?;
    let paging = PageQuery {
        limit: input.limit,
        cursor: input.cursor,
        state: None,
    };
    let (limit, cursor) = (paging.limit()?, paging.cursor()?);
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let replay = ReplayRequest {
        request: new_request_id(),
        ids: Vec::new(),
        since: Some(input.since),
    };
    let counts = state
        .store
        .failed_since(
            &tenant.namespace,
            input.since,
            cursor.as_ref().map(|c| c.after_id.as_str()),
            limit,
        )
        .await?;
    for name in counts.keys() {
        request_replay(&api, name, replay.clone()).await?;
    }
    let total: usize = counts.values().sum();
    let next = (counts.len() as i64 == limit)
        .then(|| counts.keys().next_back())
        .flatten()
        .map(|last| Cursor::after_name(last).encode());
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "replayed": total, "groups": counts, "nextCursor": next })),
    )
        .into_response())
}

fn new_request_id() -> String {
    format!("rpl-{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// Writes the request into the group's annotation. A request the controller has not
/// carried out yet is merged in rather than overwritten, and the write is conditional on
/// the group being unchanged since it was read, so concurrent requests all take effect.
async fn request_replay(
    api: &Api<ImageGroup>,
    name: &str,
    request: ReplayRequest,
) -> Result<(), ApiError> {
    retry::on_conflict(|| async {
        let group = find_group(api, name, "image group").await?;
        let last_carried_out = group.status.as_ref().and_then(|s| s.last_replay.as_deref());
        let waiting = group
            .annotations()
            .get(REPLAY_ANNOTATION)
            .and_then(|text| serde_json::from_str::<ReplayRequest>(text).ok())
            .filter(|w| Some(w.request.as_str()) != last_carried_out);
        let merged = match waiting {
            Some(w) => request.clone().absorb(w),
            None => request.clone(),
        };
        let value = serde_json::to_string(&merged)
            .map_err(|e| ApiError::Unavailable(format!("encoding a replay request: {e}")))?;
        let patch = json!({ "metadata": {
            "resourceVersion": group.resource_version(),
            "annotations": { REPLAY_ANNOTATION: value },
        } });
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    })
    .await
}
