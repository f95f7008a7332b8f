//! The work order the controller hands a worker Job: a ConfigMap per Job, mounted into its
//! pod, so the worker needs no access to the API server at all: it reads the image URLs
//! here and hands its results to the result ingest. (Not the environment: Linux refuses to start a process with one
//! variable over 128 KiB, which a group of 1000 images with long URLs exceeds.)

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::results::GroupRef;

/// Environment variable naming the work order's file (the mounted ConfigMap's key).
pub const WORK_ORDER_FILE_ENV: &str = "KINSIGHT_WORK_ORDER_FILE";
/// Environment variable carrying the JSON work order itself (small orders run by hand,
/// and Jobs made by controllers before the ConfigMap).
pub const WORK_ORDER_ENV: &str = "KINSIGHT_WORK_ORDER";
/// The work order ConfigMap's one key.
pub const WORK_ORDER_KEY: &str = "order.json";
/// Where worker pods mount it.
pub const WORK_ORDER_MOUNT_PATH: &str = "/etc/kinsight/work-order";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkOrder {
    pub group: GroupRef,
    /// The group's generation this order's Job was made for; stored with each result.
    #[serde(default = "first_generation")]
    pub generation: i64,
    pub models: Vec<String>,
    pub images: Vec<WorkItem>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkItem {
    pub id: String,
    pub url: String,
    /// The models to run on this image when not all of the order's (models added to a
    /// group later run alone on the images that already have results).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

fn first_generation() -> i64 {
    1
}

impl WorkOrder {
    /// The order in `KINSIGHT_WORK_ORDER_FILE`, else in `KINSIGHT_WORK_ORDER`.
    pub fn from_env() -> Result<WorkOrder, String> {
        if let Some(file) = std::env::var_os(WORK_ORDER_FILE_ENV) {
            let path = Path::new(&file);
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the work order {}: {e}", path.display()))?;
            return serde_json::from_str(&text)
                .map_err(|e| format!("{} is not a valid work order: {e}", path.display()));
        }
        let text = std::env::var(WORK_ORDER_ENV)
            .map_err(|_| format!("neither {WORK_ORDER_FILE_ENV} nor {WORK_ORDER_ENV} is set"))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{WORK_ORDER_ENV} is not a valid work order: {e}"))
    }
}

impl WorkItem {
    pub fn models<'a>(&'a self, order: &'a WorkOrder) -> &'a [String] {
        if self.models.is_empty() {
            &order.models
        } else {
            &self.models
        }
    }
}
