//! The tenant set. A namespace is a tenant when an API-key record names it
//! (`tenant-namespace` of a Secret labelled `kinsight.io/api-key=true` in the keys
//! namespace) or it carries the label [`TENANT_LABEL`]`: "true"`. The controller works only
//! there: it binds its per-tenant ClusterRole in each tenant namespace (a RoleBinding it
//! creates when the namespace becomes a tenant) and removes what it put there (that
//! RoleBinding, the worker's ServiceAccount, the catalog ConfigMap, the workers'
//! NetworkPolicy) when it stops being one. With [`TenantBindings::Preinstalled`] someone
//! else (the chart) makes those RoleBindings: the controller makes and deletes none, so it
//! needs no right to create RoleBindings anywhere, and a tenant without one waits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::api::{API_KEY_LABEL, TENANT_NAMESPACE_FIELD};
use crate::controller::STANDBY_LABEL;
use crate::crd::is_dns_label;

/// The label that makes a namespace a tenant without an API key.
pub const TENANT_LABEL: &str = "kinsight.io/tenant";
/// The RoleBinding the controller makes in each tenant namespace.
pub const TENANT_BINDING: &str = "kinsight-controller";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kinsight-controller");
const MANAGER: &str = "kinsight-controller";
/// How soon a failed binding or clean-up is tried again when nothing else happens.
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Who binds the controller's tenant ClusterRole in tenant namespaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TenantBindings {
    /// The controller, when a namespace becomes a tenant: any namespace can become one, and
    /// the controller may create RoleBindings (to its tenant role alone) in any namespace.
    #[default]
    Controller,
    /// Made beforehand by whoever installs kinsight (the chart, in the namespaces it
    /// lists): the controller may create no RoleBinding, and a tenant without one waits.
    Preinstalled,
}

/// Where the controller's identity and its tenant rights are.
#[derive(Clone, Debug)]
pub struct TenancyConfig {
    /// The namespace of the API-key records.
    pub keys_namespace: String,
    /// The ClusterRole bound in every tenant namespace (the chart's `<release>-controller-tenant`).
    pub tenant_role: String,
    /// The controller's ServiceAccount: (namespace, name).
    pub service_account: (String, String),
    /// What else goes when a tenant goes: (worker ServiceAccount, catalog ConfigMap).
    pub worker_account: String,
    pub catalog_config_map: String,
    /// The NetworkPolicy put beside worker pods in every tenant namespace (the chart's
    /// `worker.networkPolicy`); `None`: none.
    pub network_policy: Option<NetworkPolicySpec>,
    /// Who makes the RoleBinding of [`TenancyConfig::tenant_role`] in tenant namespaces.
    pub bindings: TenantBindings,
}

/// The name of the workers' NetworkPolicy in a tenant namespace.
pub const WORKER_NETWORK_POLICY: &str = "kinsight-worker";

/// A NetworkPolicy spec given as JSON or YAML (`--worker-network-policy`).
pub fn parse_network_policy(text: &str) -> Result<NetworkPolicySpec, String> {
    serde_yaml::from_str(text).map_err(|e| format!("not a NetworkPolicy spec: {e}"))
}

/// The current tenant namespaces, shared by every reconcile.
#[derive(Clone, Default)]
pub struct Tenants {
    current: Arc<RwLock<BTreeSet<String>>>,
}

impl Tenants {
    pub fn contains(&self, namespace: &str) -> bool {
        crate::sync::read(&self.current).contains(namespace)
    }

    /// The tenant namespaces now.
    pub fn namespaces(&self) -> Vec<String> {
        crate::sync::read(&self.current).iter().cloned().collect()
    }

    fn replace(&self, set: BTreeSet<String>) {
        *crate::sync::write(&self.current) = set;
    }
}

/// Why nothing happens in a namespace that is not a tenant (a condition's message). A
/// namespace that may never be one is told so, not sent to label it in vain.
pub fn not_a_tenant(config: &TenancyConfig, namespace: &str) -> String {
    if may_be_tenant(config, namespace) {
        let bound = match config.bindings {
            TenantBindings::Controller => "",
            TenantBindings::Preinstalled => {
                ", and bind kinsight's tenant role there (the chart's \
                 controller.tenantNamespaces)"
            }
        };
        return format!(
            "namespace {namespace} is not a kinsight tenant: label it {TENANT_LABEL}=true or \
             name it in an API-key record{bound}"
        );
    }
    let why = if namespace.starts_with("kube-") {
        "Kubernetes' own namespaces (kube-*)"
    } else if namespace == config.keys_namespace {
        "the namespace of the API-key records"
    } else {
        "the controller's own namespace"
    };
    format!(
        "namespace {namespace} can never be a kinsight tenant ({why} are excluded whatever \
         a label or key record says): create the resource in a tenant namespace"
    )
}

/// Whether a namespace may be a tenant at all: never Kubernetes' own (`kube-*`), nor the
/// controller's or the key records' namespace, whatever a label or a key record says.
pub fn may_be_tenant(config: &TenancyConfig, namespace: &str) -> bool {
    !namespace.starts_with("kube-")
        && namespace != config.keys_namespace
        && namespace != config.service_account.0
}

/// The tenant set that labelled namespaces and API-key records make.
pub fn tenant_set(
    config: &TenancyConfig,
    labelled: &Store<Namespace>,
    keys: &Store<Secret>,
) -> BTreeSet<String> {
    let named = keys.state().into_iter().filter_map(|secret| {
        let value = secret.data.as_ref()?.get(TENANT_NAMESPACE_FIELD)?;
        let name = std::str::from_utf8(&value.0).ok()?.trim();
        is_dns_label(name, 63).then(|| name.to_owned())
    });
    labelled
        .state()
        .into_iter()
        .map(|ns| ns.name_any())
        .chain(named)
        .filter(|namespace| {
            let allowed = may_be_tenant(config, namespace);
            if !allowed {
                tracing::warn!(
                    namespace,
                    "a system namespace cannot be a kinsight tenant; ignored"
                );
            }
            allowed
        })
        .collect()
}

/// Keeps `tenants` current, binding and unbinding the controller's tenant rights as
/// namespaces come and go; `changed` is called (after the first full listing, and after
/// every change) so the groups waiting for their namespace are looked at again. Runs until
/// the process stops.
pub async fn run(
    client: Client,
    config: TenancyConfig,
    tenants: Tenants,
    ready: tokio::sync::watch::Sender<bool>,
    changed: impl Fn(),
) {
    let (labelled, labelled_writer) = reflector::store();
    let (keys, keys_writer) = reflector::store();
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default().labels(&format!("{TENANT_LABEL}=true")),
    )
    .default_backoff()
    .reflect(labelled_writer)
    .map(|e| e.map(|e| (0, matches!(e, watcher::Event::InitDone))));
    let key_records = watcher(
        Api::<Secret>::namespaced(client.clone(), &config.keys_namespace),
        watcher::Config::default().labels(&format!("{API_KEY_LABEL}=true")),
    )
    .default_backoff()
    .reflect(keys_writer)
    .map(|e| e.map(|e| (1, matches!(e, watcher::Event::InitDone))));
    let mut events = std::pin::pin!(futures::stream::select(namespaces, key_records));
    let mut listed = [false, false];
    // What was a tenant before: where this controller's RoleBindings are (a tenant that
    // went while no controller ran is found so).
    let mut before = bound_namespaces(&client, &config)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing the controller's tenant RoleBindings");
            BTreeSet::new()
        });
    let mut first = true;
    // Namespaces whose binding or clean-up failed: tried again at the next event, or after
    // RETRY_EVERY without one.
    let mut unsettled: BTreeSet<String> = BTreeSet::new();
    // Tenants without their preinstalled binding: left out of `tenants` until it comes.
    let mut unbound: BTreeSet<String> = BTreeSet::new();
    loop {
        match tokio::time::timeout(RETRY_EVERY, events.next()).await {
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "watching tenants");
                continue;
            }
            Ok(Some(Ok((which, init_done)))) => listed[which] |= init_done,
            Err(_) if unsettled.is_empty() => continue,
            Err(_) => {}
        }
        if !listed.iter().all(|l| *l) {
            continue;
        }
        let now = tenant_set(&config, &labelled, &keys);
        let retried = std::mem::take(&mut unsettled);
        if !first && now == before && retried.is_empty() {
            continue;
        }
        // At the first listing every tenant is bound again (it costs one apply each).
        let newcomers = if first {
            now.clone()
        } else {
            now.difference(&before).cloned().collect()
        };
        for namespace in newcomers
            .iter()
            .chain(retried.iter().filter(|n| now.contains(*n)))
        {
            match bind(&client, &config, namespace).await {
                Ok(()) => {
                    unbound.remove(namespace);
                }
                Err(BindError::NotBound) => {
                    // Said once; looked at again every RETRY_EVERY.
                    if unbound.insert(namespace.clone()) {
                        tracing::warn!(namespace, error = %BindError::NotBound, "a tenant waits for its binding");
                    }
                    unsettled.insert(namespace.clone());
                }
                Err(e) => {
                    tracing::warn!(namespace, error = %e, "binding the controller's tenant role");
                    unsettled.insert(namespace.clone());
                }
            }
        }
        unbound.retain(|n| now.contains(n));
        tenants.replace(now.difference(&unbound).cloned().collect());
        let leavers = before.difference(&now).cloned().collect::<BTreeSet<_>>();
        for namespace in leavers
            .iter()
            .chain(retried.iter().filter(|n| !now.contains(*n)))
        {
            match unbind(&client, &config, namespace).await {
                Ok(()) => tracing::info!(
                    namespace,
                    "no longer a tenant: worker identity, catalog and RoleBinding removed"
                ),
                Err(e) => {
                    tracing::warn!(namespace, error = %e, "removing a former tenant's objects");
                    unsettled.insert(namespace.clone());
                }
            }
        }
        before = now;
        if first {
            let _ = ready.send(true);
            first = false;
        }
        changed();
    }
}

/// Removes what controllers made in every tenant namespace (each one's worker
/// ServiceAccount, catalog ConfigMap, workers' NetworkPolicy and, last, the controller's
/// RoleBinding): the chart's uninstall runs it before the controllers go, since objects in
/// other namespaces are nothing Helm made. Returns the namespaces cleaned; stops at the
/// first that fails (run it again: what is gone stays gone).
pub async fn remove_all(
    client: &Client,
    config: &TenancyConfig,
) -> Result<Vec<String>, kube::Error> {
    let mut cleaned = Vec::new();
    for namespace in bound_namespaces(client, config).await? {
        unbind(client, config, &namespace).await?;
        cleaned.push(namespace);
    }
    Ok(cleaned)
}

fn managed() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())])
}

/// Namespaces holding this controller's tenant RoleBinding: one binding its own
/// ServiceAccount, not another installation's in the same cluster.
async fn bound_namespaces(
    client: &Client,
    config: &TenancyConfig,
) -> Result<BTreeSet<String>, kube::Error> {
    let mut params = ListParams::default().fields(&format!("metadata.name={TENANT_BINDING}"));
    // Preinstalled bindings carry their maker's labels, not the controller's.
    if config.bindings == TenantBindings::Controller {
        params = params.labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    }
    let bindings = Api::<RoleBinding>::all(client.clone())
        .list(&params)
        .await?;
    Ok(bindings
        .items
        .iter()
        .filter(|b| binds_tenant_role(config, b))
        .filter_map(|b| b.namespace())
        .collect())
}

/// The RoleBinding that gives the controller its tenant rights in `namespace`.
pub fn tenant_binding(config: &TenancyConfig, namespace: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(TENANT_BINDING.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: config.tenant_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: config.service_account.1.clone(),
            namespace: Some(config.service_account.0.clone()),
            ..Subject::default()
        }]),
    }
}

/// Why a tenant namespace has no tenant rights yet.
#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// [`TenantBindings::Preinstalled`] and no RoleBinding of the tenant role to the
    /// controller there.
    #[error(
        "the controller's tenant role is not bound in this namespace, and with preinstalled \
         bindings the controller makes none (the chart binds it in the namespaces of \
         controller.tenantNamespaces)"
    )]
    NotBound,
}

/// Whether `binding` gives the controller its tenant role.
fn binds_tenant_role(config: &TenancyConfig, binding: &RoleBinding) -> bool {
    let (account_namespace, account) = &config.service_account;
    binding.role_ref.kind == "ClusterRole"
        && binding.role_ref.name == config.tenant_role
        && binding.subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && &s.name == account
                && s.namespace.as_ref() == Some(account_namespace)
        })
}

async fn bind(client: &Client, config: &TenancyConfig, namespace: &str) -> Result<(), BindError> {
    let params = PatchParams::apply(MANAGER).force();
    let bindings = Api::<RoleBinding>::namespaced(client.clone(), namespace);
    match config.bindings {
        TenantBindings::Controller => {
            bindings
                .patch(
                    TENANT_BINDING,
                    &params,
                    &Patch::Apply(&tenant_binding(config, namespace)),
                )
                .await?;
        }
        TenantBindings::Preinstalled => {
            let made = bindings.get_opt(TENANT_BINDING).await?;
            if !made.is_some_and(|b| binds_tenant_role(config, &b)) {
                return Err(BindError::NotBound);
            }
        }
    }
    // With the binding in place, the workers' NetworkPolicy.
    if let Some(spec) = &config.network_policy {
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(WORKER_NETWORK_POLICY.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(managed()),
                ..ObjectMeta::default()
            },
            spec: Some(spec.clone()),
        };
        let policies = Api::<NetworkPolicy>::namespaced(client.clone(), namespace);
        // The API server's authorizer sees a new RoleBinding a moment after it is made.
        let mut tries = 0;
        loop {
            match policies
                .patch(WORKER_NETWORK_POLICY, &params, &Patch::Apply(&policy))
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 403 && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => break other.map(drop)?,
            }
        }
    }
    Ok(())
}

/// Removes what the controller made in a former tenant namespace; the RoleBinding last,
/// since deleting the rest needs its rights.
fn gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(drop),
    }
}

async fn unbind(
    client: &Client,
    config: &TenancyConfig,
    namespace: &str,
) -> Result<(), kube::Error> {
    let params = DeleteParams::default();
    // Standby workers first: they run as the worker account.
    let standbys = Api::<Job>::namespaced(client.clone(), namespace);
    let listed = standbys
        .list(&ListParams::default().labels(&format!("{STANDBY_LABEL}=true")))
        .await?;
    for job in listed.items {
        gone(
            standbys
                .delete(&job.name_any(), &DeleteParams::background())
                .await,
        )?;
    }
    gone(
        Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .delete(&config.worker_account, &params)
            .await,
    )?;
    gone(
        Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .delete(&config.catalog_config_map, &params)
            .await,
    )?;
    gone(
        Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
            .delete(WORKER_NETWORK_POLICY, &params)
            .await,
    )?;
    // A preinstalled binding is its maker's to remove.
    if config.bindings == TenantBindings::Preinstalled {
        return Ok(());
    }
    gone(
        Api::<RoleBinding>::namespaced(client.clone(), namespace)
            .delete(TENANT_BINDING, &params)
            .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TenancyConfig {
        TenancyConfig {
            keys_namespace: "kinsight-keys".into(),
            tenant_role: "kinsight-controller-tenant".into(),
            service_account: ("kinsight".into(), "kinsight-controller".into()),
            worker_account: "kinsight-worker".into(),
            catalog_config_map: "kinsight-catalog".into(),
            network_policy: None,
            bindings: TenantBindings::Controller,
        }
    }

    #[test]
    fn a_namespace_that_may_become_a_tenant_is_told_how() {
        let message = not_a_tenant(&config(), "shop");
        assert!(
            message.contains("label it kinsight.io/tenant=true"),
            "{message}"
        );
    }

    #[test]
    fn with_preinstalled_bindings_a_namespace_is_told_it_needs_one() {
        let preinstalled = TenancyConfig {
            bindings: TenantBindings::Preinstalled,
            ..config()
        };
        let message = not_a_tenant(&preinstalled, "shop");
        assert!(message.contains("label it"), "{message}");
        assert!(message.contains("controller.tenantNamespaces"), "{message}");
        assert!(!not_a_tenant(&config(), "shop").contains("tenantNamespaces"));
    }

    #[test]
    fn only_a_binding_of_the_tenant_role_to_the_controller_counts() {
        let config = config();
        let made = tenant_binding(&config, "shop");
        assert!(binds_tenant_role(&config, &made));
        let mut other_role = made.clone();
        other_role.role_ref.name = "cluster-admin".into();
        assert!(!binds_tenant_role(&config, &other_role));
        let mut other_account = made.clone();
        if let Some(subject) = other_account.subjects.as_mut().and_then(|s| s.first_mut()) {
            subject.namespace = Some("elsewhere".into());
        }
        assert!(!binds_tenant_role(&config, &other_account));
    }

    #[test]
    fn reserved_namespaces_are_told_they_never_can_be() {
        for (namespace, why) in [
            ("kube-system", "kube-*"),
            ("kinsight-keys", "API-key records"),
            ("kinsight", "controller's own"),
        ] {
            let message = not_a_tenant(&config(), namespace);
            assert!(
                message.contains("can never be a kinsight tenant"),
                "{message}"
            );
            assert!(message.contains(why), "{message}");
            assert!(!message.contains("label it"), "{message}");
        }
    }
}
