//! The work order the controller hands a worker Job through its pod's environment, so the
//! worker needs no read access to ImageGroups: only the image URLs and ImageResult writes.

use serde::{Deserialize, Serialize};

use crate::results::GroupRef;

/// Environment variable carrying the JSON work order.
pub const WORK_ORDER_ENV: &str = "KINSIGHT_WORK_ORDER";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkOrder {
    pub group: GroupRef,
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

impl WorkItem {
    pub fn models<'a>(&'a self, order: &'a WorkOrder) -> &'a [String] {
        if self.models.is_empty() {
            &order.models
        } else {
            &self.models
        }
    }
}
