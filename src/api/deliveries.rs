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
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for group in api.list(&ListParams::default()).await? {
        let n = group
            .status
            .iter()
            .flat_map(|s| s.deliveries.iter())
            .filter(|d| d.state == DeliveryState::Failed && d.created_at >= input.since)
            .count();
        if n > 0 {
            counts.insert(group.name_any(), n);
        }
    }
    let request = new_request_id();
    for name in counts.keys() {
        let replay = ReplayRequest {
            request: request.clone(),
            ids: Vec::new(),
            since: Some(input.since),
        };
        request_replay(&api, name, replay).await?;
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

async fn request_replay(
    api: &Api<ImageGroup>,
    name: &str,
    request: ReplayRequest,
) -> Result<(), ApiError> {
    let value =
        serde_json::to_string(&request).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let patch = json!({ "metadata": { "annotations": { REPLAY_ANNOTATION: value } } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
