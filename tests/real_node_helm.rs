//! The Helm chart installed for real (issue 10): `helm install` of charts/kinsight, with the
//! project's image, into the testbed with a real node (`kinsight::testbed::RealNode`); the
//! controller's and the API's two replicas each come up Running and Ready (the controller's
//! readiness probe asks PostgreSQL and the API server), exactly one controller holds the
//! leader Lease, and the API answers a REST call at its pod's address and through its
//! Service. A group posted there completes: its worker Job runs from the image, sends its
//! results to the API's Service, and every event arrives signed. `helm upgrade` with changed
//! values, started while a second group runs, rolls both Deployments to new pods carrying
//! them, Ready again with one leader, and that group's events all arrive; `helm uninstall`
//! removes every object the chart made and leaves the CRDs.
//!
//! How the pods reach what they need, as in a cluster:
//! - Services: kube-proxy (built from the same source as the control plane, iptables
//!   mode, see `RealNode`) serves the ClusterIPs to pods and to the host. There is no
//!   cluster DNS here, so the API's Service gets a fixed ClusterIP (`api.service.clusterIP`)
//!   and workers are told it (`api.resultsUrl`).
//! - The API server: in-cluster config (the `kubernetes` Service's ClusterIP, 10.0.0.1:443,
//!   and the token, CA and namespace the chart projects); its endpoint is the address the
//!   API server advertises on the bridge.
//! - Image downloads and webhooks: servers of the test on the bridge's host address, which
//!   the controller's egress allow-list (`controller.allowEgress`) names.
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
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kinsight::dev::ReceivedWebhook;
use kinsight::testbed::node::{HOST_ADDRESS, POD_SUBNET};
use kube::api::{Api, ListParams, LogParams, PostParams};
use tokio::sync::mpsc::UnboundedReceiver;

use common::real_node::{Stack, run_bounded};
use common::run;
use common::{eventually, repo_path};

const TEST_LIMIT: Duration = Duration::from_secs(400);
/// From `helm install` to every pod Running and Ready.
const READY_LIMIT: Duration = Duration::from_secs(180);
const NAMESPACE: &str = "kinsight-system";
const KEYS_NAMESPACE: &str = "kinsight-system-keys";
const TENANT: &str = "tenant-helm";
/// The API Service's ClusterIP, fixed (from the testbed's service range, 10.0.0.0/24)
/// because no cluster DNS names it here.
const API_SERVICE_IP: &str = "10.0.0.80";
/// How long a group may take from its POST to its last event.
const GROUP_LIMIT: Duration = Duration::from_secs(120);

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
    let webhook_secret = kinsight::webhook::generate_secret();
    // API-key records live in a namespace of their own (the chart's default name; made
    // here, so the chart is told not to make it).
    kinsight::dev::ensure_namespace(&client, NAMESPACE)
        .await
        .expect("the release namespace");
    kinsight::dev::create_tenant(&client, KEYS_NAMESPACE, TENANT, &api_key, &webhook_secret)
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
        "apiKeys": { "namespace": KEYS_NAMESPACE, "createNamespace": false },
        "api": {
            "service": { "clusterIP": API_SERVICE_IP },
            "resultsUrl": format!("http://{API_SERVICE_IP}/internal/v1/results"),
        },
        // Webhooks and image downloads reach the test's servers on the bridge.
        "controller": { "replicas": 2, "allowEgress": POD_SUBNET },
    });
    // The test's photo host and webhook receiver, where pods reach the host.
    let bridge: std::net::IpAddr = HOST_ADDRESS.into();
    let (photos, _photo_server) =
        kinsight::dev::serve_folder_on(repo_path("tests/fixtures/images"), bridge)
            .await
            .expect("photo server on the bridge");
    let (hook, mut webhooks, _receiver) =
        kinsight::dev::webhook_receiver_on(&webhook_secret, bridge)
            .await
            .expect("webhook receiver on the bridge");
    let hook_url = format!("http://{hook}/hook");
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

    // Through its Service (kube-proxy): a group served end to end. Its worker Job runs the
    // image and sends results to the Service's ClusterIP; each event arrives signed (the
    // receiver takes only what verifies).
    let service = format!("http://{API_SERVICE_IP}");
    // kube-proxy programs the Service once its endpoints are listed (about a second).
    eventually(
        "the API answers through its Service",
        Duration::from_secs(30),
        async || {
            http.get(format!("{service}/v1/image-groups/grp-none"))
                .bearer_auth(&api_key)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == reqwest::StatusCode::NOT_FOUND)
        },
    )
    .await;
    let served_started = Instant::now();
    let first = post_group(&http, &service, &api_key, &photos, &hook_url, 2).await;
    let events = events_until_complete(&mut webhooks, &first, 2).await;
    assert_eq!(completed_images(&events, &first), 2, "{events:#?}");
    eprintln!(
        "a group of 2 served through the Service in {:.1?}",
        served_started.elapsed()
    );

    // helm upgrade with changed values, while a group runs: both Deployments roll to new
    // pods that carry them, and the group's events all arrive.
    let during = post_group(&http, &service, &api_key, &photos, &hook_url, 4).await;
    let before: BTreeSet<String> = listed("controller")
        .await
        .into_iter()
        .chain(listed("api").await)
        .filter_map(|p| p.metadata.name)
        .collect();
    let mut changed = values.clone();
    changed["api"]["rateLimit"] = serde_json::json!(50);
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
    let events = events_until_complete(&mut webhooks, &during, 4).await;
    assert_eq!(
        completed_images(&events, &during),
        4,
        "every image of the group that ran through the upgrade: {events:#?}"
    );
    eprintln!(
        "the group posted before the upgrade completed with every event, {:.1?} after it",
        upgrade_started.elapsed()
    );

    // What the controller made in the tenant namespace, which Helm did not make: there now.
    let tenant_objects = async || {
        let mut found = Vec::new();
        let sa = Api::<ServiceAccount>::namespaced(client.clone(), TENANT);
        if sa.get_opt("kinsight-worker").await.ok().flatten().is_some() {
            found.push("ServiceAccount kinsight-worker");
        }
        let catalog = Api::<ConfigMap>::namespaced(client.clone(), TENANT);
        if catalog
            .get_opt("kinsight-worker-catalog")
            .await
            .ok()
            .flatten()
            .is_some()
        {
            found.push("ConfigMap kinsight-worker-catalog");
        }
        let policies = Api::<NetworkPolicy>::namespaced(client.clone(), TENANT);
        let policy = kinsight::tenancy::WORKER_NETWORK_POLICY;
        if policies.get_opt(policy).await.ok().flatten().is_some() {
            found.push("NetworkPolicy (workers)");
        }
        let bindings = Api::<RoleBinding>::namespaced(client.clone(), TENANT);
        let binding = kinsight::tenancy::TENANT_BINDING;
        if bindings.get_opt(binding).await.ok().flatten().is_some() {
            found.push("RoleBinding (the controller's)");
        }
        found
    };
    assert_eq!(
        tenant_objects().await,
        [
            "ServiceAccount kinsight-worker",
            "ConfigMap kinsight-worker-catalog",
            "NetworkPolicy (workers)",
            "RoleBinding (the controller's)"
        ]
    );

    // helm uninstall: every object the chart made goes (the CRDs stay, as Helm leaves
    // crds/ alone, and so do the groups customers made), and its hook removes what the
    // controller made in tenant namespaces.
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
    assert_eq!(
        tenant_objects().await,
        Vec::<&str>::new(),
        "left in the tenant namespace after helm uninstall"
    );
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

/// POSTs a group of `count` photos (the fixtures, in turn) with the webhook `hook_url`;
/// returns its id.
async fn post_group(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    photos: &std::net::SocketAddr,
    hook_url: &str,
    count: usize,
) -> String {
    let names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"];
    let images: Vec<_> = (0..count)
        .map(
            |i| serde_json::json!({ "url": format!("http://{photos}/{}", names[i % names.len()]) }),
        )
        .collect();
    let response = http
        .post(format!("{base}/v1/image-groups"))
        .bearer_auth(api_key)
        .json(&serde_json::json!({
            "images": images,
            "models": ["image_classification"],
            "webhookUrl": hook_url,
        }))
        .send()
        .await
        .expect("the API answers through its Service");
    let status = response.status();
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    body["id"].as_str().expect("the group's id").to_owned()
}

/// The webhooks received until `group`'s `image_group.completed` and an `image.completed`
/// of each of its `images` arrived (within [`GROUP_LIMIT`]; events may come in any order),
/// `group`'s only, each event once.
async fn events_until_complete(
    webhooks: &mut UnboundedReceiver<ReceivedWebhook>,
    group: &str,
    images: usize,
) -> Vec<ReceivedWebhook> {
    let mut events: Vec<ReceivedWebhook> = Vec::new();
    let deadline = tokio::time::Instant::now() + GROUP_LIMIT;
    loop {
        let done = events
            .iter()
            .any(|e| e.payload["type"] == "image_group.completed");
        if done && completed_images(&events, group) >= images {
            break;
        }
        match tokio::time::timeout_at(deadline, webhooks.recv()).await {
            Ok(Some(event)) => {
                if event.payload["data"]["groupId"] == group
                    && !events.iter().any(|e| e.id == event.id)
                {
                    events.push(event);
                }
            }
            _ => panic!("{group} did not complete within {GROUP_LIMIT:?}: {events:#?}"),
        }
    }
    events
}

/// How many distinct images of `group` have an `image.completed` event among `events`.
fn completed_images(events: &[ReceivedWebhook], group: &str) -> usize {
    events
        .iter()
        .filter(|e| e.payload["type"] == "image.completed" && e.payload["data"]["groupId"] == group)
        .filter_map(|e| e.payload["data"]["imageId"].as_str())
        .collect::<BTreeSet<_>>()
        .len()
}
