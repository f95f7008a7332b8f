//! The inference engine: one ONNX Runtime session per model, loaded once and reused.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use image::DynamicImage;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use super::catalog::{Catalog, ModelSpec, TaskSpec};
use super::classification::decode_classification;
use super::detection::{Geometry, RawTensor, decode_nanodet};
use super::output::ModelOutput;
use super::preprocess::preprocess;
use super::{InferenceError, runtime};

/// How sessions are created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Threads ONNX Runtime may use inside one operator of one run; 0 lets ONNX Runtime
    /// decide (one per physical core). With several images processed concurrently, a
    /// small number avoids oversubscribing the CPU.
    pub intra_threads: usize,
    /// Where the models run.
    pub execution_provider: ExecutionProvider,
}

/// ONNX Runtime execution provider of every session. Only the CPU for now; accelerators
/// would be added here (they need an onnxruntime build that ships them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecutionProvider {
    #[default]
    Cpu,
}

impl ExecutionProvider {
    /// ONNX Runtime's name of the provider, as logged.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "CPUExecutionProvider",
        }
    }
}

struct LoadedModel {
    spec: ModelSpec,
    /// `Session::run` needs `&mut`; runs of the same model are serialised, different
    /// models run in parallel.
    session: Mutex<Session>,
}

/// Loaded models, ready to run. `Send + Sync`: share it behind an `Arc`.
pub struct Engine {
    models: BTreeMap<String, LoadedModel>,
    execution_provider: ExecutionProvider,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Engine {
    /// Loads the named catalog models (an empty `models` slice loads all of them).
    ///
    /// Initialises ONNX Runtime from [`runtime::default_runtime_path`] if
    /// [`runtime::init_runtime`] was not called before. Each model's inputs and outputs
    /// are checked against its catalog entry, so mistakes surface here, not per image.
    pub fn load(
        catalog: &Catalog,
        models: &[String],
        opts: &EngineOptions,
    ) -> Result<Engine, InferenceError> {
        let environment = runtime::environment()?;
        let specs: Vec<&ModelSpec> = if models.is_empty() {
            catalog.models().iter().collect()
        } else {
            models
                .iter()
                .map(|name| {
                    catalog
                        .get(name)
                        .ok_or_else(|| InferenceError::UnknownModel(name.clone()))
                })
                .collect::<Result<_, _>>()?
        };

        let mut loaded = BTreeMap::new();
        for spec in specs {
            if loaded.contains_key(&spec.name) {
                continue;
            }
            let started = Instant::now();
            let load_error = |message: String| InferenceError::ModelLoad {
                model: spec.name.clone(),
                message,
            };
            let session = create_session(&environment, spec, opts)
                .map_err(|e| load_error(format!("{}: {e}", spec.model_path.display())))?;
            check_signature(&session, spec)?;
            tracing::info!(
                model = %spec.name,
                file = %spec.model_path.display(),
                execution_provider = opts.execution_provider.name(),
                intra_threads = opts.intra_threads,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            loaded.insert(
                spec.name.clone(),
                LoadedModel {
                    spec: spec.clone(),
                    session: Mutex::new(session),
                },
            );
        }
        Ok(Engine {
            models: loaded,
            execution_provider: opts.execution_provider,
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

    /// Runs one model on one image.
    pub fn run(&self, model: &str, image: &DynamicImage) -> Result<ModelOutput, InferenceError> {
        let loaded = self
            .models
            .get(model)
            .ok_or_else(|| InferenceError::UnknownModel(model.to_string()))?;
        let spec = &loaded.spec;
        let started = Instant::now();
        let input = preprocess(image, &spec.preprocessing)?;
        let preprocessed = Instant::now();

        let tensor = TensorRef::from_array_view(&input)
            .map_err(|e| InferenceError::Internal(format!("input tensor: {e}")))?;
        // A panic cannot happen while the lock is held (everything below returns
        // errors), but if one did the session is still usable: ignore poisoning.
        let mut session = loaded
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let locked = Instant::now();
        let outputs = session
            .run(ort::inputs![tensor])
            .map_err(|e| InferenceError::Inference {
                model: model.to_string(),
                message: e.to_string(),
            })?;
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
                .map_err(|e| unexpected(format!("output `{name}`: {e}")))?;
            tensors.push(RawTensor { name, shape, data });
        }
        let output = match &spec.task {
            TaskSpec::Detection(params) => {
                let geometry = Geometry {
                    input_width: spec.preprocessing.width,
                    input_height: spec.preprocessing.height,
                    image_width: image.width(),
                    image_height: image.height(),
                };
                let detections =
                    decode_nanodet(&tensors, &spec.labels, params, geometry).map_err(unexpected)?;
                ModelOutput {
                    detections,
                    classes: Vec::new(),
                }
            }
            TaskSpec::Classification(params) => {
                let [logits] = tensors.as_slice() else {
                    return Err(unexpected(format!(
                        "expected one output, got {}",
                        tensors.len()
                    )));
                };
                let classes =
                    decode_classification(logits.shape, logits.data, &spec.labels, params)
                        .map_err(unexpected)?;
                ModelOutput {
                    detections: Vec::new(),
                    classes,
                }
            }
        };
        drop(outputs);
        drop(session);

        tracing::debug!(
            model,
            execution_provider = self.execution_provider.name(),
            width = image.width(),
            height = image.height(),
            preprocess_ms = ms(preprocessed - started),
            queued_ms = ms(locked - preprocessed),
            inference_ms = ms(inferred - locked),
            postprocess_ms = ms(inferred.elapsed()),
            "inference done"
        );
        Ok(output)
    }
}

fn create_session(
    environment: &Environment,
    spec: &ModelSpec,
    opts: &EngineOptions,
) -> ort::Result<Session> {
    // The CPU provider is registered explicitly (with ONNX Runtime's default arena) so a
    // failure is an error rather than a silent fallback, and so the provider is one
    // visible choice here.
    let cpu = ort::ep::CPU::default()
        .with_arena_allocator(true)
        .build()
        .error_on_failure();
    Session::builder(environment)?
        .with_execution_providers([cpu])?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(opts.intra_threads)?
        .commit_from_file(&spec.model_path)
}

fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Checks the model's input and outputs against its catalog entry.
fn check_signature(session: &Session, spec: &ModelSpec) -> Result<(), InferenceError> {
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
    let expected = [
        1,
        3,
        i64::from(spec.preprocessing.height),
        i64::from(spec.preprocessing.width),
    ];
    match input.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 4
            && shape
                .iter()
                .zip(expected)
                .all(|(&actual, wanted)| actual == wanted || actual < 0) => {}
        other => {
            return Err(load_error(format!(
                "input `{}` is {other:?}; the catalog describes float32 {expected:?} (NCHW)",
                input.name()
            )));
        }
    }

    // Last dimension of every output, when the model declares it.
    let output_classes: Vec<Option<usize>> = session
        .outputs()
        .iter()
        .map(|o| {
            o.dtype()
                .tensor_shape()
                .and_then(|shape| shape.last().copied())
                .and_then(|d| usize::try_from(d).ok())
        })
        .collect();
    let labels = spec.labels.len();
    let declared = || {
        output_classes
            .iter()
            .map(|c| c.map_or("?".to_string(), |c| c.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let consistent = match &spec.task {
        TaskSpec::Classification(_) => match output_classes.as_slice() {
            [classes] => classes.is_none_or(|c| c == labels),
            _ => {
                return Err(load_error(format!(
                    "a classification model needs exactly one output, found {}",
                    output_classes.len()
                )));
            }
        },
        // Some output must carry one score per label (unknown dims are checked per image).
        TaskSpec::Detection(_) => output_classes.iter().any(|c| c.is_none_or(|c| c == labels)),
    };
    if !consistent {
        return Err(InferenceError::LabelCountMismatch {
            model: spec.name.clone(),
            labels,
            model_classes: declared(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Engine>();
    }
}
