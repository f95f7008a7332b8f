//! `WebhookSubscription`: a namespace-wide endpoint that receives the events of every
//! ImageGroup in its namespace (filtered by event type).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;

/// The event types kinsight sends.
pub const EVENT_TYPES: &[&str] = &[
    "image.completed",
    "image.failed",
    "image_group.completed",
    "image_group.updated",
];

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kinsight.io",
    version = "v1alpha1",
    kind = "WebhookSubscription",
    namespaced,
    status = "WebhookSubscriptionStatus",
    shortname = "whsub",
    category = "kinsight",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscriptionSpec {
    pub url: String,
    /// Event types to send; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// The Secret key holding the `whsec_...` signing secret.
    pub secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscriptionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl WebhookSubscriptionSpec {
    pub fn wants(&self, event: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|e| e == event)
    }

    pub fn validate(&self) -> Result<(), String> {
        super::image_group::validate_http_url("url", &self.url)?;
        if let Some(bad) = self
            .event_types
            .iter()
            .find(|e| !EVENT_TYPES.contains(&e.as_str()))
        {
            return Err(format!(
                "eventTypes: unknown event type {bad:?}; known: {}",
                EVENT_TYPES.join(", ")
            ));
        }
        Ok(())
    }
}
