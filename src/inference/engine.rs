//! The inference engine: one ONNX Runtime session per model, loaded once and reused.
//!
//! [`Engine::run`] runs one model on one image. When several images are ready,
//! [`Engine::run_batch`] (or [`Engine::prepare`] + [`Engine::run_prepared`], which lets
//! another thread do the preprocessing) sends them to the model together, in batches of
//! up to [`Engine::max_batch`] images for models whose batch dimension is dynamic.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError, TryLockError};
use std::time::Instant;

use image::DynamicImage;
use ort::environment::Environment;
#[cfg(feature = "cuda")]
use ort::ep::ExecutionProvider as _;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use super::catalog::{
    AnalyserEntry, BuiltIn, Catalog, DEFAULT_MAX_BATCH, DetectionDecoder, Layout, ModelSpec,
    TaskSpec,
};
use super::classification::decode_classification;
use super::cpu::cpu_limit;
use super::detection::{Geometry, RawTensor, decode_nanodet, decode_yolov8};
use super::ordinal::decode_ordinal;
use super::output::ModelOutput;
use super::preprocess::preprocess_into;
use super::{InferenceError, ms, quality, runtime};

/// How sessions are created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Threads ONNX Runtime may use inside one operator of one run; 0 means
    /// [`cpu_limit`] (the pod's CPU limit, else the CPUs of the machine).
    pub intra_threads: usize,
    /// Where the models run.
    pub execution_provider: ExecutionProvider,
    /// Let ONNX Runtime's intra-op threads spin while waiting for work (its default).
    /// Off here: spinning threads take CPU time from the decoders and the other models'
    /// sessions running at the same time, for a small latency gain per operator.
    pub intra_spinning: bool,
    /// Sessions of a model that takes one image per run (its batch fixed at 1, or
    /// `maxBatch: 1`) on the CPU, each run by its own pipeline thread; 0:
    /// [`cpu_limit`], at most [`MAX_AUTO_INSTANCES`]. With the intra-op threads left at 0,
    /// they share the CPU limit. Why: one image's operators are small, so spreading them
    /// over intra-op threads leaves cores waiting at every operator; images side by side
    /// keep the cores busy (Triton's `instance_group` does the same). A batched model gets
    /// its parallelism from the batch, and a GPU runs one session's work at a time: one
    /// session each.
    pub instances: usize,
}

/// Most sessions per single-image model when [`EngineOptions::instances`] is 0: each one
/// holds its own copy of the weights and buffers.
pub const MAX_AUTO_INSTANCES: usize = 4;

impl EngineOptions {
    /// The intra-op threads sessions get.
    pub fn effective_intra_threads(&self) -> usize {
        if self.intra_threads == 0 {
            cpu_limit()
        } else {
            self.intra_threads
        }
    }

    /// Sessions (and intra-op threads each) for a model taking at most `max_batch` images
    /// per run on `provider`.
    fn layout(&self, max_batch: usize, provider: ExecutionProvider) -> (usize, usize) {
        let single = max_batch <= 1 && provider == ExecutionProvider::Cpu;
        let instances = match self.instances {
            _ if !single => 1,
            0 => cpu_limit().min(MAX_AUTO_INSTANCES),
            n => n,
        };
        let threads = match self.intra_threads {
            0 => (cpu_limit() / instances).max(1),
            n => n,
        };
        (instances, threads)
    }
}

/// ONNX Runtime execution provider of every session.
///
/// CUDA needs kinsight built with the `cuda` cargo feature (on by default; it only compiles
/// ort's CUDA registration code: nothing CUDA-related is needed to build, the runtime is
/// loaded dynamically) and, at run time, an ONNX Runtime library built with CUDA (the
/// `onnxruntime-gpu` wheel or release, with CUDA and cuDNN installed). Without either,
/// [`Self::Cuda`] fails at load with an error saying which is missing, and [`Self::Auto`]
/// uses the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    /// NVIDIA CUDA on this GPU; operators CUDA lacks run on the CPU.
    Cuda { device_id: i32 },
    /// CUDA (GPU 0) when the runtime and the machine have it, else the CPU.
    Auto,
}

impl ExecutionProvider {
    /// ONNX Runtime's name of the provider, as logged (`auto` before it is resolved).
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "CPUExecutionProvider",
            Self::Cuda { .. } => "CUDAExecutionProvider",
            Self::Auto => "auto",
        }
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { device_id: 0 } => f.write_str("cuda"),
            Self::Cuda { device_id } => write!(f, "cuda:{device_id}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for ExecutionProvider {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0), `cuda:<gpu>` or `auto`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda { device_id: 0 }),
            "auto" => Ok(Self::Auto),
            other => other
                .strip_prefix("cuda:")
                .and_then(|id| id.parse::<i32>().ok())
                .filter(|id| *id >= 0)
                .map(|device_id| Self::Cuda { device_id })
                .ok_or_else(|| {
                    format!("unknown execution provider `{text}`: expected cpu, cuda, cuda:<gpu> or auto")
                }),
        }
    }
}

struct LoadedModel {
    spec: ModelSpec,
    /// Images per run at most (1: the model's batch dimension is fixed).
    max_batch: usize,
    /// The provider the session was created with (never `Auto`).
    execution_provider: ExecutionProvider,
    /// `Session::run` needs `&mut`: a session runs one batch at a time; different models,
    /// and a model's several sessions ([`EngineOptions::instances`]), run in parallel.
    sessions: Vec<Mutex<Session>>,
    /// Intra-op threads of each session.
    intra_threads: usize,
}

/// An image turned into one model's input: what [`Engine::run_prepared`] runs. Making it
/// is the CPU-heavy part besides inference (resize, normalisation), so it can be done on
/// another thread than the one running the model.
#[derive(Debug, Clone)]
pub struct PreparedInput {
    /// `[3, height, width]`, normalised, in the model's channel order.
    data: Vec<f32>,
    geometry: Geometry,
}

/// Loaded models, ready to run. `Send + Sync`: share it behind an `Arc`.
pub struct Engine {
    models: BTreeMap<String, LoadedModel>,
    /// Built-in analysers requested beside the models; they run on the decoded image.
    analysers: BTreeMap<String, AnalyserEntry>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Engine {
    /// Loads the named catalog models and analysers (an empty `models` slice: all of them).
    ///
    /// Initialises ONNX Runtime from [`runtime::default_runtime_path`] if
    /// [`runtime::init_runtime`] was not called before. Each model's inputs and outputs
    /// are checked against its catalog entry, so mistakes surface here, not per image.
    pub fn load(
        catalog: &Catalog,
        models: &[String],
        opts: &EngineOptions,
    ) -> Result<Engine, InferenceError> {
        let analysers: BTreeMap<String, AnalyserEntry> = catalog
            .analysers()
            .iter()
            .filter(|a| models.is_empty() || models.contains(&a.name))
            .map(|a| (a.name.clone(), a.clone()))
            .collect();
        let specs: Vec<&ModelSpec> = if models.is_empty() {
            // "All of them": those whose fetched file is not there yet are left out.
            catalog
                .models()
                .iter()
                .filter(|spec| {
                    let present = spec.fetch.is_none() || spec.model_path.is_file();
                    if !present {
                        tracing::info!(model = %spec.name, file = %spec.model_path.display(), "model file not fetched; model left out");
                    }
                    present
                })
                .collect()
        } else {
            models
                .iter()
                .filter(|name| !analysers.contains_key(*name))
                .map(|name| {
                    catalog
                        .get(name)
                        .ok_or_else(|| InferenceError::UnknownModel(name.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        if specs.is_empty() {
            // Only built-in analysers: ONNX Runtime is not needed.
            return Ok(Engine {
                models: BTreeMap::new(),
                analysers,
            });
        }
        let environment = runtime::environment()?;

        let intra_threads = opts.effective_intra_threads();
        let mut loaded = BTreeMap::new();
        for spec in specs {
            if loaded.contains_key(&spec.name) {
                continue;
            }
            if let Some(fetch) = &spec.fetch
                && !spec.model_path.is_file()
            {
                return Err(InferenceError::ModelLoad {
                    model: spec.name.clone(),
                    message: format!(
                        "model file {} is missing: run `{fetch}` (scripts/setup.sh and scripts/test.sh do)",
                        spec.model_path.display()
                    ),
                });
            }
            let started = Instant::now();
            let (session, chosen) = create_session(&environment, spec, opts, intra_threads)?;
            let max_batch = check_signature(&session, spec)?;
            let execution_provider = chosen.provider;
            let (instances, threads) = opts.layout(max_batch, execution_provider);
            // The batch is known once a session is made. That first session is kept when it
            // has the layout's threads; the others (all of them when it has not) are made
            // side by side: making a session (its graph optimisation) is one thread's work.
            let kept = (threads == intra_threads).then_some(session);
            let build = || {
                build_session(
                    &environment,
                    spec,
                    execution_provider,
                    threads,
                    opts.intra_spinning,
                )
                .map(Mutex::new)
                .map_err(|e| InferenceError::ModelLoad {
                    model: spec.name.clone(),
                    message: format!("{}: {}", spec.model_path.display(), one_line(&e)),
                })
            };
            let more = instances - usize::from(kept.is_some());
            let mut sessions = std::thread::scope(|scope| {
                let making: Vec<_> = (0..more).map(|_| scope.spawn(build)).collect();
                making
                    .into_iter()
                    .map(|made| {
                        made.join().unwrap_or_else(|_| {
                            Err(InferenceError::Internal("making a session panicked".into()))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })?;
            if let Some(session) = kept {
                sessions.insert(0, Mutex::new(session));
            }
            // One line per model that says where it really runs, and why when that is not
            // what was asked for (operators look for it on GPU nodes).
            tracing::info!(
                model = %spec.name,
                execution_provider = %chosen,
                file = %spec.model_path.display(),
                intra_threads = threads,
                instances,
                max_batch,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            loaded.insert(
                spec.name.clone(),
                LoadedModel {
                    spec: spec.clone(),
                    max_batch,
                    execution_provider,
                    sessions,
                    intra_threads: threads,
                },
            );
        }
        Ok(Engine {
            models: loaded,
            analysers,
        })
    }

    /// Names of the loaded models, sorted.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// The catalog entry of a loaded model.
    pub fn spec(&self, model: &str) -> Option<&ModelSpec> {
        self.models.get(model).map(|m| &m.spec)
    }

    /// Whether `name` is a loaded model or analyser.
    pub fn has(&self, name: &str) -> bool {
        self.models.contains_key(name) || self.analysers.contains_key(name)
    }

    /// A loaded built-in analyser.
    pub fn analyser(&self, name: &str) -> Option<&AnalyserEntry> {
        self.analysers.get(name)
    }

    /// Runs a built-in analyser on the decoded image (no ONNX Runtime involved).
    pub fn run_analyser(
        &self,
        name: &str,
        image: &image::RgbImage,
    ) -> Result<ModelOutput, InferenceError> {
        let analyser = self
            .analysers
            .get(name)
            .ok_or_else(|| InferenceError::UnknownModel(name.to_string()))?;
        match analyser.builtin {
            BuiltIn::PhotoQuality => Ok(ModelOutput {
                quality: Some(quality::analyse(image, &analyser.thresholds)?),
                ..ModelOutput::default()
            }),
        }
    }

    /// Most images one run of the model takes (1 when its batch dimension is fixed).
    pub fn max_batch(&self, model: &str) -> Option<usize> {
        self.models.get(model).map(|m| m.max_batch)
    }

    /// How many runs of the model can go at once (its sessions; see
    /// [`EngineOptions::instances`]).
    pub fn instances(&self, model: &str) -> Option<usize> {
        self.models.get(model).map(|m| m.sessions.len())
    }

    /// The intra-op threads of each of the model's sessions.
    pub fn intra_threads(&self, model: &str) -> Option<usize> {
        self.models.get(model).map(|m| m.intra_threads)
    }

    /// The execution provider the model's session runs on.
    pub fn execution_provider(&self, model: &str) -> Option<ExecutionProvider> {
        self.models.get(model).map(|m| m.execution_provider)
    }

    fn loaded(&self, model: &str) -> Result<&LoadedModel, InferenceError> {
        self.models
            .get(model)
            .ok_or_else(|| InferenceError::UnknownModel(model.to_string()))
    }

    /// Runs one model on one image.
    pub fn run(&self, model: &str, image: &DynamicImage) -> Result<ModelOutput, InferenceError> {
        let input = self.prepare(model, image)?;
        self.run_prepared(model, std::slice::from_ref(&input))
            .pop()
            .unwrap_or_else(|| Err(InferenceError::Internal("no result for the image".into())))
    }

    /// Runs one model on several images, in batches where the model allows it; one result
    /// per image, in order (a bad image fails alone).
    pub fn run_batch(
        &self,
        model: &str,
        images: &[&DynamicImage],
    ) -> Vec<Result<ModelOutput, InferenceError>> {
        let prepared: Vec<Result<PreparedInput, InferenceError>> = images
            .iter()
            .map(|image| self.prepare(model, image))
            .collect();
        let ready: Vec<&PreparedInput> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
        let mut outputs = self.run_prepared(model, &ready).into_iter();
        prepared
            .into_iter()
            .map(|p| match p {
                Ok(_) => outputs.next().unwrap_or_else(|| {
                    Err(InferenceError::Internal("no result for the image".into()))
                }),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// Preprocesses an image for a model (see [`PreparedInput`]).
    pub fn prepare(
        &self,
        model: &str,
        image: &DynamicImage,
    ) -> Result<PreparedInput, InferenceError> {
        let spec = &self.loaded(model)?.spec;
        let pre = &spec.preprocessing;
        let mut data = vec![0.0_f32; input_len(spec)];
        let placement = preprocess_into(image, pre, &mut data)?;
        Ok(PreparedInput {
            data,
            geometry: Geometry {
                input_width: pre.width,
                input_height: pre.height,
                image_width: image.width(),
                image_height: image.height(),
                placement,
            },
        })
    }

    /// Runs a model on inputs made by [`Engine::prepare`] for it (owned or borrowed),
    /// [`Engine::max_batch`] at a time; one result per input, in order.
    pub fn run_prepared<I: Borrow<PreparedInput>>(
        &self,
        model: &str,
        inputs: &[I],
    ) -> Vec<Result<ModelOutput, InferenceError>> {
        let loaded = match self.loaded(model) {
            Ok(loaded) => loaded,
            Err(_) => {
                return inputs
                    .iter()
                    .map(|_| Err(InferenceError::UnknownModel(model.to_string())))
                    .collect();
            }
        };
        let mut results = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(loaded.max_batch.max(1)) {
            match run_chunk(loaded, chunk) {
                Ok(outputs) => results.extend(outputs),
                Err(message) => results.extend(chunk.iter().map(|_| {
                    Err(InferenceError::Inference {
                        model: model.to_string(),
                        message: message.clone(),
                    })
                })),
            }
        }
        results
    }
}

fn input_len(spec: &ModelSpec) -> usize {
    3 * spec.preprocessing.width as usize * spec.preprocessing.height as usize
}

/// One ONNX Runtime run on a batch. `Err` (a message) when the run itself failed; output
/// problems are per image.
fn run_chunk<I: Borrow<PreparedInput>>(
    loaded: &LoadedModel,
    chunk: &[I],
) -> Result<Vec<Result<ModelOutput, InferenceError>>, String> {
    let spec = &loaded.spec;
    let model = spec.name.as_str();
    let per_image = input_len(spec);
    if let Some(bad) = chunk
        .iter()
        .map(Borrow::borrow)
        .find(|input| input.data.len() != per_image)
    {
        return Err(format!(
            "an input of {} values was prepared for another model (this one takes {per_image})",
            bad.data.len()
        ));
    }
    let started = Instant::now();
    // One image: its buffer as is; several: copied into one batch tensor.
    let mut batch = Vec::new();
    let data: &[f32] = match chunk {
        [single] => &single.borrow().data,
        _ => {
            batch.reserve_exact(per_image * chunk.len());
            for input in chunk {
                batch.extend_from_slice(&input.borrow().data);
            }
            &batch
        }
    };
    let (height, width) = (
        spec.preprocessing.height as usize,
        spec.preprocessing.width as usize,
    );
    let shape = match spec.preprocessing.layout {
        Layout::Nchw => [chunk.len(), 3, height, width],
        Layout::Nhwc => [chunk.len(), height, width, 3],
    };
    let tensor =
        TensorRef::from_array_view((shape, data)).map_err(|e| format!("input tensor: {e}"))?;
    let assembled = Instant::now();

    // A free session if there is one, else wait for the first. A panic cannot happen while
    // a lock is held (everything below returns errors), but if one did the session is
    // still usable: ignore poisoning.
    let free = loaded
        .sessions
        .iter()
        .find_map(|session| match session.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        });
    let mut session = match free {
        Some(session) => session,
        None => loaded
            .sessions
            .first()
            .ok_or("the model has no session")?
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    };
    let locked = Instant::now();
    let outputs = session
        .run(ort::inputs![tensor])
        .map_err(|e| e.to_string())?;
    let inferred = Instant::now();

    let unexpected = |message: String| InferenceError::UnexpectedOutput {
        model: model.to_string(),
        message,
    };
    // Owned values (still runtime memory, no copy) so the tensors can borrow them.
    let outputs: Vec<(&str, DynValue)> = outputs.into_iter().collect();
    let mut tensors = Vec::with_capacity(outputs.len());
    for (name, value) in &outputs {
        let (shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("output `{name}`: {e}"))?;
        // Every output is `[batch, ...]`: image i owns the i-th slice.
        let values = match shape.first() {
            Some(&n) if usize::try_from(n).ok() == Some(chunk.len()) => data.len() / chunk.len(),
            _ => {
                return Err(format!(
                    "output `{name}` has shape {shape:?}, expected a first dimension of {} (the batch)",
                    chunk.len()
                ));
            }
        };
        let mut image_shape = shape.to_vec();
        if let Some(first) = image_shape.first_mut() {
            *first = 1;
        }
        tensors.push((*name, image_shape, data, values));
    }

    let results = chunk
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let image_tensors: Vec<RawTensor<'_>> = tensors
                .iter()
                .map(|(name, shape, data, values)| RawTensor {
                    name,
                    shape,
                    data: data.get(i * values..(i + 1) * values).unwrap_or_default(),
                })
                .collect();
            decode(spec, &image_tensors, input.borrow().geometry).map_err(unexpected)
        })
        .collect();
    drop(outputs);
    drop(session);

    tracing::debug!(
        model,
        execution_provider = loaded.execution_provider.name(),
        batch = chunk.len(),
        batch_ms = ms(assembled - started),
        queued_ms = ms(locked - assembled),
        inference_ms = ms(inferred - locked),
        postprocess_ms = ms(inferred.elapsed()),
        "inference done"
    );
    Ok(results)
}

/// One image's outputs -> its result, by the model's task.
fn decode(
    spec: &ModelSpec,
    tensors: &[RawTensor<'_>],
    geometry: Geometry,
) -> Result<ModelOutput, String> {
    let single = || match tensors {
        [one] => Ok(one),
        _ => Err(format!("expected one output, got {}", tensors.len())),
    };
    Ok(match &spec.task {
        TaskSpec::Detection(params) => {
            let detections = match params.decoder {
                DetectionDecoder::Nanodet => {
                    decode_nanodet(tensors, &spec.labels, params, geometry)?
                }
                DetectionDecoder::Yolov8 => decode_yolov8(tensors, &spec.labels, params, geometry)?,
            };
            ModelOutput {
                detections,
                ..ModelOutput::default()
            }
        }
        TaskSpec::Classification(params) => {
            let logits = single()?;
            let (classes, flags) =
                decode_classification(logits.shape, logits.data, &spec.labels, params)?;
            ModelOutput {
                classes,
                flags,
                ..ModelOutput::default()
            }
        }
        TaskSpec::Ordinal => {
            let logits = single()?;
            ModelOutput {
                grade: Some(decode_ordinal(logits.shape, logits.data, &spec.labels)?),
                ..ModelOutput::default()
            }
        }
    })
}

/// The provider a session runs on, and how it came to be that one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChosenProvider {
    /// Never `Auto`.
    provider: ExecutionProvider,
    requested: ExecutionProvider,
    /// Why `auto` settled for the CPU.
    fallback: Option<String>,
}

impl fmt::Display for ChosenProvider {
    /// `CPU (requested)`, `CUDA:0 (CUDA available, via auto)`,
    /// `CPU (CUDA requested via auto but this ONNX Runtime has no CUDA)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.provider {
            ExecutionProvider::Cuda { device_id } => write!(f, "CUDA:{device_id}")?,
            _ => f.write_str("CPU")?,
        }
        match (&self.fallback, self.requested) {
            (Some(why), _) => write!(f, " (CUDA requested via auto but {why})"),
            (None, ExecutionProvider::Auto) => f.write_str(" (CUDA available, via auto)"),
            (None, _) => f.write_str(" (requested)"),
        }
    }
}

/// Creates the session on the requested provider; says which one it runs on.
fn create_session(
    environment: &Environment,
    spec: &ModelSpec,
    opts: &EngineOptions,
    intra_threads: usize,
) -> Result<(Session, ChosenProvider), InferenceError> {
    let requested = opts.execution_provider;
    let spin = opts.intra_spinning;
    let load_error = |message: String| InferenceError::ModelLoad {
        model: spec.name.clone(),
        message,
    };
    let runtime_library = || {
        runtime::library_path().map_or_else(|| "ONNX Runtime".into(), |p| p.display().to_string())
    };
    let mut chosen = ChosenProvider {
        provider: requested,
        requested,
        fallback: None,
    };
    match requested {
        ExecutionProvider::Cuda { .. } if !CUDA_COMPILED => {
            return Err(load_error(
                "CUDA was asked for, but this build has no CUDA support: build kinsight with \
                 `--features cuda`, or use the CPU execution provider"
                    .into(),
            ));
        }
        ExecutionProvider::Cuda { .. } if !cuda_available() => {
            return Err(load_error(format!(
                "CUDA was asked for, but {} has no CUDA support: use an ONNX Runtime \
                 build with CUDA (e.g. the onnxruntime-gpu wheel, with CUDA and cuDNN \
                 installed) or the CPU execution provider",
                runtime_library()
            )));
        }
        ExecutionProvider::Auto if !CUDA_COMPILED => {
            chosen.provider = ExecutionProvider::Cpu;
            chosen.fallback = Some("this kinsight build has no CUDA support".into());
        }
        ExecutionProvider::Auto if !cuda_available() => {
            chosen.provider = ExecutionProvider::Cpu;
            chosen.fallback = Some("this ONNX Runtime has no CUDA".into());
        }
        ExecutionProvider::Auto => chosen.provider = ExecutionProvider::Cuda { device_id: 0 },
        _ => {}
    }
    let created = build_session(environment, spec, chosen.provider, intra_threads, spin);
    match (created, requested) {
        (Ok(session), _) => Ok((session, chosen)),
        // `auto` settles for the CPU when the GPU cannot be used after all.
        (Err(e), ExecutionProvider::Auto) if chosen.provider != ExecutionProvider::Cpu => {
            let error = one_line(&e);
            tracing::warn!(model = %spec.name, error, "CUDA is unusable; using the CPU");
            chosen.provider = ExecutionProvider::Cpu;
            chosen.fallback = Some(format!("CUDA failed in {}: {error}", runtime_library()));
            build_session(
                environment,
                spec,
                ExecutionProvider::Cpu,
                intra_threads,
                spin,
            )
            .map(|session| (session, chosen))
            .map_err(|e| load_error(format!("{}: {}", spec.model_path.display(), one_line(&e))))
        }
        (Err(e), _) => Err(load_error(format!(
            "{}: {}",
            spec.model_path.display(),
            one_line(&e)
        ))),
    }
}

/// An ONNX Runtime error as one line: its messages can end in a newline, which would split
/// the log line they go into.
fn one_line(error: &ort::Error) -> String {
    error.to_string().trim_end().to_owned()
}

/// Whether ort's CUDA provider is compiled in (the `cuda` cargo feature).
const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// Whether the loaded ONNX Runtime library has the CUDA provider.
fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        ort::ep::CUDA::is_available().unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

fn build_session(
    environment: &Environment,
    spec: &ModelSpec,
    provider: ExecutionProvider,
    intra_threads: usize,
    spin: bool,
) -> ort::Result<Session> {
    // Providers are registered explicitly, so a failure is an error rather than a silent
    // fallback. The CPU provider (ONNX Runtime's default arena) comes last: it takes the
    // operators an accelerator lacks.
    let cpu = ort::ep::CPU::default()
        .with_arena_allocator(true)
        .build()
        .error_on_failure();
    let providers = match provider {
        #[cfg(feature = "cuda")]
        ExecutionProvider::Cuda { device_id } => vec![
            ort::ep::CUDA::default()
                .with_device_id(device_id)
                .build()
                .error_on_failure(),
            cpu,
        ],
        // Refused earlier when CUDA is not compiled in.
        #[cfg(not(feature = "cuda"))]
        ExecutionProvider::Cuda { .. } => vec![cpu],
        ExecutionProvider::Cpu | ExecutionProvider::Auto => vec![cpu],
    };
    Session::builder(environment)?
        .with_execution_providers(providers)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(intra_threads)?
        .with_intra_op_spinning(spin)?
        .commit_from_file(&spec.model_path)
}

/// Checks the model's input and outputs against its catalog entry; returns the largest
/// batch the model takes.
fn check_signature(session: &Session, spec: &ModelSpec) -> Result<usize, InferenceError> {
    let load_error = |message: String| InferenceError::ModelLoad {
        model: spec.name.clone(),
        message,
    };

    let [input] = session.inputs() else {
        return Err(load_error(format!(
            "expected exactly one input, found {}",
            session.inputs().len()
        )));
    };
    let (height, width) = (
        i64::from(spec.preprocessing.height),
        i64::from(spec.preprocessing.width),
    );
    let (expected, layout) = match spec.preprocessing.layout {
        Layout::Nchw => ([1, 3, height, width], "NCHW"),
        Layout::Nhwc => ([1, height, width, 3], "NHWC"),
    };
    let batch_dim = match input.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 4
            && shape
                .iter()
                .zip(expected)
                .all(|(&actual, wanted)| actual == wanted || actual < 0) =>
        {
            shape.first().copied().unwrap_or(1)
        }
        other => {
            let found = match other {
                ValueType::Tensor { ty, shape, .. } => {
                    let dims: Vec<String> = shape
                        .iter()
                        .map(|&d| if d < 0 { "?".into() } else { d.to_string() })
                        .collect();
                    format!("{} [{}]", format!("{ty:?}").to_lowercase(), dims.join(", "))
                }
                other => format!("{other:?}"),
            };
            return Err(load_error(format!(
                "input `{}` is {found}; the catalog describes float32 {expected:?} ({layout})",
                input.name()
            )));
        }
    };
    let max_batch = match (batch_dim < 0, spec.max_batch) {
        (true, Some(max)) => max,
        (true, None) => DEFAULT_MAX_BATCH,
        (false, None | Some(1)) => 1,
        (false, Some(max)) => {
            return Err(load_error(format!(
                "maxBatch is {max} but the model's batch dimension is fixed at 1"
            )));
        }
    };

    // Declared output shapes (`None`: unknown dimension).
    let output_dims: Vec<Vec<Option<usize>>> = session
        .outputs()
        .iter()
        .map(|o| {
            o.dtype()
                .tensor_shape()
                .map(|shape| shape.iter().map(|&d| usize::try_from(d).ok()).collect())
                .unwrap_or_default()
        })
        .collect();
    let labels = spec.labels.len();
    let declared = || {
        output_dims
            .iter()
            .map(|dims| {
                let dims: Vec<String> = dims
                    .iter()
                    .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                    .collect();
                format!("[{}]", dims.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let last = |dims: &Vec<Option<usize>>| dims.last().copied().flatten();
    let one_output = |kind: &str| match output_dims.as_slice() {
        [dims] => Ok(dims),
        _ => Err(load_error(format!(
            "{kind} model needs exactly one output, found {}",
            output_dims.len()
        ))),
    };
    // [batch, classes]: every output's first dimension is the batch (see `run_chunk`).
    let logits = |kind: &str| {
        let dims = one_output(kind)?;
        if dims.len() < 2 {
            return Err(load_error(format!(
                "{kind} model's output is [batch, classes], this one is {}",
                declared()
            )));
        }
        Ok(dims)
    };
    let consistent = match &spec.task {
        TaskSpec::Classification(_) => {
            last(logits("a classification")?).is_none_or(|c| c == labels)
        }
        TaskSpec::Ordinal => last(logits("an ordinal")?).is_none_or(|c| c == labels),
        TaskSpec::Detection(params) => match params.decoder {
            // Per-level [1, N, classes] scores and [1, N, 4 * bins] boxes; some output must
            // carry one score per label (unknown dims are checked per image).
            DetectionDecoder::Nanodet
                if output_dims.len() < 2 || output_dims.iter().any(|d| d.len() != 3) =>
            {
                return Err(load_error(format!(
                    "a nanodet model has per-level outputs [1, N, classes] and \
                     [1, N, 4 * bins], this one has {}",
                    declared()
                )));
            }
            DetectionDecoder::Nanodet => output_dims
                .iter()
                .any(|dims| last(dims).is_none_or(|c| c == labels)),
            // [1, 4 + classes, anchors] (or transposed).
            DetectionDecoder::Yolov8 => match one_output("a yolov8")?.as_slice() {
                [_, a, b] => [a, b].iter().any(|d| d.is_none_or(|d| d == labels + 4)),
                _ => {
                    return Err(load_error(format!(
                        "a yolov8 model's output is [1, 4 + classes, anchors], this one is {}",
                        declared()
                    )));
                }
            },
        },
    };
    if !consistent {
        return Err(InferenceError::LabelCountMismatch {
            model: spec.name.clone(),
            labels,
            model_classes: declared(),
        });
    }
    Ok(max_batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Engine>();
        assert_send_sync::<PreparedInput>();
    }

    #[test]
    fn execution_providers_parse_and_print() {
        for (text, provider) in [
            ("cpu", ExecutionProvider::Cpu),
            ("CUDA", ExecutionProvider::Cuda { device_id: 0 }),
            ("cuda:1", ExecutionProvider::Cuda { device_id: 1 }),
            ("auto", ExecutionProvider::Auto),
        ] {
            assert_eq!(text.parse::<ExecutionProvider>(), Ok(provider), "{text}");
            assert_eq!(
                provider.to_string().parse::<ExecutionProvider>(),
                Ok(provider)
            );
        }
        for bad in ["", "tpu", "cuda:", "cuda:-1", "cuda:x"] {
            let err = bad.parse::<ExecutionProvider>().unwrap_err();
            assert!(err.contains("expected cpu, cuda"), "{err}");
        }
        assert_eq!(
            ExecutionProvider::Cuda { device_id: 3 }.name(),
            "CUDAExecutionProvider"
        );
    }

    #[test]
    fn the_load_line_says_where_a_model_runs_and_why() {
        let chosen = |provider, requested, fallback: Option<&str>| {
            ChosenProvider {
                provider,
                requested,
                fallback: fallback.map(str::to_owned),
            }
            .to_string()
        };
        let (cpu, auto) = (ExecutionProvider::Cpu, ExecutionProvider::Auto);
        let gpu1 = ExecutionProvider::Cuda { device_id: 1 };
        assert_eq!(chosen(cpu, cpu, None), "CPU (requested)");
        assert_eq!(chosen(gpu1, gpu1, None), "CUDA:1 (requested)");
        assert_eq!(
            chosen(ExecutionProvider::Cuda { device_id: 0 }, auto, None),
            "CUDA:0 (CUDA available, via auto)"
        );
        assert_eq!(
            chosen(cpu, auto, Some("this ONNX Runtime has no CUDA")),
            "CPU (CUDA requested via auto but this ONNX Runtime has no CUDA)"
        );
    }

    #[test]
    fn zero_threads_means_the_cpu_limit() {
        let opts = EngineOptions::default();
        assert_eq!(opts.effective_intra_threads(), cpu_limit());
        let opts = EngineOptions {
            intra_threads: 3,
            ..EngineOptions::default()
        };
        assert_eq!(opts.effective_intra_threads(), 3);
    }

    #[test]
    fn a_single_image_cpu_model_gets_sessions_side_by_side_sharing_the_threads() {
        let cpus = cpu_limit();
        let cpu = ExecutionProvider::Cpu;
        let auto = EngineOptions::default();
        let instances = cpus.min(MAX_AUTO_INSTANCES);
        assert_eq!(auto.layout(1, cpu), (instances, (cpus / instances).max(1)));
        // Batched, or on a GPU: one session with every thread.
        assert_eq!(auto.layout(8, cpu), (1, cpus));
        let gpu = ExecutionProvider::Cuda { device_id: 0 };
        assert_eq!(auto.layout(1, gpu), (1, cpus));
        // Asked for: as many as asked, the threads shared unless set too.
        let three = EngineOptions {
            instances: 3,
            ..EngineOptions::default()
        };
        assert_eq!(three.layout(1, cpu), (3, (cpus / 3).max(1)));
        assert_eq!(three.layout(8, cpu), (1, cpus));
        let set = EngineOptions {
            instances: 3,
            intra_threads: 2,
            ..EngineOptions::default()
        };
        assert_eq!(set.layout(1, cpu), (3, 2));
    }
}
