//! The internal end of the result path: `POST /internal/v1/results` takes a worker's batch
//! of results and stores it. The caller proves it is the worker of the group's namespace
//! with its pod's ServiceAccount token, checked by the API server (TokenReview) and
//! remembered for a minute, so a worker needs no database credentials and no etcd writes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};

use super::auth::bearer_token;
use super::{ApiError, AppState};
use crate::controller::ImageEvents;
use crate::controller::WORKER_ACCOUNT;
use crate::crd::ImageGroup;
use crate::results::{MAX_BATCH, ResultBatch};

/// How long a reviewed token's identity is trusted without asking again.
const REVIEW_TTL: Duration = Duration::from_secs(60);
/// Reviewed tokens remembered at most (each worker pod has one).
const REVIEW_CACHE_MAX: usize = 10_000;

/// A reviewed token's user (`None`: refused) and when it was reviewed, by its SHA-256.
type Reviewed = HashMap<[u8; 32], (Option<String>, Instant)>;

/// Identities of recently reviewed tokens.
#[derive(Default)]
pub struct TokenReviews {
    seen: Mutex<Reviewed>,
}

impl TokenReviews {
    /// The authenticated user name of `token` (`None`: the API server refused it).
    async fn user(&self, client: &kube::Client, token: &str) -> Result<Option<String>, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((user, at)) = self.lock().get(&key)
            && at.elapsed() < REVIEW_TTL
        {
            return Ok(user.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let user = reviewed
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .and_then(|u| u.username);
        let mut seen = self.lock();
        if seen.len() >= REVIEW_CACHE_MAX {
            seen.retain(|_, (_, at)| at.elapsed() < REVIEW_TTL);
            if seen.len() >= REVIEW_CACHE_MAX {
                seen.clear();
            }
        }
        seen.insert(key, (user.clone(), Instant::now()));
        Ok(user)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reviewed> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub async fn store_results(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ResultBatch>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let token = bearer_token(&headers)?;
    let user = state
        .reviews
        .user(&state.client, token)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let Json(batch) = body.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let worker = format!(
        "system:serviceaccount:{}:{WORKER_ACCOUNT}",
        batch.group.namespace
    );
    if user != worker {
        return Err(ApiError::Forbidden(format!(
            "{user} may not store results of namespace {}",
            batch.group.namespace
        )));
    }
    check_batch(&batch)?;
    // The group must be the one the work order named: results of a deleted group (or of
    // an earlier group of the same name) have no reader.
    let groups: Api<ImageGroup> = Api::namespaced(state.client.clone(), &batch.group.namespace);
    let group = groups
        .get_opt(&batch.group.name)
        .await?
        .filter(|g| g.uid().as_deref() == Some(batch.group.uid.as_str()))
        .ok_or_else(|| ApiError::Gone(format!("image group {} is gone", batch.group.name)))?;
    // The batch's image events are recorded with its results: the dispatchers send them
    // as soon as they are stored.
    let planner = ImageEvents::new(&group);
    if let Some(stranger) = batch
        .results
        .iter()
        .find(|r| !planner.has_image(&r.image_id))
    {
        return Err(ApiError::InvalidRequest(format!(
            "image {:?} is not in group {}",
            stranger.image_id, batch.group.name
        )));
    }
    state
        .store
        .store_results(
            &batch.group,
            batch.generation,
            &batch.results,
            Some(&planner),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the store relies on: a bounded batch, each image once, names that fit.
fn check_batch(batch: &ResultBatch) -> Result<(), ApiError> {
    if batch.results.is_empty() || batch.results.len() > MAX_BATCH {
        return Err(ApiError::InvalidRequest(format!(
            "a batch holds 1 to {MAX_BATCH} results, got {}",
            batch.results.len()
        )));
    }
    let mut seen = HashSet::new();
    for result in &batch.results {
        if !seen.insert(result.image_id.as_str()) {
            return Err(ApiError::InvalidRequest(format!(
                "image {:?} is in the batch twice",
                result.image_id
            )));
        }
        let too_big = |v: Option<u32>| v.is_some_and(|v| i32::try_from(v).is_err());
        if too_big(result.width) || too_big(result.height) {
            return Err(ApiError::InvalidRequest(format!(
                "image {:?}: width or height out of range",
                result.image_id
            )));
        }
    }
    Ok(())
}
