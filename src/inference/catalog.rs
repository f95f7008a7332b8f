//! The model catalog: which models exist and how to feed and read them.
//!
//! The catalog is a YAML file (see `models/catalog.yaml`); model and labels files are
//! resolved relative to the models folder, by default the catalog's own folder (workers
//! read the catalog from a mounted ConfigMap and the files from their image, so the two
//! differ there: [`Catalog::load_with_models_dir`]). Operators add a model by dropping its
//! `.onnx` + labels files into the models folder and adding an entry, without rebuilding.
//!
//! [`CatalogFile`] / [`ModelEntry`] mirror the YAML; [`Catalog::load`] validates them into
//! [`ModelSpec`]s with resolved paths, the labels read and the task parameters filled in.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::InferenceError;
use super::quality::QualityThresholds;

/// The YAML document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatalogFile {
    pub models: Vec<ModelEntry>,
    /// Built-in analysers: requested by name like models, no ONNX file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysers: Vec<AnalyserEntry>,
}

/// A built-in analyser as written in the catalog (and, validated, as the engine runs it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnalyserEntry {
    /// Name used in requests and results, e.g. `photo_quality`.
    pub name: String,
    pub builtin: BuiltIn,
    /// `photo-quality`: when its flags are raised (every field has a default).
    #[serde(default)]
    pub thresholds: QualityThresholds,
}

/// The analysers kinsight has built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltIn {
    /// Sharpness, exposure, resolution and aspect, with flags (see `inference::quality`).
    PhotoQuality,
}

/// One model as written in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelEntry {
    /// Name used in requests and results, e.g. `object_detection`.
    pub name: String,
    /// The `.onnx` file, relative to the models folder (or absolute).
    pub file: PathBuf,
    pub task: Task,
    /// How raw outputs become detections; required for `detection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<DetectionDecoder>,
    /// Labels file: one label per line, in the model's class order.
    pub labels: PathBuf,
    pub input: InputEntry,
    /// Minimum confidence reported. Default 0.35 for detection, 0 for classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_threshold: Option<f32>,
    /// Detection only: IoU above which a lower-scored box of the same class is dropped. Default 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nms_iou: Option<f32>,
    /// Detection only: at most this many detections per image. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_detections: Option<usize>,
    /// Classification only: number of classes reported. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Classification only: what the output holds, `logits` (softmax applied, the
    /// default) or `probabilities` (taken as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<ClassificationOutput>,
    /// Classification only: content flags, label -> probability above which the image gets
    /// that label as a flag in its result (e.g. `nsfw: 0.8`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, f32>,
    /// Most images sent to the model in one run. Default: 1 when the model's batch
    /// dimension is fixed, [`DEFAULT_MAX_BATCH`] when it is dynamic; 1 disables batching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// The model wants a GPU: worker Jobs running it request one (and the GPU node
    /// settings) and let ONNX Runtime pick CUDA when it has it. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpu: bool,
    /// For a model file that is not committed but fetched (e.g. `scripts/fetch-open-nsfw.sh`):
    /// the command that fetches it. While the file is missing the catalog still loads, and
    /// the model alone fails to load, with an error that names this command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<String>,
}

/// The model's input tensor and how to produce it from an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputEntry {
    /// Width of the `[1, 3, height, width]` input tensor.
    pub width: u32,
    pub height: u32,
    pub resize: ResizeMode,
    /// `shorter-side-center-crop` only: the shorter side is resized to this before the crop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_size: Option<u32>,
    /// `letterbox` only: grey level (0..=255, all channels) of the padding. Default 114.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_value: Option<u8>,
    pub channel_order: ChannelOrder,
    /// Per channel, in the model's channel order: `(x - mean) / std` on 0..255 values.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// `nchw` (`[batch, 3, height, width]`, the default) or `nhwc` (`[batch, height, width, 3]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
}

/// Axis order of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

/// What a classification model outputs per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassificationOutput {
    #[default]
    Logits,
    Probabilities,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Detection,
    Classification,
    /// A classifier whose labels are ordered grades, lowest first (e.g. poor, fair, good,
    /// excellent): reports the most likely grade and a confidence-weighted score.
    Ordinal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DetectionDecoder {
    /// NanoDet (GFL) with per-level outputs: class scores `[1, N, classes]` (sigmoid
    /// applied) and box distributions `[1, N, 4 * bins]`, for strides 8/16/32/...
    Nanodet,
    /// Ultralytics YOLOv8/v11 export: one output `[1, 4 + classes, anchors]` whose rows are
    /// the box centre x, y, width and height in input pixels, then the class scores
    /// (sigmoid applied). `[1, anchors, 4 + classes]` (transposed) is accepted too.
    Yolov8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Resize to exactly width x height, ignoring the aspect ratio.
    Stretch,
    /// Resize so the shorter side is `resizeSize` (aspect ratio kept), then crop the centre.
    ShorterSideCenterCrop,
    /// Resize to `resizeSize` x `resizeSize` (aspect ratio ignored), then crop the centre
    /// (Caffe's pipeline, e.g. Open-NSFW: 256 then 224).
    StretchCenterCrop,
    /// Resize so the whole image fits (aspect ratio kept), centred on a `padValue` grey
    /// background (Ultralytics' letterbox).
    Letterbox,
}

/// Channel order of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// A validated model, ready for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// Resolved path of the `.onnx` file (exists when the catalog was loaded).
    pub model_path: PathBuf,
    /// Class names in the model's class order.
    pub labels: Vec<String>,
    pub preprocessing: Preprocessing,
    pub task: TaskSpec,
    /// `maxBatch` of the catalog; `None`: decided from the model's input (see [`ModelEntry`]).
    pub max_batch: Option<usize>,
    /// `gpu` of the catalog: Jobs running the model request a GPU.
    pub gpu: bool,
    /// `fetch` of the catalog: how its file is fetched when it is missing.
    pub fetch: Option<String>,
}

/// How an image becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    pub width: u32,
    pub height: u32,
    pub resize: Resize,
    pub channel_order: ChannelOrder,
    /// In the model's channel order.
    pub mean: [f32; 3],
    /// In the model's channel order; all > 0.
    pub std: [f32; 3],
    pub layout: Layout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    Stretch,
    /// `shorter_side >= max(width, height)` of the input.
    ShorterSideCenterCrop {
        shorter_side: u32,
    },
    /// `side >= max(width, height)` of the input.
    StretchCenterCrop {
        side: u32,
    },
    /// Fit inside the input, centred; the rest is `pad` (0..=255 before normalisation).
    Letterbox {
        pad: u8,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskSpec {
    Detection(DetectionParams),
    Classification(ClassificationParams),
    /// Labels are grades, lowest first; at least two.
    Ordinal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DetectionParams {
    pub decoder: DetectionDecoder,
    pub score_threshold: f32,
    pub nms_iou: f32,
    pub max_detections: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationParams {
    pub top_k: usize,
    pub score_threshold: f32,
    /// The output is probabilities already (no softmax).
    pub probabilities: bool,
    /// Content flags: (label, its class index, probability above which it is raised).
    pub flags: Vec<(String, usize, f32)>,
}

/// Input sides above this are refused: no vision model needs them, and a typo (4160)
/// would otherwise allocate huge tensors per image.
const MAX_INPUT_SIDE: u32 = 4096;

const DEFAULT_DETECTION_THRESHOLD: f32 = 0.35;
const DEFAULT_NMS_IOU: f32 = 0.5;
const DEFAULT_MAX_DETECTIONS: usize = 100;
const DEFAULT_TOP_K: usize = 5;
/// Largest batch sent to a model with a dynamic batch dimension unless the catalog says.
pub const DEFAULT_MAX_BATCH: usize = 8;
/// `maxBatch` above this is refused (memory: a batch of 224x224 inputs is 600 KB per image).
const MAX_BATCH_LIMIT: usize = 256;
const DEFAULT_PAD_VALUE: u8 = 114;

/// A loaded and validated catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    path: PathBuf,
    /// The YAML the catalog was read from (what the controller hands to workers).
    yaml: String,
    models: Vec<ModelSpec>,
    analysers: Vec<AnalyserEntry>,
}

impl Catalog {
    /// Reads and validates a catalog file; model and labels files must exist, relative to
    /// the catalog's folder.
    pub fn load(path: impl AsRef<Path>) -> Result<Catalog, InferenceError> {
        Self::load_with_models_dir(path, None)
    }

    /// [`Catalog::load`] with relative model and labels files resolved against
    /// `models_dir` instead (`None`: the catalog's folder).
    pub fn load_with_models_dir(
        path: impl AsRef<Path>,
        models_dir: Option<&Path>,
    ) -> Result<Catalog, InferenceError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| catalog_error(path, e.to_string()))?;
        let base_dir = models_dir.unwrap_or_else(|| Self::default_models_dir(path));
        Self::from_yaml_str(&text, base_dir, path)
    }

    /// Where a catalog file's relative entries resolve when no models folder is given.
    pub fn default_models_dir(path: &Path) -> &Path {
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    /// Parses and validates catalog YAML. Relative files are resolved against
    /// `base_dir`; `origin` only names the catalog in error messages.
    pub fn from_yaml_str(
        yaml: &str,
        base_dir: &Path,
        origin: &Path,
    ) -> Result<Catalog, InferenceError> {
        let file: CatalogFile =
            serde_yaml::from_str(yaml).map_err(|e| catalog_error(origin, e.to_string()))?;
        Self::validate(file, yaml.to_owned(), base_dir, origin)
    }

    fn validate(
        file: CatalogFile,
        yaml: String,
        base_dir: &Path,
        origin: &Path,
    ) -> Result<Catalog, InferenceError> {
        if file.models.is_empty() {
            return Err(catalog_error(origin, "the catalog lists no models".into()));
        }
        let mut seen = HashSet::new();
        let mut models = Vec::with_capacity(file.models.len());
        for entry in file.models {
            if !seen.insert(entry.name.clone()) {
                return Err(catalog_error(
                    origin,
                    format!("model `{}` is listed more than once", entry.name),
                ));
            }
            let spec = validate_entry(entry, base_dir).map_err(|(name, message)| {
                catalog_error(origin, format!("model `{name}`: {message}"))
            })?;
            models.push(spec);
        }
        for entry in &file.analysers {
            if !seen.insert(entry.name.clone()) {
                return Err(catalog_error(
                    origin,
                    format!("`{}` is listed more than once", entry.name),
                ));
            }
            validate_name(&entry.name)
                .and_then(|()| entry.thresholds.validate())
                .map_err(|message| {
                    catalog_error(origin, format!("analyser `{}`: {message}", entry.name))
                })?;
        }
        Ok(Catalog {
            path: origin.to_path_buf(),
            yaml,
            models,
            analysers: file.analysers,
        })
    }

    /// The catalog file this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The catalog's YAML as read.
    pub fn yaml(&self) -> &str {
        &self.yaml
    }

    /// Names of the models that want a GPU (`gpu: true`).
    pub fn gpu_models(&self) -> impl Iterator<Item = &str> {
        self.models
            .iter()
            .filter(|m| m.gpu)
            .map(|m| m.name.as_str())
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn analysers(&self) -> &[AnalyserEntry] {
        &self.analysers
    }

    pub fn analyser(&self, name: &str) -> Option<&AnalyserEntry> {
        self.analysers.iter().find(|a| a.name == name)
    }

    /// What requests may name: the models, then the built-in analysers.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let analysers = self.analysers.iter().map(|a| a.name.as_str());
        self.models.iter().map(|m| m.name.as_str()).chain(analysers)
    }
}

fn catalog_error(path: &Path, message: String) -> InferenceError {
    InferenceError::Catalog {
        path: path.to_path_buf(),
        message,
    }
}

/// Validates one entry; the error carries the model name and the problem.
fn validate_entry(entry: ModelEntry, base_dir: &Path) -> Result<ModelSpec, (String, String)> {
    let name = entry.name.clone();
    validate_inner(entry, base_dir).map_err(|message| (name, message))
}

fn validate_inner(entry: ModelEntry, base_dir: &Path) -> Result<ModelSpec, String> {
    validate_name(&entry.name)?;

    let model_path = base_dir.join(&entry.file);
    if !model_path.is_file() && entry.fetch.is_none() {
        return Err(format!(
            "model file {} does not exist",
            model_path.display()
        ));
    }
    let labels_path = base_dir.join(&entry.labels);
    let labels = read_labels(&labels_path)?;

    let preprocessing = validate_input(&entry.input)?;

    let score_threshold = entry.score_threshold;
    if let Some(t) = score_threshold
        && !(0.0..=1.0).contains(&t)
    {
        return Err(format!("scoreThreshold must be within [0, 1], got {t}"));
    }

    if !matches!(entry.task, Task::Classification)
        && (entry.output.is_some() || !entry.flags.is_empty())
    {
        return Err("output and flags apply to classification models only".into());
    }
    if !matches!(entry.task, Task::Detection)
        && (entry.decoder.is_some() || entry.nms_iou.is_some() || entry.max_detections.is_some())
    {
        return Err("decoder, nmsIou and maxDetections apply to detection models only".into());
    }
    let task = match entry.task {
        Task::Detection => {
            if entry.top_k.is_some() {
                return Err("topK applies to classification models only".into());
            }
            let decoder = entry
                .decoder
                .ok_or("a detection model needs a decoder (supported: nanodet, yolov8)")?;
            let nms_iou = entry.nms_iou.unwrap_or(DEFAULT_NMS_IOU);
            if !(nms_iou > 0.0 && nms_iou <= 1.0) {
                return Err(format!("nmsIou must be within (0, 1], got {nms_iou}"));
            }
            let max_detections = entry.max_detections.unwrap_or(DEFAULT_MAX_DETECTIONS);
            if max_detections == 0 {
                return Err("maxDetections must be at least 1".into());
            }
            TaskSpec::Detection(DetectionParams {
                decoder,
                score_threshold: score_threshold.unwrap_or(DEFAULT_DETECTION_THRESHOLD),
                nms_iou,
                max_detections,
            })
        }
        Task::Classification => {
            let top_k = entry.top_k.unwrap_or(DEFAULT_TOP_K);
            if top_k == 0 {
                return Err("topK must be at least 1".into());
            }
            let mut flags = Vec::new();
            for (label, above) in &entry.flags {
                let index = labels
                    .iter()
                    .position(|l| l == label)
                    .ok_or_else(|| format!("flags: `{label}` is not one of the labels"))?;
                if !(*above > 0.0 && *above < 1.0) {
                    return Err(format!(
                        "flags: the threshold of `{label}` must be within (0, 1), got {above}"
                    ));
                }
                flags.push((label.clone(), index, *above));
            }
            TaskSpec::Classification(ClassificationParams {
                top_k,
                score_threshold: score_threshold.unwrap_or(0.0),
                probabilities: entry.output == Some(ClassificationOutput::Probabilities),
                flags,
            })
        }
        Task::Ordinal => {
            if entry.top_k.is_some() || score_threshold.is_some() {
                return Err(
                    "topK and scoreThreshold do not apply to ordinal models (they report one grade)"
                        .into(),
                );
            }
            if labels.len() < 2 {
                return Err(format!(
                    "an ordinal model needs at least 2 grades in its labels file, found {}",
                    labels.len()
                ));
            }
            TaskSpec::Ordinal
        }
    };

    if let Some(max_batch) = entry.max_batch
        && !(1..=MAX_BATCH_LIMIT).contains(&max_batch)
    {
        return Err(format!(
            "maxBatch must be within 1..={MAX_BATCH_LIMIT}, got {max_batch}"
        ));
    }

    Ok(ModelSpec {
        name: entry.name,
        model_path,
        labels,
        preprocessing,
        task,
        max_batch: entry.max_batch,
        gpu: entry.gpu,
        fetch: entry.fetch,
    })
}

/// Model names end up in resource names, labels and metrics: keep them simple.
fn validate_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    let starts_ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if name.is_empty() || name.len() > 63 || !valid_chars || !starts_ok {
        return Err(
            "the name must be 1-63 characters of a-z, 0-9, `_` or `-`, starting with a letter"
                .into(),
        );
    }
    Ok(())
}

fn validate_input(input: &InputEntry) -> Result<Preprocessing, String> {
    for (side, value) in [("width", input.width), ("height", input.height)] {
        if value == 0 || value > MAX_INPUT_SIDE {
            return Err(format!(
                "input {side} must be within 1..={MAX_INPUT_SIDE}, got {value}"
            ));
        }
    }
    if input.pad_value.is_some() && input.resize != ResizeMode::Letterbox {
        return Err("padValue only applies to resize: letterbox".into());
    }
    let resize = match (input.resize, input.resize_size) {
        (ResizeMode::Stretch, None) => Resize::Stretch,
        (ResizeMode::Letterbox, None) => Resize::Letterbox {
            pad: input.pad_value.unwrap_or(DEFAULT_PAD_VALUE),
        },
        (ResizeMode::Stretch | ResizeMode::Letterbox, Some(_)) => {
            return Err(
                "resizeSize only applies to resize: shorter-side-center-crop or stretch-center-crop"
                    .into(),
            );
        }
        (ResizeMode::ShorterSideCenterCrop | ResizeMode::StretchCenterCrop, None) => {
            return Err("this resize (a centre crop) needs resizeSize".into());
        }
        (
            mode @ (ResizeMode::ShorterSideCenterCrop | ResizeMode::StretchCenterCrop),
            Some(size),
        ) => {
            let needed = input.width.max(input.height);
            if size < needed || size > MAX_INPUT_SIDE {
                return Err(format!(
                    "resizeSize must be within {needed}..={MAX_INPUT_SIDE} (at least the crop size), got {size}"
                ));
            }
            if mode == ResizeMode::StretchCenterCrop {
                Resize::StretchCenterCrop { side: size }
            } else {
                Resize::ShorterSideCenterCrop { shorter_side: size }
            }
        }
    };
    if input.mean.iter().any(|m| !m.is_finite()) {
        return Err("mean values must be finite numbers".into());
    }
    if input.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err("std values must be finite and greater than 0".into());
    }
    Ok(Preprocessing {
        width: input.width,
        height: input.height,
        resize,
        channel_order: input.channel_order,
        mean: input.mean,
        std: input.std,
        layout: input.layout.unwrap_or_default(),
    })
}

/// One label per line; surrounding whitespace and trailing blank lines are ignored.
/// A blank line in the middle would shift every later class, so it is refused.
fn read_labels(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read labels file {}: {e}", path.display()))?;
    let labels: Vec<String> = text
        .trim_end()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    if labels.iter().all(String::is_empty) {
        return Err(format!("labels file {} is empty", path.display()));
    }
    if let Some(line) = labels.iter().position(String::is_empty) {
        return Err(format!(
            "labels file {} has a blank line {}",
            path.display(),
            line + 1
        ));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary folder with a fake model file and labels files.
    fn fixture_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("det.onnx"), b"not really onnx").unwrap();
        std::fs::write(dir.path().join("cls.onnx"), b"not really onnx").unwrap();
        std::fs::write(dir.path().join("three.labels"), "cat\ndog\nbird\n").unwrap();
        std::fs::write(dir.path().join("gap.labels"), "cat\n\nbird\n").unwrap();
        dir
    }

    const VALID: &str = r#"
models:
  - name: object_detection
    file: det.onnx
    task: detection
    decoder: nanodet
    labels: three.labels
    input: {width: 416, height: 416, resize: stretch, channelOrder: bgr,
            mean: [103.53, 116.28, 123.675], std: [57.375, 57.12, 58.395]}
    scoreThreshold: 0.35
    nmsIou: 0.5
    maxDetections: 50
  - name: image_classification
    file: cls.onnx
    task: classification
    labels: three.labels
    input: {width: 224, height: 224, resize: shorter-side-center-crop, resizeSize: 256,
            channelOrder: rgb, mean: [127, 127, 127], std: [128, 128, 128]}
    topK: 2
"#;

    fn parse(yaml: &str, dir: &Path) -> Result<Catalog, InferenceError> {
        Catalog::from_yaml_str(yaml, dir, Path::new("catalog.yaml"))
    }

    fn error_text(yaml: &str) -> String {
        let dir = fixture_dir();
        match parse(yaml, dir.path()) {
            Ok(_) => panic!("catalog should have been rejected"),
            Err(e) => {
                assert_eq!(e.category(), "invalid_catalog");
                e.to_string()
            }
        }
    }

    #[test]
    fn loads_valid_catalog() {
        let dir = fixture_dir();
        let catalog = parse(VALID, dir.path()).unwrap();
        assert_eq!(
            catalog.names().collect::<Vec<_>>(),
            ["object_detection", "image_classification"]
        );
        let det = catalog.get("object_detection").unwrap();
        assert_eq!(det.model_path, dir.path().join("det.onnx"));
        assert_eq!(det.labels, ["cat", "dog", "bird"]);
        assert_eq!(det.preprocessing.channel_order, ChannelOrder::Bgr);
        assert_eq!(det.preprocessing.resize, Resize::Stretch);
        assert_eq!(
            det.task,
            TaskSpec::Detection(DetectionParams {
                decoder: DetectionDecoder::Nanodet,
                score_threshold: 0.35,
                nms_iou: 0.5,
                max_detections: 50
            })
        );
        let cls = catalog.get("image_classification").unwrap();
        assert_eq!(
            cls.preprocessing.resize,
            Resize::ShorterSideCenterCrop { shorter_side: 256 }
        );
        assert_eq!(
            cls.task,
            TaskSpec::Classification(ClassificationParams {
                top_k: 2,
                score_threshold: 0.0,
                probabilities: false,
                flags: vec![],
            })
        );
        assert!(catalog.get("nope").is_none());
    }

    #[test]
    fn loads_from_file_relative_to_its_folder() {
        let dir = fixture_dir();
        let path = dir.path().join("catalog.yaml");
        std::fs::write(&path, VALID).unwrap();
        let catalog = Catalog::load(&path).unwrap();
        assert_eq!(catalog.path(), path);
        assert_eq!(catalog.models().len(), 2);
    }

    #[test]
    fn models_dir_replaces_the_catalog_folder() {
        // The worker's layout: the catalog mounted on its own, the files elsewhere.
        let models = fixture_dir();
        let mounted = tempfile::tempdir().unwrap();
        let path = mounted.path().join("catalog.yaml");
        std::fs::write(&path, VALID).unwrap();

        let catalog = Catalog::load_with_models_dir(&path, Some(models.path())).unwrap();
        let det = catalog.get("object_detection").unwrap();
        assert_eq!(det.model_path, models.path().join("det.onnx"));
        assert_eq!(det.labels, ["cat", "dog", "bird"]);
        assert_eq!(catalog.path(), path);
        assert_eq!(catalog.yaml(), VALID, "the YAML as read, for publishing");

        // Without it the files are looked for next to the catalog, where they are not.
        let text = Catalog::load(&path).unwrap_err().to_string();
        let expected = mounted.path().join("det.onnx");
        assert!(
            text.contains(&format!("{} does not exist", expected.display())),
            "{text}"
        );
        // Absolute entries ignore the models folder.
        let at = |file: &str| models.path().join(file).display().to_string();
        let absolute = VALID
            .replace("file: det.onnx", &format!("file: {}", at("det.onnx")))
            .replace("file: cls.onnx", &format!("file: {}", at("cls.onnx")))
            .replace(
                "labels: three.labels",
                &format!("labels: {}", at("three.labels")),
            );
        let catalog = parse(&absolute, mounted.path()).unwrap();
        let cls = catalog.get("image_classification").unwrap();
        assert_eq!(cls.model_path, models.path().join("cls.onnx"));
    }

    #[test]
    fn analysers_are_named_like_models_and_their_thresholds_checked() {
        let dir = fixture_dir();
        let with = |entry: &str| format!("{VALID}\nanalysers:\n{entry}");
        let catalog = parse(
            &with("  - name: photo_quality\n    builtin: photo-quality\n    thresholds:\n      minShortSide: 600\n"),
            dir.path(),
        )
        .unwrap();
        assert!(catalog.names().any(|n| n == "photo_quality"));
        let analyser = catalog.analyser("photo_quality").unwrap();
        assert_eq!(analyser.thresholds.min_short_side, 600);
        assert_eq!(analyser.thresholds.blurry_below, 100.0, "default");
        let text = |yaml: String| parse(&yaml, dir.path()).unwrap_err().to_string();
        assert!(
            text(with(
                "  - name: object_detection\n    builtin: photo-quality\n"
            ))
            .contains("listed more than once")
        );
        assert!(
            text(with(
                "  - name: q\n    builtin: photo-quality\n    thresholds:\n      darkMeanBelow: 2\n"
            ))
            .contains("darkMeanBelow")
        );
    }

    #[test]
    fn gpu_models_are_marked() {
        let dir = fixture_dir();
        let yaml = VALID.replace("topK: 2", "topK: 2\n    gpu: true");
        let catalog = parse(&yaml, dir.path()).unwrap();
        assert!(catalog.get("image_classification").unwrap().gpu);
        assert!(
            !catalog.get("object_detection").unwrap().gpu,
            "default: CPU"
        );
        assert_eq!(
            catalog.gpu_models().collect::<Vec<_>>(),
            ["image_classification"]
        );
        assert_eq!(parse(VALID, dir.path()).unwrap().gpu_models().count(), 0);
        let text = error_text(&VALID.replace("topK: 2", "topK: 2\n    gpu: yes"));
        assert!(text.contains("gpu"), "{text}");
    }

    #[test]
    fn project_catalog_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/catalog.yaml");
        let catalog = Catalog::load(&path).unwrap();
        let det = catalog.get("object_detection").unwrap();
        assert_eq!(det.labels.len(), 80);
        let cls = catalog.get("image_classification").unwrap();
        assert_eq!(cls.labels.len(), 1000);
    }

    /// Models of the tasks and options the bundled models do not use.
    const MORE: &str = r#"
models:
  - name: quality
    file: cls.onnx
    task: ordinal
    labels: three.labels
    input: {width: 8, height: 8, resize: stretch, channelOrder: rgb, mean: [0, 0, 0], std: [255, 255, 255]}
    maxBatch: 16
  - name: yolo
    file: det.onnx
    task: detection
    decoder: yolov8
    labels: three.labels
    input: {width: 640, height: 640, resize: letterbox, channelOrder: rgb, mean: [0, 0, 0], std: [255, 255, 255]}
"#;

    #[test]
    fn loads_ordinal_yolov8_letterbox_and_batches() {
        let dir = fixture_dir();
        let catalog = parse(MORE, dir.path()).unwrap();
        let quality = catalog.get("quality").unwrap();
        assert_eq!(quality.task, TaskSpec::Ordinal);
        assert_eq!(quality.max_batch, Some(16));
        let yolo = catalog.get("yolo").unwrap();
        assert_eq!(yolo.preprocessing.resize, Resize::Letterbox { pad: 114 });
        assert_eq!(yolo.max_batch, None);
        let TaskSpec::Detection(params) = &yolo.task else {
            panic!("{:?}", yolo.task);
        };
        assert_eq!(params.decoder, DetectionDecoder::Yolov8);
        assert_eq!(params.score_threshold, 0.35);
        let padded = parse(
            &MORE.replace("resize: letterbox,", "resize: letterbox, padValue: 0,"),
            dir.path(),
        )
        .unwrap();
        assert_eq!(
            padded.get("yolo").unwrap().preprocessing.resize,
            Resize::Letterbox { pad: 0 }
        );
    }

    #[test]
    fn rejects_inconsistent_new_entries() {
        let cases = [
            (MORE.replace("maxBatch: 16", "maxBatch: 0"), "maxBatch"),
            (MORE.replace("maxBatch: 16", "maxBatch: 100000"), "maxBatch"),
            (
                MORE.replace("maxBatch: 16", "maxBatch: 16\n    topK: 2"),
                "do not apply to ordinal",
            ),
            (
                MORE.replace("maxBatch: 16", "maxBatch: 16\n    scoreThreshold: 0.5"),
                "do not apply to ordinal",
            ),
            (
                MORE.replace("task: ordinal", "task: ordinal\n    decoder: yolov8"),
                "detection models only",
            ),
            (
                MORE.replace("resize: letterbox,", "resize: letterbox, padValue: 300,"),
                "padValue",
            ),
            (
                MORE.replace("resize: stretch,", "resize: stretch, padValue: 0,"),
                "padValue only applies",
            ),
            (
                MORE.replace("resize: letterbox,", "resize: letterbox, resizeSize: 700,"),
                "resizeSize only applies",
            ),
        ];
        for (yaml, expected) in cases {
            let text = error_text(&yaml);
            assert!(text.contains(expected), "expected `{expected}` in: {text}");
        }
        // One grade is no scale.
        let dir = fixture_dir();
        std::fs::write(dir.path().join("one.labels"), "only\n").unwrap();
        let yaml = MORE.replacen("labels: three.labels", "labels: one.labels", 1);
        let text = parse(&yaml, dir.path()).unwrap_err().to_string();
        assert!(text.contains("at least 2 grades"), "{text}");
    }

    #[test]
    fn rejects_unknown_task() {
        let text = error_text(&VALID.replace("task: classification", "task: segmentation"));
        assert!(text.contains("unknown variant `segmentation`"), "{text}");
        assert!(
            text.contains("detection") && text.contains("classification"),
            "{text}"
        );
    }

    #[test]
    fn rejects_missing_model_file() {
        let text = error_text(&VALID.replace("file: cls.onnx", "file: missing.onnx"));
        assert!(text.contains("model `image_classification`"), "{text}");
        assert!(text.contains("missing.onnx does not exist"), "{text}");
    }

    #[test]
    fn rejects_bad_labels_files() {
        let text = error_text(&VALID.replace(
            "labels: three.labels\n    input: {width: 224",
            "labels: none.labels\n    input: {width: 224",
        ));
        assert!(text.contains("cannot read labels file"), "{text}");
        let text = error_text(&VALID.replacen("labels: three.labels", "labels: gap.labels", 1));
        assert!(text.contains("blank line 2"), "{text}");
    }

    #[test]
    fn rejects_inconsistent_entries() {
        let cases = [
            (
                VALID.replace("    decoder: nanodet\n", ""),
                "needs a decoder",
            ),
            (
                VALID.replace("decoder: nanodet", "decoder: yolo"),
                "unknown variant `yolo`, expected `nanodet` or `yolov8`",
            ),
            (
                VALID.replace("topK: 2", "topK: 2\n    nmsIou: 0.4"),
                "detection models only",
            ),
            (
                VALID.replace("maxDetections: 50", "maxDetections: 50\n    topK: 3"),
                "classification models only",
            ),
            (VALID.replace("resizeSize: 256,", ""), "needs resizeSize"),
            (
                VALID.replace("resizeSize: 256", "resizeSize: 200"),
                "at least the crop size",
            ),
            (
                VALID.replace("std: [128, 128, 128]", "std: [128, 0, 128]"),
                "std values",
            ),
            (
                VALID.replace("scoreThreshold: 0.35", "scoreThreshold: 1.5"),
                "scoreThreshold",
            ),
            (VALID.replace("nmsIou: 0.5", "nmsIou: 0"), "nmsIou"),
            (VALID.replace("width: 416", "width: 0"), "input width"),
            (
                VALID.replace("name: image_classification", "name: object_detection"),
                "more than once",
            ),
            (
                VALID.replace("name: image_classification", "name: Bad Name"),
                "the name must be",
            ),
            (
                VALID.replace("topK: 2", "topK: 2\n    colour: red"),
                "unknown field `colour`",
            ),
            (
                VALID.replace("mean: [127, 127, 127]", "mean: [127, 127]"),
                "mean",
            ),
            ("models: []".to_string(), "no models"),
        ];
        for (yaml, expected) in cases {
            let text = error_text(&yaml);
            assert!(text.contains(expected), "expected `{expected}` in: {text}");
        }
    }
}
