//! The work order the controller hands a worker Job. The controller stores it in
//! PostgreSQL under the Job's name before it creates the Job, and the Job's pod fetches it
//! from the API's internal end (`GET /internal/v1/work-orders/{job}`) with its ServiceAccount
//! token, so the worker needs no access to the API server or the database, and a Job costs
//! the API server no ConfigMap. (Not the environment: Linux refuses to start a process with
//! one variable over 128 KiB, which a group of 1000 images with long URLs exceeds.) Jobs made
//! by earlier controllers mount it as a file ([`WORK_ORDER_FILE_ENV`]); small orders run by
//! hand come inline ([`WORK_ORDER_ENV`]).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::results::{GroupRef, INGEST_PATH, ImageResult, TokenSource, failed_answer};

/// Environment variable with the URL of the Job's work order (set by the controller).
pub const WORK_ORDER_URL_ENV: &str = "KINSIGHT_WORK_ORDER_URL";
/// The API's internal end, below its address.
const INTERNAL_PREFIX: &str = "/internal/v1";
/// Where the API serves work orders, one per Job name below it.
pub const WORK_ORDERS_PATH: &str = "/internal/v1/work-orders";
/// Where carriers ask for orders (`{job}/next-order`) and say they are done with one
/// (`{job}/orders/{name}/done`).
pub const CARRIERS_PATH: &str = "/internal/v1/carriers";
/// Environment variable naming the work order's file (a mounted ConfigMap's key: Jobs of
/// controllers before the orders moved to the database).
pub const WORK_ORDER_FILE_ENV: &str = "KINSIGHT_WORK_ORDER_FILE";
/// Environment variable carrying the JSON work order itself (small orders run by hand,
/// and Jobs made by controllers before the ConfigMap).
pub const WORK_ORDER_ENV: &str = "KINSIGHT_WORK_ORDER";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkOrder {
    pub group: GroupRef,
    /// The group's generation this order's Job was made for; stored with each result.
    #[serde(default = "first_generation")]
    pub generation: i64,
    pub models: Vec<String>,
    pub images: Vec<WorkItem>,
    /// The group's W3C `traceparent`, so that a worker carrying the order for another Job
    /// joins the group's trace (a Job's own pod has it in `TRACEPARENT` as well).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkItem {
    pub id: String,
    pub url: String,
    /// The models to run on this image when not all of the order's (models added to a
    /// group later run alone on the images that already have results).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

fn first_generation() -> i64 {
    1
}

impl WorkOrder {
    /// The order in `KINSIGHT_WORK_ORDER_FILE`, else in `KINSIGHT_WORK_ORDER`.
    pub fn from_env() -> Result<WorkOrder, String> {
        if let Some(file) = std::env::var_os(WORK_ORDER_FILE_ENV) {
            let path = Path::new(&file);
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the work order {}: {e}", path.display()))?;
            return serde_json::from_str(&text)
                .map_err(|e| format!("{} is not a valid work order: {e}", path.display()));
        }
        let text = std::env::var(WORK_ORDER_ENV)
            .map_err(|_| format!("neither {WORK_ORDER_FILE_ENV} nor {WORK_ORDER_ENV} is set"))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{WORK_ORDER_ENV} is not a valid work order: {e}"))
    }
}

/// The API's internal end (`.../internal/v1`) of the result ingest at `results_url`: work
/// orders and carriers are beside it.
pub fn internal_base(results_url: &str) -> String {
    match results_url.strip_suffix(INGEST_PATH) {
        Some(origin) => format!("{origin}{INTERNAL_PREFIX}"),
        // An ingest behind another path: the others are its siblings.
        None => {
            let trimmed = results_url.trim_end_matches('/');
            trimmed
                .rsplit_once('/')
                .map_or(trimmed, |(parent, _)| parent)
                .to_owned()
        }
    }
}

/// The URL of the Job `job`'s work order.
pub fn work_order_url(results_url: &str, job: &str) -> String {
    format!("{}/work-orders/{job}", internal_base(results_url))
}

/// How long the worker tries to fetch its order while the API is unreachable or failing
/// before it gives up (and fails, so the Job's next pod tries again).
const FETCH_GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// Fetches the work order at `url` with the pod's token; `None` when the API has none (the
/// Job's group was deleted, or a later generation replaced the Job meanwhile). Unreachable or
/// failing answers are retried for [`FETCH_GIVE_UP_AFTER`].
pub async fn fetch_work_order(
    http: &reqwest::Client,
    url: &str,
    token: &TokenSource,
) -> Result<Option<WorkOrder>, String> {
    // Only the images without a result: an earlier pod of the Job may have stored some.
    let mut url = reqwest::Url::parse(url)
        .map_err(|e| format!("the work order's URL {url:?} is not valid: {e}"))?;
    url.query_pairs_mut().append_pair("pending", "true");
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        let bearer = token.read().map_err(|e| e.to_string())?;
        let last = match http.get(url.clone()).bearer_auth(bearer).send().await {
            Ok(response) if response.status().is_success() => {
                let text = response
                    .text()
                    .await
                    .map_err(|e| format!("reading the work order: {}", e.without_url()))?;
                return serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| format!("the API's work order is not valid: {e}"));
            }
            Ok(response) if response.status() == reqwest::StatusCode::NOT_FOUND => return Ok(None),
            // A refusal (a token of another account) will not pass later.
            Ok(response) => failed_answer(response)
                .await
                .map_err(|refused| format!("fetching the work order: {refused}"))?,
            Err(e) => e.without_url().to_string(),
        };
        if started.elapsed() > FETCH_GIVE_UP_AFTER {
            return Err(format!(
                "fetching the work order failed for {} s: {last}",
                FETCH_GIVE_UP_AFTER.as_secs()
            ));
        }
        tracing::warn!(error = %last, "fetching the work order failed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

impl WorkOrder {
    /// This order without the images that have a result for their models in `stored` (a
    /// failure included, as the controller counts it): what a Job's next pod, or a carrier's,
    /// has left to do after an earlier one stopped half-way.
    pub fn without_stored(mut self, stored: &HashMap<String, ImageResult>) -> WorkOrder {
        let models = &self.models;
        self.images.retain(|item| {
            !stored
                .get(&item.id)
                .is_some_and(|r| r.covers(item.models_or(models)))
        });
        self
    }
}

impl WorkItem {
    pub fn models<'a>(&'a self, order: &'a WorkOrder) -> &'a [String] {
        self.models_or(&order.models)
    }

    /// Its own models, or the order's (`order_models`) when it names none.
    fn models_or<'a>(&'a self, order_models: &'a [String]) -> &'a [String] {
        if self.models.is_empty() {
            order_models
        } else {
            &self.models
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_without_stored_results_keeps_what_has_none_for_its_models() {
        let item = |id: &str, models: &[&str]| WorkItem {
            id: id.to_owned(),
            url: format!("http://images.example/{id}.jpg"),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
        };
        let order = WorkOrder {
            group: GroupRef {
                namespace: "tenant-a".into(),
                name: "listing-42".into(),
                uid: "uid-1".into(),
            },
            generation: 2,
            models: vec!["object_detection".into(), "image_classification".into()],
            images: vec![
                item("done", &[]),
                item("half", &[]),
                item("failed", &[]),
                item("added-model", &["image_classification"]),
                item("new", &[]),
            ],
            traceparent: None,
        };
        let with = |id: &str, models: &[&str]| {
            let mut result = ImageResult::failed("listing-42", id, "x", "x".into());
            result.failure = None;
            for model in models {
                let run = crate::results::ModelResult {
                    output: Default::default(),
                    error: None,
                    inference_ms: 1.0,
                };
                result.outputs.insert((*model).to_owned(), run);
            }
            (id.to_owned(), result)
        };
        let stored: HashMap<String, ImageResult> = [
            with("done", &["object_detection", "image_classification"]),
            // One model of two: it runs again.
            with("half", &["object_detection"]),
            (
                "failed".to_owned(),
                ImageResult::failed("listing-42", "failed", "DownloadFailed", "x".into()),
            ),
            // The one model asked of it is there.
            with("added-model", &["image_classification"]),
        ]
        .into_iter()
        .collect();
        let left = order.clone().without_stored(&stored);
        let ids: Vec<&str> = left.images.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["half", "new"]);
        assert_eq!(
            (left.group, left.generation, left.models),
            (order.group.clone(), 2, order.models.clone())
        );
        // Nothing stored: the whole order.
        assert_eq!(order.clone().without_stored(&HashMap::new()), order);
    }

    #[tokio::test]
    async fn a_worker_asks_only_for_the_images_without_a_result() {
        // What the worker asks for, in one step: `?pending=true`, with its token. The
        // whole path runs on the real node in tests/e2e.rs
        // (`a_workers_next_pod_does_only_the_images_left`), the API's side in
        // tests/result_ingest.rs.
        let order = WorkOrder {
            group: GroupRef {
                namespace: "tenant-a".into(),
                name: "listing-42".into(),
                uid: "uid-1".into(),
            },
            generation: 1,
            models: vec!["object_detection".into()],
            images: Vec::new(),
            traceparent: None,
        };
        let answer = serde_json::to_string(&order).expect("JSON");
        let app = axum::Router::new().route(
            "/internal/v1/work-orders/{job}",
            axum::routing::get(
                async move |query: axum::extract::RawQuery, headers: axum::http::HeaderMap| {
                    let asked = query.0.as_deref() == Some("pending=true")
                        && headers.get("authorization").and_then(|v| v.to_str().ok())
                            == Some("Bearer pod-token");
                    if asked {
                        (axum::http::StatusCode::OK, answer.clone())
                    } else {
                        (axum::http::StatusCode::BAD_REQUEST, String::new())
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let url = work_order_url(
            &format!("http://{address}/internal/v1/results"),
            "listing-42-g1",
        );
        crate::install_crypto_provider();
        let fetched = fetch_work_order(
            &reqwest::Client::new(),
            &url,
            &TokenSource::Token("pod-token".into()),
        )
        .await;
        assert_eq!(fetched, Ok(Some(order)));
    }

    #[test]
    fn the_work_order_url_is_beside_the_result_ingest() {
        assert_eq!(
            work_order_url(
                "http://10.244.91.1:8080/internal/v1/results",
                "listing-42-g1"
            ),
            "http://10.244.91.1:8080/internal/v1/work-orders/listing-42-g1"
        );
        // The API behind a path prefix keeps it.
        assert_eq!(
            work_order_url("https://gw.example/kinsight/internal/v1/results", "g-g2-1"),
            "https://gw.example/kinsight/internal/v1/work-orders/g-g2-1"
        );
        // An ingest elsewhere: its sibling.
        assert_eq!(
            work_order_url("http://api:8080/ingest/results/", "g-g1"),
            "http://api:8080/ingest/work-orders/g-g1"
        );
    }
}
