//! The custom resources kinsight serves: what users and the API create (`ImageGroup`,
//! `WebhookSubscription`). Per-image results live in the database, not here.
//! `kinsight crd` prints them; `crds/` holds the same YAML (a test keeps them equal).

mod conditions;
mod image_group;
mod names;
mod webhook_subscription;

pub use conditions::{ConditionStatus, set_condition};
pub use image_group::{
    Aggregate, ClassCount, Cover, DuplicateSummary, EndpointDeliveries, FailedDelivery,
    FlaggedPhotos, GroupPhase, ImageEntry, ImageGroup, ImageGroupSpec, ImageGroupStatus,
    LabelCount, Listing, MAX_IMAGES, MAX_LISTED, MAX_RECENT_FAILURES, ObjectCount, ObjectsPerPhoto,
    PhotoObjects, REPLAY_ANNOTATION, RETENTION_ANNOTATION, ReplayRequest, SecretKeyRef,
    WebhookTarget,
};
pub use names::{is_dns_label, is_object_name, label_value};
pub use webhook_subscription::{
    CircuitState, EndpointHealth, LastDelivery, RetryPolicy, SecretName, WebhookSubscription,
    WebhookSubscriptionSpec, WebhookSubscriptionStatus, validate_headers,
};

use kube::CustomResourceExt;

/// The API group of every kinsight resource.
pub const GROUP: &str = "kinsight.io";

/// Label put on everything kinsight creates for a group (Jobs, work orders).
pub const GROUP_LABEL: &str = "kinsight.io/group";

/// Every CRD as one multi-document YAML stream, in a stable order.
pub fn all_crds_yaml() -> Result<String, serde_yaml::Error> {
    let crds = [ImageGroup::crd(), WebhookSubscription::crd()];
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// The CRD objects, for installing them with server-side apply.
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![ImageGroup::crd(), WebhookSubscription::crd()]
}
