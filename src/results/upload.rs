//! The worker's side of the result path: results are queued the moment they exist and sent
//! in batches, one request in flight at a time, each request taking everything that queued
//! up meanwhile and what comes within [`LINGER`] of its first result (so a fast worker sends
//! few large requests and a slow one sends each result at most [`LINGER`] late). A batch is retried until it is stored; the worker's success waits for the last
//! one, so no result is lost between the worker and the store.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{GroupRef, ImageResult, MAX_BATCH, ResultBatch};

/// How long one batch is retried before the worker gives up (and fails, so its Job retries).
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// How long one request to the API's internal end may take (a carrier's long poll for its
/// next order included: [`crate::worker::MAX_WAIT`] is shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The worker's one HTTP client for the API's internal end (its work orders, its results,
/// the orders it carries), so that every call reuses its connections.
pub fn internal_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}
/// How long a batch waits for more results after its first. Each request costs the ingest,
/// PostgreSQL and the controller's event planning a round of work, on the same cores as
/// inference on a small cluster: one per image halves a worker's pace; this delays an
/// image's event by at most as much (a few percent of the p99 target of 2 s).
pub const LINGER: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("result ingest: {0}")]
    Refused(String),
    #[error("result ingest unreachable for {secs} s: {last}", secs = GIVE_UP_AFTER.as_secs())]
    Unreachable { last: String },
    #[error("reading the ServiceAccount token: {0}")]
    Token(String),
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

impl UploadError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::Refused(_) => "results_refused",
            Self::Unreachable { .. } => "results_unreachable",
            Self::Token(_) => "results_token",
            Self::Client(_) => "http_client",
        }
    }
}

/// Where the worker's credentials come from: a token, or a file a kubelet keeps fresh
/// (projected ServiceAccount tokens rotate, so the file is read for every request).
#[derive(Clone, Debug)]
pub enum TokenSource {
    Token(String),
    File(PathBuf),
}

impl TokenSource {
    /// The pod's ServiceAccount credentials, as a kube client would find them (in-cluster
    /// token file, or `KUBECONFIG`).
    pub async fn infer() -> Result<TokenSource, UploadError> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| UploadError::Token(e.to_string()))?;
        if let Some(file) = config.auth_info.token_file {
            return Ok(TokenSource::File(PathBuf::from(file)));
        }
        if let Some(token) = config.auth_info.token {
            use secrecy::ExposeSecret;
            return Ok(TokenSource::Token(token.expose_secret().to_owned()));
        }
        Err(UploadError::Token(
            "no ServiceAccount token (neither a token file nor a token in the kubeconfig)".into(),
        ))
    }

    /// The token to send now.
    pub fn read(&self) -> Result<String, UploadError> {
        match self {
            Self::Token(t) => Ok(t.clone()),
            Self::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| UploadError::Token(format!("{}: {e}", path.display()))),
        }
    }
}

/// Queues results and sends them in the background; [`ResultUploader::finish`] waits for
/// every queued result to be stored.
pub struct ResultUploader {
    queue: mpsc::UnboundedSender<ImageResult>,
    task: JoinHandle<Result<UploadReport, UploadError>>,
}

/// What the uploader did, for the worker's `worker finished` line.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct UploadReport {
    /// Results stored.
    pub stored: usize,
    /// Requests that stored them (retries not counted).
    pub batches: usize,
    /// Milliseconds spent sending (retries and their pauses included), off the inference path.
    pub send_ms: f64,
}

impl ResultUploader {
    pub fn start(
        http: reqwest::Client,
        url: String,
        token: TokenSource,
        group: GroupRef,
        generation: i64,
    ) -> ResultUploader {
        let (queue, mut queued) = mpsc::unbounded_channel::<ImageResult>();
        let task = tokio::spawn(async move {
            let mut report = UploadReport::default();
            while let Some(first) = queued.recv().await {
                let mut results = vec![first];
                let deadline = tokio::time::Instant::now() + LINGER;
                while results.len() < MAX_BATCH {
                    match tokio::time::timeout_at(deadline, queued.recv()).await {
                        Ok(Some(r)) => results.push(r),
                        // The worker is done, or the batch waited long enough.
                        Ok(None) | Err(_) => break,
                    }
                }
                let batch = ResultBatch {
                    group: group.clone(),
                    generation,
                    results,
                };
                let started = tokio::time::Instant::now();
                send_until_stored(&http, &url, &token, &batch).await?;
                report.send_ms += started.elapsed().as_secs_f64() * 1000.0;
                report.stored += batch.results.len();
                report.batches += 1;
            }
            Ok(report)
        });
        ResultUploader { queue, task }
    }

    /// Queues one result; an error means the sender already gave up (see [`Self::finish`]).
    pub fn push(&self, result: ImageResult) -> Result<(), UploadError> {
        self.queue
            .send(result)
            .map_err(|_| UploadError::Refused("the uploader stopped".into()))
    }

    /// Waits until every queued result is stored; says how many were, in how many requests
    /// and how long they took.
    pub async fn finish(self) -> Result<UploadReport, UploadError> {
        drop(self.queue);
        self.task
            .await
            .map_err(|e| UploadError::Refused(format!("uploader task: {e}")))?
    }
}

async fn send_until_stored(
    http: &reqwest::Client,
    url: &str,
    token: &TokenSource,
    batch: &ResultBatch,
) -> Result<(), UploadError> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        let last = match http
            .post(url)
            .bearer_auth(token.read()?)
            .json(batch)
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => return Ok(()),
            // The group is gone: nobody will read these results.
            Ok(response) if response.status() == reqwest::StatusCode::GONE => {
                tracing::info!(group = %batch.group.name, "group deleted; its results are dropped");
                return Ok(());
            }
            // Refusals of the batch itself are final; the rest may pass later.
            Ok(response) => failed_answer(response)
                .await
                .map_err(UploadError::Refused)?,
            Err(e) => e.without_url().to_string(),
        };
        if started.elapsed() > GIVE_UP_AFTER {
            return Err(UploadError::Unreachable { last });
        }
        tracing::warn!(error = %last, "storing results failed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// What an unsuccessful answer of the API's internal end says (status and the start of its
/// body): `Err` when the request itself was refused and will not pass later, `Ok` when it
/// may (overloaded, timed out, a server error).
pub(crate) async fn failed_answer(response: reqwest::Response) -> Result<String, String> {
    let status = response.status();
    let text: String = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(500)
        .collect();
    let answer = format!("{status}: {text}");
    let retried = !status.is_client_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT;
    if retried { Ok(answer) } else { Err(answer) }
}
