//! `GET /internal/v1/work-orders/{job}`: a worker Job's pod fetches its work order (the
//! controller stored it before creating the Job) with its ServiceAccount token. A worker
//! reads only its own namespace's orders.
//!
//! Carriers (see [`crate::worker::Carrier`]): `POST /internal/v1/carriers/{job}/next-order`
//! waits up to the asked time for an order the controller hands the worker of Job `job`
//! (200 with it, 204 when none came); `POST .../{job}/orders/{name}/done` says its results
//! are all stored. A waiting request is woken by the database's notification of the
//! hand-over ([`Handovers`]), with a slow poll as the backstop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::ingest::{caller, worker_namespace};
use super::{ApiError, AppState};
use crate::store::{CARRIERS_CHANNEL, StoreNotice, carrier_key};
use crate::sync::lock;
use crate::worker::{CarriedOrder, MAX_WAIT, NextOrder, WorkOrder};

/// How often a waiting carrier's request looks for an order handed to it when no
/// notification came (one lost while the listening connection was down).
const HANDED_POLL: Duration = Duration::from_secs(1);

/// The carriers' requests waiting at this API replica, woken by the notification the
/// controller's hand-over sends ([`CARRIERS_CHANNEL`], `namespace/job`).
#[derive(Default)]
pub struct Handovers {
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Handovers {
    /// Listens for hand-overs for as long as it is polled; a reconnection wakes every
    /// waiting request (what was sent meanwhile is lost), so they look again.
    pub async fn listen(self: Arc<Self>, database_url: String) {
        let notices = crate::store::listen(database_url, &[CARRIERS_CHANNEL]);
        futures::pin_mut!(notices);
        while let Some(notice) = notices.next().await {
            let waiting = lock(&self.waiting);
            match notice {
                StoreNotice::Connected => waiting.values().for_each(|n| n.notify_waiters()),
                StoreNotice::Notification { payload, .. } => {
                    if let Some(n) = waiting.get(&payload) {
                        n.notify_waiters();
                    }
                }
            }
        }
    }

    /// The wake-up of the requests of Job `job` in `namespace`, while the guard lives.
    fn register(self: &Arc<Self>, namespace: &str, job: &str) -> Waiting {
        let key = carrier_key(namespace, job);
        let notify = lock(&self.waiting).entry(key.clone()).or_default().clone();
        Waiting {
            handovers: self.clone(),
            key,
            notify,
        }
    }
}

/// A request's registration; dropped (answered, or its client went) it leaves the map
/// unless another request of the same Job still waits.
struct Waiting {
    handovers: Arc<Handovers>,
    key: String,
    notify: Arc<Notify>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = lock(&self.handovers.waiting);
        // The map's and this one's: no other request shares it.
        if Arc::strong_count(&self.notify) <= 2 {
            waiting.remove(&self.key);
        }
    }
}

/// `?pending=true`: only the images that have no result yet.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OrderQuery {
    #[serde(default)]
    pending: bool,
}

pub async fn get_work_order(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(job): Path<String>,
    query: Result<Query<OrderQuery>, QueryRejection>,
) -> Result<Json<WorkOrder>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let namespace = worker_of(&state, &headers).await?;
    match state.store.work_order(&namespace, &job).await? {
        Some(order) if query.pending => Ok(Json(pending(&state, order).await?)),
        Some(order) => Ok(Json(order)),
        None => Err(ApiError::NotFound(format!(
            "work order {job} of namespace {namespace}"
        ))),
    }
}

/// `order` without the images whose results are stored: a Job's next pod, or a carrier's,
/// does only what an earlier one left.
async fn pending(state: &AppState, order: WorkOrder) -> Result<WorkOrder, ApiError> {
    let ids: Vec<String> = order.images.iter().map(|i| i.id.clone()).collect();
    let stored = state.store.results_of_images(&order.group, &ids).await?;
    Ok(order.without_stored(&stored))
}

/// The namespace whose worker calls (its token's account).
async fn worker_of(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let user = caller(state, headers).await?;
    match worker_namespace(&user) {
        Some(namespace) => Ok(namespace.to_owned()),
        None => Err(ApiError::Forbidden(format!(
            "{user} is not a kinsight worker and may not read work orders"
        ))),
    }
}

pub async fn next_order(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(job): Path<String>,
    body: Result<Json<NextOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let namespace = worker_of(&state, &headers).await?;
    let Json(ask) = body.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    if ask.shape.is_empty() || ask.shape.len() > 128 {
        return Err(ApiError::InvalidRequest(
            "shape must be 1 to 128 characters".into(),
        ));
    }
    if !(ask.wait_seconds.is_finite() && (0.0..=MAX_WAIT.as_secs_f64()).contains(&ask.wait_seconds))
    {
        return Err(ApiError::InvalidRequest(format!(
            "waitSeconds must be 0 to {}",
            MAX_WAIT.as_secs()
        )));
    }
    let store = &state.store;
    // What the order has left: a carrier's next pod takes up its predecessor's.
    let handed = async |order: Option<(String, WorkOrder)>| -> Result<Option<Response>, ApiError> {
        let Some((name, order)) = order else {
            return Ok(None);
        };
        let order = pending(&state, order).await?;
        Ok(Some(Json(CarriedOrder { name, order }).into_response()))
    };
    // One handed to this Job and not done (its previous pod's) comes first.
    if let Some(order) = handed(store.take_carried(&namespace, &job).await?).await? {
        return Ok(order);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(ask.wait_seconds);
    let waiting = state.handovers.register(&namespace, &job);
    store.wait_as_carrier(&namespace, &job, &ask.shape).await?;
    loop {
        // Enabled before the look, so a notification during it is not missed.
        let notified = waiting.notify.notified();
        futures::pin_mut!(notified);
        notified.as_mut().enable();
        if let Some(order) = handed(store.take_carried(&namespace, &job).await?).await? {
            return Ok(order);
        }
        let pause = HANDED_POLL.min(deadline.saturating_duration_since(Instant::now()));
        let _ = tokio::time::timeout(pause, notified).await;
        if Instant::now() >= deadline {
            // Handed one just now (its wait was taken with it): that one, else nothing.
            if !store.stop_waiting(&namespace, &job).await?
                && let Some(order) = handed(store.take_carried(&namespace, &job).await?).await?
            {
                return Ok(order);
            }
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

pub async fn carried_done(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((job, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let namespace = worker_of(&state, &headers).await?;
    if state.store.carried_done(&namespace, &name, &job).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "work order {name} carried by {job} in namespace {namespace}"
        )))
    }
}
