//! `GET /internal/v1/work-orders/{job}`: a worker Job's pod fetches its work order (the
//! controller stored it before creating the Job) with its ServiceAccount token. A worker
//! reads only its own namespace's orders.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;

use super::ingest::{caller, worker_namespace};
use super::{ApiError, AppState};
use crate::worker::WorkOrder;

pub async fn get_work_order(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<Json<WorkOrder>, ApiError> {
    let user = caller(&state, &headers).await?;
    let Some(namespace) = worker_namespace(&user) else {
        return Err(ApiError::Forbidden(format!(
            "{user} is not a kinsight worker and may not read work orders"
        )));
    };
    match state.store.work_order(namespace, &job).await? {
        Some(order) => Ok(Json(order)),
        None => Err(ApiError::NotFound(format!(
            "work order {job} of namespace {namespace}"
        ))),
    }
}
