//! `WebhookSubscription`: a namespace-wide endpoint that receives the events of every
//! ImageGroup in its namespace (filtered by event type).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use kube::core::labels::{Selector, SelectorExt};

use super::SecretKeyRef;
use crate::webhook::{RetrySchedule, parse_duration};

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
    printcolumn = r#"{"name":"Healthy","type":"string","jsonPath":".status.conditions[?(@.type==\"Healthy\")].status"}"#,
    printcolumn = r#"{"name":"Circuit","type":"string","jsonPath":".status.health.circuit"}"#,
    printcolumn = r#"{"name":"Failures","type":"integer","jsonPath":".status.health.consecutiveFailures"}"#,
    printcolumn = r#"{"name":"Last Delivery","type":"date","jsonPath":".status.health.lastDelivery.at"}"#,
    printcolumn = r#"{"name":"Disabled","type":"string","jsonPath":".status.health.disabledReason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscriptionSpec {
    #[schemars(
        length(min = 1, max = super::image_group::MAX_URL_LEN),
        regex(pattern = super::image_group::HTTP_URL_PATTERN)
    )]
    pub url: String,
    /// Event types to send; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = { "type": "string", "enum": EVENT_TYPES }))]
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
    /// More request headers from a Secret of the namespace labelled
    /// `kinsight.io/webhook-signing=true`: each key is a header name, its value the
    /// header's value (for tokens that should not stand in the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<SecretName>,
    /// Per-attempt timeout (1-60 s; default: the controller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: Option<u32>,
    /// When to retry a failed attempt (default: the controller's schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
}

/// A Secret in the object's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretName {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Waits before each retry, in order, e.g. `["5s", "5m", "30m", "2h"]` (units ms, s,
    /// m, h, d): the first attempt is immediate, so an event gets at most one attempt more
    /// than this list has entries. At most 20 entries of at most 7 days each.
    #[schemars(length(max = MAX_RETRIES), inner(length(min = 1, max = 32)))]
    pub schedule: Vec<String>,
}

/// Bounds of a subscription's retry schedule.
const MAX_RETRIES: usize = 20;
const MAX_RETRY_WAIT: std::time::Duration = std::time::Duration::from_secs(7 * 86400);

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
    /// Whether a group with these labels is covered (a selector that does not parse
    /// covers none; `validate` refuses it).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.label_selector()
            .is_ok_and(|selector| selector.is_none_or(|s| s.matches(labels)))
    }

    fn label_selector(&self) -> Result<Option<Selector>, String> {
        self.selector
            .clone()
            .map(Selector::try_from)
            .transpose()
            .map_err(|e| format!("selector: {e}"))
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscriptionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (the spec and signing secret are usable) and `Healthy` (the endpoint
    /// accepts deliveries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How the endpoint has been answering, as the controller's circuit breaker sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<EndpointHealth>,
}

/// The circuit breaker of one endpoint: closed (deliveries flow), open (paused after
/// consecutive failures until a probe is due), half-open (one probe in flight), or
/// disabled (failing for the whole failure window; re-enabled by changing the spec).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CircuitState {
    #[default]
    Closed,
    Open,
    HalfOpen,
    Disabled,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHealth {
    #[serde(default)]
    pub circuit: CircuitState,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// The first failure since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<jiff::Timestamp>,
    /// While open: when the next single probe may go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_probe_at: Option<jiff::Timestamp>,
    /// Attempts allowed in flight at once; halved on 429/503, grows back with successes.
    #[serde(default)]
    pub concurrency_limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery: Option<LastDelivery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<jiff::Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<jiff::Timestamp>,
}

/// The latest attempt made to the endpoint.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastDelivery {
    pub at: jiff::Timestamp,
    /// `Delivered` or `Failed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl WebhookSubscriptionSpec {
    /// The subscription's own retry schedule, if it has one.
    pub fn retry_schedule(&self) -> Result<Option<RetrySchedule>, String> {
        let Some(policy) = &self.retry_policy else {
            return Ok(None);
        };
        if policy.schedule.len() > MAX_RETRIES {
            return Err(format!(
                "retryPolicy.schedule: at most {MAX_RETRIES} retries"
            ));
        }
        let mut waits = Vec::with_capacity(policy.schedule.len());
        for text in &policy.schedule {
            let wait =
                parse_duration(text.trim()).map_err(|e| format!("retryPolicy.schedule: {e}"))?;
            if wait > MAX_RETRY_WAIT {
                return Err(format!(
                    "retryPolicy.schedule: {text:?} is longer than 7 days"
                ));
            }
            waits.push(wait);
        }
        Ok(Some(RetrySchedule(waits)))
    }

    pub fn wants(&self, event: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|e| e == event)
    }

    pub fn validate(&self) -> Result<(), String> {
        super::image_group::validate_http_url("url", &self.url)?;
        validate_headers(&self.headers).map_err(|e| format!("headers: {e}"))?;
        if self.timeout_seconds.is_some_and(|t| !(1..=60).contains(&t)) {
            return Err("timeoutSeconds: must be between 1 and 60".into());
        }
        self.retry_schedule()?;
        self.label_selector()?;
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

/// Custom request headers: valid names and values, none that kinsight sets itself.
pub fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), String> {
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-") {
            return Err(format!(
                "{name:?} is set by kinsight and cannot be overridden"
            ));
        }
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            return Err(format!("{name:?} is not a valid header name and value"));
        }
    }
    Ok(())
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
            headers_from: None,
            timeout_seconds: None,
            retry_policy: None,
        }
    }

    #[test]
    fn retry_policies_parse_or_are_refused() {
        let mut s = spec();
        assert_eq!(s.retry_schedule(), Ok(None));
        let policy = |waits: &[&str]| RetryPolicy {
            schedule: waits.iter().map(|w| (*w).to_owned()).collect(),
        };
        s.retry_policy = Some(policy(&["500ms", "5s", "2h"]));
        let schedule = s.retry_schedule().expect("valid").expect("some");
        assert_eq!(
            schedule.0,
            vec![
                std::time::Duration::from_millis(500),
                std::time::Duration::from_secs(5),
                std::time::Duration::from_secs(7200)
            ]
        );
        s.retry_policy = Some(policy(&["5 minutes"]));
        assert!(s.validate().unwrap_err().contains("retryPolicy.schedule"));
        s.retry_policy = Some(policy(&["8d"]));
        assert!(s.validate().unwrap_err().contains("7 days"));
        s.retry_policy = Some(policy(&["1s"; 21]));
        assert!(s.validate().unwrap_err().contains("at most 20"));
        // An empty schedule is allowed: one attempt, no retries.
        s.retry_policy = Some(policy(&[]));
        assert_eq!(s.validate(), Ok(()));
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
        // Unknown operators, and In without values, are refused and select nothing.
        for (operator, values) in [("Like", Some(vec!["x".to_owned()])), ("In", None)] {
            s.selector = Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "team".into(),
                    operator: operator.into(),
                    values,
                }]),
            });
            let error = s.validate().expect_err(operator);
            assert!(error.starts_with("selector:"), "{error}");
            assert!(!s.selects(&labels), "{operator}");
        }
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
