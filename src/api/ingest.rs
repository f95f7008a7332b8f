//! The internal end of the result path: `POST /internal/v1/results` takes a worker's batch
//! of results and stores it. The caller proves it is the worker of the group's namespace
//! with its pod's ServiceAccount token, checked by the API server (TokenReview) and
//! remembered for a minute, so a worker needs no database credentials and no etcd writes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::auth::bearer_token;
use super::{ApiError, AppState};
use crate::cache::Cache;
use crate::controller::ImageEvents;
use crate::controller::WORKER_ACCOUNT;
use crate::crd::ImageGroup;
use crate::results::{MAX_BATCH, ResultBatch};

/// How long a reviewed token's identity is trusted without asking again.
const REVIEW_TTL: Duration = Duration::from_secs(60);

/// Identities of recently reviewed tokens (`None`: refused), by the token's SHA-256.
#[derive(Default)]
pub struct TokenReviews {
    seen: Cache<[u8; 32], Option<String>>,
}

impl TokenReviews {
    /// The authenticated user name of `token` (`None`: the API server refused it).
    async fn user(&self, client: &kube::Client, token: &str) -> Result<Option<String>, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let review = || async {
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
            Ok(reviewed
                .status
                .filter(|s| s.authenticated == Some(true))
                .and_then(|s| s.user)
                .and_then(|u| u.username))
        };
        let fresh = |(at, _): &(Instant, Option<String>)| at.elapsed() < REVIEW_TTL;
        self.seen.try_get_or_load(&key, fresh, review).await
    }
}

/// How long a group read for a batch serves the batches that follow (a worker uploads
/// many) before a metadata read confirms it again.
const GROUP_TTL: Duration = Duration::from_secs(2);

/// Groups recently read for batches, by uid, each with its event rules. A batch of a
/// newer generation than the one remembered reads the group again; a group deleted
/// meanwhile is noticed within [`GROUP_TTL`] (its dispatchers then send nothing of it).
#[derive(Default)]
pub struct GroupReads {
    read: Cache<String, Arc<ImageEvents>>,
}

impl GroupReads {
    /// A group the API has just created, as the API server answered: its worker's first
    /// batches need not read it again.
    pub async fn prime(&self, group: ImageGroup) {
        if let Some(uid) = group.uid() {
            let events = Arc::new(ImageEvents::new(Arc::new(group)));
            self.read.put(&uid, events).await;
        }
    }

    async fn planner(
        &self,
        client: &kube::Client,
        batch: &ResultBatch,
    ) -> Result<Arc<ImageEvents>, ApiError> {
        let uid = &batch.group.uid;
        // Only the group of the batch's namespace and name (the caller is that namespace's
        // worker) with this uid, the same check as the read's, of the batch's generation
        // or newer.
        let serves = |events: &ImageEvents| {
            let group = events.group();
            group.metadata.generation.unwrap_or(1) >= batch.generation
                && group.namespace().as_deref() == Some(batch.group.namespace.as_str())
                && group.metadata.name.as_deref() == Some(batch.group.name.as_str())
        };
        let fresh =
            |(at, events): &(Instant, Arc<ImageEvents>)| at.elapsed() < GROUP_TTL && serves(events);
        let read = |held: Option<Arc<ImageEvents>>| async move {
            let groups: Api<ImageGroup> = Api::namespaced(client.clone(), &batch.group.namespace);
            // The spec, all the events are made of, changes only with the generation: a
            // metadata read (about 1 KiB) confirms the group held, where a whole read of
            // 1000 images' spec is 55 KiB for the API server to encode every TTL.
            if let Some(held) = held.filter(|h| serves(h)) {
                let current = groups.get_metadata_opt(&batch.group.name).await?;
                let current = the_one(current, uid, &batch.group.name)?;
                if current.metadata.generation == held.group().metadata.generation {
                    return Ok(held);
                }
            }
            let group = groups.get_opt(&batch.group.name).await?;
            let group = the_one(group, uid, &batch.group.name)?;
            Ok(Arc::new(ImageEvents::new(Arc::new(group))))
        };
        self.read.try_get_or_refresh(uid, fresh, read).await
    }
}

/// The group found by name if it has the work order's uid (not a later group of that name).
fn the_one<K: ResourceExt>(found: Option<K>, uid: &str, name: &str) -> Result<K, ApiError> {
    found
        .filter(|g| g.uid().as_deref() == Some(uid))
        .ok_or_else(|| ApiError::Gone(format!("image group {name} is gone")))
}

/// Who calls the internal end: the user name of the request's bearer token, as the API
/// server reviewed it.
pub(super) async fn caller(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = bearer_token(headers)?;
    state
        .reviews
        .user(&state.client, token)
        .await?
        .ok_or(ApiError::Unauthorized)
}

/// The namespace whose worker `user` is (`system:serviceaccount:<namespace>:kinsight-worker`),
/// if it is one.
pub(super) fn worker_namespace(user: &str) -> Option<&str> {
    let (namespace, account) = user
        .strip_prefix("system:serviceaccount:")?
        .split_once(':')?;
    (account == WORKER_ACCOUNT && !namespace.is_empty()).then_some(namespace)
}

pub async fn store_results(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ResultBatch>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let user = caller(&state, &headers).await?;
    let Json(batch) = body.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    if worker_namespace(&user) != Some(batch.group.namespace.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "{user} may not store results of namespace {}",
            batch.group.namespace
        )));
    }
    check_batch(&batch)?;
    // The group must be the one the work order named: results of a deleted group (or of
    // an earlier group of the same name) have no reader. The batch's image events are
    // recorded with its results, by the group's spec: the dispatchers send them as soon as
    // they are stored.
    let planner = state.groups.planner(&state.client, &batch).await?;
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
            Some(planner.as_ref()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_namespaces_worker_account_is_its_worker() {
        assert_eq!(
            worker_namespace("system:serviceaccount:tenant-a:kinsight-worker"),
            Some("tenant-a")
        );
        for other in [
            "system:serviceaccount:tenant-a:default",
            "system:serviceaccount:tenant-a:kinsight-worker:x",
            "system:serviceaccount::kinsight-worker",
            "kinsight-worker",
            "system:admin",
        ] {
            assert_eq!(worker_namespace(other), None, "{other}");
        }
    }
}
