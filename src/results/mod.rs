//! The result path, behind one narrow interface: the worker writes an image's results,
//! the controller reads a group's. Today they are `ImageResult` objects in the API server
//! (they survive restarts and need no other network path); at large scale a database-backed
//! store replaces this module, and nothing outside it names `ImageResult` but the
//! controller's watch on it.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::{GROUP_LABEL, ImageGroup, ImageResult, ImageResultSpec};

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("result store unavailable: {0}")]
    Unavailable(#[source] kube::Error),
}

impl ResultsError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "result_store_unavailable",
        }
    }
}

/// The group results belong to: enough to name and own them.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// How fresh a read of results must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// From the API server's watch cache (`resourceVersion=0`): no etcd read, and no
    /// decoding of every result in the namespace. It may trail the latest writes a little,
    /// which only delays what a reconcile sees: results are only ever added to, and each
    /// write triggers a reconcile of its own. With several API servers a later read can
    /// even be older than an earlier one; callers must not act on what a read lacks.
    /// (`NotOlderThan` an earlier list's version would prevent that, but a 1.20 watch cache
    /// only advances with events of its own resource, so such reads can stall.)
    Cached,
    /// A quorum read: for decisions that must not miss a result just written.
    Latest,
}

#[derive(Clone)]
pub struct ResultStore {
    client: Client,
}

impl ResultStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Stores one image's results; outputs of models run earlier for the same image are kept
    /// (a group that gains models later re-runs only the new ones).
    pub async fn write(
        &self,
        group: &GroupRef,
        spec: &ImageResultSpec,
    ) -> Result<(), ResultsError> {
        let api: Api<ImageResult> = Api::namespaced(self.client.clone(), &group.namespace);
        let name = result_name(&group.name, &spec.image_id);
        let object = ImageResult {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(group.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (GROUP_LABEL.to_owned(), label_value(&group.name)),
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        "kinsight".to_owned(),
                    ),
                ])),
                owner_references: Some(vec![OwnerReference {
                    api_version: ImageGroup::api_version(&()).into_owned(),
                    kind: ImageGroup::kind(&()).into_owned(),
                    name: group.name.clone(),
                    uid: group.uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: Some(false),
                }]),
                ..ObjectMeta::default()
            },
            spec: spec.clone(),
        };
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // A JSON merge patch adds the new models' outputs next to the old ones.
                let patch = serde_json::json!({ "spec": spec });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(ResultsError::Unavailable)
            }
            Err(e) => Err(ResultsError::Unavailable(e)),
        }
    }

    /// Every stored result of a group, by image id.
    pub async fn list(
        &self,
        namespace: &str,
        group: &str,
        freshness: Freshness,
    ) -> Result<HashMap<String, ImageResultSpec>, ResultsError> {
        let api: Api<ImageResult> = Api::namespaced(self.client.clone(), namespace);
        let selector = format!("{GROUP_LABEL}={}", label_value(group));
        let params = ListParams::default().labels(&selector);
        let params = match freshness {
            Freshness::Cached => params.match_any(),
            Freshness::Latest => params,
        };
        let list = api.list(&params).await.map_err(ResultsError::Unavailable)?;
        Ok(list
            .items
            .into_iter()
            .map(|r| r.spec)
            .filter(|spec| spec.group == group)
            .map(|spec| (spec.image_id.clone(), spec))
            .collect())
    }

    /// A group's results, for reads as frequent as polls and reconciles: from the watch
    /// cache, unless that view has fewer finished images than the group's status (read
    /// from etcd) already counts for this generation, as a cache that trails (another API
    /// server, a new leader) would; then from etcd. So what was counted or announced never
    /// goes missing from a later read, and counts never go back.
    pub async fn list_not_behind(
        &self,
        group: &ImageGroup,
    ) -> Result<HashMap<String, ImageResultSpec>, ResultsError> {
        let namespace = group.namespace().unwrap_or_default();
        let name = group.name_any();
        let results = self.list(&namespace, &name, Freshness::Cached).await?;
        if !lags_status(group, &results) {
            return Ok(results);
        }
        self.list(&namespace, &name, Freshness::Latest).await
    }
}

/// Whether fewer images are finished in `results` than the group's status counts for the
/// group's current generation (a status of an earlier one counted with other models).
fn lags_status(group: &ImageGroup, results: &HashMap<String, ImageResultSpec>) -> bool {
    let Some(status) = &group.status else {
        return false;
    };
    if status.observed_generation != group.metadata.generation {
        return false;
    }
    let models = &group.spec.models;
    let in_view = results.values().filter(|r| r.covers(models)).count();
    u32::try_from(in_view).unwrap_or(u32::MAX) < status.images_done
}

/// Object name of an image's result: readable when it fits, hashed when it would not.
pub fn result_name(group: &str, image_id: &str) -> String {
    let name = format!("{group}-{image_id}");
    if name.len() <= 253 {
        return name;
    }
    let digest = hex::encode(Sha256::digest(name.as_bytes()));
    format!("{}-{}", &group[..group.len().min(200)], &digest[..16])
}

/// Label values are limited to 63 characters; long group names are hashed.
pub fn label_value(group: &str) -> String {
    if group.len() <= 63 {
        return group.to_owned();
    }
    let digest = hex::encode(Sha256::digest(group.as_bytes()));
    format!("{}-{}", &group[..46], &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ImageGroupSpec, ImageGroupStatus};

    fn failed(id: &str) -> (String, ImageResultSpec) {
        let result = ImageResultSpec::failed("g", id, "DownloadFailed", "HTTP 404".into());
        (id.to_owned(), result)
    }

    #[test]
    fn a_cached_view_with_fewer_finished_images_than_the_status_counts_lags() {
        let spec = ImageGroupSpec {
            images: Vec::new(),
            models: vec!["object_detection".into()],
            webhook: None,
            metadata: BTreeMap::new(),
        };
        let mut group = ImageGroup::new("g", spec);
        group.metadata.generation = Some(2);
        let view: HashMap<_, _> = [failed("a")].into_iter().collect();
        assert!(!lags_status(&group, &view), "no status yet");
        group.status = Some(ImageGroupStatus {
            images_done: 2,
            observed_generation: Some(2),
            ..ImageGroupStatus::default()
        });
        assert!(lags_status(&group, &view));
        let view: HashMap<_, _> = [failed("a"), failed("b")].into_iter().collect();
        assert!(!lags_status(&group, &view));
        // Counted for generation 1, with other models: no measure of this view.
        let view: HashMap<_, _> = [failed("a")].into_iter().collect();
        group.metadata.generation = Some(3);
        assert!(!lags_status(&group, &view));
    }

    #[test]
    fn names_fit_kubernetes_limits() {
        assert_eq!(result_name("grp-1", "0"), "grp-1-0");
        let long = "a".repeat(250);
        assert!(result_name(&long, "img-1").len() <= 253);
        assert_ne!(result_name(&long, "img-1"), result_name(&long, "img-2"));
        assert_eq!(label_value("g"), "g");
        assert_eq!(label_value(&"b".repeat(100)).len(), 63);
    }
}
