//! `ImageResult`: one image's model outputs, written by the worker, read by the controller.
//! Internal and small (outputs only, never image bytes); owned by its ImageGroup so it goes
//! when the group goes. Only `crate::results` touches these objects.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::inference::output::ModelOutput;

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kinsight.io",
    version = "v1alpha1",
    kind = "ImageResult",
    namespaced,
    category = "kinsight",
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".spec.group"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.imageId"}"#,
    printcolumn = r#"{"name":"Error","type":"string","jsonPath":".spec.failure.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageResultSpec {
    /// Name of the owning ImageGroup.
    pub group: String,
    pub image_id: String,
    /// Set when the image itself could not be processed (download, decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<ImageFailure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
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

impl ImageResultSpec {
    /// The result of an image that could not be processed at all.
    pub fn failed(group: &str, image_id: &str, reason: &str, message: String) -> Self {
        ImageResultSpec {
            group: group.to_owned(),
            image_id: image_id.to_owned(),
            failure: Some(ImageFailure {
                reason: reason.to_owned(),
                message,
            }),
            width: None,
            height: None,
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
