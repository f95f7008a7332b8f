//! One image's result: the outputs of the models run on it, or why it failed. Small
//! (outputs only, never image bytes).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::inference::output::ModelOutput;

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageResult {
    /// Name of the ImageGroup it belongs to.
    pub group: String,
    pub image_id: String,
    /// Set when the image itself could not be processed (download, decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<ImageFailure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Perceptual hash of the decoded image (base64), for near-duplicates in the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perceptual_hash: Option<String>,
    /// Per model name.
    #[serde(default)]
    pub outputs: BTreeMap<String, ModelResult>,
    #[serde(default)]
    pub timings: Timings,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageFailure {
    /// Stable machine-readable category, e.g. `DownloadFailed`, `UnsupportedFormat`.
    pub reason: String,
    pub message: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelResult {
    #[serde(flatten)]
    pub output: ModelOutput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub inference_ms: f64,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    #[serde(default)]
    pub download_ms: f64,
    #[serde(default)]
    pub decode_ms: f64,
}

impl ImageResult {
    /// The result of an image that could not be processed at all.
    pub fn failed(group: &str, image_id: &str, reason: &str, message: String) -> Self {
        ImageResult {
            group: group.to_owned(),
            image_id: image_id.to_owned(),
            failure: Some(ImageFailure {
                reason: reason.to_owned(),
                message,
            }),
            width: None,
            height: None,
            perceptual_hash: None,
            outputs: BTreeMap::new(),
            timings: Timings::default(),
        }
    }

    /// The image is finished for `models` when it failed as a whole or every model ran.
    pub fn covers(&self, models: &[String]) -> bool {
        self.failure.is_some() || models.iter().all(|m| self.outputs.contains_key(m))
    }

    /// Failed as a whole, or every requested model errored.
    pub fn is_failure(&self, models: &[String]) -> bool {
        self.failure.is_some()
            || (!models.is_empty()
                && models
                    .iter()
                    .all(|m| self.outputs.get(m).is_some_and(|r| r.error.is_some())))
    }
}
