//! The REST contract: an OpenAPI 3.1 document generated from the handlers' annotations and
//! the types below, served at `GET /openapi.json` and checked in as `schemas/openapi.json`
//! (regenerate with `kinsight openapi > schemas/openapi.json`; a test compares the two).
//!
//! Answers are built as JSON in the handlers; the `...Out` types here describe them for the
//! document only. Schemathesis (tests/schemathesis.rs) checks real answers against them, so
//! the two cannot drift apart unnoticed.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use super::{deliveries, images};

/// The security scheme's name in the document.
const API_KEY: &str = "apiKey";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kinsight",
        description = "Image insights: submit images, read their model results, follow and \
                       replay their signed webhooks. Every error is `application/problem+json` \
                       (RFC 9457) with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        images::create_image,
        images::get_image,
        images::create_group,
        images::get_group,
        images::update_group,
        deliveries::list_group,
        deliveries::get_one,
        deliveries::replay_one,
        deliveries::list_undelivered,
        deliveries::replay_since,
    ),
    components(schemas(Problem, StateFilter)),
    modifiers(&ApiKeyScheme),
    security(("apiKey" = [])),
)]
struct ApiDoc;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The tenant's API key: `Authorization: Bearer <key>`."))
                    .build(),
            ),
        );
    }
}

/// The document, as served and checked in (pretty, with a final newline).
pub fn document() -> String {
    let text = ApiDoc::openapi()
        .to_pretty_json()
        // Serialising a tree of maps and strings cannot fail; an empty object would show.
        .unwrap_or_else(|_| "{}".to_owned());
    format!("{text}\n")
}

/// `GET /openapi.json` (no key needed).
pub(super) async fn serve() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document(),
    )
}

/// An RFC 9457 problem: every error answer.
#[derive(Serialize, ToSchema)]
pub struct Problem {
    /// `https://kinsight.io/problems/<code with dashes>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable category, e.g. `invalid_request`, `not_found`.
    pub code: String,
    /// The limit met (`in_flight_images`), on `in_flight_limited` and `over_in_flight_cap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// The tenant's images in flight, on `in_flight_limited`.
    #[serde(rename = "inFlight", skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// The request's images, on `in_flight_limited` and `over_in_flight_cap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<u32>,
    /// The tenant's cap on images in flight, on `in_flight_limited` and `over_in_flight_cap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap: Option<u32>,
}

/// A POST's answer: the resource was accepted and is processed asynchronously.
#[derive(Serialize, ToSchema)]
pub struct AcceptedOut {
    pub id: String,
    /// Always `pending` at first.
    pub status: String,
    pub links: LinksOut,
}

#[derive(Serialize, ToSchema)]
pub struct LinksOut {
    /// Where to read the resource (also in `Location`).
    #[serde(rename = "self")]
    pub self_link: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // Only the document reads it.
pub enum Phase {
    Pending,
    Running,
    Completed,
    Failed,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // Only the document reads it.
pub enum ImageStatus {
    Pending,
    Completed,
    Failed,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageFailureOut {
    /// Stable category, e.g. `DownloadFailed`, `UnsupportedFormat`.
    pub reason: String,
    pub message: String,
}

/// One image of a group and its results once processed.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageOut {
    pub id: String,
    pub url: String,
    pub metadata: BTreeMap<String, String>,
    pub status: ImageStatus,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Per model name, that model's output.
    #[schema(value_type = Option<Object>)]
    pub results: Option<Value>,
    pub failure: Option<ImageFailureOut>,
}

/// `GET /v1/images/{id}`: the image with its group's models.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SingleImageOut {
    #[serde(flatten)]
    pub image: ImageOut,
    pub models: Vec<String>,
    pub created_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupOut {
    pub id: String,
    pub status: Phase,
    pub models: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub images_total: u64,
    pub images_done: u64,
    pub images_failed: u64,
    /// Counts across the group's results, per model.
    #[schema(value_type = Object)]
    pub aggregate: Value,
    pub created_at: Option<String>,
    pub completed_at: Option<String>,
    /// A page of the group's images (`limit`, default 100), in the group's order.
    pub images: Vec<ImageOut>,
    /// The `cursor` of the next page of images; null on the last.
    pub next_cursor: Option<String>,
    pub links: GroupLinks,
}

#[derive(Serialize, ToSchema)]
pub struct GroupLinks {
    /// The group's URL.
    #[serde(rename = "self")]
    pub this: String,
    /// The next page of its images; null on the last.
    pub next: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // Only the document reads it.
pub enum DeliveryStateOut {
    Pending,
    Sending,
    Delivered,
    Failed,
}

/// `state` of `GET /v1/deliveries`: `pending` includes being sent.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // Only the document reads it.
pub enum StateFilter {
    Failed,
    Pending,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryOut {
    pub group_id: String,
    /// The `webhook-id`.
    pub id: String,
    pub event: String,
    pub image_id: Option<String>,
    /// `request` (the group's own webhook) or `subscription/<name>`.
    pub endpoint: String,
    pub sequence: u64,
    pub state: DeliveryStateOut,
    pub attempts: u32,
    pub created_at: String,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    pub last_error: Option<String>,
}

/// A page of deliveries; `nextCursor` (when not null) fetches the next one.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    pub deliveries: Vec<DeliveryOut>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptOut {
    pub at: String,
    /// `delivered`, `failed` or `not_sent`.
    pub outcome: String,
    pub status_code: Option<u16>,
    pub duration_ms: f64,
    pub error: Option<String>,
    /// The start of the receiver's answer to a failed attempt.
    pub response: Option<String>,
}

/// One delivery with every attempt (`attempts` is the list here, not the count).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryDetailOut {
    pub group_id: String,
    pub id: String,
    pub event: String,
    pub image_id: Option<String>,
    pub endpoint: String,
    pub sequence: u64,
    pub state: DeliveryStateOut,
    pub attempts: Vec<AttemptOut>,
    pub created_at: String,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayedOut {
    /// Failed deliveries to send again.
    pub replayed: u64,
    /// Per group, how many (only for a replay since a time; at most `limit` groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<BTreeMap<String, u64>>,
    /// Only for a replay since a time: when not null, post the same `since` with this
    /// `cursor` to replay the next groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<Option<String>>,
}

/// What every customer call may answer besides its result.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only the document reads it.
pub enum Problems {
    #[response(
        status = 400,
        description = "A query or path parameter is invalid (`invalid_parameter`).",
        content_type = "application/problem+json"
    )]
    BadParameter(Problem),
    #[response(
        status = 401,
        description = "Missing or unknown API key (`unauthorized`).",
        content_type = "application/problem+json"
    )]
    Unauthorized(Problem),
    #[response(
        status = 404,
        description = "No such resource for this tenant (`not_found`).",
        content_type = "application/problem+json"
    )]
    NotFound(Problem),
    #[response(
        status = 429,
        description = "This API key's rate limit is reached (`rate_limited`), or (a POST, a PATCH adding images) the tenant's images in flight would pass its cap (`in_flight_limited`, with `inFlight`, `requested` and `cap`); retry after `Retry-After` seconds.",
        content_type = "application/problem+json",
        headers(
            ("Retry-After" = u64, description = "Seconds until a request is accepted again"),
            ("RateLimit-Policy" = String, description = "The key's limit, e.g. `\"per-key\";q=100;w=1` (requests per second)"),
            ("RateLimit" = String, description = "What is left and when it refills, e.g. `\"per-key\";r=0;t=1`"),
        )
    )]
    RateLimited(Problem),
    #[response(
        status = 503,
        description = "The cluster or the store is unavailable, or the request took too long (`unavailable`, `timeout`); retry.",
        content_type = "application/problem+json"
    )]
    Unavailable(Problem),
}

/// What a POST or PATCH may answer on top of [`Problems`].
#[derive(IntoResponses)]
#[allow(dead_code)] // Only the document reads it.
pub enum WriteProblems {
    #[response(
        status = 409,
        description = "Changed meanwhile (`conflict`), or a request with this `Idempotency-Key` is still running (`idempotency_key_in_progress`, with `Retry-After`); retry.",
        content_type = "application/problem+json"
    )]
    Conflict(Problem),
    #[response(
        status = 413,
        description = "The body is over the limit (`payload_too_large`).",
        content_type = "application/problem+json"
    )]
    TooLarge(Problem),
    #[response(
        status = 415,
        description = "The body is not `application/json` (`unsupported_media_type`).",
        content_type = "application/problem+json"
    )]
    NotJson(Problem),
    #[response(
        status = 422,
        description = "The body is invalid (`invalid_request`), the `Idempotency-Key` is malformed, or it was used for another request (`idempotency_key_reused`), or the request alone has more images than the tenant's cap on images in flight (`over_in_flight_cap`, with `requested` and `cap`).",
        content_type = "application/problem+json"
    )]
    Invalid(Problem),
}

/// The header every POST takes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only the document reads it.
pub struct IdempotencyKey {
    /// At most 255 visible ASCII characters. A retry with the same key and body gets the
    /// first answer (marked `Idempotent-Replayed: true`) and creates nothing more; kept 24 h.
    #[param(rename = "Idempotency-Key", value_type = String, required = false, min_length = 1, max_length = 255)]
    key: Option<String>,
}

/// The W3C trace context a request that creates or changes a group may carry.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only the document reads it.
pub struct TraceContext {
    /// `00-<trace id>-<span id>-<flags>`: the group's work and webhooks join this trace. One
    /// that does not parse is ignored (a new trace is started), never refused.
    #[param(rename = "traceparent", value_type = String, required = false)]
    traceparent: Option<String>,
    /// Kept with the group's trace context (`kinsight.io/tracestate`) when printable, at
    /// most 512 characters and sent with a valid `traceparent`; its webhooks send it on.
    #[param(rename = "tracestate", value_type = String, required = false)]
    tracestate: Option<String>,
}

/// `limit` and `cursor` of every list.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Only the document reads it.
pub struct Paging {
    /// Page size (default 100).
    #[param(value_type = i64, required = false, minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// `nextCursor` of the previous page.
    #[param(value_type = String, required = false)]
    cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    /// The checked-in document is the generated one; regenerate it with
    /// `cargo run -- openapi > schemas/openapi.json`.
    #[test]
    fn checked_in_document_is_the_generated_one() {
        let checked_in = include_str!("../../schemas/openapi.json");
        assert!(
            checked_in == super::document(),
            "schemas/openapi.json is stale: run `cargo run -- openapi > schemas/openapi.json`"
        );
    }
}
