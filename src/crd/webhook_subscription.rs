//! `WebhookSubscription`: a namespace-wide endpoint that receives the events of every
//! ImageGroup in its namespace (filtered by event type).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
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
    /// The Secret key holding the `whsec_...` signing secret(s): several, separated by
    /// white space, while keys rotate (each signs).
    pub secret_ref: SecretKeyRef,
    /// Only ImageGroups whose labels match; empty means every group of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Extra request headers (e.g. an authorization token the receiver wants).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Per-attempt timeout (1-60 s; default: the controller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// Headers the sender sets itself; a subscription may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "user-agent",
    "connection",
];

impl WebhookSubscriptionSpec {
    /// Whether a group with these labels is covered.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        let Some(selector) = &self.selector else {
            return true;
        };
        let match_labels = selector
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v));
        let match_expressions = selector.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => !value.is_some_and(|v| values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        });
        match_labels && match_expressions
    }
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
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-") {
                return Err(format!(
                    "headers: {name:?} is set by kinsight and cannot be overridden"
                ));
            }
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return Err(format!(
                    "headers: {name:?} is not a valid header name and value"
                ));
            }
        }
        if self.timeout_seconds.is_some_and(|t| !(1..=60).contains(&t)) {
            return Err("timeoutSeconds: must be between 1 and 60".into());
        }
        for e in self
            .selector
            .iter()
            .flat_map(|s| s.match_expressions.iter().flatten())
        {
            if !matches!(
                e.operator.as_str(),
                "In" | "NotIn" | "Exists" | "DoesNotExist"
            ) {
                return Err(format!("selector: unknown operator {:?}", e.operator));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn spec() -> WebhookSubscriptionSpec {
        WebhookSubscriptionSpec {
            url: "https://example.com/hook".into(),
            event_types: vec![],
            secret_ref: SecretKeyRef {
                name: "s".into(),
                key: "k".into(),
            },
            selector: None,
            headers: BTreeMap::new(),
            timeout_seconds: None,
        }
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels = BTreeMap::from([("team".to_owned(), "listings".to_owned())]);
        let mut s = spec();
        assert!(s.selects(&labels));
        s.selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("team".to_owned(), "listings".to_owned())])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "DoesNotExist".into(),
                values: None,
            }]),
        });
        assert!(s.selects(&labels));
        let mut other = labels.clone();
        other.insert("tier".into(), "gold".into());
        assert!(!s.selects(&other));
        assert!(!s.selects(&BTreeMap::new()));
    }

    #[test]
    fn reserved_or_invalid_headers_and_timeouts_are_refused() {
        let mut s = spec();
        s.headers.insert("Webhook-Signature".into(), "x".into());
        assert!(s.validate().unwrap_err().contains("cannot be overridden"));
        s.headers = BTreeMap::from([("bad header".to_owned(), "x".to_owned())]);
        assert!(s.validate().is_err());
        s.headers = BTreeMap::from([("Authorization".to_owned(), "Bearer t".to_owned())]);
        assert_eq!(s.validate(), Ok(()));
        s.timeout_seconds = Some(0);
        assert!(s.validate().is_err());
    }
}
