//! `kinsight models`: the catalog as a table (or JSON), and `kinsight models check`, which
//! loads a new entry's ONNX file and says whether it fits its entry.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::catalog::{CatalogFile, Layout, ModelEntry};
use super::{Catalog, ChannelOrder, Engine, EngineOptions, ExecutionProvider, Resize, TaskSpec};
use super::{InferenceError, ModelSpec};

/// One line of `kinsight models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CatalogRow {
    pub name: String,
    /// detection (with its decoder) | classification | ordinal | the analyser's builtin.
    pub task: String,
    /// `WIDTHxHEIGHT`; `None` for analysers (they take the decoded image).
    pub input: Option<String>,
    pub resize: Option<String>,
    pub channel_order: Option<String>,
    pub labels: Option<usize>,
    /// `cpu` | `gpu` (`gpu: true`: Jobs request a GPU and use CUDA when they have it).
    pub runs_on: &'static str,
}

/// The catalog's models, then its analysers.
pub fn catalog_rows(catalog: &Catalog) -> Vec<CatalogRow> {
    let models = catalog.models().iter().map(|spec| {
        let p = &spec.preprocessing;
        CatalogRow {
            name: spec.name.clone(),
            task: task_name(&spec.task),
            input: Some(match p.layout {
                Layout::Nchw => format!("{}x{}", p.width, p.height),
                Layout::Nhwc => format!("{}x{} NHWC", p.width, p.height),
            }),
            resize: Some(match p.resize {
                Resize::Stretch => "stretch".into(),
                Resize::ShorterSideCenterCrop { shorter_side } => {
                    format!("shorter-side {shorter_side}, center-crop")
                }
                Resize::StretchCenterCrop { side } => {
                    format!("stretch {side}, center-crop")
                }
                Resize::Letterbox { pad } => format!("letterbox (pad {pad})"),
            }),
            channel_order: Some(
                match p.channel_order {
                    ChannelOrder::Rgb => "rgb",
                    ChannelOrder::Bgr => "bgr",
                }
                .into(),
            ),
            labels: Some(spec.labels.len()),
            runs_on: if spec.gpu { "gpu" } else { "cpu" },
        }
    });
    let analysers = catalog.analysers().iter().map(|a| CatalogRow {
        name: a.name.clone(),
        task: format!(
            "builtin {}",
            serde_json::to_value(a.builtin)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
        input: None,
        resize: None,
        channel_order: None,
        labels: None,
        runs_on: "cpu",
    });
    models.chain(analysers).collect()
}

fn task_name(task: &TaskSpec) -> String {
    match task {
        TaskSpec::Detection(params) => format!("detection ({:?})", params.decoder).to_lowercase(),
        TaskSpec::Classification(_) => "classification".into(),
        TaskSpec::Ordinal => "ordinal".into(),
    }
}

/// The rows as an aligned text table with a header.
pub fn catalog_table(rows: &[CatalogRow]) -> String {
    let dash = || "-".to_string();
    let cells: Vec<[String; 7]> = std::iter::once(
        [
            "NAME", "TASK", "INPUT", "RESIZE", "CHANNELS", "LABELS", "RUNS ON",
        ]
        .map(str::to_owned),
    )
    .chain(rows.iter().map(|r| {
        [
            r.name.clone(),
            r.task.clone(),
            r.input.clone().unwrap_or_else(dash),
            r.resize.clone().unwrap_or_else(dash),
            r.channel_order.clone().unwrap_or_else(dash),
            r.labels.map_or_else(dash, |n| n.to_string()),
            r.runs_on.to_owned(),
        ]
    }))
    .collect();
    let widths: Vec<usize> = (0..7)
        .map(|i| cells.iter().map(|row| row[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Error,
}

/// One thing `kinsight models check` found, about one model (or the whole file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// `None`: the file itself (unreadable, not YAML, no entry).
    pub model: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.severity {
            Severity::Ok => "ok   ",
            Severity::Error => "error",
        };
        match &self.model {
            Some(model) => write!(f, "{tag} {model}: {}", self.message),
            None => write!(f, "{tag} {}", self.message),
        }
    }
}

/// Checks a YAML file holding one model entry or a whole catalog: each entry is validated
/// as the catalog loader does, then its ONNX file is loaded with ONNX Runtime (CPU) and its
/// input and outputs compared with the entry and its task. Relative paths resolve against
/// the file's folder. Every entry is checked, so one run lists every problem.
pub fn check_catalog_file(path: &Path) -> Vec<Finding> {
    let file_error = |message: String| {
        vec![Finding {
            severity: Severity::Error,
            model: None,
            message,
        }]
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return file_error(format!("cannot read {}: {e}", path.display())),
    };
    let file = match serde_yaml::from_str::<CatalogFile>(&text) {
        Ok(file) => file,
        // Not a catalog: one entry on its own.
        Err(catalog_error) => match serde_yaml::from_str::<ModelEntry>(&text) {
            Ok(entry) => CatalogFile {
                models: vec![entry],
                analysers: Vec::new(),
            },
            Err(entry_error) => {
                return file_error(format!(
                    "{} is neither a catalog ({catalog_error}) nor one model entry ({entry_error})",
                    path.display()
                ));
            }
        },
    };
    if file.models.is_empty() {
        return file_error(format!("{} lists no models", path.display()));
    }
    let base_dir = Catalog::default_models_dir(path);
    file.models
        .into_iter()
        .map(|entry| {
            let model = Some(entry.name.clone());
            let (severity, message) = match check_entry(entry, base_dir, path) {
                Ok(summary) => (Severity::Ok, summary),
                Err(e) => (Severity::Error, without_prefix(&e)),
            };
            Finding {
                severity,
                model,
                message,
            }
        })
        .collect()
}

/// Validates one entry and loads its model; says what was checked.
fn check_entry(
    entry: ModelEntry,
    base_dir: &Path,
    origin: &Path,
) -> Result<String, InferenceError> {
    let single = CatalogFile {
        models: vec![entry],
        analysers: Vec::new(),
    };
    let yaml = serde_yaml::to_string(&single)
        .map_err(|e| InferenceError::Internal(format!("cannot write the entry as YAML: {e}")))?;
    let catalog = Catalog::from_yaml_str(&yaml, base_dir, origin)?;
    let options = EngineOptions {
        intra_threads: 1,
        execution_provider: ExecutionProvider::Cpu,
        intra_spinning: false,
        // A check runs the model once: one session is enough.
        instances: 1,
    };
    let Some(spec) = catalog.models().first() else {
        return Err(InferenceError::Internal("the entry vanished".into()));
    };
    // Named, so that a fetched model whose file is missing is an error, not left out.
    let engine = Engine::load(&catalog, std::slice::from_ref(&spec.name), &options)?;
    let max_batch = engine.max_batch(&spec.name).unwrap_or(1);
    Ok(summary(spec, max_batch))
}

fn summary(spec: &ModelSpec, max_batch: usize) -> String {
    let p = &spec.preprocessing;
    let (h, w) = (p.height, p.width);
    let input = match p.layout {
        Layout::Nchw => format!("[batch, 3, {h}, {w}]"),
        Layout::Nhwc => format!("[batch, {h}, {w}, 3]"),
    };
    format!(
        "{} loads; input float32 {input} matches {}x{} (batch up to {max_batch}); \
         outputs fit {} with {} labels",
        spec.model_path.display(),
        p.width,
        p.height,
        task_name(&spec.task),
        spec.labels.len()
    )
}

/// The error without the part the finding already says (the catalog path, the model name).
fn without_prefix(error: &InferenceError) -> String {
    match error {
        InferenceError::Catalog { message, .. } => message
            .split_once("`: ")
            .filter(|_| message.starts_with("model `"))
            .map_or_else(|| message.clone(), |(_, rest)| rest.to_owned()),
        InferenceError::ModelLoad { message, .. } => message.clone(),
        InferenceError::LabelCountMismatch {
            labels,
            model_classes,
            ..
        } => format!(
            "its labels file has {labels} labels but the model's outputs are {model_classes}"
        ),
        other => other.to_string(),
    }
}
