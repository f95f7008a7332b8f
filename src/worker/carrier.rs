//! A worker that stays up: once its Job's own order is done, the worker asks the API's
//! internal end for an order the controller hands it (another group of its namespace that its
//! pod's shape can run), waiting up to its linger time each time, and exits when none comes.
//! So a tenant's next group starts without a pod start of its own. The controller sets the
//! three variables on its Jobs; without them the worker does its own order only.
//!
//! A standby worker ([`STANDBY_ENV`]) has no order of its own: it loads the models first
//! and waits the longer time it is given, so that even a tenant's first group in a while
//! finds a worker ready.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::order::{WorkOrder, internal_base};
use crate::results::{TokenSource, failed_answer};

/// The worker's own Job name.
pub const JOB_NAME_ENV: &str = "KINSIGHT_JOB_NAME";
/// What the worker's pod is (image, resources, catalog, settings) as the controller hashes
/// it: only orders whose own Job would have the same pod are handed to it.
pub const SHAPE_ENV: &str = "KINSIGHT_WORKER_SHAPE";
/// How long, in seconds, the worker waits for another order after each one (0: none).
pub const LINGER_ENV: &str = "KINSIGHT_WORKER_LINGER";
/// Set on a standby worker's Job: how long, in seconds, it waits for an order before it
/// ends (its requests still wait at most the linger time each, which is how recent a wait
/// must be for the controller to hand it an order).
pub const STANDBY_ENV: &str = "KINSIGHT_WORKER_STANDBY";
/// The longest wait one request may ask for: a longer linger asks again.
pub const MAX_WAIT: Duration = Duration::from_secs(20);
// A long poll ends well within the worker's request timeout.
const _: () = assert!(MAX_WAIT.as_secs() + 5 <= crate::results::REQUEST_TIMEOUT.as_secs());

/// Whether this worker is a standby (no order of its own).
pub fn is_standby() -> bool {
    std::env::var(STANDBY_ENV).is_ok_and(|v| !v.trim().is_empty())
}

/// What a carrier asks for: an order for a pod of `shape`, waiting up to `wait_seconds`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NextOrder {
    pub shape: String,
    #[serde(default)]
    pub wait_seconds: f64,
}

/// An order handed to a carrier, with the name of the Job it belongs to.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CarriedOrder {
    pub name: String,
    pub order: WorkOrder,
}

/// The API's side of carrying, for one worker.
pub struct Carrier {
    base: String,
    shape: String,
    /// How long it waits for an order after each one (a standby's idle time).
    linger: Duration,
    /// The longest wait of one request.
    ask_for: Duration,
    token: TokenSource,
    http: reqwest::Client,
}

impl Carrier {
    /// The carrier of the Job the environment names, or `None` when the controller did
    /// not ask its Jobs to stay up (or made this one before it could).
    pub fn from_env(
        http: reqwest::Client,
        results_url: &str,
        token: TokenSource,
    ) -> Result<Option<Carrier>, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let (Some(job), Some(shape), Some(linger)) =
            (var(JOB_NAME_ENV), var(SHAPE_ENV), var(LINGER_ENV))
        else {
            return Ok(None);
        };
        let seconds = |name: &str, text: &str| {
            text.trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e9)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{name} must be seconds, got {text:?}"))
        };
        let ask_for = seconds(LINGER_ENV, &linger)?;
        if ask_for.is_zero() {
            return Ok(None);
        }
        // A standby asks again well within the linger: the controller hands orders only
        // to waits that recent.
        let (linger, ask_for) = match var(STANDBY_ENV) {
            Some(idle) => (seconds(STANDBY_ENV, &idle)?, ask_for.mul_f64(0.8)),
            None => (ask_for, ask_for),
        };
        Ok(Some(Carrier {
            base: format!("{}/carriers/{job}", internal_base(results_url)),
            shape,
            linger,
            ask_for: ask_for.min(MAX_WAIT),
            token,
            http,
        }))
    }

    /// The next order handed to this worker, waiting up to the linger time (in requests
    /// of at most the Job's linger and [`MAX_WAIT`]); `None` when none came (or the API cannot be reached: the
    /// worker's own work is done, so it ends).
    pub async fn next_order(&self) -> Option<CarriedOrder> {
        let deadline = tokio::time::Instant::now() + self.linger;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let ask = NextOrder {
                shape: self.shape.clone(),
                wait_seconds: left.min(self.ask_for).as_secs_f64(),
            };
            let asked = async {
                let response = self.post("next-order", Some(&ask)).await?;
                match response.status() {
                    reqwest::StatusCode::NO_CONTENT => Ok(None),
                    status if status.is_success() => response
                        .json::<CarriedOrder>()
                        .await
                        .map(Some)
                        .map_err(|e| format!("the API's order is not valid: {}", e.without_url())),
                    _ => Err(failed_answer(response).await.unwrap_or_else(|e| e)),
                }
            };
            match asked.await {
                Ok(Some(order)) => return Some(order),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "asking for another work order failed; the worker ends");
                    return None;
                }
            }
        }
    }

    /// Says that every result of the order of Job `name` is stored. A failure is logged
    /// only: the controller takes back what a carrier that ended did not mark done, and its
    /// own Job redoes it (results are idempotent).
    pub async fn done(&self, name: &str) {
        let outcome = async {
            let response = self.post(&format!("orders/{name}/done"), None).await?;
            // Gone: its Job was deleted once its results were stored, nothing to mark.
            let status = response.status();
            if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
                return Ok(());
            }
            Err(failed_answer(response).await.unwrap_or_else(|e| e))
        };
        if let Err(e) = outcome.await {
            tracing::warn!(order = %name, error = %e, "marking a carried order done failed");
        }
    }

    /// POSTs to this carrier's `path` with the pod's token.
    async fn post(
        &self,
        path: &str,
        body: Option<&NextOrder>,
    ) -> Result<reqwest::Response, String> {
        let bearer = self.token.read().map_err(|e| e.to_string())?;
        let mut request = self
            .http
            .post(format!("{}/{path}", self.base))
            .bearer_auth(bearer);
        if let Some(body) = body {
            request = request.json(body);
        }
        request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())
    }
}
