//! The REST front door: `POST /v1/images`, `POST /v1/image-groups` and their `GET`s. It
//! authenticates the API key, validates the request and creates an ImageGroup in the
//! tenant's namespace; everything after that is the controller's.

mod auth;
mod deliveries;
mod idempotency;
mod images;
mod in_flight;
mod ingest;
mod openapi;
mod problem;
mod rate_limit;
mod retry;
mod work_orders;

pub use auth::{
    API_KEY_LABEL, ApiKeys, KEY_HASH_FIELD, SIGNING_SECRET_KEY, SIGNING_SECRET_NAME,
    TENANT_NAMESPACE_FIELD, hash_key,
};
pub use in_flight::{DEFAULT_IN_FLIGHT_LIMIT, IN_FLIGHT_LIMIT_FIELD};
pub use openapi::document as openapi_document;
pub use problem::ApiError;
pub use rate_limit::RATE_LIMIT_FIELD;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::results::INGEST_PATH;
use crate::store::Store;
use crate::worker::{CARRIERS_PATH, WORK_ORDERS_PATH};

/// Largest request body accepted: a 10,000-image group fits, and one whose spec would be
/// over its 1 MiB ([`crate::crd::MAX_SPEC_BYTES`]) gets that bound's own message.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Requests per second per API key unless its record or the `--rate-limit` flag says otherwise.
pub const DEFAULT_RATE_LIMIT: std::num::NonZeroU32 = std::num::NonZeroU32::new(100).unwrap();
/// Longest a customer's request may take; past it the answer is 503 `timeout` (a client
/// retries, with its Idempotency-Key, rather than hold a connection open).
pub const REQUEST_TIME_LIMIT: Duration = Duration::from_secs(30);
/// Largest batch of results a worker may send at once.
pub const INGEST_BODY_BYTES: usize = 32 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Namespace holding the tenants' API-key Secrets.
    pub keys_namespace: String,
    /// Model names the catalog offers.
    pub models: Vec<String>,
    /// Requests per second per API key whose record sets no `rate-limit`.
    pub rate_limit: std::num::NonZeroU32,
    /// Images in flight per tenant whose record sets no `max-in-flight-images`.
    pub in_flight_limit: std::num::NonZeroU32,
}

pub struct AppState {
    pub client: Client,
    pub config: ApiConfig,
    pub keys: ApiKeys,
    /// Results (and, through the controller, everything high-volume) live here.
    pub store: Store,
    /// Workers' ServiceAccount tokens recently checked by the result ingest.
    pub reviews: ingest::TokenReviews,
    /// Groups recently read by the result ingest.
    pub groups: ingest::GroupReads,
    pub limits: rate_limit::RateLimits,
    /// Carriers' requests waiting for an order, woken by the database.
    pub handovers: Arc<work_orders::Handovers>,
}

/// Builds the router and starts watching the API-key Secrets; the returned future keeps
/// the watch running and must be polled (spawned) alongside the server, and the keys are
/// for [`wait_for_keys`].
pub fn router(
    client: Client,
    database: Store,
    config: ApiConfig,
) -> (Router, impl Future<Output = ()> + Send + 'static, ApiKeys) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.keys_namespace);
    let (store, writer) = reflector::store();
    let (mark, loaded) = tokio::sync::watch::channel(false);
    let keys = ApiKeys {
        store: store.clone(),
        loaded,
    };
    let stream = reflector::reflector(
        writer,
        watcher(
            secrets,
            watcher::Config::default().labels(&format!("{API_KEY_LABEL}=true")),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|event| async move {
        if let Err(e) = event {
            tracing::warn!(error = %e, "watching API keys");
        }
    });
    let mark_loaded = async move {
        if store.wait_until_ready().await.is_ok() {
            mark.send_replace(true);
        }
    };
    let handovers = Arc::new(work_orders::Handovers::default());
    let hand_overs = handovers.clone().listen(database.url().to_owned());
    let watch = async move {
        futures::join!(stream, mark_loaded, hand_overs);
    };
    let state = Arc::new(AppState {
        handovers,
        client,
        limits: rate_limit::RateLimits::new(config.rate_limit),
        config,
        keys: keys.clone(),
        store: database,
        reviews: ingest::TokenReviews::default(),
        groups: ingest::GroupReads::default(),
    });
    // Workers' result batches: larger bodies than customers' requests.
    let internal = Router::new()
        .route(INGEST_PATH, post(ingest::store_results))
        .route(
            &format!("{WORK_ORDERS_PATH}/{{job}}"),
            get(work_orders::get_work_order),
        )
        .route(
            &format!("{CARRIERS_PATH}/{{job}}/next-order"),
            post(work_orders::next_order),
        )
        .route(
            &format!("{CARRIERS_PATH}/{{job}}/orders/{{name}}/done"),
            post(work_orders::carried_done),
        )
        .layer(DefaultBodyLimit::max(INGEST_BODY_BYTES));
    // Every customer's POST takes an Idempotency-Key.
    let posts = Router::new()
        .route("/v1/images", post(images::create_image))
        .route("/v1/image-groups", post(images::create_group))
        .route(
            "/v1/image-groups/{id}/deliveries/{delivery}/replay",
            post(deliveries::replay_one),
        )
        .route("/v1/deliveries/replay", post(deliveries::replay_since))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::guard,
        ));
    let router = Router::new()
        .merge(posts)
        .route("/v1/images/{id}", get(images::get_image))
        .route(
            "/v1/image-groups/{id}",
            get(images::get_group).patch(images::update_group),
        )
        .route(
            "/v1/image-groups/{id}/deliveries",
            get(deliveries::list_group),
        )
        .route(
            "/v1/image-groups/{id}/deliveries/{delivery}",
            get(deliveries::get_one),
        )
        .route("/v1/deliveries", get(deliveries::list_undelivered))
        .route("/openapi.json", get(openapi::serve))
        .route("/healthz", get(|| async { "ok" }))
        // Ready once the API keys are listed: before, every key would get 503.
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound("route".to_owned()) })
        // axum answers a known route's other methods 405 with no body; a problem too.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outside the idempotency guard: a replayed answer costs a token too.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            REQUEST_TIME_LIMIT,
            time_limit,
        ))
        .merge(internal)
        .layer(axum::middleware::map_response(problem::as_problem))
        .with_state(state);
    (router, watch, keys)
}

/// Answers 503 `timeout` when the rest of the stack takes longer than `limit`.
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut(limit.as_secs()).into_response(),
    }
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> (axum::http::StatusCode, &'static str) {
    if *state.keys.loaded.borrow() {
        (axum::http::StatusCode::OK, "ok")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "API keys not listed yet",
        )
    }
}

/// How long a starting API waits for its first list of API keys.
const KEYS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits until the API-key Secrets have been listed once (at most 30 s), so the first
/// requests are not refused only because the watch has not caught up. Returns whether
/// they were.
pub async fn wait_for_keys(keys: &ApiKeys) -> bool {
    let mut listed = keys.loaded.clone();
    let loaded = matches!(
        tokio::time::timeout(KEYS_WAIT, listed.wait_for(|loaded| *loaded)).await,
        Ok(Ok(_))
    );
    if !loaded {
        tracing::warn!("API keys not listed yet; requests get 503 until they are");
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow handler is cut off with a problem, not left to hold the connection.
    #[tokio::test]
    async fn a_request_past_the_time_limit_is_answered_503_timeout() {
        crate::install_crypto_provider();
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                Duration::from_millis(100),
                time_limit,
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/slow", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let started = std::time::Instant::now();
        let response = reqwest::get(url).await.expect("GET");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(response.status().as_u16(), 503);
        let kind = response.headers().get("content-type").cloned();
        assert_eq!(
            kind.as_ref().map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..])
        );
        let problem: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(problem["code"], "timeout");
    }
}
