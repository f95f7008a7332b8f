//! Webhook events of a group: which endpoints get them, and planning them (with stable
//! ids, per-group sequence numbers and their bodies fixed) into the store, where the
//! dispatchers (`dispatch.rs`) find them; the status counts them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Context, ControllerError};
use crate::crd::{
    ConditionStatus, EndpointDeliveries, EndpointHealth, FailedDelivery, GroupPhase, ImageEntry,
    ImageGroup, ImageGroupStatus, MAX_RECENT_FAILURES, REPLAY_ANNOTATION, ReplayRequest,
    SecretKeyRef, WebhookSubscription, set_condition,
};
use crate::delivery::{
    Delivery, DeliveryState, DraftEvent, EventBodies, EventLedger, EventPlanner,
};
use crate::results::ImageResult;
use crate::store::DeliveryCount;
use crate::webhook::{
    EndpointOptions, EventPayload, MEMORY_ONLY, RetrySchedule, group_event, image_event,
};

pub const GROUP_COMPLETED: &str = "image_group.completed";
/// Sent instead of `image_group.completed` when a group that had completed completes again
/// after images or models were added.
pub const GROUP_UPDATED: &str = "image_group.updated";
const REQUEST_ENDPOINT: &str = "request";

/// Where a group's events go. Saved with the group's deliveries: any replica's dispatcher
/// sends by it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Names the endpoint within the group: `request` or `subscription/<name>`.
    pub key: String,
    pub url: String,
    pub secret: SecretKeyRef,
    pub event_types: Vec<String>,
    pub options: EndpointOptions,
    /// A Secret (marked for kinsight) whose keys are more request headers, read when
    /// sending, so their values are never stored with the events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<String>,
    /// The endpoint's own retry schedule, if it has one.
    pub retry: Option<RetrySchedule>,
    /// Names the endpoint's circuit, which every group sending there shares.
    pub circuit_key: String,
    /// The subscription's generation (a changed spec starts a fresh circuit).
    pub generation: i64,
    /// The health its subscription's status recorded, and for which generation.
    pub recorded: Option<(i64, EndpointHealth)>,
    /// Where Events about the endpoint go: its subscription, or the group.
    pub object: ObjectReference,
}

/// The circuit of a subscription's endpoint (by uid: a subscription deleted and made
/// again under the same name starts afresh).
pub fn subscription_circuit(sub: &WebhookSubscription) -> String {
    format!(
        "{}/subscription/{}/{}",
        sub.namespace().unwrap_or_default(),
        sub.name_any(),
        sub.uid().unwrap_or_default()
    )
}

/// Groups' own webhooks share a circuit per URL within a namespace.
fn request_circuit(namespace: &str, url: &str) -> String {
    format!("{namespace}/url/{url}")
}

impl Endpoint {
    /// How a 410 Gone from this endpoint is remembered: its key with the URL that answered,
    /// so an endpoint whose URL is corrected afterwards is sent to again.
    pub fn stop_mark(&self) -> String {
        format!("{} {}", self.key, self.url)
    }

    fn wants(&self, event: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|e| e == event)
    }
}

/// The group's own webhook plus every valid subscription in its namespace; `consistent`
/// reads the subscriptions from the API server whatever the watch holds.
pub async fn endpoints(
    ctx: &Context,
    group: &ImageGroup,
    namespace: &str,
    consistent: bool,
) -> Result<Vec<Endpoint>, ControllerError> {
    let mut out = Vec::new();
    if let Some(target) = &group.spec.webhook {
        out.push(Endpoint {
            key: REQUEST_ENDPOINT.to_owned(),
            url: target.url.clone(),
            secret: target.secret_ref.clone(),
            event_types: Vec::new(),
            options: EndpointOptions::default(),
            headers_from: None,
            retry: None,
            circuit_key: request_circuit(namespace, &target.url),
            generation: MEMORY_ONLY,
            recorded: None,
            object: group.object_ref(&()),
        });
    }
    let subscriptions = ctx
        .subscriptions
        .in_namespace(&ctx.client, namespace, consistent)
        .await?;
    for sub in subscriptions {
        if sub.spec.validate().is_err() || !sub.spec.selects(group.labels()) {
            continue;
        }
        out.push(Endpoint {
            key: format!("subscription/{}", sub.name_any()),
            url: sub.spec.url.clone(),
            secret: sub.spec.secret_ref.clone(),
            event_types: sub.spec.event_types.clone(),
            options: EndpointOptions {
                headers: sub.spec.headers.clone().into_iter().collect(),
                timeout: sub
                    .spec
                    .timeout_seconds
                    .map(|s| Duration::from_secs(u64::from(s))),
            },
            headers_from: sub.spec.headers_from.as_ref().map(|s| s.name.clone()),
            retry: sub.spec.retry_schedule().ok().flatten(),
            circuit_key: subscription_circuit(&sub),
            generation: sub.metadata.generation.unwrap_or(0),
            recorded: sub
                .status
                .as_ref()
                .and_then(|s| Some((s.observed_generation?, s.health.clone()?))),
            object: sub.object_ref(&()),
        });
    }
    Ok(out)
}

/// Stable `webhook-id`: the same event for the same endpoint always gets the same id, so
/// receivers can dedupe retries and re-sends after a controller restart.
fn event_id(group_uid: &str, event: &str, subject: &str, endpoint: &str) -> String {
    let digest = Sha256::digest(format!("{group_uid}\n{event}\n{subject}\n{endpoint}").as_bytes());
    format!("msg_{}", &hex::encode(digest)[..26])
}

/// Adds the events that are due to `deliveries` (idempotent); returns the bodies of the
/// events added, fixed now, by sequence number.
pub fn plan(
    group: &ImageGroup,
    status: &mut ImageGroupStatus,
    deliveries: &mut Vec<Delivery>,
    results: &HashMap<String, ImageResult>,
    endpoints: &[Endpoint],
    all_done: bool,
    now: jiff::Timestamp,
) -> EventBodies {
    let uid = group.uid().unwrap_or_default();
    let models = &group.spec.models;
    let first_new = deliveries.len();
    // The ledger is saved before the status: its numbers are never handed out twice.
    let recorded_max = deliveries.iter().map(|d| d.sequence).max().unwrap_or(0);
    status.sequence = status.sequence.max(recorded_max);
    // Each recorded event's sequence, by id: thousands of deliveries are looked up here
    // on every reconcile.
    let mut known: HashMap<String, u64> = deliveries
        .iter()
        .map(|d| (d.id.clone(), d.sequence))
        .collect();
    // An image's event is about its results for this set of models: adding models later
    // makes a new event (with all its results), adding images does not repeat old ones.
    let fingerprint = models_fingerprint(models);
    for (i, image) in group.spec.images.iter().enumerate() {
        let key = image.key(i);
        let Some((event, subject)) = results
            .get(&key)
            .and_then(|r| image_event_of(r, models, &fingerprint))
        else {
            continue;
        };
        let event = NewEvent {
            event,
            image_id: Some(&key),
            subject: &subject,
        };
        add_event(
            status,
            deliveries,
            &mut known,
            &uid,
            &event,
            endpoints,
            now,
            &|_| true,
        );
    }
    let is_group_event = |d: &Delivery| d.event == GROUP_COMPLETED || d.event == GROUP_UPDATED;
    // The group event goes to an endpoint once that endpoint's image events are settled:
    // events are ordered per endpoint, so a sick one holds back only its own.
    let unsettled: HashSet<String> = deliveries
        .iter()
        .filter(|d| !is_group_event(d) && d.state.is_open())
        .map(|d| d.endpoint.clone())
        .collect();
    if all_done {
        let generation = group.metadata.generation.unwrap_or(1).to_string();
        // Endpoints that have gone since keep their records: theirs count as this
        // generation's too, or losing a subscription would announce an update.
        let recorded = deliveries.iter().map(|d| d.endpoint.as_str());
        let keys: HashSet<&str> = endpoints
            .iter()
            .map(|e| e.key.as_str())
            .chain(recorded)
            .collect();
        let this_generation = group_event_ids(&uid, &generation, keys);
        let completed_before = deliveries
            .iter()
            .any(|d| is_group_event(d) && !this_generation.contains(&d.id));
        let event = if completed_before {
            GROUP_UPDATED
        } else {
            GROUP_COMPLETED
        };
        let event = NewEvent {
            event,
            image_id: None,
            subject: &generation,
        };
        let settled = |e: &Endpoint| !unsettled.contains(&e.key);
        add_event(
            status, deliveries, &mut known, &uid, &event, endpoints, now, &settled,
        );
    }
    // Each new event's body is fixed now, with the results it announces: once per event,
    // whichever endpoints it goes to.
    let entries: HashMap<String, &ImageEntry> = if deliveries.len() > first_new {
        group
            .spec
            .images
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key(i), e))
            .collect()
    } else {
        HashMap::new()
    };
    let mut bodies = EventBodies::new();
    for delivery in &deliveries[first_new..] {
        if let std::collections::btree_map::Entry::Vacant(slot) = bodies.entry(delivery.sequence) {
            let body = payload_for(group, status, delivery, results, &entries);
            if let Ok(value) = serde_json::to_value(body) {
                slot.insert(value);
            }
        }
    }
    prune_superseded(deliveries);
    bodies
}

/// Drops the image events that a newer event about the same image supersedes at the same
/// endpoint, once they are final (delivered, or failed for good). Adding models makes a
/// new event per image, with every result; without this, each update would add a copy of
/// every image's record to a status that etcd caps at 1.5 MiB. Pending ones still go out:
/// delivery is at least once. Models are only ever added, so a superseded event is never
/// planned again.
fn prune_superseded(deliveries: &mut Vec<Delivery>) {
    let mut newest: HashMap<(&str, &str), u64> = HashMap::new();
    for d in deliveries.iter() {
        if let Some(image) = d.image_id.as_deref() {
            let seq = newest.entry((image, d.endpoint.as_str())).or_insert(0);
            *seq = (*seq).max(d.sequence);
        }
    }
    let keep: Vec<bool> = deliveries
        .iter()
        .map(|d| {
            d.state.is_open()
                || d.image_id.as_deref().is_none_or(|image| {
                    newest.get(&(image, d.endpoint.as_str())) == Some(&d.sequence)
                })
        })
        .collect();
    let mut keep = keep.into_iter();
    deliveries.retain(|_| keep.next().unwrap_or(true));
}

/// The ids the group event of `generation` has (or would have), for every endpoint and
/// both event types.
fn group_event_ids<'a>(
    uid: &str,
    generation: &str,
    endpoint_keys: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    endpoint_keys
        .into_iter()
        .flat_map(|key| {
            [GROUP_COMPLETED, GROUP_UPDATED].map(|event| event_id(uid, event, generation, key))
        })
        .collect()
}

/// The event an image's result calls for once it covers `models`, and the subject that
/// makes its id: an image's event is about its results for this set of models.
fn image_event_of(
    result: &ImageResult,
    models: &[String],
    fingerprint: &str,
) -> Option<(&'static str, String)> {
    if !result.covers(models) {
        return None;
    }
    let event = if result.is_failure(models) {
        "image.failed"
    } else {
        "image.completed"
    };
    Some((event, format!("{}:{fingerprint}", result.image_id)))
}

/// The image events of results as they are written ([`EventPlanner`]): the events, ids
/// and bodies the group's plan would make for them, so that a write of results records
/// them at once and the plan finds them recorded.
pub struct ImageEvents {
    group: std::sync::Arc<ImageGroup>,
    uid: String,
    fingerprint: String,
    /// Each image's place in the spec, by id.
    places: HashMap<String, usize>,
}

impl ImageEvents {
    pub fn new(group: std::sync::Arc<ImageGroup>) -> Self {
        ImageEvents {
            uid: group.uid().unwrap_or_default(),
            fingerprint: models_fingerprint(&group.spec.models),
            places: group
                .spec
                .images
                .iter()
                .enumerate()
                .map(|(i, e)| (e.key(i), i))
                .collect(),
            group,
        }
    }

    /// The group the events are about.
    pub fn group(&self) -> &ImageGroup {
        &self.group
    }

    /// Whether `image_id` is one of the group's images.
    pub fn has_image(&self, image_id: &str) -> bool {
        self.places.contains_key(image_id)
    }
}

impl EventPlanner for ImageEvents {
    fn images_total(&self) -> usize {
        self.group.spec.images.len()
    }

    fn image_events(&self, stored: &[ImageResult], ledger: &EventLedger) -> Vec<DraftEvent> {
        let endpoints = match Vec::<Endpoint>::deserialize(&ledger.endpoints) {
            Ok(endpoints) => endpoints,
            Err(e) => {
                // The group's plan records them anew; its next reconcile plans these.
                tracing::warn!(error = %e, "stored endpoint records unreadable");
                return Vec::new();
            }
        };
        let models = &self.group.spec.models;
        stored
            .iter()
            .enumerate()
            .filter(|(_, r)| self.has_image(&r.image_id))
            .filter_map(|(index, result)| {
                let (event, subject) = image_event_of(result, models, &self.fingerprint)?;
                let deliveries = endpoints
                    .iter()
                    .filter(|e| e.wants(event) && !ledger.stopped.contains(&e.stop_mark()))
                    .map(|e| (e.key.clone(), event_id(&self.uid, event, &subject, &e.key)))
                    .collect();
                Some(DraftEvent {
                    event: event.to_owned(),
                    image_id: result.image_id.clone(),
                    deliveries,
                    result: index,
                })
            })
            .collect()
    }

    fn body(
        &self,
        event: &DraftEvent,
        stored: &ImageResult,
        sequence: u64,
        now: jiff::Timestamp,
    ) -> Option<serde_json::Value> {
        let entry = self
            .places
            .get(&event.image_id)
            .and_then(|i| self.group.spec.images.get(*i));
        let body = image_event(
            &event.event,
            &self.group,
            &event.image_id,
            entry,
            Some(stored),
            sequence,
            now,
        );
        serde_json::to_value(body).ok()
    }
}

fn models_fingerprint(models: &[String]) -> String {
    let mut sorted: Vec<&str> = models.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    hex::encode(&Sha256::digest(sorted.join(",").as_bytes())[..4])
}

/// An event about to be recorded: `subject` makes its id (with the group and endpoint).
struct NewEvent<'a> {
    event: &'a str,
    image_id: Option<&'a str>,
    subject: &'a str,
}

/// Records `new` for every endpoint that wants it and is `ready` for it; the event has one
/// sequence number whichever endpoints it goes to, and whenever.
#[allow(clippy::too_many_arguments)]
fn add_event(
    status: &mut ImageGroupStatus,
    deliveries: &mut Vec<Delivery>,
    known: &mut HashMap<String, u64>,
    uid: &str,
    new: &NewEvent<'_>,
    endpoints: &[Endpoint],
    now: jiff::Timestamp,
    ready: &dyn Fn(&Endpoint) -> bool,
) {
    let ids: Vec<String> = endpoints
        .iter()
        .map(|e| event_id(uid, new.event, new.subject, &e.key))
        .collect();
    // One event has one sequence number, whichever endpoints it goes to.
    let mut sequence = ids.iter().find_map(|id| known.get(id).copied());
    for (endpoint, id) in endpoints.iter().zip(ids) {
        if !endpoint.wants(new.event)
            || !ready(endpoint)
            || status.stopped_endpoints.contains(&endpoint.stop_mark())
            || known.contains_key(&id)
        {
            continue;
        }
        let seq = *sequence.get_or_insert_with(|| {
            status.sequence += 1;
            status.sequence
        });
        known.insert(id.clone(), seq);
        deliveries.push(Delivery::pending(
            id,
            new.event,
            new.image_id,
            &endpoint.key,
            seq,
            now,
        ));
    }
}

/// What a replay request changed: the deliveries that start again, and the endpoints
/// whose 410 stop it lifted.
#[derive(Debug, Default, PartialEq)]
pub struct Replayed {
    pub deliveries: Vec<String>,
    pub unstopped: Vec<String>,
}

/// Carries out a replay request found in the group's annotation, once: the deliveries it
/// names go back to pending with a fresh retry schedule (and their endpoint is no longer
/// stopped). Their `webhook-id` stays, so receivers can still dedupe.
pub fn apply_replay(
    group: &ImageGroup,
    status: &mut ImageGroupStatus,
    deliveries: &mut [Delivery],
) -> Replayed {
    let mut replayed = Replayed::default();
    let Some(text) = group.annotations().get(REPLAY_ANNOTATION) else {
        return replayed;
    };
    let request: ReplayRequest = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed replay request");
            return replayed;
        }
    };
    if status.last_replay.as_deref() == Some(request.request.as_str()) {
        return replayed;
    }
    let now = jiff::Timestamp::now();
    for delivery in deliveries.iter_mut().filter(|d| request.selects(d)) {
        delivery.state = DeliveryState::Pending;
        delivery.attempts = 0;
        delivery.next_attempt_at = Some(now);
        let prefix = format!("{} ", delivery.endpoint);
        status.stopped_endpoints.retain(|e| !e.starts_with(&prefix));
        if !replayed.unstopped.contains(&delivery.endpoint) {
            replayed.unstopped.push(delivery.endpoint.clone());
        }
        replayed.deliveries.push(delivery.id.clone());
    }
    tracing::info!(request = %request.request, replayed = replayed.deliveries.len(), "replay request carried out");
    status.last_replay = Some(request.request);
    replayed
}

fn payload_for(
    group: &ImageGroup,
    status: &ImageGroupStatus,
    delivery: &Delivery,
    results: &HashMap<String, ImageResult>,
    entries: &HashMap<String, &ImageEntry>,
) -> EventPayload {
    let created = delivery.created_at;
    match &delivery.image_id {
        Some(image_id) => {
            let entry = entries.get(image_id).copied();
            image_event(
                &delivery.event,
                group,
                image_id,
                entry,
                results.get(image_id),
                delivery.sequence,
                created,
            )
        }
        None => group_event(&delivery.event, group, status, delivery.sequence, created),
    }
}

pub fn set_delivery_condition(
    status: &mut ImageGroupStatus,
    deliveries: &[Delivery],
    generation: i64,
    now: jiff::Timestamp,
) {
    let mut counts: std::collections::BTreeMap<(&str, &str), DeliveryCount> =
        std::collections::BTreeMap::new();
    for d in deliveries {
        counts
            .entry((d.endpoint.as_str(), d.state.as_str()))
            .or_insert_with(|| DeliveryCount {
                endpoint: d.endpoint.clone(),
                state: d.state,
                count: 0,
            })
            .count += 1;
    }
    let counts: Vec<DeliveryCount> = counts.into_values().collect();
    let mut failures: Vec<&Delivery> = deliveries
        .iter()
        .filter(|d| d.state == DeliveryState::Failed)
        .collect();
    failures.sort_by(|a, b| b.sequence.cmp(&a.sequence).then_with(|| a.id.cmp(&b.id)));
    let failures: Vec<Delivery> = failures
        .into_iter()
        .take(MAX_RECENT_FAILURES)
        .cloned()
        .collect();
    set_delivery_counts(status, &counts, &failures, generation, now);
}

/// The status's delivery counts, recent failures (newest first) and `WebhooksDelivered`
/// condition, from counts per endpoint and state.
pub fn set_delivery_counts(
    status: &mut ImageGroupStatus,
    counts: &[DeliveryCount],
    recent_failures: &[Delivery],
    generation: i64,
    now: jiff::Timestamp,
) {
    let total = |open: bool, state: Option<DeliveryState>| -> u64 {
        counts
            .iter()
            .filter(|c| match state {
                Some(s) => c.state == s,
                None => c.state.is_open() == open,
            })
            .map(|c| c.count)
            .sum()
    };
    let pending = total(true, None);
    let failed = total(false, Some(DeliveryState::Failed));
    let delivered = total(false, Some(DeliveryState::Delivered));
    // Settled only once no event is left to come: while images are processed, more
    // events follow, and a condition flipping True and back between results would be
    // wrong for `kubectl wait` and force a status write each time.
    let done = status.phase == GroupPhase::Completed;
    let (state, reason) = match (pending, failed) {
        (0, 0) if done => (ConditionStatus::True, "AllDelivered"),
        (0, _) if done => (ConditionStatus::True, "SomeFailed"),
        _ => (ConditionStatus::False, "Delivering"),
    };
    let message = format!("{delivered} delivered, {pending} pending, {failed} failed");
    let mut per_endpoint: std::collections::BTreeMap<&str, EndpointDeliveries> =
        std::collections::BTreeMap::new();
    for c in counts {
        let entry = per_endpoint
            .entry(c.endpoint.as_str())
            .or_insert_with(|| EndpointDeliveries {
                endpoint: c.endpoint.clone(),
                ..EndpointDeliveries::default()
            });
        let n = u32::try_from(c.count).unwrap_or(u32::MAX);
        match c.state {
            DeliveryState::Pending | DeliveryState::Sending => entry.pending += n,
            DeliveryState::Delivered => entry.delivered += n,
            DeliveryState::Failed => entry.failed += n,
        }
    }
    status.deliveries = per_endpoint.into_values().collect();
    status.recent_failures = recent_failures
        .iter()
        .take(MAX_RECENT_FAILURES)
        .map(|d| FailedDelivery {
            id: d.id.clone(),
            event: d.event.clone(),
            image_id: d.image_id.clone(),
            endpoint: d.endpoint.clone(),
            attempts: d.attempts,
            last_error: d.last_error.clone(),
        })
        .collect();
    set_condition(
        &mut status.conditions,
        "WebhooksDelivered",
        state,
        reason,
        message,
        Some(generation),
        now,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_and_distinct() {
        let a = event_id("uid", "image.completed", "0", "request");
        assert_eq!(a, event_id("uid", "image.completed", "0", "request"));
        assert_ne!(a, event_id("uid", "image.completed", "1", "request"));
        assert_ne!(a, event_id("uid", "image.completed", "0", "subscription/x"));
        assert!(a.starts_with("msg_"));
    }

    fn endpoint(key: &str) -> Endpoint {
        Endpoint {
            key: key.to_owned(),
            url: "https://hooks.example/in".to_owned(),
            secret: SecretKeyRef {
                name: "s".to_owned(),
                key: "k".to_owned(),
            },
            event_types: Vec::new(),
            options: EndpointOptions::default(),
            headers_from: None,
            retry: None,
            circuit_key: key.to_owned(),
            generation: MEMORY_ONLY,
            recorded: None,
            object: ObjectReference::default(),
        }
    }

    fn group(images: usize, models: &[&str], generation: i64) -> ImageGroup {
        let spec = crate::crd::ImageGroupSpec {
            images: (0..images)
                .map(|i| crate::crd::ImageEntry {
                    id: Some(format!("img-{i}")),
                    url: format!("https://photos.example/{i}.jpg"),
                    metadata: Default::default(),
                })
                .collect(),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            webhook: None,
            metadata: Default::default(),
        };
        let mut group = ImageGroup::new("g", spec);
        group.metadata.uid = Some("uid-1".to_owned());
        group.metadata.generation = Some(generation);
        group
    }

    /// Every image failed to download: a result that covers any set of models.
    fn results(images: usize) -> HashMap<String, ImageResult> {
        (0..images)
            .map(|i| {
                let id = format!("img-{i}");
                let result = ImageResult::failed("g", &id, "DownloadFailed", "HTTP 404".into());
                (id, result)
            })
            .collect()
    }

    fn settle(deliveries: &mut [Delivery], state: DeliveryState) {
        for d in deliveries.iter_mut() {
            if d.state == DeliveryState::Pending {
                d.state = state;
            }
        }
    }

    #[test]
    fn an_update_replaces_final_image_events_and_keeps_pending_ones() {
        let endpoints = [endpoint("request"), endpoint("subscription/s")];
        let results = results(2);
        let now = jiff::Timestamp::now();
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let before = group(2, &["a"], 1);
        plan(
            &before,
            &mut status,
            &mut deliveries,
            &results,
            &endpoints,
            false,
            now,
        );
        assert_eq!(deliveries.len(), 4);
        // img-0 is done with at both endpoints (delivered, failed for good); img-1 waits.
        for d in &mut deliveries {
            if d.image_id.as_deref() == Some("img-0") {
                d.state = if d.endpoint == "request" {
                    DeliveryState::Delivered
                } else {
                    DeliveryState::Failed
                };
            }
        }
        let old_pending: Vec<String> = deliveries
            .iter()
            .filter(|d| d.state == DeliveryState::Pending)
            .map(|d| d.id.clone())
            .collect();

        let after = group(2, &["a", "b"], 2);
        plan(
            &after,
            &mut status,
            &mut deliveries,
            &results,
            &endpoints,
            false,
            now,
        );
        // Two new events (one per image) to two endpoints, plus img-1's two old ones,
        // still pending; img-0's old records are gone.
        assert_eq!(deliveries.len(), 6, "{:#?}", deliveries);
        for id in &old_pending {
            assert!(deliveries.iter().any(|d| &d.id == id), "{id} kept");
        }
        let new: Vec<&Delivery> = deliveries
            .iter()
            .filter(|d| !old_pending.contains(&d.id))
            .collect();
        assert_eq!(new.len(), 4);
        assert!(new.iter().all(|d| d.state == DeliveryState::Pending));
        // One sequence per event across endpoints, after every earlier one.
        for image in ["img-0", "img-1"] {
            let seqs: Vec<u64> = new
                .iter()
                .filter(|d| d.image_id.as_deref() == Some(image))
                .map(|d| d.sequence)
                .collect();
            assert_eq!(seqs.len(), 2);
            assert_eq!(seqs[0], seqs[1]);
            assert!(seqs[0] > 2, "{seqs:?}");
        }

        // Planning again adds and drops nothing.
        let planned = (status.clone(), deliveries.clone());
        plan(
            &after,
            &mut status,
            &mut deliveries,
            &results,
            &endpoints,
            false,
            now,
        );
        assert_eq!((status, deliveries), planned);
    }

    #[test]
    fn group_events_survive_pruning_so_an_update_is_announced_as_one() {
        let endpoints = [endpoint("request")];
        let results = results(3);
        let now = jiff::Timestamp::now();
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let first = group(3, &["a"], 1);
        plan(
            &first,
            &mut status,
            &mut deliveries,
            &results,
            &endpoints,
            true,
            now,
        );
        settle(&mut deliveries, DeliveryState::Delivered);
        plan(
            &first,
            &mut status,
            &mut deliveries,
            &results,
            &endpoints,
            true,
            now,
        );
        let events = |d: &[Delivery], name: &str| d.iter().filter(|d| d.event == name).count();
        assert_eq!(events(&deliveries, GROUP_COMPLETED), 1);
        settle(&mut deliveries, DeliveryState::Delivered);

        let second = group(3, &["a", "b"], 2);
        plan(
            &second,
            &mut status,
            &mut deliveries,
            &results,
            &endpoints,
            true,
            now,
        );
        settle(&mut deliveries, DeliveryState::Delivered);
        plan(
            &second,
            &mut status,
            &mut deliveries,
            &results,
            &endpoints,
            true,
            now,
        );
        // Only the newest event per image is left; both group events are.
        assert_eq!(events(&deliveries, "image.failed"), 3, "{:#?}", deliveries);
        assert_eq!(events(&deliveries, GROUP_COMPLETED), 1);
        assert_eq!(events(&deliveries, GROUP_UPDATED), 1);
    }

    #[test]
    fn events_of_an_endpoint_that_went_away_hold_nothing_back_once_failed() {
        let both = [endpoint("request"), endpoint("subscription/s")];
        let g = group(2, &["a"], 1);
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let now = jiff::Timestamp::now();
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &both,
            true,
            now,
        );
        // The subscription is deleted before its events went out: a dispatcher fails them
        // at once (tests/dispatcher.rs); the group's own endpoint had its events delivered.
        for d in &mut deliveries {
            d.state = if d.endpoint == "request" {
                DeliveryState::Delivered
            } else {
                DeliveryState::Failed
            };
        }
        let left = [endpoint("request")];
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &left,
            true,
            now,
        );
        let completed = deliveries
            .iter()
            .filter(|d| d.event == GROUP_COMPLETED)
            .count();
        assert_eq!(completed, 1, "{:#?}", deliveries);
    }

    #[test]
    fn losing_an_endpoint_announces_no_update() {
        let both = [endpoint("request"), endpoint("subscription/a")];
        let g = group(2, &["m"], 1);
        let now = jiff::Timestamp::now();
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &both,
            true,
            now,
        );
        settle(&mut deliveries, DeliveryState::Delivered);
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &both,
            true,
            now,
        );
        settle(&mut deliveries, DeliveryState::Delivered);
        let recorded = deliveries.clone();
        assert_eq!(recorded.len(), 2 * 2 + 2, "{recorded:#?}");

        // The subscription is deleted; nothing about the group changed.
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &[endpoint("request")],
            true,
            now,
        );
        assert_eq!(deliveries, recorded);
    }

    #[test]
    fn webhooks_are_delivered_only_once_no_event_is_left_to_come() {
        let now = jiff::Timestamp::now();
        let count = |state, count| DeliveryCount {
            endpoint: "request".into(),
            state,
            count,
        };
        let condition = |status: &ImageGroupStatus| {
            let c = status
                .conditions
                .iter()
                .find(|c| c.type_ == "WebhooksDelivered")
                .expect("condition");
            (c.status.clone(), c.reason.clone())
        };
        let settle = |status: &mut ImageGroupStatus, counts: &[DeliveryCount]| {
            set_delivery_counts(status, counts, &[], 1, now);
            condition(status)
        };
        // Images still processed: every event so far sent, but more come.
        let mut status = ImageGroupStatus {
            phase: GroupPhase::Running,
            ..ImageGroupStatus::default()
        };
        let delivering = ("False".to_owned(), "Delivering".to_owned());
        assert_eq!(
            settle(&mut status, &[count(DeliveryState::Delivered, 5)]),
            delivering
        );
        status.phase = GroupPhase::Completed;
        assert_eq!(
            settle(&mut status, &[count(DeliveryState::Pending, 1)]),
            delivering
        );
        assert_eq!(
            settle(&mut status, &[count(DeliveryState::Delivered, 6)]),
            ("True".into(), "AllDelivered".into())
        );
        let settled = [
            count(DeliveryState::Delivered, 5),
            count(DeliveryState::Failed, 1),
        ];
        assert_eq!(
            settle(&mut status, &settled),
            ("True".into(), "SomeFailed".into())
        );
    }

    #[test]
    fn the_status_counts_deliveries_per_endpoint_and_lists_the_newest_failures() {
        let endpoints = [endpoint("request"), endpoint("subscription/s")];
        let g = group(30, &["a"], 1);
        let now = jiff::Timestamp::now();
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(30),
            &endpoints,
            false,
            now,
        );
        for d in deliveries.iter_mut() {
            d.state = match (d.endpoint.as_str(), d.sequence % 3) {
                ("request", _) => DeliveryState::Delivered,
                (_, 0) => DeliveryState::Pending,
                _ => DeliveryState::Failed,
            };
        }
        set_delivery_condition(&mut status, &deliveries, 1, now);
        let counts: Vec<_> = status
            .deliveries
            .iter()
            .map(|c| (c.endpoint.as_str(), c.delivered, c.pending, c.failed))
            .collect();
        assert_eq!(
            counts,
            [("request", 30, 0, 0), ("subscription/s", 0, 10, 20)]
        );
        assert_eq!(status.recent_failures.len(), MAX_RECENT_FAILURES);
        let newest = deliveries
            .iter()
            .filter(|d| d.state == DeliveryState::Failed)
            .map(|d| d.sequence)
            .max();
        let first = &status.recent_failures[0];
        let first_seq = deliveries
            .iter()
            .find(|d| d.id == first.id)
            .map(|d| d.sequence);
        assert_eq!(first_seq, newest, "newest first");
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == "WebhooksDelivered")
            .expect("condition");
        assert_eq!(condition.message, "30 delivered, 10 pending, 20 failed");
    }

    #[test]
    fn a_sick_endpoint_holds_back_only_its_own_group_event() {
        let endpoints = [endpoint("request"), endpoint("subscription/sick")];
        let g = group(2, &["a"], 1);
        let now = jiff::Timestamp::now();
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &endpoints,
            true,
            now,
        );
        for d in deliveries.iter_mut().filter(|d| d.endpoint == "request") {
            d.state = DeliveryState::Delivered;
        }
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &endpoints,
            true,
            now,
        );
        let group_events = |d: &[Delivery]| -> Vec<(String, u64)> {
            d.iter()
                .filter(|d| d.event == GROUP_COMPLETED)
                .map(|d| (d.endpoint.clone(), d.sequence))
                .collect()
        };
        let first = group_events(&deliveries);
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(first[0].0, "request");

        // The sick endpoint's image events settle (failed for good): its group event
        // follows, as the same event (one sequence number).
        for d in deliveries
            .iter_mut()
            .filter(|d| d.state == DeliveryState::Pending)
        {
            d.state = DeliveryState::Failed;
        }
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(2),
            &endpoints,
            true,
            now,
        );
        let both = group_events(&deliveries);
        assert_eq!(both.len(), 2, "{both:?}");
        assert_eq!(both[0].1, both[1].1);
    }

    #[test]
    fn a_410_stops_the_endpoint_at_its_url_only() {
        let g = group(1, &["a"], 1);
        let now = jiff::Timestamp::now();
        let gone = endpoint("subscription/s");
        let mut status = ImageGroupStatus {
            stopped_endpoints: vec![gone.stop_mark()],
            ..ImageGroupStatus::default()
        };
        let mut deliveries: Vec<Delivery> = Vec::new();
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(1),
            std::slice::from_ref(&gone),
            false,
            now,
        );
        assert!(deliveries.is_empty(), "{deliveries:#?}");
        // The subscription's URL is corrected: it is sent to again.
        let corrected = Endpoint {
            url: "https://hooks.example/v2".to_owned(),
            ..gone
        };
        plan(
            &g,
            &mut status,
            &mut deliveries,
            &results(1),
            &[corrected],
            false,
            now,
        );
        assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
    }

    #[test]
    fn an_events_body_is_fixed_when_it_is_recorded_once_for_all_its_endpoints() {
        let endpoints = [
            endpoint("request"),
            endpoint("subscription/a"),
            endpoint("subscription/b"),
        ];
        let g = group(1, &["a"], 1);
        let now = jiff::Timestamp::now();
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let before = results(1);
        let bodies = plan(
            &g,
            &mut status,
            &mut deliveries,
            &before,
            &endpoints,
            false,
            now,
        );
        // One event to three endpoints: three deliveries, one sequence, one body.
        assert_eq!(deliveries.len(), 3);
        assert!(
            deliveries
                .iter()
                .all(|d| d.sequence == deliveries[0].sequence)
        );
        assert_eq!(bodies.len(), 1);
        let body = bodies[&deliveries[0].sequence].clone();
        assert_eq!(
            body["data"]["failure"]["reason"], "DownloadFailed",
            "{body}"
        );
        assert_eq!(body["data"]["sequence"], deliveries[0].sequence);

        // The stored result changes later (say, a later Job's write): the recorded event
        // keeps the body it was recorded with, and planning again changes nothing.
        let mut after = results(1);
        if let Some(r) = after.get_mut("img-0") {
            r.failure = Some(crate::results::ImageFailure {
                reason: "Other".into(),
                message: "changed".into(),
            });
        }
        let again = plan(
            &g,
            &mut status,
            &mut deliveries,
            &after,
            &endpoints,
            false,
            now,
        );
        assert_eq!(deliveries.len(), 3);
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_write_of_results_drafts_the_events_ids_and_bodies_the_plan_would_make() {
        let mut only_groups = endpoint("subscription/groups");
        only_groups.event_types = vec![GROUP_COMPLETED.to_owned()];
        let stopped = endpoint("subscription/gone");
        let endpoints = [
            endpoint("request"),
            endpoint("subscription/a"),
            only_groups,
            stopped.clone(),
        ];
        let g = group(3, &["a"], 1);
        let now = jiff::Timestamp::now();
        let mut results = results(3);
        // img-2 has a result, but not for model "a": no event yet.
        if let Some(r) = results.get_mut("img-2") {
            r.failure = None;
        }
        let mut status = ImageGroupStatus {
            stopped_endpoints: vec![stopped.stop_mark()],
            ..ImageGroupStatus::default()
        };
        let mut planned: Vec<Delivery> = Vec::new();
        let bodies = plan(
            &g,
            &mut status,
            &mut planned,
            &results,
            &endpoints,
            false,
            now,
        );

        let stored: Vec<ImageResult> = ["img-0", "img-1", "img-2"]
            .iter()
            .filter_map(|id| results.get(*id).cloned())
            .collect();
        let ledger = EventLedger {
            endpoints: serde_json::to_value(&endpoints).expect("records"),
            stopped: status.stopped_endpoints.clone(),
        };
        let writer = ImageEvents::new(std::sync::Arc::new(g.clone()));
        let drafts = writer.image_events(&stored, &ledger);
        let mut drafted: Vec<(String, String, String)> = drafts
            .iter()
            .flat_map(|d| {
                d.deliveries
                    .iter()
                    .map(|(endpoint, id)| (d.image_id.clone(), endpoint.clone(), id.clone()))
            })
            .collect();
        let mut expected: Vec<(String, String, String)> = planned
            .iter()
            .map(|d| {
                let image = d.image_id.clone().unwrap_or_default();
                (image, d.endpoint.clone(), d.id.clone())
            })
            .collect();
        expected.sort();
        drafted.sort();
        // Two images to the two endpoints that take image events and are not stopped.
        assert_eq!(drafted, expected);
        assert_eq!(expected.len(), 4, "{expected:?}");
        // Numbered the same, an event's body is the plan's to the byte.
        for draft in &drafts {
            let sequence = planned
                .iter()
                .find(|d| d.image_id.as_deref() == Some(draft.image_id.as_str()))
                .map(|d| d.sequence)
                .expect("planned");
            let body = writer.body(draft, &stored[draft.result], sequence, now);
            assert_eq!(body.as_ref(), bodies.get(&sequence), "{}", draft.image_id);
        }
        // Records it cannot read plan nothing (the group's plan records them again).
        let unreadable = EventLedger {
            endpoints: serde_json::json!({"not": "a list"}),
            stopped: Vec::new(),
        };
        assert!(writer.image_events(&stored, &unreadable).is_empty());
    }

    #[test]
    fn repeated_updates_do_not_grow_the_status() {
        let endpoints = [endpoint("request"), endpoint("subscription/s")];
        let results = results(200);
        let now = jiff::Timestamp::now();
        let mut status = ImageGroupStatus::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut models = vec!["m0".to_owned()];
        for generation in 1..=5 {
            let refs: Vec<&str> = models.iter().map(String::as_str).collect();
            let g = group(200, &refs, generation);
            plan(
                &g,
                &mut status,
                &mut deliveries,
                &results,
                &endpoints,
                true,
                now,
            );
            settle(&mut deliveries, DeliveryState::Delivered);
            plan(
                &g,
                &mut status,
                &mut deliveries,
                &results,
                &endpoints,
                true,
                now,
            );
            settle(&mut deliveries, DeliveryState::Delivered);
            models.push(format!("m{generation}"));
        }
        // 200 images x 2 endpoints, plus one group event per generation and endpoint.
        assert_eq!(deliveries.len(), 200 * 2 + 5 * 2);
    }
}
