//! A whole kinsight installation for integration tests, against a real control plane
//! (or the cluster of `USE_EXISTING_CLUSTER=true`): CRDs, a tenant, the controller, the
//! REST API, a server for the sample photos and a webhook receiver that verifies signatures.
//!
//! Where the workers run:
//! - In a test binary whose `main` is [`real_node::main`], on the real node the binary's
//!   tests share: worker Jobs run as containers of the project's image, reaching the API's
//!   result ingest and the photo server on the node's bridge address. Each test keeps to
//!   its own tenant namespace, API-key namespace and database, so the tests of the binary
//!   run side by side without seeing each other's groups.
//! - With `USE_EXISTING_CLUSTER=true`, on that cluster's nodes: worker Jobs run the image
//!   `KINSIGHT_WORKER_IMAGE`, and reach this machine at `KINSIGHT_POD_ADDRESS`.

#![allow(dead_code)]

pub mod bad_bodies;
pub mod dev_process;
pub mod fairness;
pub mod real_node;
pub mod scripted_receiver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kinsight::controller::{ControllerConfig, WorkerCatalog};
use kinsight::dev::{
    ReceivedWebhook, create_tenant_labelled, install_crds, serve_folder_on, webhook_receiver,
};
use kinsight::inference::Catalog;
use kinsight::results::INGEST_PATH;
use kinsight::shutdown::Shutdown;
use kinsight::store::Store;
use kinsight::testbed::TestCluster;
use kinsight::webhook::{RetrySchedule, generate_secret};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

pub const KEYS_NAMESPACE: &str = "kinsight-system";

pub struct Harness {
    pub cluster: TestCluster,
    pub client: kube::Client,
    pub namespace: String,
    /// Where the tenant's API-key record is (the controller's and the API's keys namespace).
    pub keys_namespace: String,
    pub api_url: String,
    pub api_key: String,
    pub webhook_secret: String,
    pub photos: SocketAddr,
    pub hook_url: String,
    pub webhooks: UnboundedReceiver<ReceivedWebhook>,
    pub models: Vec<String>,
    /// The database (the testbed's PostgreSQL) the controller and the API share.
    pub store: Store,
    /// The controller's metrics, kept across controller restarts.
    pub metrics: std::sync::Arc<kinsight::controller::Metrics>,
    controller: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// The real node this test shares, if it runs on one.
    real_node: Option<&'static real_node::Shared>,
}

/// Where the project's image keeps its models (Dockerfile: `KINSIGHT_MODELS_DIR`).
pub const IMAGE_MODELS_DIR: &str = "/opt/kinsight/models";

/// The REST API (its result ingest included) for `models`, with its API-key watch, on
/// `address`; returns its URL. Its tasks join `tasks`.
pub async fn serve_api(
    client: &kube::Client,
    store: &Store,
    models: &[String],
    keys_namespace: &str,
    address: std::net::IpAddr,
    tasks: &mut Vec<JoinHandle<()>>,
) -> String {
    let (app, key_watch, _keys) = kinsight::api::router(
        client.clone(),
        store.clone(),
        kinsight::api::ApiConfig {
            keys_namespace: keys_namespace.into(),
            models: models.to_vec(),
            rate_limit: kinsight::api::DEFAULT_RATE_LIMIT,
            in_flight_limit: kinsight::api::DEFAULT_IN_FLIGHT_LIMIT,
        },
    );
    tasks.push(tokio::spawn(key_watch));
    let listener = tokio::net::TcpListener::bind((address, 0))
        .await
        .expect("bind the API");
    let api_url = format!("http://{}", listener.local_addr().expect("addr"));
    tasks.push(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }));
    api_url
}

/// The address of this machine that this binary's worker pods reach (where servers they
/// call listen): the real node's bridge address; on an existing cluster
/// (`USE_EXISTING_CLUSTER`) `KINSIGHT_POD_ADDRESS`, else 127.0.0.1.
pub fn pod_address() -> std::net::IpAddr {
    match real_node::shared() {
        Some(_) => kinsight::testbed::node::HOST_ADDRESS.into(),
        None => std::env::var("KINSIGHT_POD_ADDRESS")
            .ok()
            .map(|a| a.parse().expect("KINSIGHT_POD_ADDRESS: an IP address"))
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
    }
}

/// Status, Content-Type and body text of the answer to `request`.
pub async fn answer(request: reqwest::RequestBuilder) -> (u16, String, String) {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, kind, response.text().await.unwrap_or_default())
}

/// A PostgreSQL of its own (in a temporary folder, removed with the returned guard) and
/// the store on it, migrated.
pub async fn database() -> (kinsight::testbed::Postgres, Store, tempfile::TempDir) {
    kinsight::install_crypto_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let postgres = kinsight::testbed::Postgres::start(dir.path())
        .await
        .expect("PostgreSQL starts");
    let store = Store::connect(&postgres.url(), Duration::from_secs(30))
        .await
        .expect("connects and migrates");
    (postgres, store, dir)
}

/// stdout of a command that must have succeeded (else the test fails with its output).
pub fn stdout_of(output: std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// stdout of `command`, which must succeed.
pub fn run(command: &mut std::process::Command, what: &str) -> String {
    stdout_of(
        command.output().unwrap_or_else(|e| panic!("{what}: {e}")),
        what,
    )
}

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

impl Harness {
    pub async fn start(namespace: &str) -> Harness {
        Self::start_full(namespace, |_| {}, false).await
    }

    /// Like [`Harness::start`], with the test's changes to the controller's configuration.
    pub async fn start_configured(
        namespace: &str,
        configure: impl FnOnce(&mut ControllerConfig),
    ) -> Harness {
        Self::start_full(namespace, configure, false).await
    }

    /// [`Harness::start`] with a PostgreSQL of the test's own on the shared real-node
    /// stack (`h.cluster.postgres_mut()`), for a test that restarts it; the others' stay up.
    pub async fn start_with_own_database(namespace: &str) -> Harness {
        Self::start_full(namespace, |_| {}, true).await
    }

    async fn start_full(
        namespace: &str,
        configure: impl FnOnce(&mut ControllerConfig),
        own_database: bool,
    ) -> Harness {
        kinsight::install_crypto_provider();
        let real_node = real_node::shared();
        let cluster = match real_node {
            Some(shared) if own_database => {
                TestCluster::connect_shared_with_own_database(&shared.kubeconfig)
                    .await
                    .expect("the shared control plane, and a PostgreSQL of the test's own")
            }
            Some(shared) => {
                let database = kinsight::testbed::postgres::create_database(
                    &shared.database_url,
                    &namespace.replace('-', "_"),
                )
                .await
                .expect("a database of the test's own");
                TestCluster::connect_shared(&shared.kubeconfig, database)
                    .await
                    .expect("the shared control plane")
            }
            None => TestCluster::start().await.expect("control plane starts"),
        };
        let keys_namespace = match real_node {
            Some(_) => format!("{namespace}-keys"),
            None => KEYS_NAMESPACE.to_owned(),
        };
        let pod_address = pod_address();
        let client = cluster.client();
        let store = Store::connect(&cluster.database_url(), Duration::from_secs(60))
            .await
            .expect("the testbed's PostgreSQL");
        install_crds(&client).await.expect("CRDs install");
        let api_key = format!("test-key-{namespace}");
        let webhook_secret = generate_secret();
        // On the shared cluster the namespace is a tenant through its key record only, so
        // the controllers of the other tests (each reading its own keys namespace) leave its
        // groups alone.
        create_tenant_labelled(
            &client,
            &keys_namespace,
            namespace,
            &api_key,
            &webhook_secret,
            real_node.is_none(),
        )
        .await
        .expect("tenant");
        let catalog = Catalog::load(repo_path("models/catalog.yaml")).expect("catalog");
        let models: Vec<String> = catalog.names().map(str::to_owned).collect();

        let mut tasks = Vec::new();

        // The API (its result ingest) and the photos where workers reach them.
        let api_url = serve_api(
            &client,
            &store,
            &models,
            &keys_namespace,
            pod_address,
            &mut tasks,
        )
        .await;
        let (photos, photo_server) =
            serve_folder_on(repo_path("tests/fixtures/images"), pod_address)
                .await
                .expect("photo server");
        tasks.push(photo_server);
        let (hook_addr, webhooks, hook_server) =
            webhook_receiver(&webhook_secret).await.expect("receiver");
        tasks.push(hook_server);

        let mut harness = Harness {
            cluster,
            client,
            namespace: namespace.to_owned(),
            keys_namespace,
            api_url,
            api_key,
            webhook_secret,
            photos,
            hook_url: format!("http://{hook_addr}/hook"),
            webhooks,
            models,
            store,
            metrics: Default::default(),
            controller: None,
            tasks,
            real_node,
        };
        let mut config = harness.controller_config();
        configure(&mut config);
        harness.start_controller_with(config);
        harness.wait_for_api().await;
        harness
    }

    pub fn controller_config(&self) -> ControllerConfig {
        // Workers read the catalog from the ConfigMap the controller publishes.
        let catalog = Catalog::load(repo_path("models/catalog.yaml")).expect("catalog");
        let base = ControllerConfig {
            models: self.models.clone(),
            // Where workers reach the API's result ingest (see `pod_address`).
            results_url: format!("{}{INGEST_PATH}", self.api_url),
            metrics: self.metrics.clone(),
            // Test schedules are in seconds.
            retry: RetrySchedule(vec![Duration::from_secs(1), Duration::from_secs(2)]),
            sender: kinsight::webhook::SenderConfig {
                timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_secs(1),
            },
            tenancy: kinsight::tenancy::TenancyConfig {
                keys_namespace: self.keys_namespace.clone(),
                ..ControllerConfig::default().tenancy
            },
            // The model files and ONNX Runtime come from the worker image.
            worker_catalog: Some(WorkerCatalog::new(&catalog, IMAGE_MODELS_DIR)),
            worker_env: vec![("RUST_LOG".into(), "info".into())],
            // Workers fetch photos from where pods reach this machine; the controller sends
            // webhooks to receivers on 127.0.0.1.
            egress: kinsight::net::EgressPolicy::parse(&format!("127.0.0.0/8,{}", pod_address()))
                .expect("egress"),
            ..ControllerConfig::default()
        };
        let Some(shared) = self.real_node else {
            // An existing cluster: the image its nodes pull.
            return ControllerConfig {
                worker_image: std::env::var("KINSIGHT_WORKER_IMAGE")
                    .unwrap_or(base.worker_image.clone()),
                ..base
            };
        };
        // One controller per test on the shared cluster, as separate installations of one
        // cluster would be: each watches its test's namespace only and binds its own
        // ServiceAccount there.
        let mut tenancy = base.tenancy.clone();
        tenancy.service_account.0 = self.keys_namespace.clone();
        ControllerConfig {
            watch_namespace: Some(self.namespace.clone()),
            tenancy,
            worker_image: shared.image.clone(),
            // Several workers at once on the node's two CPUs, tests side by side.
            worker_cpu: "500m".into(),
            ..base
        }
    }

    pub fn start_controller(&mut self) {
        let config = self.controller_config();
        self.start_controller_with(config);
    }

    pub fn start_controller_with(&mut self, config: ControllerConfig) {
        let client = self.client.clone();
        let store = self.store.clone();
        self.controller = Some(tokio::spawn(async move {
            if let Err(e) =
                kinsight::controller::run(client, store, config, Shutdown::never()).await
            {
                eprintln!("controller stopped: {e}");
            }
        }));
    }

    /// Stops the controller the hard way (its task is dropped mid-flight, like a killed pod).
    pub async fn kill_controller(&mut self) {
        if let Some(handle) = self.controller.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    async fn wait_for_api(&self) {
        // The key watch needs a moment after start; retry until an authenticated call works.
        let http = reqwest::Client::new();
        for _ in 0..100 {
            let response = http
                .get(format!("{}/v1/image-groups/grp-none", self.api_url))
                .bearer_auth(&self.api_key)
                .send()
                .await;
            if response.is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("API did not accept the test key in time");
    }

    /// What a pod printed (stdout and stderr), empty until it has started.
    /// What the pod's container wrote, through the API server (which asks the node's
    /// kubelet); empty when it cannot be had.
    pub async fn pod_log(&self, pod: &str) -> String {
        kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(
            self.client.clone(),
            &self.namespace,
        )
        .logs(pod, &Default::default())
        .await
        .unwrap_or_default()
    }

    /// How the store names one of the harness namespace's groups.
    pub async fn group_ref(&self, group: &str) -> kinsight::results::GroupRef {
        let found: kinsight::crd::ImageGroup =
            kube::Api::namespaced(self.client.clone(), &self.namespace)
                .get(group)
                .await
                .expect("the group");
        group_ref(&found)
    }
    /// Who holds the controllers' leader Lease (in the installation's own namespace) now.
    pub async fn lease_holder(&self) -> Option<String> {
        let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::namespaced(self.client.clone(), &self.keys_namespace);
        leases
            .get_opt(kinsight::controller::LEASE_NAME)
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    }

    /// The group's results as the database holds them, by image id.
    pub async fn stored_results(
        &self,
        group: &str,
    ) -> std::collections::HashMap<String, kinsight::results::ImageResult> {
        self.store
            .group_results(&self.group_ref(group).await)
            .await
            .expect("stored results")
    }

    /// The group's webhook deliveries as the database holds them, in sequence order.
    pub async fn deliveries(&self, group: &str) -> Vec<kinsight::delivery::Delivery> {
        self.store
            .group_deliveries(&self.group_ref(group).await.uid)
            .await
            .expect("stored deliveries")
    }

    /// Posts a group of `count` images (`i0`, `i1`, ...: the sample photos in turn) through
    /// the REST API, its events to `webhook_url`; returns the group's id.
    pub async fn post_photo_group(
        &self,
        count: usize,
        models: &[&str],
        webhook_url: &str,
    ) -> String {
        let names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];
        let images: Vec<_> = (0..count)
            .map(|i| serde_json::json!({ "id": format!("i{i}"), "url": self.photo_url(names[i % names.len()]) }))
            .collect();
        let (status, body) = self
            .post(
                "/v1/image-groups",
                serde_json::json!({ "images": images, "models": models, "webhookUrl": webhook_url }),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Sets `field` of the tenant's API-key record (a limit, say); the API's key watch picks
    /// it up without a restart.
    pub async fn set_key_field(&self, field: &str, value: &str) {
        use kube::api::{Patch, PatchParams};
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.client.clone(), &self.keys_namespace);
        let patch = serde_json::json!({ "stringData": { field: value } });
        secrets
            .patch(
                &format!("tenant-{}", self.namespace),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("set the tenant's {field}: {e}"));
    }

    /// The address of this machine that worker pods reach: servers a test's workers fetch
    /// from listen there.
    pub fn pod_address(&self) -> std::net::IpAddr {
        pod_address()
    }

    /// Serves one photo whose first download takes `delay`, where workers reach it; returns
    /// its URL.
    pub async fn slow_photo(&self, delay: Duration) -> String {
        slow_photo_on(pod_address(), delay).await
    }

    pub fn photo_url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.photos)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.api_url))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.api_url))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// Collects verified webhooks until `done` says the collection is complete.
    pub async fn collect_webhooks(
        &mut self,
        limit: Duration,
        done: impl FnMut(&[ReceivedWebhook]) -> bool,
    ) -> Vec<ReceivedWebhook> {
        let mut received = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        if self
            .collect_webhooks_into(&mut received, deadline, done, |_| {})
            .await
            .is_err()
        {
            panic!(
                "timed out after {limit:?}; received so far: {:#?}",
                webhook_summary(&received)
            );
        }
        received
    }

    /// Adds verified webhooks to `received` until `done` says the collection is complete
    /// (checked first, on what is already there), calling `each` on every new one; `Err` if
    /// `deadline` passes first.
    pub async fn collect_webhooks_into(
        &mut self,
        received: &mut Vec<ReceivedWebhook>,
        deadline: tokio::time::Instant,
        mut done: impl FnMut(&[ReceivedWebhook]) -> bool,
        mut each: impl FnMut(&ReceivedWebhook),
    ) -> Result<(), tokio::time::error::Elapsed> {
        while !done(received) {
            match tokio::time::timeout_at(deadline, self.webhooks.recv()).await? {
                Some(event) => {
                    each(&event);
                    received.push(event);
                }
                None => panic!("webhook receiver stopped"),
            }
        }
        Ok(())
    }

    /// Reasons of the Events about one object (by name) in the test's namespace.
    pub async fn event_reasons(&self, object: &str) -> Vec<String> {
        self.events_about(object)
            .await
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }

    /// The Events about one object (by name) in the test's namespace.
    pub async fn events_about(&self, object: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
        let events: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        events
            .list(&Default::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
            .collect()
    }

    /// The value of one sample of the controller's metrics, see [`metric`].
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric(&self.metrics.encode(), sample)
    }

    /// Creates (through the kube API, as `kubectl apply` would) a group `name` of `count`
    /// images that nothing serves (port 9): each fails at once, so its events come fast.
    /// Each image carries `metadata`; the group's own webhook is the harness' receiver.
    pub async fn create_unreachable_group(
        &self,
        name: &str,
        count: usize,
        metadata: serde_json::Value,
    ) -> kube::Api<kinsight::crd::ImageGroup> {
        let images: Vec<_> = (0..count)
            .map(|i| serde_json::json!({ "id": format!("i{i}"), "url": format!("http://127.0.0.1:9/{i}.jpg"), "metadata": metadata }))
            .collect();
        let group: kinsight::crd::ImageGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "kinsight.io/v1alpha1",
            "kind": "ImageGroup",
            "metadata": { "name": name },
            "spec": {
                "images": images,
                "models": ["image_classification"],
                "webhook": { "url": self.hook_url, "secretRef": { "name": "kinsight-webhook-signing", "key": "secret" } }
            }
        }))
        .expect("group");
        let groups = kube::Api::namespaced(self.client.clone(), &self.namespace);
        groups
            .create(&kube::api::PostParams::default(), &group)
            .await
            .expect("group created");
        groups
    }

    /// Creates the Secret `secret_name` holding `secret` under `key`, and one
    /// WebhookSubscription per (name, url, more of its spec) signing with it, then waits up
    /// to `ready_within` for each to report `Ready=True`.
    pub async fn subscribe(
        &self,
        secret_name: &str,
        secret: &str,
        subscriptions: &[(&str, String, serde_json::Value)],
        ready_within: Duration,
    ) {
        use k8s_openapi::api::core::v1::Secret;
        use kinsight::crd::WebhookSubscription;
        use kube::api::PostParams;

        let secrets: kube::Api<Secret> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let key: Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": secret_name, "labels": { kinsight::tenancy::SIGNING_LABEL: "true" } },
            "stringData": { "key": secret }
        }))
        .expect("secret");
        secrets
            .create(&PostParams::default(), &key)
            .await
            .expect("create secret");
        let api: kube::Api<WebhookSubscription> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        for (name, url, extra) in subscriptions {
            let mut spec = serde_json::json!({
                "url": url,
                "secretRef": { "name": secret_name, "key": "key" }
            });
            if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
                spec.extend(extra.clone());
            }
            let sub: WebhookSubscription = serde_json::from_value(serde_json::json!({
                "apiVersion": "kinsight.io/v1alpha1",
                "kind": "WebhookSubscription",
                "metadata": { "name": name },
                "spec": spec
            }))
            .expect("subscription");
            api.create(&PostParams::default(), &sub)
                .await
                .expect("create subscription");
        }
        for (name, _, _) in subscriptions {
            eventually(
                &format!("subscription {name} reports Ready"),
                ready_within,
                async || {
                    api.get(name)
                        .await
                        .ok()
                        .and_then(|s| s.status)
                        .is_some_and(|st| {
                            st.conditions
                                .iter()
                                .any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                },
            )
            .await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// (webhook-id, type, imageId) of each event: enough to see what arrived, for messages.
pub fn webhook_summary(
    events: &[ReceivedWebhook],
) -> Vec<(&String, &serde_json::Value, &serde_json::Value)> {
    events
        .iter()
        .map(|e| (&e.id, &e.payload["type"], &e.payload["data"]["imageId"]))
        .collect()
}

/// The value of the sample `sample` (its name with labels, as written: e.g.
/// `kinsight_webhook_attempts_total{outcome="gone"}`) in a Prometheus text exposition.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// What a polled check says: `true`, or `Some(value)`, once it holds.
pub trait Outcome {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// How often [`poll`] and [`eventually`] check.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Checks every [`POLL_INTERVAL`] until `check` holds, for at most `limit` (the last check
/// is at the limit); `None` if it never did.
pub async fn poll<R: Outcome>(limit: Duration, check: impl AsyncFnMut() -> R) -> Option<R::Value> {
    poll_every(POLL_INTERVAL, limit, check).await
}

/// [`poll`], checking every `every` (for checks that are heavy on the API server).
pub async fn poll_every<R: Outcome>(
    every: Duration,
    limit: Duration,
    mut check: impl AsyncFnMut() -> R,
) -> Option<R::Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await.ready() {
            return Some(value);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep((deadline - now).min(every)).await;
    }
}

/// [`poll`], panicking with `what` if `check` did not hold within `limit`.
pub async fn eventually<R: Outcome>(
    what: &str,
    limit: Duration,
    check: impl AsyncFnMut() -> R,
) -> R::Value {
    poll(limit, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// The project's Python environment (`.venv`, made by scripts/setup-onnxruntime.sh with
/// jsonschema and the webhook verifiers).
pub fn python() -> PathBuf {
    let python = repo_path(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-onnxruntime.sh first",
        python.display()
    );
    python
}

/// Checks received payloads against the documented JSON Schemas (schemas/webhooks/), with
/// the `jsonschema` package from PyPI, and their size against the 20 KB aim.
pub fn assert_payloads_conform(events: &[ReceivedWebhook]) {
    use std::io::Write;
    for event in events {
        let size = event.payload.to_string().len();
        assert!(size < 20_000, "{} is {size} bytes", event.payload["type"]);
    }
    let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let mut child = std::process::Command::new(python())
        .arg(repo_path("tests/receivers/validate_payloads.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python (scripts/setup-onnxruntime.sh installs jsonschema)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&payloads).expect("json").as_bytes())
        .expect("write payloads");
    let output = child.wait_with_output().expect("validator");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Jobs the controller made for a group (by its label).
pub async fn jobs_of(
    client: &kube::Client,
    namespace: &str,
    group: &str,
) -> Vec<k8s_openapi::api::batch::v1::Job> {
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> =
        kube::Api::namespaced(client.clone(), namespace);
    jobs.list(&kube::api::ListParams::default().labels(&format!("kinsight.io/group={group}")))
        .await
        .expect("list jobs")
        .items
}

/// Where `namespace`'s Jobs stand now: [`job_since`] from it sees every Job made after.
pub async fn jobs_version(client: &kube::Client, namespace: &str) -> String {
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> =
        kube::Api::namespaced(client.clone(), namespace);
    jobs.list_metadata(&kube::api::ListParams::default().limit(1))
        .await
        .expect("list jobs")
        .metadata
        .resource_version
        .expect("the list's resourceVersion")
}

/// The Job `name` of `namespace` as first made, changed or deleted after `version` (see
/// [`jobs_version`]), read from a watch: a Job whose order a waiting worker did is deleted
/// once done, which for a few photos can be sooner than a poll looks.
pub async fn job_since(
    client: &kube::Client,
    namespace: &str,
    version: &str,
    name: &str,
    limit: Duration,
) -> k8s_openapi::api::batch::v1::Job {
    use futures::TryStreamExt;
    use kube::api::WatchEvent;
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> =
        kube::Api::namespaced(client.clone(), namespace);
    let params = kube::api::WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(u32::try_from(limit.as_secs()).unwrap_or(290).min(290));
    let seen = async {
        let mut events = std::pin::pin!(jobs.watch(&params, version).await.expect("watch jobs"));
        while let Some(event) = events.try_next().await.expect("a watch event") {
            match event {
                WatchEvent::Added(job) | WatchEvent::Modified(job) | WatchEvent::Deleted(job) => {
                    return job;
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => panic!("watching job {name}: {e:?}"),
            }
        }
        panic!("the watch for job {name} ended without it")
    };
    tokio::time::timeout(limit, seen)
        .await
        .unwrap_or_else(|_| panic!("no job {name} within {limit:?}"))
}

pub fn of_type<'a>(events: &'a [ReceivedWebhook], kind: &str) -> Vec<&'a ReceivedWebhook> {
    events
        .iter()
        .filter(|e| e.payload["type"] == kind)
        .collect()
}

/// Names a group for the store.
pub fn group_ref(group: &kinsight::crd::ImageGroup) -> kinsight::results::GroupRef {
    use kube::ResourceExt;
    kinsight::results::GroupRef {
        namespace: group.namespace().expect("namespaced"),
        name: group.name_any(),
        uid: group.uid().expect("uid"),
    }
}

/// Serves one photo whose first download takes `delay` on `address`; returns its URL.
pub async fn slow_photo_on(address: std::net::IpAddr, delay: Duration) -> String {
    let photo = std::fs::read(repo_path("tests/fixtures/images/coffee.png")).expect("photo");
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let slow = axum::Router::new().route(
        "/slow.png",
        axum::routing::get(move || {
            let photo = photo.clone();
            let first = first.swap(false, std::sync::atomic::Ordering::SeqCst);
            async move {
                if first {
                    tokio::time::sleep(delay).await;
                }
                ([("content-type", "image/png")], photo)
            }
        }),
    );
    format!("{}/slow.png", serve_on(address, slow).await)
}

/// Serves `app` on 127.0.0.1; returns its base URL.
pub async fn serve_on_loopback(app: axum::Router) -> String {
    serve_on(std::net::Ipv4Addr::LOCALHOST.into(), app).await
}

/// Serves `app` on `address`; returns its base URL.
pub async fn serve_on(address: std::net::IpAddr, app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind((address, 0))
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Processes whose command line names `needle` (say a node's state folder: the kubelet,
/// containerd and the containerd shims, whose `-address` is in it).
pub fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}
