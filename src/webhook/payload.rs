//! Event payloads, in the Standard Webhooks envelope `{type, timestamp, data}`.
//! Per-image data travels in image events; the group event carries counts and the aggregate.

use serde::Serialize;
use serde_json::json;

use crate::crd::{ImageEntry, ImageGroup, ImageGroupStatus};
use crate::results::ImageResult;

/// Version of the image events' `data` layout, so receivers can tell payload revisions
/// apart (schemas/webhooks/image-event.<version>.json).
pub const PAYLOAD_VERSION: &str = "v1alpha1";

/// Version of the group events' `data` layout (schemas/webhooks/group-event.<version>.json):
/// v1alpha2 added `aggregate.listing`.
pub const GROUP_PAYLOAD_VERSION: &str = "v1alpha2";

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct EventPayload {
    #[serde(rename = "type")]
    pub event_type: String,
    pub timestamp: String,
    pub data: serde_json::Value,
}

/// `image.completed` / `image.failed` for one image.
pub fn image_event(
    event_type: &str,
    group: &ImageGroup,
    image_id: &str,
    entry: Option<&ImageEntry>,
    result: Option<&ImageResult>,
    sequence: u64,
    created_at: jiff::Timestamp,
) -> EventPayload {
    let mut data = json!({
        "version": PAYLOAD_VERSION,
        "groupId": group.metadata.name,
        "imageId": image_id,
        "sequence": sequence,
        "groupMetadata": group.spec.metadata,
    });
    if let Some(entry) = entry {
        data["url"] = json!(entry.url);
        data["metadata"] = json!(entry.metadata);
    }
    if let Some(result) = result {
        data["width"] = json!(result.width);
        data["height"] = json!(result.height);
        data["results"] = json!(result.outputs);
        if let Some(failure) = &result.failure {
            data["failure"] = json!(failure);
        }
    }
    EventPayload {
        event_type: event_type.to_owned(),
        timestamp: created_at.to_string(),
        data,
    }
}

/// `image_group.completed` / `image_group.updated`: counts and aggregate (of `status`, the
/// group's as it is being written), not the per-image data.
pub fn group_event(
    event_type: &str,
    group: &ImageGroup,
    status: &ImageGroupStatus,
    sequence: u64,
    created_at: jiff::Timestamp,
) -> EventPayload {
    EventPayload {
        event_type: event_type.to_owned(),
        timestamp: created_at.to_string(),
        data: json!({
            "version": GROUP_PAYLOAD_VERSION,
            "groupId": group.metadata.name,
            "sequence": sequence,
            "metadata": group.spec.metadata,
            "models": group.spec.models,
            "imagesTotal": status.images_total,
            "imagesDone": status.images_done,
            "imagesFailed": status.images_failed,
            "aggregate": status.aggregate.clone().unwrap_or_default(),
        }),
    }
}
