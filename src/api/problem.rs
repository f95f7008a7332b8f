//! API errors, answered as RFC 9457 `application/problem+json` with a stable `code`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    InvalidRequest(String),
    /// A query or path parameter, as opposed to the body.
    #[error("{0}")]
    InvalidParameter(String),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("this route does not take that method (the Allow header lists those it takes)")]
    MethodNotAllowed,
    #[error("{0}")]
    Gone(String),
    #[error("the resource changed meanwhile; read it again and retry")]
    Conflict,
    #[error("the cluster is unavailable; try again")]
    Unavailable(String),
    #[error("the request took longer than {0} s; retry it")]
    TimedOut(u64),
    #[error(
        "this API key's limit of {limit} requests per second is reached; retry in {retry_after} s"
    )]
    RateLimited { limit: u32, retry_after: u64 },
    #[error(
        "this tenant has {in_flight} images in flight (posted, not yet finished) and a cap of \
         {limit}; the {requested} images of this request would pass it: retry once some finish"
    )]
    InFlightLimited {
        in_flight: u64,
        requested: u32,
        limit: u32,
    },
    #[error(
        "this request has {requested} images, more than this tenant's cap of {limit} images in \
         flight: split it into requests of at most {limit}"
    )]
    OverInFlightCap { requested: u32, limit: u32 },
    #[error(
        "this Idempotency-Key was used for another request (method, path or body); use a new key"
    )]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being carried out; retry shortly")]
    IdempotencyKeyInProgress,
}

impl ApiError {
    /// Stable machine-readable code; clients switch on this, not on the text.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidParameter(_) => "invalid_parameter",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Gone(_) => "gone",
            Self::Conflict => "conflict",
            Self::Unavailable(_) => "unavailable",
            Self::TimedOut(_) => "timeout",
            Self::RateLimited { .. } => "rate_limited",
            Self::InFlightLimited { .. } => "in_flight_limited",
            Self::OverInFlightCap { .. } => "over_in_flight_cap",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyKeyInProgress => "idempotency_key_in_progress",
        }
    }

    pub(super) fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            Self::RateLimited { .. } | Self::InFlightLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::OverInFlightCap { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Gone(_) => StatusCode::GONE,
            Self::Conflict => StatusCode::CONFLICT,
            Self::Unavailable(_) | Self::TimedOut(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyKeyInProgress => StatusCode::CONFLICT,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::warn!(category = e.category(), error = %e, "result store call failed");
        Self::Unavailable(format!(
            "the result store is unavailable ({})",
            e.category()
        ))
    }
}

impl From<kube::Error> for ApiError {
    /// The API server's answers that concern the request keep their meaning (a group
    /// deleted meanwhile, a concurrent change, an object it refuses); the rest is the
    /// cluster being unavailable.
    fn from(e: kube::Error) -> Self {
        if let kube::Error::Api(answer) = &e {
            // An object over the API server's or etcd's size limit: retrying cannot help,
            // a smaller request can.
            if answer.code == 413 || answer.message.contains("too large") {
                return Self::InvalidRequest(format!(
                    "the image group would be larger than the cluster stores in one object \
                     ({}); split the images into several groups",
                    answer.message
                ));
            }
            match answer.code {
                404 => return Self::NotFound(answer.message.clone()),
                409 => return Self::Conflict,
                422 => return Self::InvalidRequest(answer.message.clone()),
                _ => {}
            }
        }
        tracing::warn!(error = %e, "kubernetes API call failed");
        Self::Unavailable(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({
            "type": format!("https://kinsight.io/problems/{}", self.code().replace('_', "-")),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
            "code": self.code(),
        });
        let body = match &self {
            // Which limit, where the client stands and the cap, for a client to act on.
            Self::InFlightLimited {
                in_flight,
                requested,
                limit,
            } => with_fields(
                body,
                json!({ "limit": "in_flight_images", "inFlight": in_flight,
                        "requested": requested, "cap": limit }),
            ),
            Self::OverInFlightCap { requested, limit } => with_fields(
                body,
                json!({ "limit": "in_flight_images", "requested": requested, "cap": limit }),
            ),
            _ => body,
        };
        let mut response = (status, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::RateLimited { limit, retry_after } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            super::rate_limit::headers(response.headers_mut(), limit, 0, retry_after);
        }
        if matches!(self, Self::InFlightLimited { .. }) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(IN_FLIGHT_RETRY_AFTER_SECONDS),
            );
        }
        if matches!(self, Self::IdempotencyKeyInProgress) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A guess, not a promise: images finish at a rate no one knows beforehand, and a few
/// seconds lets a backlog move without the client hammering the API.
const IN_FLIGHT_RETRY_AFTER_SECONDS: u64 = 5;

/// `problem` with `fields` added (RFC 9457 extension members).
fn with_fields(mut problem: serde_json::Value, fields: serde_json::Value) -> serde_json::Value {
    if let (Some(problem), serde_json::Value::Object(fields)) = (problem.as_object_mut(), fields) {
        problem.extend(fields);
    }
    problem
}

/// Answers that did not come from an [`ApiError`] (axum's own rejections, such as a path
/// with a bad escape, and any layer's) become problems too, keeping their status, their text
/// as the detail and their other headers (`Allow` of a 405).
pub(super) async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Rejections' texts are one line; a longer body is cut, not buffered whole.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let detail = String::from_utf8_lossy(&text).trim().to_owned();
    let error = match status {
        StatusCode::NOT_FOUND => ApiError::NotFound("route".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(super::MAX_BODY_BYTES),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::InvalidRequest(detail),
        s if s.is_server_error() => ApiError::Unavailable(detail),
        _ => ApiError::InvalidParameter(detail),
    };
    let answer = error.into_response();
    parts.status = answer.status();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.extend(answer.headers().clone());
    Response::from_parts(parts, answer.into_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: u16) -> kube::Error {
        let status = serde_json::from_value(json!({
            "status": "Failure", "message": format!("answer {code}"), "reason": "", "code": code
        }))
        .expect("a Status");
        kube::Error::Api(status)
    }

    #[test]
    fn api_server_answers_keep_their_meaning() {
        let mapped = |code| ApiError::from(answer(code));
        assert_eq!(mapped(404).status(), StatusCode::NOT_FOUND);
        assert_eq!(mapped(409).status(), StatusCode::CONFLICT);
        assert_eq!(mapped(422).status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(mapped(500).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(mapped(403).code(), "unavailable");
        // Too large is the request's fault, not the cluster's: no "try again".
        assert_eq!(mapped(413).status(), StatusCode::UNPROCESSABLE_ENTITY);
        let etcd = serde_json::from_value(json!({
            "status": "Failure", "message": "etcdserver: request is too large", "code": 500
        }))
        .expect("a Status");
        let error = ApiError::from(kube::Error::Api(etcd));
        assert_eq!(error.code(), "invalid_request");
        assert!(error.to_string().contains("split the images"), "{error}");
    }
}
