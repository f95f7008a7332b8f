//! `kinsight worker`: the process a worker Job's pod runs. It reads its work order from
//! the environment, downloads and decodes each image, runs the requested models and writes
//! one result per image the moment it is ready. A bad image fails alone; the process fails
//! only when it cannot work at all (models, runtime, result store).

mod fetch;
mod order;

pub use fetch::{FetchConfig, FetchError, Fetcher};
pub use order::{WORK_ORDER_ENV, WorkItem, WorkOrder};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;

use crate::crd::{ImageFailure, ImageResultSpec, ModelResult, Timings};
use crate::inference::{
    Catalog, DecodeLimits, Engine, EngineOptions, InferenceError, decode_image,
};
use crate::results::{ResultStore, ResultsError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("work order: {0}")]
    WorkOrder(String),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("inference thread: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl WorkerError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::WorkOrder(_) => "invalid_work_order",
            Self::Inference(e) => e.category(),
            Self::Results(e) => e.category(),
            Self::Http(_) => "http_client",
            Self::Join(_) => "internal",
        }
    }
}

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub catalog: PathBuf,
    pub fetch: FetchConfig,
    /// Downloads in flight while inference runs.
    pub prefetch: usize,
    pub engine: EngineOptions,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub succeeded: usize,
    pub failed: usize,
}

/// Reads the work order from `KINSIGHT_WORK_ORDER`.
pub fn order_from_env() -> Result<WorkOrder, WorkerError> {
    let text = std::env::var(WORK_ORDER_ENV)
        .map_err(|_| WorkerError::WorkOrder(format!("{WORK_ORDER_ENV} is not set")))?;
    serde_json::from_str(&text).map_err(|e| {
        WorkerError::WorkOrder(format!("{WORK_ORDER_ENV} is not a valid work order: {e}"))
    })
}

pub async fn run(
    order: WorkOrder,
    store: ResultStore,
    options: WorkerOptions,
) -> Result<WorkerReport, WorkerError> {
    let catalog = Catalog::load(&options.catalog)?;
    let engine_options = options.engine.clone();
    let models = order.models.clone();
    let engine =
        tokio::task::spawn_blocking(move || Engine::load(&catalog, &models, &engine_options))
            .await??;
    let engine = Arc::new(engine);
    let fetcher = Fetcher::new(&options.fetch)?;
    tracing::info!(group = %order.group.name, images = order.images.len(), models = ?order.models, "worker started");

    // Downloads overlap inference: up to `prefetch` images are fetched ahead.
    let mut downloads = futures::stream::iter(order.images.iter().cloned())
        .map(|item| {
            let fetcher = fetcher.clone();
            async move {
                let started = Instant::now();
                let bytes = fetcher.fetch(&item.url).await;
                (item, bytes, started.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffered(options.prefetch.max(1));
    let mut report = WorkerReport::default();
    while let Some((item, bytes, download_ms)) = downloads.next().await {
        let spec = match bytes {
            Err(e) => failed(&order, &item, e.reason(), e.to_string(), download_ms),
            Ok(bytes) => {
                let engine = engine.clone();
                let models = item.models(&order).to_vec();
                let mut spec =
                    tokio::task::spawn_blocking(move || analyse(&engine, &models, &bytes)).await?;
                spec.group = order.group.name.clone();
                spec.image_id = item.id.clone();
                spec.timings.download_ms = round_ms(download_ms);
                spec
            }
        };
        if spec.is_failure(item.models(&order)) {
            report.failed += 1;
            tracing::warn!(image = %item.id, failure = ?spec.failure, "image failed");
        } else {
            report.succeeded += 1;
        }
        store.write(&order.group, &spec).await?;
    }
    tracing::info!(
        succeeded = report.succeeded,
        failed = report.failed,
        "worker finished"
    );
    Ok(report)
}

fn failed(
    order: &WorkOrder,
    item: &WorkItem,
    reason: &str,
    message: String,
    download_ms: f64,
) -> ImageResultSpec {
    ImageResultSpec {
        group: order.group.name.clone(),
        image_id: item.id.clone(),
        failure: Some(ImageFailure {
            reason: reason.to_owned(),
            message,
        }),
        width: None,
        height: None,
        outputs: BTreeMap::new(),
        timings: Timings {
            download_ms: round_ms(download_ms),
            decode_ms: 0.0,
        },
    }
}

/// Decode once, then every model; a model's error is recorded beside the others' outputs.
fn analyse(engine: &Engine, models: &[String], bytes: &[u8]) -> ImageResultSpec {
    let mut spec = ImageResultSpec {
        group: String::new(),
        image_id: String::new(),
        failure: None,
        width: None,
        height: None,
        outputs: BTreeMap::new(),
        timings: Timings::default(),
    };
    let started = Instant::now();
    let image = match decode_image(bytes, &DecodeLimits::default()) {
        Ok(image) => image,
        Err(e) => {
            spec.failure = Some(ImageFailure {
                reason: failure_reason(&e).to_owned(),
                message: e.to_string(),
            });
            return spec;
        }
    };
    spec.timings.decode_ms = round_ms(started.elapsed().as_secs_f64() * 1000.0);
    spec.width = Some(image.width());
    spec.height = Some(image.height());
    for model in models {
        let started = Instant::now();
        let result = match engine.run(model, &image) {
            Ok(output) => ModelResult {
                output,
                error: None,
                inference_ms: 0.0,
            },
            Err(e) => ModelResult {
                output: Default::default(),
                error: Some(e.to_string()),
                inference_ms: 0.0,
            },
        };
        let inference_ms = round_ms(started.elapsed().as_secs_f64() * 1000.0);
        spec.outputs.insert(
            model.clone(),
            ModelResult {
                inference_ms,
                ..result
            },
        );
    }
    spec
}

fn failure_reason(e: &InferenceError) -> &'static str {
    match e {
        InferenceError::UnsupportedFormat { .. } => "UnsupportedFormat",
        InferenceError::ImageTooLarge { .. } => "ImageTooLarge",
        InferenceError::CorruptImage(_) | InferenceError::InvalidImage(_) => "CorruptImage",
        _ => "ProcessingFailed",
    }
}

fn round_ms(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}
