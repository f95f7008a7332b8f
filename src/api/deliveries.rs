//! Webhook deliveries over REST: a group's deliveries, what was not delivered across the
//! tenant, and replays. Replays are requests to the controller (an annotation on the group),
//! which owns delivery state; they are carried out within a reconcile.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::authenticate;
use super::images::{find_group, parse_json};
use super::problem::ApiError;
use super::retry;
use crate::crd::{Delivery, DeliveryState, ImageGroup, REPLAY_ANNOTATION, ReplayRequest};

fn delivery_out(group: &str, d: &Delivery) -> Value {
    json!({
        "groupId": group,
        "id": d.id,
        "event": d.event,
        "imageId": d.image_id,
        "endpoint": d.endpoint,
        "sequence": d.sequence,
        "state": match d.state {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        },
        "attempts": d.attempts,
        "createdAt": d.created_at.to_string(),
        "nextAttemptAt": d.next_attempt_at.map(|t| t.to_string()),
        "deliveredAt": d.delivered_at.map(|t| t.to_string()),
        "lastError": d.last_error,
    })
}

/// `GET /v1/image-groups/{id}/deliveries`
pub async fn list_group(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let group = find_group(&api, &id, "image group").await?;
    let deliveries: Vec<Value> = group
        .status
        .iter()
        .flat_map(|s| s.deliveries.iter())
        .map(|d| delivery_out(&id, d))
        .collect();
    Ok(Json(json!({ "deliveries": deliveries })))
}

#[derive(Deserialize)]
pub struct ListQuery {
    /// `failed` (default: not delivered, i.e. failed and pending), `pending`, `failed`.
    state: Option<String>,
}

/// `GET /v1/deliveries?state=failed|pending`: what was not delivered, across the tenant's groups.
pub async fn list_undelivered(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let wanted: Vec<DeliveryState> = match query.state.as_deref() {
        None => vec![DeliveryState::Failed, DeliveryState::Pending],
        Some("failed") => vec![DeliveryState::Failed],
        Some("pending") => vec![DeliveryState::Pending],
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "state: {other:?} is not one of failed, pending"
            )));
        }
    };
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let mut out = Vec::new();
    for group in api.list(&ListParams::default()).await? {
        let name = group.name_any();
        for d in group
            .status
            .iter()
            .flat_map(|s| s.deliveries.iter())
            .filter(|d| wanted.contains(&d.state))
        {
            out.push(delivery_out(&name, d));
        }
    }
    Ok(Json(json!({ "deliveries": out })))
}

/// `POST /v1/image-groups/{id}/deliveries/{delivery}/replay`
pub async fn replay_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let group = find_group(&api, &id, "image group").await?;
    let known = group
        .status
        .iter()
        .flat_map(|s| s.deliveries.iter())
        .find(|d| d.id == delivery);
    match known {
        None => return Err(ApiError::NotFound(format!("delivery {delivery}"))),
        Some(d) if d.state != DeliveryState::Failed => {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySinceIn {
    since: jiff::Timestamp,
}

/// `POST /v1/deliveries/replay {"since": "2026-11-29T10:00:00Z"}`: every failed delivery of
/// events recorded since then, across the tenant's groups.
pub async fn replay_since(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let input: ReplaySinceIn = parse_json(&headers, body)?;
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let replay = ReplayRequest {
        request: new_request_id(),
        ids: Vec::new(),
        since: Some(input.since),
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for group in api.list(&ListParams::default()).await? {
        let n = group
            .status
            .iter()
            .flat_map(|s| s.deliveries.iter())
            .filter(|d| replay.selects(d))
            .count();
        if n > 0 {
            counts.insert(group.name_any(), n);
        }
    }
    for name in counts.keys() {
        request_replay(&api, name, replay.clone()).await?;
    }
    let total: usize = counts.values().sum();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "replayed": total, "groups": counts })),
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
