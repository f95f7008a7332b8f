//! `Idempotency-Key` on the POSTs (Stripe's semantics): a request carrying one is carried out
//! once per tenant and key; its retries with the same method, path and body get the first
//! answer again (status, body, `Location`, marked `Idempotent-Replayed: true`) without a second
//! group or replay. The same key with another request is refused (422
//! `idempotency_key_reused`), and so is a retry while the first is still running (409
//! `idempotency_key_in_progress`, `Retry-After: 1`): waiting would hold a connection and a
//! poll of the database per retry for a request that takes well under a second, and clients
//! retry a 409 anyway. A 5xx (or a 409 conflict, which says "retry") is not kept: the key is
//! released so that the retry runs again. Keys are kept 24 h
//! ([`crate::store::IDEMPOTENCY_KEEP`]), then the controller's retention deletes them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::auth::authenticate;
use super::images::read_body;
use super::problem::ApiError;
use super::{AppState, MAX_BODY_BYTES};
use crate::store::{IDEMPOTENCY_KEEP, KeyClaim, StoredResponse};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer given again from a key, as Stripe does.
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest key accepted (Stripe's bound).
const MAX_KEY_LEN: usize = 255;
/// A request holding a key is cut off after this (answered 503, its key released) ...
const HANDLER_LIMIT: Duration = Duration::from_secs(60);
/// ... so a claim older than this belongs to a process that died, and the retry of the same
/// request may take it over.
const LEASE: Duration = Duration::from_secs(120);
/// The answer headers kept with the key.
/// `traceparent` too: a replayed answer names the trace the first one started.
const KEPT_HEADERS: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::LOCATION,
    HeaderName::from_static(crate::trace::HEADER),
];

/// The middleware of the POST routes. Without the header the request passes through untouched.
pub(super) async fn guard(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !request.headers().contains_key(IDEMPOTENCY_KEY) {
        return Ok(next.run(request).await);
    }
    // Keys are the tenant's: who asks comes first.
    let tenant = authenticate(&state.keys, request.headers())?;
    let key = idempotency_key(request.headers())?;
    let (parts, body) = request.into_parts();
    let body = read_body(Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await)?;
    let hash = request_hash(parts.method.as_str(), parts.uri.path(), &body);
    let namespace = tenant.namespace;
    let claim = match state
        .store
        .claim_idempotency_key(&namespace, &key, &hash, LEASE, IDEMPOTENCY_KEEP)
        .await?
    {
        KeyClaim::Claimed(claim) => claim,
        KeyClaim::Done(stored) => return Ok(replayed(stored)),
        KeyClaim::InProgress => return Err(ApiError::IdempotencyKeyInProgress),
        KeyClaim::Reused => return Err(ApiError::IdempotencyKeyReused),
    };
    let request = Request::from_parts(parts, Body::from(body));
    // Its own task: a client that hangs up does not cut the request off between creating
    // the group and recording the answer, which its retry then finds.
    let task = tokio::spawn(async move {
        let answer = match tokio::time::timeout(HANDLER_LIMIT, next.run(request)).await {
            Ok(response) => kept(response).await,
            Err(_) => Err(ApiError::Unavailable(format!(
                "the request took longer than {} s; retry it",
                HANDLER_LIMIT.as_secs()
            ))),
        };
        let store = &state.store;
        let outcome = match &answer {
            Ok(stored) if !is_retryable(stored.status) => {
                store
                    .record_idempotent_response(&namespace, &key, &claim, stored)
                    .await
            }
            _ => {
                store
                    .release_idempotency_key(&namespace, &key, &claim)
                    .await
            }
        };
        match outcome {
            Ok(true) => {}
            // Its lease ran out and a retry took the key over: nothing more to write.
            Ok(false) => tracing::warn!(%namespace, "an idempotency key was taken over"),
            // The answer still goes to the client; a retry finds the key claimed until the
            // lease ends, then runs again.
            Err(e) => tracing::warn!(error = %e, %namespace, "recording an idempotent answer"),
        }
        answer
    });
    match task.await {
        Ok(Ok(stored)) => Ok(response_of(stored)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(ApiError::Unavailable(format!("the request failed: {e}"))),
    }
}

/// The header's key: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ApiError::InvalidRequest(
            "Idempotency-Key: give it once".into(),
        ));
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN {
        return Err(ApiError::InvalidRequest(format!(
            "Idempotency-Key: 1 to {MAX_KEY_LEN} characters, got {}",
            bytes.len()
        )));
    }
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(ApiError::InvalidRequest(
            "Idempotency-Key: only visible ASCII characters (no spaces)".into(),
        ));
    }
    // Visible ASCII is UTF-8.
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// SHA-256 of what makes a request that same request; the parts are NUL-separated, which
/// neither a method nor a path contains.
fn request_hash(method: &str, path: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update([0]);
    hash.update(path.as_bytes());
    hash.update([0]);
    hash.update(body);
    hex::encode(hash.finalize())
}

/// Answers a retry should not get again: the server's failures and conflicts say "retry".
fn is_retryable(status: u16) -> bool {
    status >= 500 || status == StatusCode::CONFLICT.as_u16()
}

/// The handler's answer as kept with the key.
async fn kept(response: Response) -> Result<StoredResponse, ApiError> {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError::Unavailable(format!("reading the answer: {e}")))?;
    let headers = KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = parts.headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_owned(), value.to_owned()))
        })
        .collect();
    Ok(StoredResponse {
        status: parts.status.as_u16(),
        headers,
        body: body.to_vec(),
    })
}

fn response_of(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, stored.body).into_response();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn replayed(stored: StoredResponse) -> Response {
    let mut response = response_of(stored);
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.append(IDEMPOTENCY_KEY, value);
            }
        }
        headers
    }

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        let long = "k".repeat(255);
        for good in [b"a".as_slice(), b"order-42/retry_1", long.as_bytes()] {
            assert!(idempotency_key(&with(&[good])).is_ok(), "{good:?}");
        }
        let too_long = "k".repeat(256);
        for bad in [
            b"".as_slice(),
            too_long.as_bytes(),
            b"with space",
            b"tab\there",
            "caf\u{e9}".as_bytes(),
        ] {
            assert!(
                matches!(
                    idempotency_key(&with(&[bad])),
                    Err(ApiError::InvalidRequest(_))
                ),
                "{bad:?}"
            );
        }
        assert!(idempotency_key(&with(&[b"a", b"b"])).is_err());
    }

    #[test]
    fn the_hash_tells_method_path_and_body_apart() {
        let base = request_hash("POST", "/v1/images", b"{}");
        assert_eq!(base, request_hash("POST", "/v1/images", b"{}"));
        assert_ne!(base, request_hash("POST", "/v1/image-groups", b"{}"));
        assert_ne!(base, request_hash("PUT", "/v1/images", b"{}"));
        assert_ne!(base, request_hash("POST", "/v1/images", b"{ }"));
    }

    #[test]
    fn failures_a_retry_may_fix_are_not_kept() {
        assert!(is_retryable(503) && is_retryable(500) && is_retryable(409));
        assert!(!is_retryable(202) && !is_retryable(422) && !is_retryable(404));
    }
}
