//! Running ONNX models on images.
//!
//! The pieces, in the order an image goes through them:
//! - [`decode`]: untrusted bytes -> [`image::DynamicImage`] (JPEG/PNG/WebP, pixel limit);
//! - [`catalog`]: which models exist and how to feed / read them (`models/catalog.yaml`);
//! - `preprocess`: resize + normalise into the NCHW `f32` tensor a model expects;
//! - [`engine`]: one ONNX Runtime session per model, loaded once; batches when the model
//!   allows; CPU or CUDA;
//! - `detection` (NanoDet, YOLOv8) / `classification` / `ordinal`: raw model outputs ->
//!   [`output::ModelOutput`];
//! - [`quality`]: the built-in `photo_quality` analyser (sharpness, exposure, resolution,
//!   aspect; no model file), run on the decoded image beside the models;
//! - [`similarity`]: a perceptual hash per decoded image, near-duplicate sets;
//! - [`pipeline`]: bytes in, results out, decoding and preprocessing overlapping inference
//!   (what the worker runs);
//! - [`cpu_limit`]: the CPUs the pod may use (std: affinity and cgroup quota), for thread counts.
//!
//! ONNX Runtime is loaded dynamically: call [`init_runtime`] once at start-up (or let
//! [`Engine::load`] find it through [`default_runtime_path`]).

pub mod catalog;
pub mod catalog_tool;
mod classification;
mod cpu;
pub mod decode;
mod detection;
pub mod engine;
mod ordinal;
pub mod output;
pub mod pipeline;
mod preprocess;
pub mod quality;
pub mod runtime;
pub mod similarity;

use std::path::PathBuf;

pub use catalog::{
    AnalyserEntry, BuiltIn, Catalog, ChannelOrder, ClassificationParams, DetectionDecoder,
    DetectionParams, ModelSpec, Preprocessing, Resize, TaskSpec,
};
pub use cpu::cpu_limit;
pub use decode::{DecodeLimits, decode_image};
pub use engine::{Engine, EngineOptions, ExecutionProvider, PreparedInput};
pub use output::{
    BoundingBox, ClassScore, Detection, ModelOutput, OrdinalGrade, PhotoQuality, QualityFlag,
};
pub use pipeline::{ImageAnalysis, ModelRun, Pipeline, PipelineOptions};
pub use runtime::{default_runtime_path, init_runtime};

/// A duration in milliseconds, as timings are reported.
pub(crate) fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Everything that can go wrong between image bytes and a [`ModelOutput`].
///
/// [`InferenceError::category`] gives a short stable string for metrics, status
/// conditions and webhook payloads; the `Display` text is for humans and may change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferenceError {
    /// The ONNX Runtime library could not be found or loaded.
    #[error("ONNX Runtime is unavailable: {0}")]
    Runtime(String),

    /// The model catalog is unreadable or invalid.
    #[error("model catalog {}: {message}", path.display())]
    Catalog { path: PathBuf, message: String },

    /// The labels file of a model does not match the number of classes the model outputs.
    #[error(
        "model `{model}`: its labels file has {labels} labels but the model outputs {model_classes} classes"
    )]
    LabelCountMismatch {
        model: String,
        labels: usize,
        model_classes: String,
    },

    /// A model name that is not in the catalog (or was not loaded into the engine).
    #[error("unknown model `{0}`")]
    UnknownModel(String),

    /// The model file could not be loaded, or its inputs/outputs do not fit its catalog entry.
    #[error("cannot load model `{model}`: {message}")]
    ModelLoad { model: String, message: String },

    /// The bytes are not a JPEG, PNG or WebP image.
    #[error("unsupported image format{}: only JPEG, PNG and WebP are accepted",
        detected.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    UnsupportedFormat { detected: Option<String> },

    /// The bytes claim to be a supported format but cannot be decoded (corrupt, empty).
    #[error("corrupt image: {0}")]
    CorruptImage(String),

    /// The file is cut short (e.g. a partial download): its end is missing.
    #[error("truncated image: {0}")]
    TruncatedImage(String),

    /// The image header announces more pixels than allowed; nothing was decoded.
    #[error("image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")]
    ImageTooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },

    /// A decoded image that cannot be processed (e.g. zero width).
    #[error("invalid image: {0}")]
    InvalidImage(String),

    /// ONNX Runtime failed while running the model.
    #[error("inference with model `{model}` failed: {message}")]
    Inference { model: String, message: String },

    /// The model produced outputs that do not have the shape its decoder expects.
    #[error("model `{model}` produced unexpected output: {message}")]
    UnexpectedOutput { model: String, message: String },

    /// A bug or an invariant broken inside this module.
    #[error("internal inference error: {0}")]
    Internal(String),
}

impl InferenceError {
    /// A short, stable, snake_case name of the kind of error.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Runtime(_) => "runtime_unavailable",
            Self::Catalog { .. } | Self::LabelCountMismatch { .. } => "invalid_catalog",
            Self::UnknownModel(_) => "unknown_model",
            Self::ModelLoad { .. } => "model_load_failed",
            Self::UnsupportedFormat { .. } => "unsupported_format",
            Self::CorruptImage(_) => "corrupt_image",
            Self::TruncatedImage(_) => "image_truncated",
            Self::ImageTooLarge { .. } => "image_too_large",
            Self::InvalidImage(_) => "invalid_image",
            Self::Inference { .. } => "inference_failed",
            Self::UnexpectedOutput { .. } => "unexpected_model_output",
            Self::Internal(_) => "internal",
        }
    }

    /// Whether the error is caused by the submitted image itself, so retrying the same
    /// bytes cannot succeed (as opposed to configuration or runtime problems).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            Self::UnsupportedFormat { .. }
                | Self::CorruptImage(_)
                | Self::TruncatedImage(_)
                | Self::ImageTooLarge { .. }
                | Self::InvalidImage(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_stable_and_input_errors_flagged() {
        let unsupported = InferenceError::UnsupportedFormat {
            detected: Some("gif".into()),
        };
        assert_eq!(unsupported.category(), "unsupported_format");
        assert!(unsupported.is_input_error());
        assert_eq!(
            unsupported.to_string(),
            "unsupported image format (gif): only JPEG, PNG and WebP are accepted"
        );
        let unknown = InferenceError::UnsupportedFormat { detected: None };
        assert_eq!(
            unknown.to_string(),
            "unsupported image format: only JPEG, PNG and WebP are accepted"
        );
        let runtime = InferenceError::Runtime("missing".into());
        assert_eq!(runtime.category(), "runtime_unavailable");
        assert!(!runtime.is_input_error());
        assert_eq!(
            InferenceError::UnknownModel("x".into()).category(),
            "unknown_model"
        );
    }
}
