//! `ImageGroup`: images plus the models to run on them; a single image is a group of one.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::delivery::{Delivery, DeliveryState};

/// Bounds that keep one group (and its status) well inside etcd's object size limit.
pub const MAX_IMAGES: usize = 10_000;
pub const MAX_MODELS: usize = 16;
pub const MAX_METADATA_KEYS: usize = 50;
pub const MAX_METADATA_KEY_LEN: usize = 40;
pub const MAX_METADATA_VALUE_LEN: usize = 500;
pub const MAX_URL_LEN: usize = 2048;
/// All of a group's image URLs together, at most: the group's object holds them, and so do
/// its worker Jobs' work orders (ConfigMaps, at most 1 MiB each).
pub const MAX_GROUP_URL_BYTES: usize = 768 * 1024;
/// The whole spec as JSON, at most, as the REST API takes it: the object (spec, status and
/// metadata) must stay within etcd's 1.5 MiB (the API server refuses bigger ones), with room
/// for the status.
pub const MAX_SPEC_BYTES: usize = 1280 * 1024;
/// What the CRD schema checks of an image id and a URL, so the API server refuses what
/// [`ImageGroupSpec::validate`] would (an id is a DNS label of at most 40; a URL's scheme is
/// http or https, in any case); the controller checks the rest and reports it in status.
pub const IMAGE_ID_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
pub const HTTP_URL_PATTERN: &str = "^[hH][tT][tT][pP][sS]?://";
/// A model name as the catalog takes it; which names exist is the catalog's (the controller
/// checks that), so the schema has no enum of them.
pub const MODEL_NAME_PATTERN: &str = "^[a-z][a-z0-9_-]*$";
/// What Kubernetes takes as a Secret's name (a DNS subdomain) and as a key in its data.
pub const SECRET_NAME_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
pub const SECRET_KEY_PATTERN: &str = "^[-._a-zA-Z0-9]+$";
/// Failed deliveries a group's status lists, at most.
pub const MAX_RECENT_FAILURES: usize = 10;

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kinsight.io",
    version = "v1alpha1",
    kind = "ImageGroup",
    namespaced,
    status = "ImageGroupStatus",
    shortname = "ig",
    category = "kinsight",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Scheduled","type":"string","jsonPath":".status.conditions[?(@.type==\"Scheduled\")].reason"}"#,
    printcolumn = r#"{"name":"Queue","type":"string","jsonPath":".status.conditions[?(@.type==\"Scheduled\")].message","priority":1}"#,
    printcolumn = r#"{"name":"Done","type":"integer","jsonPath":".status.imagesDone"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.imagesTotal"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.imagesFailed","priority":1}"#,
    printcolumn = r#"{"name":"Models","type":"string","jsonPath":".spec.models","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageGroupSpec {
    /// The images to analyse (at most 10,000; the REST API takes a spec of at most 1.25 MiB).
    #[schemars(length(min = 1, max = MAX_IMAGES))]
    pub images: Vec<ImageEntry>,
    /// Catalog names of the models to run on every image, e.g. `object_detection`.
    /// Each once (the API server refuses a name listed twice).
    #[schemars(
        length(min = 1, max = MAX_MODELS),
        inner(length(min = 1, max = 63), regex(pattern = MODEL_NAME_PATTERN)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub models: Vec<String>,
    /// Where to push this group's events, besides the namespace's WebhookSubscriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookTarget>,
    /// The customer's own key/value data, returned with every event.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAX_METADATA_KEYS,
        "additionalProperties" = { "type": "string", "maxLength": MAX_METADATA_VALUE_LEN }
    ))]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageEntry {
    /// Stable id of the image inside its group (lowercase letters, digits and '-');
    /// defaults to its position ("0", "1", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 40), regex(pattern = IMAGE_ID_PATTERN))]
    pub id: Option<String>,
    /// http(s) URL the worker downloads the image from.
    #[schemars(length(min = 1, max = MAX_URL_LEN), regex(pattern = HTTP_URL_PATTERN))]
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAX_METADATA_KEYS,
        "additionalProperties" = { "type": "string", "maxLength": MAX_METADATA_VALUE_LEN }
    ))]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookTarget {
    #[schemars(length(min = 1, max = MAX_URL_LEN), regex(pattern = HTTP_URL_PATTERN))]
    pub url: String,
    /// The Secret key holding the `whsec_...` signing secret.
    pub secret_ref: SecretKeyRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: GroupPhase,
    #[serde(default)]
    pub images_total: u32,
    #[serde(default)]
    pub images_done: u32,
    #[serde(default)]
    pub images_failed: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The worker Jobs started for this group, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<Aggregate>,
    /// Webhook deliveries per endpoint, counted (each delivery, with its attempts, is a
    /// row in the database: `GET /v1/image-groups/{id}/deliveries`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<EndpointDeliveries>,
    /// The last few deliveries that failed for good (at most
    /// [`MAX_RECENT_FAILURES`]), newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_failures: Vec<FailedDelivery>,
    /// Endpoints that answered 410 Gone (`<endpoint> <URL>`): nothing more is sent there
    /// for this group while the endpoint has that URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopped_endpoints: Vec<String>,
    /// The last replay request (annotation `kinsight.io/replay`) carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replay: Option<String>,
    /// Last per-group event sequence number handed out.
    #[serde(default)]
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GroupPhase {
    #[default]
    Pending,
    Running,
    Completed,
    Failed,
}

impl GroupPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
        }
    }
}

/// What the group's images contain, across the group.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Aggregate {
    /// Objects found by detection models, most frequent first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<ObjectCount>,
    /// Top-1 labels of classification models, most frequent first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassCount>,
    /// What a listing platform asks of the group's photos (see the README, "Listing summary").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing: Option<Listing>,
}

/// The listing view of a group: bounded whatever the group's size (counts, and lists capped
/// at [`MAX_LISTED`] entries); per-image details stay in image events.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// Photos analysed (finished and not failed).
    pub photos: u32,
    /// Photos that failed (download, truncated, corrupt, ...).
    pub failed: u32,
    /// Per `photo_quality` flag (`blurry`, `dark`, ...), the photos raising it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quality_flags: Vec<FlaggedPhotos>,
    pub duplicates: DuplicateSummary,
    /// Per content flag raised by a model (e.g. `nsfw` of `content_safety`), the photos.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flagged_content: Vec<FlaggedPhotos>,
    pub objects_per_photo: ObjectsPerPhoto,
    /// The suggested cover photo; `None` when no photo qualifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cover: Option<Cover>,
}

/// Lists in [`Listing`] name at most this many photos (or sets); counts cover all.
pub const MAX_LISTED: usize = 10;

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlaggedPhotos {
    pub flag: String,
    /// Photos with the flag.
    pub count: u32,
    /// The first of them by image id, at most [`MAX_LISTED`].
    pub image_ids: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DuplicateSummary {
    /// The Hamming distance (of 64 bits) at or under which two photos are near-duplicates.
    pub max_distance: u32,
    /// Sets of near-duplicates (two photos or more).
    pub set_count: u32,
    /// Photos in those sets.
    pub photos: u32,
    /// The first sets (by their first image id), at most [`MAX_LISTED`], each naming at most
    /// [`MAX_LISTED`] image ids, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<Vec<String>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectsPerPhoto {
    /// Photos with at least one detected object.
    pub photos_with_objects: u32,
    /// The first such photos by image id, at most [`MAX_LISTED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub photos: Vec<PhotoObjects>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhotoObjects {
    pub image_id: String,
    /// Objects by label, most frequent first, at most [`MAX_LISTED`] labels.
    pub objects: Vec<LabelCount>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelCount {
    pub label: String,
    pub count: u32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cover {
    pub image_id: String,
    /// Its `photo_quality` score, when that analyser ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality_score: Option<f32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectCount {
    pub label: String,
    /// Detections across the group.
    pub count: u32,
    /// Images with at least one such detection.
    pub images: u32,
    pub best_confidence: f32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassCount {
    pub model: String,
    pub label: String,
    pub images: u32,
    pub best_confidence: f32,
}

/// Where a group's webhook deliveries stand at one endpoint (the deliveries themselves and
/// their attempts are in the database).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDeliveries {
    /// `request` (the group's own webhook) or `subscription/<name>`.
    pub endpoint: String,
    pub pending: u32,
    pub delivered: u32,
    pub failed: u32,
}

/// A delivery that failed for good, as `kubectl describe` shows it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedDelivery {
    /// The `webhook-id`, for a replay.
    pub id: String,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    pub endpoint: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Annotation on a tenant's namespace: how long its finished groups (their results,
/// deliveries and attempts) are kept, e.g. `30d`, instead of the controller's `--group-ttl`.
pub const RETENTION_ANNOTATION: &str = "kinsight.io/group-ttl";

/// Annotation through which the API (or a user with kubectl) asks the controller to send
/// failed events again; the controller owns status, so requests travel in metadata.
pub const REPLAY_ANNOTATION: &str = "kinsight.io/replay";

/// The value of [`REPLAY_ANNOTATION`].
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplayRequest {
    /// Unique per request, so each is carried out once.
    pub request: String,
    /// Replay these deliveries (by `webhook-id`)...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// ...and/or every failed delivery of events recorded since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<jiff::Timestamp>,
}

impl ReplayRequest {
    /// Whether this request sends `delivery` again: only failed ones are replayed.
    pub fn selects(&self, delivery: &Delivery) -> bool {
        delivery.state == DeliveryState::Failed
            && (self.ids.contains(&delivery.id)
                || self.since.is_some_and(|since| delivery.created_at >= since))
    }

    /// This request plus one not carried out yet: what both ask for, under this one's id.
    pub fn absorb(mut self, earlier: ReplayRequest) -> ReplayRequest {
        for id in earlier.ids {
            if !self.ids.contains(&id) {
                self.ids.push(id);
            }
        }
        self.since = match (self.since, earlier.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self
    }
}

impl ImageEntry {
    /// The image's id inside the group: its own, or its position.
    pub fn key(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| index.to_string())
    }
}

impl ImageGroupSpec {
    /// Checks everything the controller and the worker rely on; `known_models` is the
    /// model catalog. The message names the offending field.
    pub fn validate(&self, known_models: &[String]) -> Result<(), String> {
        if self.images.is_empty() {
            return Err("images: at least one image is required".into());
        }
        if self.images.len() > MAX_IMAGES {
            return Err(format!(
                "images: at most {MAX_IMAGES} images per group, got {}",
                self.images.len()
            ));
        }
        if self.models.is_empty() {
            return Err("models: at least one model is required".into());
        }
        if self.models.len() > MAX_MODELS {
            return Err(format!("models: at most {MAX_MODELS} models"));
        }
        let mut seen_models = HashSet::new();
        for model in &self.models {
            if !known_models.iter().any(|m| m == model) {
                return Err(format!(
                    "models: unknown model {model:?}; available: {}",
                    known_models.join(", ")
                ));
            }
            if !seen_models.insert(model) {
                return Err(format!("models: {model:?} is listed twice"));
            }
        }
        validate_metadata("metadata", &self.metadata)?;
        let mut seen_ids = HashSet::new();
        for (i, image) in self.images.iter().enumerate() {
            let key = image.key(i);
            if !is_image_id(&key) {
                return Err(format!(
                    "images[{i}].id: {key:?} must be 1-40 lowercase letters, digits or '-', starting and ending with a letter or digit"
                ));
            }
            if !seen_ids.insert(key.clone()) {
                return Err(format!("images[{i}].id: {key:?} is used twice"));
            }
            validate_http_url(&format!("images[{i}].url"), &image.url)?;
            validate_metadata(&format!("images[{i}].metadata"), &image.metadata)?;
        }
        // As the work order will hold them: JSON escapes `\`, `"` and control characters,
        // which URL parsing lets through, to two or six bytes each.
        let url_bytes: usize = self.images.iter().map(|i| json_len(&i.url)).sum();
        if url_bytes > MAX_GROUP_URL_BYTES {
            return Err(format!(
                "images: the URLs add up to {} KiB, at most {} KiB per group; split the images into several groups",
                url_bytes.div_ceil(1024),
                MAX_GROUP_URL_BYTES / 1024
            ));
        }
        if let Some(webhook) = &self.webhook {
            validate_http_url("webhook.url", &webhook.url)?;
        }
        Ok(())
    }

    /// Refuses a spec too big to be stored with room for its status (see
    /// [`MAX_SPEC_BYTES`]); the REST API checks it before making the group.
    pub fn check_size(&self) -> Result<(), String> {
        let spec_bytes = json_size(self);
        if spec_bytes > MAX_SPEC_BYTES {
            return Err(format!(
                "the group is {} KiB as JSON, at most {} KiB (its images' URLs and metadata); split the images into several groups",
                spec_bytes.div_ceil(1024),
                MAX_SPEC_BYTES / 1024
            ));
        }
        Ok(())
    }
}

/// Bytes of `value` as compact JSON, counted without keeping them.
fn json_size(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing into a counter cannot fail; a value that cannot be written counts as too big.
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// Bytes of `text` inside a JSON string.
fn json_len(text: &str) -> usize {
    text.chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum()
}

fn is_image_id(id: &str) -> bool {
    super::is_dns_label(id, 40)
}

/// An absolute http(s) URL with a host; anything else would fail later, far from the caller.
pub fn validate_http_url(field: &str, url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("{field}: longer than {MAX_URL_LEN} characters"));
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("{field}: {url:?} is not a valid URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{field}: only http and https URLs are supported, got {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{field}: URL has no host"));
    }
    Ok(())
}

fn validate_metadata(field: &str, metadata: &BTreeMap<String, String>) -> Result<(), String> {
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(format!("{field}: at most {MAX_METADATA_KEYS} keys"));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.chars().count() > MAX_METADATA_KEY_LEN {
            return Err(format!(
                "{field}: key {key:?} must be 1-{MAX_METADATA_KEY_LEN} characters"
            ));
        }
        if value.chars().count() > MAX_METADATA_VALUE_LEN {
            return Err(format!(
                "{field}.{key}: value longer than {MAX_METADATA_VALUE_LEN} characters"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: &str, state: DeliveryState, created_second: i64) -> Delivery {
        Delivery {
            id: id.into(),
            event: "image.completed".into(),
            image_id: Some("0".into()),
            endpoint: "request".into(),
            sequence: 1,
            created_at: jiff::Timestamp::from_second(created_second).expect("time"),
            state,
            attempts: 3,
            next_attempt_at: None,
            last_error: None,
            delivered_at: None,
            payload: None,
        }
    }

    #[test]
    fn replay_requests_select_failed_deliveries_and_merge() {
        let at = |s| jiff::Timestamp::from_second(s).expect("time");
        let one = ReplayRequest {
            request: "rpl-1".into(),
            ids: vec!["a".into()],
            since: None,
        };
        assert!(one.selects(&delivery("a", DeliveryState::Failed, 10)));
        assert!(!one.selects(&delivery("a", DeliveryState::Delivered, 10)));
        assert!(!one.selects(&delivery("b", DeliveryState::Failed, 10)));
        let since = ReplayRequest {
            request: "rpl-2".into(),
            ids: vec!["b".into()],
            since: Some(at(100)),
        };
        assert!(since.selects(&delivery("c", DeliveryState::Failed, 100)));
        assert!(!since.selects(&delivery("c", DeliveryState::Failed, 99)));
        // A request not carried out yet is absorbed, not lost: both ids, the earlier time.
        let merged = since.absorb(one).absorb(ReplayRequest {
            request: "rpl-0".into(),
            ids: vec!["a".into()],
            since: Some(at(50)),
        });
        assert_eq!(merged.request, "rpl-2");
        assert_eq!(merged.ids, vec!["b".to_owned(), "a".to_owned()]);
        assert_eq!(merged.since, Some(at(50)));
    }

    fn spec(urls: &[&str]) -> ImageGroupSpec {
        ImageGroupSpec {
            images: urls
                .iter()
                .map(|u| ImageEntry {
                    id: None,
                    url: (*u).to_owned(),
                    metadata: BTreeMap::new(),
                })
                .collect(),
            models: vec!["object_detection".into()],
            webhook: None,
            metadata: BTreeMap::new(),
        }
    }

    fn known() -> Vec<String> {
        vec!["object_detection".into(), "image_classification".into()]
    }

    #[test]
    fn accepts_a_plain_group_and_defaults_ids_to_positions() {
        let s = spec(&["http://example.com/a.png", "https://example.com/b.jpg"]);
        assert_eq!(s.validate(&known()), Ok(()));
        assert_eq!(s.images[1].key(1), "1");
    }

    #[test]
    fn rejects_bad_input_with_the_field_named() {
        let mut s = spec(&["ftp://example.com/a.png"]);
        assert!(
            s.validate(&known())
                .unwrap_err()
                .starts_with("images[0].url")
        );
        s = spec(&["http://example.com/a.png"]);
        s.models = vec!["nope".into()];
        let err = s.validate(&known()).unwrap_err();
        assert!(
            err.contains("unknown model \"nope\"") && err.contains("object_detection"),
            "{err}"
        );
        s = spec(&["http://x/a", "http://x/b"]);
        s.images[0].id = Some("a".into());
        s.images[1].id = Some("a".into());
        assert!(s.validate(&known()).unwrap_err().contains("used twice"));
        s.images[1].id = Some("Bad_Id".into());
        assert!(
            s.validate(&known())
                .unwrap_err()
                .starts_with("images[1].id")
        );
        assert!(spec(&[]).validate(&known()).is_err());
        s = spec(&["not a url"]);
        assert!(s.validate(&known()).is_err());
    }

    #[test]
    fn a_group_whose_urls_would_not_fit_its_work_order_is_refused() {
        let long = format!("https://cdn.example/photo.jpg?sig={}", "s".repeat(1990));
        let fits = vec![long.as_str(); MAX_GROUP_URL_BYTES / long.len()];
        assert_eq!(spec(&fits).validate(&known()), Ok(()));
        let too_many = vec![long.as_str(); MAX_GROUP_URL_BYTES / long.len() + 1];
        let err = spec(&too_many).validate(&known()).unwrap_err();
        assert!(
            err.starts_with("images: the URLs add up to 769 KiB, at most 768 KiB"),
            "{err}"
        );
    }

    #[test]
    fn urls_count_as_the_work_order_will_hold_them() {
        // Backslashes pass URL parsing and double in JSON: 1000 such URLs are 525 KB
        // as sent and 1 MB in the work order.
        let url = format!("http://a.example/{}", "\\".repeat(508));
        assert_eq!(validate_http_url("url", &url), Ok(()));
        let urls = vec![url.as_str(); 1000];
        let err = spec(&urls).validate(&known()).unwrap_err();
        assert!(
            err.starts_with("images: the URLs add up to 1009 KiB"),
            "{err}"
        );
        for (text, json) in [("a\"b", 4), ("\u{1}", 6), ("\n", 2), ("é", 2), ("ab", 2)] {
            assert_eq!(json_len(text), json, "{text:?}");
            assert_eq!(
                json_len(text),
                serde_json::to_string(text).map_or(0, |s| s.len() - 2),
                "{text:?}"
            );
        }
    }

    #[test]
    fn ten_thousand_images_are_one_group_and_the_spec_stays_within_its_bytes() {
        let urls: Vec<String> = (0..MAX_IMAGES)
            .map(|i| format!("https://cdn.example/listing/{i}.jpg"))
            .collect();
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        assert_eq!(spec(&refs).validate(&known()), Ok(()));
        let mut more = refs.clone();
        more.push("https://cdn.example/one-more.jpg");
        let err = spec(&more).validate(&known()).unwrap_err();
        assert_eq!(err, "images: at most 10000 images per group, got 10001");
        assert_eq!(spec(&refs).check_size(), Ok(()));
        // Metadata counts too: 3,000 images with 500 bytes each are over 1.25 MiB.
        let mut heavy = spec(&refs[..3000]);
        for image in &mut heavy.images {
            image.metadata.insert("notes".into(), "n".repeat(500));
        }
        assert_eq!(heavy.validate(&known()), Ok(()));
        let err = heavy.check_size().unwrap_err();
        assert!(
            err.starts_with("the group is 16") && err.contains("KiB as JSON, at most 1280 KiB"),
            "{err}"
        );
        assert_eq!(
            json_size(&heavy),
            serde_json::to_vec(&heavy).map_or(0, |b| b.len())
        );
    }
}
