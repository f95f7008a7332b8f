//! Installing kinsight into a cluster the way `kinsight dev`, the demo and the tests need
//! it: the CRDs, and a tenant (namespace, API key, webhook signing secret).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::conditions;
use kube::runtime::wait::await_condition;
use kube::{Api, Client, ResourceExt};

use crate::api::{
    API_KEY_LABEL, KEY_HASH_FIELD, SIGNING_SECRET_KEY, SIGNING_SECRET_NAME, TENANT_NAMESPACE_FIELD,
    hash_key,
};
use crate::crd::all_crds;
use crate::tenancy::{SIGNING_LABEL, TENANT_LABEL};

const MANAGER: &str = "kinsight-setup";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("CRD {0} did not become established in time")]
    NotEstablished(String),
    #[error("building the request for the OpenAPI document: {0}")]
    Request(#[from] http::Error),
}

/// How long [`await_crds_published`] waits for the API server's OpenAPI document.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

/// Applies every CRD (server-side apply) and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> Result<(), SetupError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in all_crds() {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .map_err(|_| SetupError::NotEstablished(name.clone()))?
            .map_err(|_| SetupError::NotEstablished(name))?;
    }
    Ok(())
}

/// The name the API server's OpenAPI v2 document gives a CRD's served type
/// (`io.kinsight.v1alpha1.ImageGroup`): its group reversed, the version, the kind.
fn definition_names(crd: &CustomResourceDefinition) -> Vec<String> {
    let group: Vec<&str> = crd.spec.group.rsplit('.').collect();
    crd.spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| format!("{}.{}.{}", group.join("."), v.name, crd.spec.names.kind))
        .collect()
}

/// Just the definitions' names of an OpenAPI v2 document (a few MB: the rest is skipped).
#[derive(serde::Deserialize)]
struct Definitions {
    #[serde(default)]
    definitions: BTreeMap<String, serde::de::IgnoredAny>,
}

/// Waits until the API server's OpenAPI document describes every CRD (what `kubectl
/// explain` and kubectl's validation read), at most [`PUBLISH_WAIT`]; false when it still
/// does not. Established CRDs serve at once, but the API server rebuilds its whole document
/// (a few MB, about a CPU second on a laptop) in the seconds after: waited for here, that
/// work is done before `dev` says it is ready, not on the first group's cores.
pub async fn await_crds_published(client: &Client) -> Result<bool, SetupError> {
    let wanted: Vec<String> = all_crds().iter().flat_map(definition_names).collect();
    let deadline = tokio::time::Instant::now() + PUBLISH_WAIT;
    loop {
        let request = http::Request::get("/openapi/v2")
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())?;
        let document: Definitions = client.request(request).await?;
        if wanted
            .iter()
            .all(|name| document.definitions.contains_key(name))
        {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn ensure_namespace(client: &Client, name: &str) -> Result<(), SetupError> {
    apply_namespace(client, name, None).await
}

async fn apply_namespace(
    client: &Client,
    name: &str,
    labels: Option<BTreeMap<String, String>>,
) -> Result<(), SetupError> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels,
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&ns),
        )
        .await?;
    Ok(())
}

/// A tenant: its namespace, its API key (stored hashed in `keys_namespace`) and its
/// webhook signing secret (in its own namespace, where the controller reads it).
pub async fn create_tenant(
    client: &Client,
    keys_namespace: &str,
    tenant_namespace: &str,
    api_key: &str,
    webhook_secret: &str,
) -> Result<(), SetupError> {
    create_tenant_labelled(
        client,
        keys_namespace,
        tenant_namespace,
        api_key,
        webhook_secret,
        true,
    )
    .await
}

/// [`create_tenant`]; `labelled`: the namespace also carries the tenant label, so it stays
/// a tenant without its key record. Unlabelled, it is a tenant only for the controllers
/// that read `keys_namespace` (tests sharing one cluster keep apart this way).
pub async fn create_tenant_labelled(
    client: &Client,
    keys_namespace: &str,
    tenant_namespace: &str,
    api_key: &str,
    webhook_secret: &str,
    labelled: bool,
) -> Result<(), SetupError> {
    ensure_namespace(client, keys_namespace).await?;
    let labels = labelled.then(|| BTreeMap::from([(TENANT_LABEL.to_owned(), "true".to_owned())]));
    apply_namespace(client, tenant_namespace, labels).await?;
    let params = PatchParams::apply(MANAGER).force();
    let key_name = format!("tenant-{tenant_namespace}");
    let key_secret = Secret {
        metadata: ObjectMeta {
            name: Some(key_name.clone()),
            namespace: Some(keys_namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                API_KEY_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                KEY_HASH_FIELD.to_owned(),
                ByteString(hash_key(api_key).into_bytes()),
            ),
            (
                TENANT_NAMESPACE_FIELD.to_owned(),
                ByteString(tenant_namespace.as_bytes().to_vec()),
            ),
        ])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), keys_namespace)
        .patch(&key_name, &params, &Patch::Apply(&key_secret))
        .await?;
    let signing = Secret {
        metadata: ObjectMeta {
            name: Some(SIGNING_SECRET_NAME.to_owned()),
            namespace: Some(tenant_namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                SIGNING_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            SIGNING_SECRET_KEY.to_owned(),
            ByteString(webhook_secret.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), tenant_namespace)
        .patch(SIGNING_SECRET_NAME, &params, &Patch::Apply(&signing))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_names_are_the_openapi_documents() {
        let names: Vec<String> = all_crds().iter().flat_map(definition_names).collect();
        assert_eq!(
            names,
            [
                "io.kinsight.v1alpha1.ImageGroup",
                "io.kinsight.v1alpha1.WebhookSubscription"
            ]
        );
    }
}
