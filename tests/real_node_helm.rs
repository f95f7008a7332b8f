//! The Helm chart installed for real (issue 10): `helm install` of charts/kinsight, with the
//! project's image, into the testbed with a real node (`kinsight::testbed::RealNode`); the
//! controller's and the API's two replicas each come up Running and Ready (the controller's
//! readiness probe asks PostgreSQL and the API server), exactly one controller holds the
//! leader Lease, and the API answers a REST call at its pod's address. `helm upgrade` with
//! changed values rolls both Deployments to new pods carrying them, Ready again with one
//! leader; `helm uninstall` removes every object the chart made and leaves the CRDs.
//!
//! How the pods reach what they need, as in a cluster:
//! - The API server: in-cluster config (the `kubernetes` Service's ClusterIP, 10.0.0.1:443,
//!   and the token, CA and namespace the chart projects). The real node routes the service
//!   range to the host and stands in for kube-proxy with one nat rule to the API server's
//!   advertised address on the bridge (see `RealNode`).
//! - PostgreSQL: the database URL Secret names the host's bridge address, where the node
//!   forwards the database's port.
//! - The image: `localhost/kinsight:<tag>`, imported into the node, `pullPolicy: Never`.
//!
//! Needs root and what scripts/build-node.sh and scripts/install-node-packages.sh provide,
//! and helm (scripts/setup-onnxruntime.sh), as tests/real_node_e2e.rs and
//! tests/helm_chart.rs do.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kinsight::testbed::node::HOST_ADDRESS;
use kube::api::{Api, ListParams, LogParams, PostParams};

use common::real_node::{Stack, run_bounded};
use common::run;
use common::{eventually, repo_path};

const TEST_LIMIT: Duration = Duration::from_secs(400);
/// From `helm install` to every pod Running and Ready.
const READY_LIMIT: Duration = Duration::from_secs(180);
const NAMESPACE: &str = "kinsight-system";
const KEYS_NAMESPACE: &str = "kinsight-system-keys";
const TENANT: &str = "tenant-helm";

#[test]
fn the_chart_installs_on_the_real_node_and_its_pods_become_ready() {
    run_bounded(TEST_LIMIT, the_test());
}

/// Whether the pod is Running with its Ready condition true.
fn running_and_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn the_test() {
    kinsight::install_crypto_provider();
    let test_started = Instant::now();
    let scratch = tempfile::tempdir().expect("temp dir");
    let tag = format!("real-node-helm-{}", std::process::id());
    let Stack {
        node: _node,
        plane,
        image,
        image_cleanup: _image_cleanup,
    } = Stack::start(&tag, true, scratch.path()).await;

    let client = plane.client().await.expect("client");
    // The database URL Secret, naming the address pods reach the database at.
    let url = plane
        .database_url()
        .expect("the testbed's PostgreSQL")
        .replace("@127.0.0.1:", &format!("@{HOST_ADDRESS}:"));
    let api_key = format!("test-key-{TENANT}");
    // API-key records live in a namespace of their own (the chart's default name; made
    // here, so the chart is told not to make it).
    kinsight::dev::ensure_namespace(&client, NAMESPACE)
        .await
        .expect("the release namespace");
    kinsight::dev::create_tenant(
        &client,
        KEYS_NAMESPACE,
        TENANT,
        &api_key,
        &kinsight::webhook::generate_secret(),
    )
    .await
    .expect("a tenant and its API key");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "kinsight-database" },
        "stringData": { "uri": url },
    }))
    .expect("Secret");
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .expect("database Secret");

    let (repository, tag) = image.rsplit_once(':').expect("repository:tag");
    let values = serde_json::json!({
        "image": { "repository": repository, "tag": tag, "pullPolicy": "Never" },
        "database": { "secretName": "kinsight-database" },
        "controller": { "replicas": 2 },
        "apiKeys": { "namespace": KEYS_NAMESPACE, "createNamespace": false },
    });
    let kubeconfig = plane.kubeconfig_path().to_string_lossy().into_owned();
    let install_started = Instant::now();
    let release = helm(&kubeconfig, "install", &values.to_string()).await;
    assert_eq!(release["info"]["status"], "deployed", "{}", release["info"]);
    eprintln!("helm install took {:.1?}", install_started.elapsed());

    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let listed = |component: &'static str| {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels(&format!(
                "app.kubernetes.io/instance=kinsight,app.kubernetes.io/component={component}"
            )))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        }
    };
    wait_for_ready_pods(&client, &BTreeSet::new()).await;
    eprintln!(
        "controller and API pods Running and Ready {:.1?} after helm install started",
        install_started.elapsed()
    );

    // Up at the first try: no container restarted (a pod that cannot reach the API server
    // or the database exits and restarts).
    for pod in listed("controller")
        .await
        .into_iter()
        .chain(listed("api").await)
    {
        let restarts: i32 = pod
            .status
            .and_then(|s| s.container_statuses)
            .into_iter()
            .flatten()
            .map(|c| c.restart_count)
            .sum();
        assert_eq!(restarts, 0, "{:?} restarted", pod.metadata.name);
    }

    // Exactly one controller leads: the Lease names one of the two replicas.
    let controllers: Vec<String> = listed("controller")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let holder = eventually(
        "a controller holds the leader Lease",
        Duration::from_secs(60),
        async || {
            Api::<Lease>::namespaced(client.clone(), NAMESPACE)
                .get_opt(kinsight::controller::LEASE_NAME)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
        },
    )
    .await;
    assert!(
        controllers.contains(&holder),
        "the Lease holder {holder} is one of {controllers:?}"
    );
    // The API, at its pod's address on the bridge (no kube-proxy for its Service).
    let api_pod = listed("api").await.remove(0);
    let pod_ip = api_pod
        .status
        .and_then(|s| s.pod_ip)
        .expect("the API pod's IP");
    let http = reqwest::Client::new();
    let base = format!("http://{pod_ip}:8080");
    let missing = http
        .get(format!("{base}/v1/image-groups/grp-none"))
        .bearer_auth(&api_key)
        .send()
        .await
        .expect("the API pod answers");
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    let unauthorized = http
        .get(format!("{base}/v1/image-groups/grp-none"))
        .send()
        .await
        .expect("the API pod answers");
    assert_eq!(unauthorized.status(), reqwest::StatusCode::UNAUTHORIZED);

    // helm upgrade with changed values: both Deployments roll to new pods that carry them.
    let before: BTreeSet<String> = listed("controller")
        .await
        .into_iter()
        .chain(listed("api").await)
        .filter_map(|p| p.metadata.name)
        .collect();
    let mut changed = values.clone();
    changed["api"] = serde_json::json!({ "rateLimit": 50 });
    changed["controller"]["duplicateDistance"] = serde_json::json!(10);
    let upgrade_started = Instant::now();
    let release = helm(&kubeconfig, "upgrade", &changed.to_string()).await;
    assert_eq!(
        (&release["info"]["status"], &release["version"]),
        (&serde_json::json!("deployed"), &serde_json::json!(2)),
        "{release}"
    );
    let (controllers, apis) = wait_for_ready_pods(&client, &before).await;
    eprintln!(
        "after helm upgrade: new controller and API pods Running and Ready in {:.1?}",
        upgrade_started.elapsed()
    );
    let env = |pod: &Pod, name: &str| {
        pod.spec
            .as_ref()
            .and_then(|s| s.containers[0].env.as_ref())
            .and_then(|env| env.iter().find(|e| e.name == name))
            .and_then(|e| e.value.clone())
    };
    for pod in &apis {
        assert_eq!(env(pod, "KINSIGHT_RATE_LIMIT").as_deref(), Some("50"));
    }
    for pod in &controllers {
        assert_eq!(
            env(pod, "KINSIGHT_DUPLICATE_DISTANCE").as_deref(),
            Some("10")
        );
    }
    let new_controllers: Vec<String> = controllers
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let holder = eventually(
        "a new controller holds the leader Lease",
        Duration::from_secs(60),
        async || {
            Api::<Lease>::namespaced(client.clone(), NAMESPACE)
                .get_opt(kinsight::controller::LEASE_NAME)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
                .filter(|h| new_controllers.contains(h))
        },
    )
    .await;
    eprintln!("{holder} leads after the upgrade");
    let pod_ip = apis[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("the new API pod's IP");
    let missing = http
        .get(format!("http://{pod_ip}:8080/v1/image-groups/grp-none"))
        .bearer_auth(&api_key)
        .send()
        .await
        .expect("the new API pod answers");
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);

    // helm uninstall: every object the chart made goes (the CRDs stay, as Helm leaves
    // crds/ alone, and so do the groups customers made).
    let release = helm(&kubeconfig, "uninstall", "{}").await;
    eprintln!(
        "helm uninstall: release {}",
        release["release"]["info"]["status"]
    );
    let chart_made = ListParams::default().labels("app.kubernetes.io/instance=kinsight");
    let left = async || {
        let mut left = Vec::new();
        macro_rules! gather {
            ($($kind:ty),*) => {$(
                for item in Api::<$kind>::all(client.clone())
                    .list_metadata(&chart_made)
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                {
                    left.push(format!(
                        "{} {}",
                        <$kind as kube::Resource>::kind(&()),
                        item.metadata.name.unwrap_or_default()
                    ));
                }
            )*};
        }
        gather!(
            Deployment,
            Service,
            ServiceAccount,
            ConfigMap,
            Role,
            RoleBinding,
            ClusterRole,
            ClusterRoleBinding
        );
        left
    };
    let gone = holds_within(Duration::from_secs(60), async || left().await.is_empty()).await;
    assert!(gone, "left after helm uninstall: {:?}", left().await);
    let pods_gone = holds_within(Duration::from_secs(120), async || {
        listed("controller").await.is_empty() && listed("api").await.is_empty()
    })
    .await;
    assert!(pods_gone, "the release's pods outlive helm uninstall");
    Api::<CustomResourceDefinition>::all(client.clone())
        .get("imagegroups.kinsight.io")
        .await
        .expect("the ImageGroup CRD stays");
    eprintln!("test done in {:.1?}", test_started.elapsed());
}

/// `chart.py ACTION` (install, upgrade, uninstall) of the release with `values`; its
/// answer.
async fn helm(kubeconfig: &str, action: &'static str, values: &str) -> serde_json::Value {
    let (kubeconfig, values) = (kubeconfig.to_owned(), values.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(repo_path(".venv/bin/python"))
                .arg("tests/helm/chart.py")
                .args([action, &kubeconfig, NAMESPACE, &values])
                .current_dir(repo_path("")),
            &format!("helm {action}"),
        )
    })
    .await
    .expect("join");
    serde_json::from_str(&out).expect("JSON from chart.py")
}

/// Waits until two controller and two API pods, none named in `old`, are Running and Ready
/// (pods being deleted do not count); returns them. Panics with every Deployment's status
/// and every pod's log otherwise.
async fn wait_for_ready_pods(
    client: &kube::Client,
    old: &BTreeSet<String>,
) -> (Vec<Pod>, Vec<Pod>) {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let current = async |component: &str| {
        pods.list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance=kinsight,app.kubernetes.io/component={component}"
        )))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| !p.metadata.name.as_ref().is_some_and(|n| old.contains(n)))
        .collect::<Vec<_>>()
    };
    let ready = holds_within(READY_LIMIT, async || {
        let (controllers, apis) = (current("controller").await, current("api").await);
        controllers.len() == 2
            && apis.len() == 2
            && controllers.iter().chain(&apis).all(running_and_ready)
    })
    .await;
    if ready {
        return (current("controller").await, current("api").await);
    }
    let mut report = String::new();
    for deployment in Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .expect("deployments")
        .items
    {
        report.push_str(&format!(
            "--- deployment {:?}: {:?}\n",
            deployment.metadata.name, deployment.status
        ));
    }
    for pod in pods.list(&ListParams::default()).await.expect("pods").items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let log = pods
            .logs(&name, &LogParams::default())
            .await
            .unwrap_or_else(|e| format!("(no log: {e})"));
        report.push_str(&format!(
            "--- {name}: {:?}\n{log}\n",
            pod.status.map(|s| (s.phase, s.container_statuses))
        ));
    }
    panic!("the pods are not all Running and Ready after {READY_LIMIT:?}:\n{report}");
}

/// Whether `check` held within `limit` (polled every 500 ms).
async fn holds_within(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
