//! A whole kinsight installation for integration tests, against a real control plane
//! (or the cluster of `USE_EXISTING_CLUSTER=true`): CRDs, a tenant, the controller, the
//! node agent running the real `kinsight worker` binary, the REST API on 127.0.0.1, a
//! server for the sample photos and a webhook receiver that verifies signatures.

#![allow(dead_code)]

pub mod bad_bodies;
pub mod scripted_receiver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kinsight::controller::{ControllerConfig, WorkerCatalog};
use kinsight::dev::{ReceivedWebhook, create_tenant, install_crds, serve_folder, webhook_receiver};
use kinsight::inference::Catalog;
use kinsight::testbed::{NodeAgentOptions, TestCluster};
use kinsight::webhook::{RetrySchedule, generate_secret};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

pub const KEYS_NAMESPACE: &str = "kinsight-system";

pub struct Harness {
    pub cluster: TestCluster,
    pub client: kube::Client,
    pub namespace: String,
    pub api_url: String,
    pub api_key: String,
    pub webhook_secret: String,
    pub photos: SocketAddr,
    pub hook_url: String,
    pub webhooks: UnboundedReceiver<ReceivedWebhook>,
    pub models: Vec<String>,
    /// The controller's metrics, kept across controller restarts.
    pub metrics: std::sync::Arc<kinsight::controller::Metrics>,
    controller: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// Pods' stdout and stderr, as the node agent writes them.
    logs: tempfile::TempDir,
}

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

impl Harness {
    pub async fn start(namespace: &str) -> Harness {
        Self::start_with(namespace, |_| {}, |_| {}).await
    }

    /// Like [`Harness::start`], with the test's changes to the controller's configuration.
    pub async fn start_configured(
        namespace: &str,
        configure: impl FnOnce(&mut ControllerConfig),
    ) -> Harness {
        Self::start_with(namespace, |_| {}, configure).await
    }

    /// [`Harness::start`] with the node agent's options adjusted (labels, taints, GPUs).
    pub async fn start_with_node(
        namespace: &str,
        node: impl FnOnce(&mut NodeAgentOptions),
    ) -> Harness {
        Self::start_with(namespace, node, |_| {}).await
    }

    pub async fn start_with(
        namespace: &str,
        node: impl FnOnce(&mut NodeAgentOptions),
        configure: impl FnOnce(&mut ControllerConfig),
    ) -> Harness {
        kinsight::install_crypto_provider();
        let cluster = TestCluster::start().await.expect("control plane starts");
        let client = cluster.client();
        install_crds(&client).await.expect("CRDs install");
        let api_key = format!("test-key-{namespace}");
        let webhook_secret = generate_secret();
        create_tenant(
            &client,
            KEYS_NAMESPACE,
            namespace,
            &api_key,
            &webhook_secret,
        )
        .await
        .expect("tenant");
        let catalog = Catalog::load(repo_path("models/catalog.yaml")).expect("catalog");
        let models: Vec<String> = catalog.names().map(str::to_owned).collect();

        let logs = tempfile::tempdir().expect("log dir");
        let mut tasks = Vec::new();
        let mut agent = cluster.node_agent_options(
            "kinsight-test-node",
            env!("CARGO_BIN_EXE_kinsight"),
            logs.path(),
        );
        agent.extra_env = vec![("RUST_LOG".into(), "info".into())];
        node(&mut agent);
        let agent_client = client.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = kinsight::testbed::node_agent::run(agent_client, agent).await {
                eprintln!("node agent stopped: {e}");
            }
        }));

        let (app, key_watch) = kinsight::api::router(
            client.clone(),
            kinsight::api::ApiConfig {
                keys_namespace: KEYS_NAMESPACE.into(),
                models: models.clone(),
            },
        );
        tasks.push(tokio::spawn(key_watch));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind API");
        let api_url = format!("http://{}", listener.local_addr().expect("addr"));
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        let (photos, photo_server) = serve_folder(repo_path("tests/fixtures/images"))
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
            api_url,
            api_key,
            webhook_secret,
            photos,
            hook_url: format!("http://{hook_addr}/hook"),
            webhooks,
            models,
            metrics: Default::default(),
            controller: None,
            tasks,
            logs,
        };
        let mut config = harness.controller_config();
        configure(&mut config);
        harness.start_controller_with(config);
        harness.wait_for_api().await;
        harness
    }

    pub fn controller_config(&self) -> ControllerConfig {
        let ort = std::env::var("ORT_DYLIB_PATH")
            .ok()
            .map(PathBuf::from)
            .or_else(kinsight::inference::default_runtime_path)
            .expect("ONNX Runtime: set ORT_DYLIB_PATH or run scripts/setup-onnxruntime.sh");
        let ort = std::path::absolute(ort).expect("absolute path");
        // The photo server and the webhook receiver are on 127.0.0.1.
        let egress = kinsight::net::EgressPolicy::allow_loopback();
        // Workers read the catalog from the ConfigMap the controller publishes.
        let catalog = Catalog::load(repo_path("models/catalog.yaml")).expect("catalog");
        let models_dir = repo_path("models").display().to_string();
        ControllerConfig {
            models: self.models.clone(),
            worker_catalog: Some(WorkerCatalog::new(&catalog, models_dir)),
            worker_env: vec![("ORT_DYLIB_PATH".into(), ort.display().to_string())],
            egress,
            metrics: self.metrics.clone(),
            // Test schedules are in seconds.
            retry: RetrySchedule(vec![Duration::from_secs(1), Duration::from_secs(2)]),
            sender: kinsight::webhook::SenderConfig {
                timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_secs(1),
            },
            ..ControllerConfig::default()
        }
    }

    pub fn start_controller(&mut self) {
        let config = self.controller_config();
        self.start_controller_with(config);
    }

    pub fn start_controller_with(&mut self, config: ControllerConfig) {
        let client = self.client.clone();
        self.controller = Some(tokio::spawn(async move {
            if let Err(e) = kinsight::controller::run(client, config).await {
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
    pub fn pod_log(&self, pod: &str) -> String {
        let file = self
            .logs
            .path()
            .join(format!("{}_{pod}.log", self.namespace));
        std::fs::read_to_string(file).unwrap_or_default()
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
        mut done: impl FnMut(&[ReceivedWebhook]) -> bool,
    ) -> Vec<ReceivedWebhook> {
        let mut received = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while !done(&received) {
            match tokio::time::timeout_at(deadline, self.webhooks.recv()).await {
                Ok(Some(event)) => received.push(event),
                Ok(None) => panic!("webhook receiver stopped"),
                Err(_) => panic!(
                    "timed out after {limit:?}; received so far: {:#?}",
                    received
                        .iter()
                        .map(|e| (&e.id, &e.payload["type"], &e.payload["data"]["imageId"]))
                        .collect::<Vec<_>>()
                ),
            }
        }
        received
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

/// Checks received payloads against the documented JSON Schemas (schemas/webhooks/), with
/// the `jsonschema` package from PyPI, and their size against the 20 KB aim.
pub fn assert_payloads_conform(events: &[ReceivedWebhook]) {
    use std::io::Write;
    for event in events {
        let size = event.payload.to_string().len();
        assert!(size < 20_000, "{} is {size} bytes", event.payload["type"]);
    }
    let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let mut child = std::process::Command::new(repo_path(".venv/bin/python"))
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

pub fn of_type<'a>(events: &'a [ReceivedWebhook], kind: &str) -> Vec<&'a ReceivedWebhook> {
    events
        .iter()
        .filter(|e| e.payload["type"] == kind)
        .collect()
}
