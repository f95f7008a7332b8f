//! `kinsight bench`: images per second of kinsight's image path on a folder of images, for
//! `scripts/bench.sh`, which runs it beside plain Python pipelines on the same images.
//!
//! - `--mode pipeline` (default): what the worker does once the bytes are downloaded, through
//!   the same code ([`crate::inference::pipeline`]): decode, preprocess, ONNX Runtime,
//!   postprocess for every model, decoding overlapping inference, batches where the model
//!   allows. The bytes are read into memory first; the clock runs from the first image
//!   submitted to the last result out.
//! - `--mode inference`: the same models, threads and batches on inputs prepared before
//!   the clock starts: ONNX Runtime (plus output decoding) alone, the floor of the above.
//!
//! Prints one JSON object per run on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::inference::pipeline::{Pipeline, PipelineOptions};
use crate::inference::{
    Catalog, DecodeLimits, Engine, EngineOptions, ExecutionProvider, PreparedInput, decode_image,
    init_runtime,
};

/// What `kinsight bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Bytes -> results through the worker's pipeline.
    Pipeline,
    /// ONNX Runtime alone on prepared inputs (same sessions, threads, batches).
    Inference,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Folder of images (JPEG, PNG, WebP); every file in it is used once.
    #[arg(long)]
    pub images: PathBuf,
    #[arg(long, env = "KINSIGHT_CATALOG", default_value = "models/catalog.yaml")]
    pub catalog: PathBuf,
    /// Models to run on every image (default: every catalog model).
    #[arg(long = "model")]
    pub models: Vec<String>,
    #[arg(long, value_enum, default_value = "pipeline")]
    pub mode: Mode,
    /// ONNX Runtime intra-op threads per session (default: the CPU limit).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Sessions of each single-image model, side by side (default: the CPU limit, at
    /// most 4, sharing the intra-op threads).
    #[arg(long, default_value_t = 0)]
    pub instances: usize,
    /// Decoder threads of the pipeline (default: half the CPU limit, at least 1).
    #[arg(long, default_value_t = 0)]
    pub decoders: usize,
    /// Let ONNX Runtime's intra-op threads spin while idle (its default; off in kinsight).
    #[arg(long)]
    pub spin: bool,
    /// `cpu`, `cuda`, `cuda:<gpu>` or `auto`.
    #[arg(long, default_value = "cpu")]
    pub execution_provider: ExecutionProvider,
    /// Images run before the clock starts.
    #[arg(long, default_value_t = 8)]
    pub warmup: usize,
    /// libonnxruntime.so (default: ORT_DYLIB_PATH, else ./.venv's onnxruntime wheel).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib: Option<PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchReport {
    pub name: String,
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    pub failed: usize,
    pub models: Vec<String>,
    /// Per model: its sessions side by side and the intra-op threads of each.
    pub sessions: std::collections::BTreeMap<String, Sessions>,
    /// Pipeline only: mean milliseconds per image of each stage (thread time, overlapped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages_ms: Option<Stages>,
}

/// How a model runs (see `EngineOptions::instances`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sessions {
    pub instances: usize,
    pub intra_threads: usize,
}

/// Mean milliseconds per image spent in each stage.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stages {
    pub decode: f64,
    pub preprocess: f64,
    /// Per model; a batch's run time shared among its images.
    pub inference: std::collections::BTreeMap<String, f64>,
}

/// Runs the benchmark and prints its report as JSON.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    init_runtime(args.ort_dylib.as_deref())?;
    let catalog = Catalog::load(&args.catalog)?;
    let models: Vec<String> = if args.models.is_empty() {
        catalog.names().map(str::to_owned).collect()
    } else {
        args.models.clone()
    };
    let options = EngineOptions {
        intra_threads: args.threads,
        execution_provider: args.execution_provider,
        intra_spinning: args.spin,
        instances: args.instances,
    };
    let engine = Arc::new(Engine::load(&catalog, &models, &options)?);
    let files = read_images(&args.images)?;
    let report = match args.mode {
        Mode::Pipeline => pipeline(&engine, &models, files, &args).await?,
        Mode::Inference => {
            let (engine, models) = (engine.clone(), models.clone());
            let warmup = args.warmup;
            tokio::task::spawn_blocking(move || inference(&engine, &models, &files, warmup))
                .await??
        }
    };
    let report = BenchReport {
        sessions: models
            .iter()
            .filter_map(|model| {
                let instances = engine.instances(model)?;
                let intra_threads = engine.intra_threads(model)?;
                Some((
                    model.clone(),
                    Sessions {
                        instances,
                        intra_threads,
                    },
                ))
            })
            .collect(),
        ..report
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(report)
}

fn read_images(folder: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("reading {}", folder.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.is_file());
    paths.sort();
    if paths.is_empty() {
        bail!("no images in {}", folder.display());
    }
    paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

async fn pipeline(
    engine: &Arc<Engine>,
    models: &[String],
    files: Vec<Vec<u8>>,
    args: &BenchArgs,
) -> anyhow::Result<BenchReport> {
    let options = PipelineOptions {
        decoders: args.decoders,
        ..PipelineOptions::default()
    };
    let warmup: Vec<Vec<u8>> = files.iter().take(args.warmup).cloned().collect();
    pass(engine, models, warmup, &options).await?;
    let images = files.len();
    // The bytes move into the pipeline: nothing is copied while the clock runs.
    let started = Instant::now();
    let (failed, stages) = pass(engine, models, files, &options).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(BenchReport {
        stages_ms: Some(stages),
        ..report("kinsight-pipeline", images, seconds, failed, models)
    })
}

/// Feeds every image to a fresh pipeline (as the worker feeds downloads) and waits for
/// every result; returns how many images or model runs failed, and the mean stage times.
async fn pass(
    engine: &Arc<Engine>,
    models: &[String],
    files: Vec<Vec<u8>>,
    options: &PipelineOptions,
) -> anyhow::Result<(usize, Stages)> {
    let submitted = files.len();
    let count = submitted.max(1) as f64;
    let (submitter, mut results) = Pipeline::start::<usize>(engine.clone(), models, options)?;
    let feed = async move {
        for (i, bytes) in files.into_iter().enumerate() {
            submitter.submit(i, bytes).await?;
        }
        anyhow::Ok(())
    };
    let collect = async move {
        let mut failed = 0;
        let mut returned = 0;
        let mut stages = Stages::default();
        while let Some((_, outcome)) = results.next().await {
            returned += 1;
            let Ok(analysis) = outcome else {
                failed += 1;
                continue;
            };
            if analysis.models.values().any(|m| m.result.is_err()) {
                failed += 1;
            }
            stages.decode += analysis.decode_ms / count;
            stages.preprocess += analysis.preprocess_ms / count;
            for (model, run) in &analysis.models {
                *stages.inference.entry(model.clone()).or_default() += run.inference_ms / count;
            }
        }
        // Lost images would make the pass look faster than it is.
        if returned != submitted || results.panicked() > 0 {
            bail!(
                "the pipeline returned {returned} of {submitted} images ({} thread(s) panicked)",
                results.panicked()
            );
        }
        anyhow::Ok((failed, stages))
    };
    let ((), outcome) = tokio::try_join!(feed, collect)?;
    Ok(outcome)
}

/// The pipeline's model threads without decoding or preprocessing: every model on its own
/// thread, batches as large as the model allows, inputs prepared beforehand.
fn inference(
    engine: &Engine,
    models: &[String],
    files: &[Vec<u8>],
    warmup: usize,
) -> anyhow::Result<BenchReport> {
    // A few distinct inputs, reused (inference time does not depend on the pixels).
    let distinct = files.len().min(16);
    let mut prepared: Vec<Vec<PreparedInput>> = vec![Vec::new(); models.len()];
    for bytes in files.iter().take(distinct) {
        let image = decode_image(bytes, &DecodeLimits::default())?;
        for (inputs, model) in prepared.iter_mut().zip(models) {
            inputs.push(engine.prepare(model, &image)?);
        }
    }
    // One thread per session of each model (see `EngineOptions::instances`), as in the
    // pipeline; a model's threads take the next batch from a shared count.
    let counters: Vec<AtomicUsize> = models.iter().map(|_| AtomicUsize::new(0)).collect();
    // How many model runs failed; a thread that panicked fails the benchmark (its runs
    // are not counted as failures of the model).
    let run_all = |count: usize| -> anyhow::Result<usize> {
        std::thread::scope(|scope| {
            let mut threads = Vec::new();
            for ((model, inputs), next) in models.iter().zip(&prepared).zip(&counters) {
                let batch = engine.max_batch(model).unwrap_or(1).max(1);
                next.store(0, Ordering::Relaxed);
                for _ in 0..engine.instances(model).unwrap_or(1) {
                    threads.push(scope.spawn(move || {
                        let mut failed = 0;
                        loop {
                            let done = next.fetch_add(batch, Ordering::Relaxed);
                            if done >= count {
                                break failed;
                            }
                            let n = batch.min(count - done);
                            // References: no input is copied while the clock runs.
                            let chunk: Vec<&PreparedInput> = (done..done + n)
                                .filter_map(|i| inputs.get(i % inputs.len()))
                                .collect();
                            failed += engine
                                .run_prepared(model, &chunk)
                                .iter()
                                .filter(|r| r.is_err())
                                .count();
                        }
                    }));
                }
            }
            let joined: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
            let panicked = joined.iter().filter(|j| j.is_err()).count();
            anyhow::ensure!(panicked == 0, "{panicked} inference thread(s) panicked");
            Ok(joined.into_iter().flatten().sum())
        })
    };
    run_all(warmup)?;
    let started = Instant::now();
    let failed = run_all(files.len())?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(report(
        "kinsight-inference-only",
        files.len(),
        seconds,
        failed,
        models,
    ))
}

fn report(
    name: &str,
    images: usize,
    seconds: f64,
    failed: usize,
    models: &[String],
) -> BenchReport {
    BenchReport {
        name: name.to_owned(),
        images,
        seconds,
        images_per_second: if seconds > 0.0 {
            images as f64 / seconds
        } else {
            0.0
        },
        failed,
        models: models.to_vec(),
        sessions: Default::default(),
        stages_ms: None,
    }
}
