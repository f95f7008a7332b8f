//! Webhook deliveries: one per event and endpoint, each with its `webhook-id` and state.
//! They are rows in the database (`crate::store`), never arrays in a Kubernetes object;
//! the controller plans them, dispatchers (in every controller replica) claim and send
//! them, the group's status counts them.

use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The `webhook-id`: stable per event and endpoint across retries and restarts.
    pub id: String,
    /// Event type, e.g. `image.completed`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// `request` (the group's own webhook) or `subscription/<name>`.
    pub endpoint: String,
    pub sequence: u64,
    /// Timestamps of deliveries keep sub-second precision (metav1.Time would round to
    /// seconds, which distorts short retry waits).
    pub created_at: jiff::Timestamp,
    pub state: DeliveryState,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<jiff::Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<jiff::Timestamp>,
    /// The event's body, fixed when the event was recorded: read with a claimed delivery
    /// (the store keeps one per event), or given with one to record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

impl Delivery {
    /// A delivery of an event recorded at `now`, due at once.
    pub fn pending(
        id: String,
        event: &str,
        image_id: Option<&str>,
        endpoint: &str,
        sequence: u64,
        now: jiff::Timestamp,
    ) -> Delivery {
        Delivery {
            id,
            event: event.to_owned(),
            image_id: image_id.map(str::to_owned),
            endpoint: endpoint.to_owned(),
            sequence,
            created_at: now,
            state: DeliveryState::Pending,
            attempts: 0,
            next_attempt_at: Some(now),
            last_error: None,
            delivered_at: None,
            payload: None,
        }
    }
}

/// Bodies of events, by their sequence number in the group: one per event, whichever
/// endpoints it goes to.
pub type EventBodies = std::collections::BTreeMap<u64, serde_json::Value>;

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its next attempt (`next_attempt_at`).
    Pending,
    /// Claimed by a dispatcher, which is making an attempt.
    Sending,
    Delivered,
    Failed,
}

impl DeliveryState {
    /// The name stored in the database and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Sending => "Sending",
            Self::Delivered => "Delivered",
            Self::Failed => "Failed",
        }
    }

    /// Not settled yet: it will be attempted (again).
    pub fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Sending)
    }

    pub fn parse(text: &str) -> Option<DeliveryState> {
        match text {
            "Pending" => Some(Self::Pending),
            "Sending" => Some(Self::Sending),
            "Delivered" => Some(Self::Delivered),
            "Failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One attempt of a delivery, as it is kept for the delivery's history.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub delivery_id: String,
    pub attempted_at: jiff::Timestamp,
    /// The receiver's HTTP status, when it answered.
    pub status_code: Option<u16>,
    pub duration_ms: f64,
    /// `delivered`, `failed` or `not_sent` (nothing reached the receiver, for a reason of
    /// ours: the secret, the URL, the egress policy).
    pub outcome: String,
    pub error: Option<String>,
    /// The start of the receiver's answer to a failed attempt.
    pub response: Option<String>,
}

/// An image event that a write of results calls for: planned in the write's own
/// transaction, so that the dispatchers can send it as soon as the results are stored.
#[derive(Clone, Debug, PartialEq)]
pub struct DraftEvent {
    /// Event type, e.g. `image.completed`.
    pub event: String,
    pub image_id: String,
    /// `(endpoint key, webhook-id)` for every endpoint the event goes to.
    pub deliveries: Vec<(String, String)>,
    /// Which of the stored results it is about (an index into them).
    pub result: usize,
}

/// Where a group's events go, as its last plan recorded them in the store: read under the
/// group's row lock by a write of results.
#[derive(Clone, Debug, Default)]
pub struct EventLedger {
    /// The controller's endpoint records (`controller::events::Endpoint`, as JSON).
    pub endpoints: serde_json::Value,
    /// Endpoints stopped by a 410 Gone, as `<key> <url>`.
    pub stopped: Vec<String>,
}

/// The rules that turn stored results into image events (the controller's), for the store,
/// which knows none of them.
pub trait EventPlanner: Sync {
    /// The events that `stored` (each image's result as it stands after the write, with the
    /// outputs of earlier models merged in) calls for.
    fn image_events(
        &self,
        stored: &[crate::results::ImageResult],
        ledger: &EventLedger,
    ) -> Vec<DraftEvent>;

    /// Images in the group's spec: the write that brings its stored results to this many
    /// says so to the controller (see `crate::store::ALL_STORED`).
    fn images_total(&self) -> usize;

    /// The body of `event`, numbered `sequence` and recorded at `now`.
    fn body(
        &self,
        event: &DraftEvent,
        stored: &crate::results::ImageResult,
        sequence: u64,
        now: jiff::Timestamp,
    ) -> Option<serde_json::Value>;
}
