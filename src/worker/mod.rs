//! `kinsight worker`: the process a worker Job's pod runs. It reads its work order from
//! the environment, downloads and decodes each image, runs the requested models and hands
//! each image's result to the result ingest the moment it is ready. A bad image fails
//! alone; the process fails only when it cannot work at all (models, runtime, the ingest),
//! and succeeds only once every result is stored.

mod carrier;
mod engines;
mod fetch;
mod order;
mod sandbox;

pub use carrier::{
    CarriedOrder, Carrier, JOB_NAME_ENV, LINGER_ENV, MAX_WAIT, NextOrder, SHAPE_ENV, STANDBY_ENV,
    is_standby,
};
pub use engines::Engines;
pub use fetch::{FetchConfig, FetchError, Fetcher};
pub use order::{
    CARRIERS_PATH, WORK_ORDER_ENV, WORK_ORDER_FILE_ENV, WORK_ORDER_URL_ENV, WORK_ORDERS_PATH,
    WorkItem, WorkOrder, fetch_work_order, internal_base, work_order_url,
};
pub use sandbox::Sandbox;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use futures::StreamExt;
use tracing::Instrument;

use crate::inference::pipeline::{ImageAnalysis, Pipeline, PipelineOptions};
use crate::inference::{Catalog, EngineOptions, InferenceError, ms};
use crate::results::{ImageFailure, ImageResult, ModelResult, Timings};
use crate::results::{ResultUploader, TokenSource, UploadError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("work order: {0}")]
    WorkOrder(String),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error(transparent)]
    Results(#[from] UploadError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("inference thread: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// Images went into the inference pipeline and never came out (a thread panicked).
    #[error("inference pipeline: {0}")]
    Pipeline(String),
}

impl WorkerError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::WorkOrder(_) => "invalid_work_order",
            Self::Inference(e) => e.category(),
            Self::Results(e) => e.category(),
            Self::Http(_) => "http_client",
            Self::Join(_) | Self::Pipeline(_) => "internal",
        }
    }
}

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub catalog: PathBuf,
    /// Where the catalog's relative model and labels files are (`None`: the catalog's folder).
    pub models_dir: Option<PathBuf>,
    pub fetch: FetchConfig,
    /// Downloads in flight while inference runs.
    pub prefetch: usize,
    pub engine: EngineOptions,
}

impl WorkerOptions {
    pub fn load_catalog(&self) -> Result<Catalog, InferenceError> {
        Catalog::load_with_models_dir(&self.catalog, self.models_dir.as_deref())
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub succeeded: usize,
    pub failed: usize,
}

/// The work order the Job's pod was given, and the pod's credentials for the API's
/// internal end: fetched from the URL in [`WORK_ORDER_URL_ENV`] with the token, else read
/// from the file or the variable it names (before the token is looked for, so a bad order
/// is told first). `None`: the API has no order for this Job any more (its group was deleted
/// or moved on to a new generation), so there is nothing to do.
pub async fn load_order(
    http: &reqwest::Client,
) -> Result<(Option<WorkOrder>, TokenSource), WorkerError> {
    match std::env::var(WORK_ORDER_URL_ENV) {
        Ok(url) if !url.is_empty() => {
            let token = TokenSource::infer().await?;
            let order = fetch_work_order(http, &url, &token)
                .await
                .map_err(WorkerError::WorkOrder)?;
            Ok((order, token))
        }
        _ => {
            let order = WorkOrder::from_env().map_err(WorkerError::WorkOrder)?;
            Ok((Some(order), TokenSource::infer().await?))
        }
    }
}

/// Runs `order` with the models `engines` has loaded (or loads them), handing each image's
/// result to `store`.
pub async fn run(
    order: WorkOrder,
    store: ResultUploader,
    options: &WorkerOptions,
    engines: &Engines,
) -> Result<WorkerReport, WorkerError> {
    let began = Instant::now();
    let catalog = options.load_catalog()?;
    let fetcher = Fetcher::new(&options.fetch)?;
    // Downloads start at once, while ONNX Runtime loads the models, and stay up to
    // `prefetch` images ahead of inference (plus the one waiting to be submitted), in order.
    let mut downloads = start_downloads(fetcher, order.images.clone(), options.prefetch);
    let (engine, loaded) = engines.for_models(catalog, &order.models).await?;
    let load_ms = ms(began.elapsed());
    tracing::info!(group = %order.group.name, images = order.images.len(), models = ?order.models, load_ms = round_ms(load_ms), models_kept = !loaded, "worker started");
    let work_began = Instant::now();

    // The pipeline decodes and preprocesses the next images while the models run, runs the
    // models side by side and batches images for models that allow it.
    let (submitter, mut results) = Pipeline::start::<(WorkItem, f64)>(
        engine.clone(),
        &order.models,
        &PipelineOptions::default(),
    )?;
    let order = &order;
    let queue = &store;
    let feed = async move {
        let mut report = WorkerReport::default();
        let mut submitted = 0_usize;
        let mut stopped = false;
        // Time the feed waited for a download (not hidden behind model load or inference).
        let mut download_wait_ms = 0.0;
        loop {
            let waited = Instant::now();
            let Some((item, bytes, download_ms)) = downloads.recv().await else {
                break;
            };
            download_wait_ms += ms(waited.elapsed());
            match bytes {
                Err(e) => {
                    let spec = failed(order, &item, e.reason(), e.to_string(), download_ms);
                    record(&mut report, order, &item, &spec);
                    queue.push(spec)?;
                }
                Ok(bytes) => {
                    let models = item.models(order).to_vec();
                    let key = (item, download_ms);
                    if submitter.submit_for(key, bytes, models).await.is_err() {
                        // The pipeline stopped; the results that did come out are
                        // still written, then the worker fails.
                        stopped = true;
                        break;
                    }
                    submitted += 1;
                }
            }
        }
        Ok::<_, WorkerError>((report, submitted, stopped, download_wait_ms))
    };
    let collect = async move {
        let mut report = WorkerReport::default();
        let mut returned = 0_usize;
        let mut totals = PhaseTotals::default();
        while let Some(((item, download_ms), outcome)) = results.next().await {
            returned += 1;
            if let Ok(analysis) = &outcome {
                totals.add(analysis);
            }
            let mut spec = result_spec(outcome);
            spec.group = order.group.name.clone();
            spec.image_id = item.id.clone();
            spec.timings.download_ms = round_ms(download_ms);
            totals.download_ms += download_ms;
            record(&mut report, order, &item, &spec);
            queue.push(spec)?;
        }
        Ok::<_, WorkerError>((report, returned, results.panicked(), totals))
    };
    let ((fed, submitted, stopped, download_wait_ms), (collected, returned, panicked, totals)) =
        tokio::try_join!(feed, collect)?;
    let processed_ms = ms(work_began.elapsed());
    // What came out is stored even when images were lost; then the worker fails.
    let upload = store.finish().await?;
    check_pipeline(submitted, returned, panicked, stopped)?;
    let report = WorkerReport {
        succeeded: fed.succeeded + collected.succeeded,
        failed: fed.failed + collected.failed,
    };
    // Per-phase totals in milliseconds: download, decode, preprocess and inference are
    // summed over images (thread time, overlapped); download_wait is what the pipeline's feed
    // waited for bytes; processed is `worker started` to the last result out of the
    // pipeline; result_write is the time spent sending results (in the background), and
    // result_tail the wait for the last batch after the last result.
    tracing::info!(
        succeeded = report.succeeded,
        failed = report.failed,
        stored = upload.stored,
        result_batches = upload.batches,
        load_ms = round_ms(load_ms),
        download_ms = round_ms(totals.download_ms),
        download_wait_ms = round_ms(download_wait_ms),
        decode_ms = round_ms(totals.decode_ms),
        preprocess_ms = round_ms(totals.preprocess_ms),
        inference_ms = round_ms(totals.inference_ms),
        processed_ms = round_ms(processed_ms),
        result_write_ms = round_ms(upload.send_ms),
        result_tail_ms = round_ms(ms(work_began.elapsed()) - processed_ms),
        "worker finished"
    );
    Ok(report)
}

/// Summed per-image times of the images that came out of the pipeline.
#[derive(Debug, Default)]
struct PhaseTotals {
    download_ms: f64,
    decode_ms: f64,
    preprocess_ms: f64,
    /// Every model's run time, a batch's shared among its images.
    inference_ms: f64,
}

impl PhaseTotals {
    fn add(&mut self, analysis: &ImageAnalysis) {
        self.decode_ms += analysis.decode_ms;
        self.preprocess_ms += analysis.preprocess_ms;
        self.inference_ms += analysis
            .models
            .values()
            .map(|m| m.inference_ms)
            .sum::<f64>();
    }
}

type Download = (WorkItem, Result<Vec<u8>, FetchError>, f64);

/// Downloads `images` in order in a task of their own, up to `prefetch` at a time; the
/// receiver gets them in the work order's order. Dropping the receiver stops the task.
fn start_downloads(
    fetcher: Fetcher,
    images: Vec<WorkItem>,
    prefetch: usize,
) -> tokio::sync::mpsc::Receiver<Download> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    // The task runs in the worker's span, so the fetch spans stay in the group's trace.
    let task = async move {
        let downloads = futures::stream::iter(images)
            .map(|item| {
                let fetcher = fetcher.clone();
                async move {
                    let started = Instant::now();
                    let span = tracing::info_span!("fetch", image = %item.id);
                    let bytes = fetcher.fetch(&item.url).instrument(span).await;
                    (item, bytes, ms(started.elapsed()))
                }
            })
            .buffered(prefetch.max(1));
        futures::pin_mut!(downloads);
        while let Some(download) = downloads.next().await {
            if sender.send(download).await.is_err() {
                break;
            }
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    receiver
}

/// Fails the worker when images were lost in the pipeline (fewer outcomes than images
/// submitted, a thread panicked, or it stopped taking images): they have no result, and
/// only a failed Job is retried.
fn check_pipeline(
    submitted: usize,
    returned: usize,
    panicked: usize,
    stopped: bool,
) -> Result<(), WorkerError> {
    if returned >= submitted && panicked == 0 && !stopped {
        return Ok(());
    }
    let lost = submitted.saturating_sub(returned);
    let mut message = format!("{lost} of {submitted} submitted images got no result");
    if panicked > 0 {
        message.push_str(&format!("; {panicked} pipeline thread(s) panicked"));
    }
    if stopped {
        message.push_str("; it stopped taking images before the last one");
    }
    Err(WorkerError::Pipeline(message))
}

fn failed(
    order: &WorkOrder,
    item: &WorkItem,
    reason: &str,
    message: String,
    download_ms: f64,
) -> ImageResult {
    let mut result = ImageResult::failed(&order.group.name, &item.id, reason, message);
    result.timings.download_ms = round_ms(download_ms);
    result
}

fn record(report: &mut WorkerReport, order: &WorkOrder, item: &WorkItem, spec: &ImageResult) {
    if spec.is_failure(item.models(order)) {
        report.failed += 1;
        tracing::warn!(image = %item.id, failure = ?spec.failure, "image failed");
    } else {
        report.succeeded += 1;
    }
}

/// The pipeline's outcome as a result; a model's error is recorded beside the others' outputs.
fn result_spec(outcome: Result<ImageAnalysis, InferenceError>) -> ImageResult {
    let mut spec = ImageResult {
        group: String::new(),
        image_id: String::new(),
        failure: None,
        width: None,
        height: None,
        perceptual_hash: None,
        outputs: BTreeMap::new(),
        timings: Timings::default(),
    };
    let analysis = match outcome {
        Ok(analysis) => analysis,
        Err(e) => {
            spec.failure = Some(ImageFailure {
                reason: failure_reason(&e).to_owned(),
                message: e.to_string(),
            });
            return spec;
        }
    };
    spec.timings.decode_ms = round_ms(analysis.decode_ms);
    spec.width = Some(analysis.width);
    spec.height = Some(analysis.height);
    spec.perceptual_hash = analysis.perceptual_hash;
    for (model, run) in analysis.models {
        let (output, error) = match run.result {
            Ok(output) => (output, None),
            Err(e) => (Default::default(), Some(e.to_string())),
        };
        let inference_ms = round_ms(run.inference_ms);
        spec.outputs.insert(
            model,
            ModelResult {
                output,
                error,
                inference_ms,
            },
        );
    }
    spec
}

/// The stable reason recorded in an image's result for a decoding error.
pub fn failure_reason(e: &InferenceError) -> &'static str {
    match e {
        InferenceError::UnsupportedFormat { .. } => "UnsupportedFormat",
        InferenceError::ImageTooLarge { .. } => "ImageTooLarge",
        InferenceError::TruncatedImage(_) => "ImageTruncated",
        InferenceError::CorruptImage(_) | InferenceError::InvalidImage(_) => "CorruptImage",
        _ => "ProcessingFailed",
    }
}

fn round_ms(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_submitted_image_back_and_no_panic_is_fine() {
        assert!(check_pipeline(0, 0, 0, false).is_ok());
        assert!(check_pipeline(5, 5, 0, false).is_ok());
    }

    #[test]
    fn lost_images_a_panic_or_a_stop_fail_the_worker() {
        let err = check_pipeline(5, 4, 0, false).unwrap_err();
        assert!(matches!(err, WorkerError::Pipeline(_)), "{err:?}");
        assert_eq!(err.category(), "internal");
        assert!(err.to_string().contains("1 of 5 submitted images"), "{err}");

        let err = check_pipeline(5, 5, 1, false).unwrap_err();
        assert!(
            err.to_string().contains("1 pipeline thread(s) panicked"),
            "{err}"
        );

        let err = check_pipeline(3, 3, 0, true).unwrap_err();
        assert!(err.to_string().contains("stopped taking images"), "{err}");
    }
}
