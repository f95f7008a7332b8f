//! Handlers for images and image groups. DTOs are `...In` (requests) and built JSON
//! (responses); ids are prefixed by kind: `img-...` for single images, `grp-...` for groups.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::Instrument;
use utoipa::ToSchema;

use super::auth::{SIGNING_SECRET_KEY, SIGNING_SECRET_NAME, Tenant, authenticate};
use super::deliveries::PageQuery;
use super::openapi::{
    AcceptedOut, GroupOut, IdempotencyKey, Paging, Problems, SingleImageOut, TraceContext,
    WriteProblems,
};
use super::problem::ApiError;
use super::{AppState, MAX_BODY_BYTES};
use super::{in_flight, retry};
use crate::crd::{
    ImageEntry, ImageGroup, ImageGroupSpec, SecretKeyRef, WebhookTarget, is_object_name,
};
use crate::results::{GroupRef, ImageResult};
use crate::store::Cursor;
use crate::trace::{self, TraceParent};

const SINGLE_IMAGE_ID: &str = "image";

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageIn {
    url: String,
    models: Vec<String>,
    #[serde(default)]
    webhook_url: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageGroupIn {
    images: Vec<GroupImageIn>,
    models: Vec<String>,
    #[serde(default)]
    webhook_url: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupImageIn {
    #[serde(default)]
    id: Option<String>,
    url: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[utoipa::path(post, path = "/v1/images", tag = "images",
    params(IdempotencyKey, TraceContext),
    request_body = ImageIn,
    responses(
        (status = 202, description = "Accepted; processed asynchronously.", body = AcceptedOut,
         headers(("Location" = String, description = "The image's URL"),
             ("traceparent" = String, description = "The request's W3C trace context: the trace the group's webhooks carry"))),
        Problems,
        WriteProblems,
    ))]
pub async fn create_image(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let input: ImageIn = parse_json(&headers, body)?;
    let spec = ImageGroupSpec {
        images: vec![ImageEntry {
            id: Some(SINGLE_IMAGE_ID.to_owned()),
            url: input.url,
            metadata: input.metadata,
        }],
        models: input.models,
        webhook: webhook_target(input.webhook_url),
        metadata: BTreeMap::new(),
    };
    let span = tracing::info_span!("create_image", trace_id = tracing::field::Empty);
    let trace = RequestTrace::start(&headers, &span);
    let id = create(&state, &tenant, "img", spec, &trace)
        .instrument(span.clone())
        .await?;
    Ok(traced(
        accepted(&format!("/v1/images/{id}"), &id),
        &trace.span,
    ))
}

#[utoipa::path(post, path = "/v1/image-groups", tag = "image groups",
    params(IdempotencyKey, TraceContext),
    request_body = ImageGroupIn,
    responses(
        (status = 202, description = "Accepted; processed asynchronously.", body = AcceptedOut,
         headers(("Location" = String, description = "The group's URL"),
             ("traceparent" = String, description = "The request's W3C trace context: the trace the group's webhooks carry"))),
        Problems,
        WriteProblems,
    ))]
pub async fn create_group(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let input: ImageGroupIn = parse_json(&headers, body)?;
    let spec = ImageGroupSpec {
        images: input
            .images
            .into_iter()
            .map(|i| ImageEntry {
                id: i.id,
                url: i.url,
                metadata: i.metadata,
            })
            .collect(),
        models: input.models,
        webhook: webhook_target(input.webhook_url),
        metadata: input.metadata,
    };
    let span = tracing::info_span!("create_group", trace_id = tracing::field::Empty);
    let trace = RequestTrace::start(&headers, &span);
    let id = create(&state, &tenant, "grp", spec, &trace)
        .instrument(span.clone())
        .await?;
    Ok(traced(
        accepted(&format!("/v1/image-groups/{id}"), &id),
        &trace.span,
    ))
}

/// Adds images and/or models to a group; only what is new is processed, then the group's
/// events follow (`image_group.updated` when it had completed before).
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageGroupPatchIn {
    #[serde(default)]
    add_images: Vec<GroupImageIn>,
    #[serde(default)]
    add_models: Vec<String>,
}

#[utoipa::path(patch, path = "/v1/image-groups/{id}", tag = "image groups",
    params(("id" = String, Path, description = "The group's id"), TraceContext),
    request_body = ImageGroupPatchIn,
    responses(
        (status = 202, description = "Accepted; what is new is processed.", body = AcceptedOut,
         headers(("Location" = String, description = "The group's URL"),
             ("traceparent" = String, description = "The request's W3C trace context: the trace the group's webhooks carry"))),
        Problems,
        WriteProblems,
    ))]
pub async fn update_group(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let input: ImageGroupPatchIn = parse_json(&headers, body)?;
    if input.add_images.is_empty() && input.add_models.is_empty() {
        return Err(ApiError::InvalidRequest(
            "nothing to add: give addImages and/or addModels".into(),
        ));
    }
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    // The added images count in flight (added models re-run images already counted once).
    let uid = find_group(&api, &id, "image group").await?.uid();
    let added = input.add_images.len();
    in_flight::admit(&state, &tenant, &id, uid.as_deref(), added).await?;
    // A trace the client names takes over the group's events from here on; without one
    // the group's own trace goes on.
    let span = tracing::info_span!("update_group", trace_id = tracing::field::Empty);
    let given = RequestTrace::given(&headers, &span);
    let added_to = retry::on_conflict(|| {
        add_to_group(&api, &id, &input, &state.config.models, given.as_ref())
    })
    .await;
    let trace = match added_to {
        Ok(trace) => trace,
        Err(e) => {
            in_flight::withdraw(&state, &tenant, &id, added).await;
            return Err(e);
        }
    };
    Ok(traced(
        accepted(&format!("/v1/image-groups/{id}"), &id),
        &trace,
    ))
}

/// One attempt at adding `input` to the group as read now. The replace carries the
/// resourceVersion read, so a concurrent change makes it a conflict, never a lost update.
async fn add_to_group(
    api: &Api<ImageGroup>,
    id: &str,
    input: &ImageGroupPatchIn,
    models: &[String],
    given: Option<&RequestTrace>,
) -> Result<TraceParent, ApiError> {
    let mut group = find_group(api, id, "image group").await?;
    let trace = match given {
        Some(given) => {
            given.annotate(&mut group.metadata);
            given.span
        }
        None => trace::of_group(group.annotations(), group.uid().as_deref())
            .unwrap_or_else(TraceParent::new_trace),
    };
    let added = new_entries(&group.spec.images, &input.add_images);
    group.spec.images.extend(added);
    for model in &input.add_models {
        if !group.spec.models.contains(model) {
            group.spec.models.push(model.clone());
        }
    }
    group
        .spec
        .validate(models)
        .and_then(|()| group.spec.check_size())
        .map_err(ApiError::InvalidRequest)?;
    api.replace(id, &PostParams::default(), &group).await?;
    Ok(trace)
}

/// The trace of a POST: the client's `traceparent` continued in a span of ours, or a new
/// trace when it sent none or one that does not parse (never an error). The span's context
/// is what the group records, so its reconciles, Jobs and webhooks are children of it.
struct RequestTrace {
    span: TraceParent,
    state: Option<String>,
}

impl RequestTrace {
    /// `span` (the request's) joins the client's trace, or starts one.
    fn start(headers: &HeaderMap, span: &tracing::Span) -> Self {
        Self::given(headers, span).unwrap_or_else(|| Self::opened(span, None, None))
    }

    /// Only when the client sent a valid `traceparent`.
    fn given(headers: &HeaderMap, span: &tracing::Span) -> Option<Self> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let parent = text(trace::HEADER).and_then(TraceParent::parse)?;
        let state = text(trace::STATE_HEADER).and_then(trace::parse_tracestate);
        Some(Self::opened(span, Some(&parent), state))
    }

    fn opened(span: &tracing::Span, parent: Option<&TraceParent>, state: Option<String>) -> Self {
        let own = trace::start(span, parent);
        span.record("trace_id", own.trace_id_hex());
        Self { span: own, state }
    }

    fn annotate(&self, meta: &mut ObjectMeta) {
        let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(trace::ANNOTATION.to_owned(), self.span.to_string());
        match &self.state {
            Some(state) => annotations.insert(trace::STATE_ANNOTATION.to_owned(), state.clone()),
            None => annotations.remove(trace::STATE_ANNOTATION),
        };
    }
}

/// The answer with the request's trace context, so a client can find the trace.
fn traced(mut response: Response, trace: &TraceParent) -> Response {
    if let Ok(value) = header::HeaderValue::from_str(&trace.to_string()) {
        response.headers_mut().insert(trace::HEADER, value);
    }
    response
}

/// The entries for `added`, after `existing`. An image without an id gets its position,
/// as at creation, or when that is taken (an explicit id may be a number) the next number
/// no image has: the client is never refused for an id it did not send.
fn new_entries(existing: &[ImageEntry], added: &[GroupImageIn]) -> Vec<ImageEntry> {
    let mut used: HashSet<String> = existing
        .iter()
        .enumerate()
        .map(|(i, image)| image.key(i))
        .chain(added.iter().filter_map(|image| image.id.clone()))
        .collect();
    added
        .iter()
        .enumerate()
        .map(|(offset, image)| {
            let id = image.id.clone().unwrap_or_else(|| {
                let mut number = existing.len() + offset;
                while used.contains(&number.to_string()) {
                    number += 1;
                }
                let id = number.to_string();
                used.insert(id.clone());
                id
            });
            ImageEntry {
                id: Some(id),
                url: image.url.clone(),
                metadata: image.metadata.clone(),
            }
        })
        .collect()
}

#[utoipa::path(get, path = "/v1/images/{id}", tag = "images",
    params(("id" = String, Path, description = "The image's id (`img-...`)")),
    responses((status = 200, description = "The image and its results.", body = SingleImageOut), Problems))]
pub async fn get_image(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    if !id.starts_with("img-") {
        return Err(ApiError::NotFound(format!("image {id}")));
    }
    let (group, mut page) = load_page(&state, &tenant, &id, "image", 0, 1).await?;
    let mut image = page.images.pop().unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut image {
        fields.insert("id".to_owned(), json!(id));
        fields.insert("models".to_owned(), json!(group.spec.models));
        fields.insert(
            "createdAt".to_owned(),
            json!(
                group
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
            ),
        );
    }
    Ok(Json(image))
}

#[utoipa::path(get, path = "/v1/image-groups/{id}", tag = "image groups",
    params(("id" = String, Path, description = "The group's id"),
        Paging),
    responses((status = 200, description = "The group, and a page of its images (in the group's order) with their results; `nextCursor` (and `links.next`) leads to the next page.", body = GroupOut), Problems))]
pub async fn get_group(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state.keys, &headers)?;
    let Query(query) = query.map_err(|e| ApiError::InvalidParameter(e.body_text()))?;
    let limit = query.limit()?;
    let cursor = query.cursor()?;
    query.no_state()?;
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let group = find_group(&api, &id, "image group").await?;
    // Images are only ever appended, so a position names the same image for good; the
    // image's id in the cursor catches a cursor of another group.
    let start = match cursor {
        None => 0,
        Some(c) => usize::try_from(c.after_key)
            .ok()
            .filter(|&at| {
                group
                    .spec
                    .images
                    .get(at)
                    .is_some_and(|image| image.key(at) == c.after_id)
            })
            .map(|at| at + 1)
            .ok_or_else(|| {
                ApiError::InvalidParameter(format!(
                    "cursor: {:?} is not a cursor of this group's images",
                    c.encode()
                ))
            })?,
    };
    let limit = usize::try_from(limit).unwrap_or(1);
    let (group, page) = page_of(&state, &tenant, group, start, limit).await?;
    let status = group.status.clone().unwrap_or_default();
    let self_link = format!("/v1/image-groups/{id}");
    let next_link = page
        .next_cursor
        .as_ref()
        .map(|c| format!("{self_link}?limit={limit}&cursor={c}"));
    Ok(Json(json!({
        "id": id,
        "status": phase(&group),
        "models": group.spec.models,
        "metadata": group.spec.metadata,
        "imagesTotal": group.spec.images.len(),
        "imagesDone": status.images_done,
        "imagesFailed": status.images_failed,
        "aggregate": status.aggregate.unwrap_or_default(),
        "createdAt": group.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        "completedAt": status.completed_at.as_ref().map(|t| t.0.to_string()),
        "images": page.images,
        "nextCursor": page.next_cursor,
        "links": { "self": self_link, "next": next_link },
    })))
}

fn webhook_target(url: Option<String>) -> Option<WebhookTarget> {
    url.map(|url| WebhookTarget {
        url,
        secret_ref: SecretKeyRef {
            name: SIGNING_SECRET_NAME.to_owned(),
            key: SIGNING_SECRET_KEY.to_owned(),
        },
    })
}

pub(super) fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = read_body(body)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
}

/// The request body, or why it could not be read (over [`MAX_BODY_BYTES`]: 413).
pub(super) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge(MAX_BODY_BYTES)
        }
        other => ApiError::InvalidRequest(format!("could not read the request body: {other}")),
    })
}

async fn create(
    state: &AppState,
    tenant: &Tenant,
    prefix: &str,
    spec: ImageGroupSpec,
    trace: &RequestTrace,
) -> Result<String, ApiError> {
    // The cap first (no retry makes such a request fit), unless the group is over the
    // spec's own bound: that message says more.
    if spec.images.len() <= crate::crd::MAX_IMAGES {
        in_flight::fits(state, tenant, spec.images.len())?;
    }
    spec.validate(&state.config.models)
        .and_then(|()| spec.check_size())
        .map_err(ApiError::InvalidRequest)?;
    let id = format!("{prefix}-{}", hex::encode(rand::random::<[u8; 8]>()));
    let images = spec.images.len();
    in_flight::admit(state, tenant, &id, None, images).await?;
    let mut metadata = ObjectMeta {
        name: Some(id.clone()),
        namespace: Some(tenant.namespace.clone()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/created-by".to_owned(),
            "kinsight-api".to_owned(),
        )])),
        ..ObjectMeta::default()
    };
    trace.annotate(&mut metadata);
    let group = ImageGroup {
        metadata,
        spec,
        status: None,
    };
    let created = match Api::<ImageGroup>::namespaced(state.client.clone(), &tenant.namespace)
        .create(&PostParams::default(), &group)
        .await
    {
        Ok(created) => created,
        Err(e) => {
            in_flight::withdraw(state, tenant, &id, images).await;
            return Err(e.into());
        }
    };
    // Until this is recorded the admission counts for a minute only: a failure here is
    // logged, not the client's problem (its group exists).
    if let Err(e) = state
        .store
        .admitted_group(&tenant.namespace, &id, &created.uid().unwrap_or_default())
        .await
    {
        tracing::warn!(error = %e, id = %id, "recording an admitted group's uid");
    }
    tracing::info!(id = %id, namespace = %tenant.namespace, trace_id = %trace.span.trace_id_hex(), "image group created");
    state.groups.prime(created).await;
    Ok(id)
}

fn accepted(location: &str, id: &str) -> Response {
    let body = json!({ "id": id, "status": "pending", "links": { "self": location } });
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location.to_owned())],
        Json(body),
    )
        .into_response()
}

/// The tenant's group `id`, or a 404 naming `what` was looked for.
pub(super) async fn find_group(
    api: &Api<ImageGroup>,
    id: &str,
    what: &str,
) -> Result<ImageGroup, ApiError> {
    // The id becomes a segment of the API server's URL: one that is no object name
    // (`grp-x/status`, `..`) names nothing here, and must not name anything there.
    // Ids the API makes (`grp-…`) and names of groups applied with kubectl pass.
    if !is_object_name(id) {
        return Err(ApiError::NotFound(format!("{what} {id}")));
    }
    api.get_opt(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{what} {id}")))
}

/// A page of a group's images with their results: `limit` from position `start`, and the
/// cursor of the next page when there is one.
struct ImagePage {
    images: Vec<Value>,
    next_cursor: Option<String>,
}

async fn load_page(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    what: &str,
    start: usize,
    limit: usize,
) -> Result<(ImageGroup, ImagePage), ApiError> {
    let api: Api<ImageGroup> = Api::namespaced(state.client.clone(), &tenant.namespace);
    let group = find_group(&api, id, what).await?;
    page_of(state, tenant, group, start, limit).await
}

async fn page_of(
    state: &AppState,
    tenant: &Tenant,
    group: ImageGroup,
    start: usize,
    limit: usize,
) -> Result<(ImageGroup, ImagePage), ApiError> {
    let end = start.saturating_add(limit).min(group.spec.images.len());
    let start = start.min(end);
    let keys: Vec<String> = (start..end).map(|i| group.spec.images[i].key(i)).collect();
    // The store is written before the controller counts or announces a result, so a
    // client polling after a webhook always finds what it was told about. Only this
    // page's results are read.
    let group_ref = GroupRef {
        namespace: tenant.namespace.clone(),
        name: group.name_any(),
        uid: group.uid().unwrap_or_default(),
    };
    let results = state.store.results_of_images(&group_ref, &keys).await?;
    let images = images_out(&group, start..end, &results);
    let next_cursor = (end < group.spec.images.len()).then(|| {
        Cursor {
            after_key: i64::try_from(end - 1).unwrap_or(i64::MAX),
            after_id: keys.last().cloned().unwrap_or_default(),
        }
        .encode()
    });
    Ok((
        group,
        ImagePage {
            images,
            next_cursor,
        },
    ))
}

fn phase(group: &ImageGroup) -> &'static str {
    match group.status.as_ref().map(|s| s.phase) {
        Some(crate::crd::GroupPhase::Completed) => "completed",
        Some(crate::crd::GroupPhase::Failed) => "failed",
        Some(crate::crd::GroupPhase::Running) => "running",
        _ => "pending",
    }
}

fn images_out(
    group: &ImageGroup,
    positions: std::ops::Range<usize>,
    results: &HashMap<String, ImageResult>,
) -> Vec<Value> {
    let models = &group.spec.models;
    group.spec.images[positions.clone()]
        .iter()
        .zip(positions)
        .map(|(image, i)| {
            let key = image.key(i);
            let result = results.get(&key).filter(|r| r.covers(models));
            let status = match result {
                Some(r) if r.is_failure(models) => "failed",
                Some(_) => "completed",
                None => "pending",
            };
            json!({
                "id": key,
                "url": image.url,
                "metadata": image.metadata,
                "status": status,
                "width": result.and_then(|r| r.width),
                "height": result.and_then(|r| r.height),
                "results": result.map(|r| &r.outputs),
                "failure": result.and_then(|r| r.failure.as_ref()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_images_without_ids_never_take_one_in_use() {
        let entry = |id: Option<&str>| ImageEntry {
            id: id.map(str::to_owned),
            url: "https://photos.example/a.jpg".into(),
            metadata: BTreeMap::new(),
        };
        let input = |id: Option<&str>| GroupImageIn {
            id: id.map(str::to_owned),
            url: "https://photos.example/b.jpg".into(),
            metadata: BTreeMap::new(),
        };
        // Created as [no id, "5"]: positions 0 and the explicit 5 are taken.
        let existing = [entry(None), entry(Some("5"))];
        let added = [
            input(None),
            input(None),
            input(None),
            input(Some("4")),
            input(None),
        ];
        let ids: Vec<String> = new_entries(&existing, &added)
            .into_iter()
            .filter_map(|e| e.id)
            .collect();
        assert_eq!(ids, ["2", "3", "6", "4", "7"]);
        let mut group = ImageGroupSpec {
            images: existing.to_vec(),
            models: vec!["object_detection".into()],
            webhook: None,
            metadata: BTreeMap::new(),
        };
        group.images.extend(new_entries(&existing, &added));
        assert_eq!(group.validate(&["object_detection".to_owned()]), Ok(()));
    }
}
