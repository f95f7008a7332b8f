//! `kinsight dev` (a whole local installation in one process) and `kinsight demo`
//! (dev plus the sample photos and a verifying webhook receiver).

mod local_http;
mod node;
mod setup;

pub use local_http::{
    ReceivedWebhook, serve_folder, serve_folder_on, webhook_receiver, webhook_receiver_on,
};
pub use node::{DEV_IMAGE, follow_pod_logs};
pub use setup::{
    SetupError, await_crds_published, create_tenant, create_tenant_labelled, ensure_namespace,
    install_crds,
};

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::api::{ApiConfig, router};
use crate::controller::{ControllerConfig, JobCaps};
use crate::inference::Catalog;
use crate::results::INGEST_PATH;
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::store::Store;
use crate::testbed::{ControlPlane, ControlPlaneOptions, Postgres, RealNode, RealNodeOptions};
use crate::webhook::{RetrySchedule, generate_secret};

pub const KEYS_NAMESPACE: &str = "kinsight-system";
pub const DEV_TENANT: &str = "kinsight-dev";

#[derive(Clone, Debug)]
pub struct DevOptions {
    pub listen: SocketAddr,
    pub api_key: Option<String>,
    pub webhook_secret: Option<String>,
    pub catalog: PathBuf,
    /// ONNX Runtime put in the worker image (`None`: the project's wheel).
    pub ort_dylib: Option<PathBuf>,
    /// Where the local control plane keeps its state (reused across runs).
    pub state_dir: PathBuf,
    /// Use this cluster instead of starting a local control plane.
    pub kubeconfig: Option<PathBuf>,
    /// Use this database instead of the testbed's PostgreSQL.
    pub database_url: Option<String>,
    pub retry: RetrySchedule,
    /// Fair scheduling of worker Jobs ([`DEV_JOB_CAPS`] by default).
    pub job_caps: JobCaps,
    /// CPU limit of each worker pod (a Kubernetes quantity).
    pub worker_cpu: String,
    /// Its CPU request, at most the limit.
    pub worker_cpu_request: String,
    /// Standby workers of each tenant ([`DEV_STANDBY_WORKERS`] by default).
    pub standby_workers: usize,
}

/// On one machine (a laptop, 2 cores): two Jobs of a tenant and three in all use the
/// cores; a second tenant's work starts beside the first's, and one small Job may pass
/// both caps.
pub const DEV_JOB_CAPS: JobCaps = JobCaps {
    max_jobs: 3,
    max_jobs_per_tenant: 2,
    small_images: 10,
    small_lane_jobs: 1,
};

/// How long dev's workers wait for their tenant's next group (the chart's default).
pub const DEV_WORKER_LINGER: Duration = Duration::from_secs(5);

/// Standby workers per tenant in dev by default (the chart's is none: each holds a pod).
pub const DEV_STANDBY_WORKERS: usize = 1;

/// How long dev waits at its start for its standby worker to wait for orders.
const STANDBY_WAIT: Duration = Duration::from_secs(60);

/// Whether a standby worker of `namespace` waits for an order within [`STANDBY_WAIT`].
async fn wait_for_standby(store: &Store, namespace: &str) -> bool {
    let waited = tokio::time::timeout(STANDBY_WAIT, async {
        loop {
            match store.waiting_carriers(namespace).await {
                Ok(waiting) if !waiting.is_empty() => return,
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "reading the waiting workers"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    waited.await.is_ok()
}

/// A running dev installation; dropping it stops everything it started.
pub struct DevEnvironment {
    pub api_url: String,
    pub api_key: String,
    pub webhook_secret: String,
    pub kubeconfig: Option<PathBuf>,
    /// Where worker pods reach this machine (the node's bridge address), when `dev` runs
    /// the node: photos served for them must listen there.
    pub pod_address: Option<IpAddr>,
    /// The controller and the API: on a stop they are asked to finish what they have in
    /// hand; the rest of `tasks` (the API key watch) is simply dropped.
    graceful: JoinSet<()>,
    client: kube::Client,
    /// Where the worker pods' logs are kept when the node stops (`{state}/pod-logs`).
    pod_logs: PathBuf,
    tasks: JoinSet<()>,
    stopping: ShutdownTrigger,
    /// How long each step of the start took, printed with the summary.
    phases: Phases,
    // Dropped in this order: the node before its control plane.
    node: Option<RealNode>,
    _control_plane: Option<ControlPlane>,
    _database: Option<Postgres>,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Testbed(#[from] crate::testbed::TestbedError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Inference(#[from] crate::inference::InferenceError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

pub async fn start(options: DevOptions) -> Result<DevEnvironment, DevError> {
    let mut phases = Phases::default();
    let catalog_path = absolute(&options.catalog)?;
    let catalog = Catalog::load(&catalog_path)?;
    let models: Vec<String> = catalog.names().map(str::to_owned).collect();
    // The worker image is built while the control plane starts.
    let image_archive = options.state_dir.join("kinsight-image.tar");
    let image_build = match &options.kubeconfig {
        Some(_) => None,
        None => {
            let (binary, archive) = (product_binary()?, image_archive.clone());
            let ort = match &options.ort_dylib {
                Some(path) => Some(absolute(path)?),
                None => None,
            };
            std::fs::create_dir_all(&options.state_dir).map_err(|e| {
                DevError::Other(format!("creating {}: {e}", options.state_dir.display()))
            })?;
            Some(tokio::task::spawn_blocking(move || {
                node::build_image(&binary, ort.as_deref(), &archive)
            }))
        }
    };
    let (control_plane, client, kubeconfig) = match &options.kubeconfig {
        Some(path) => {
            let client = crate::testbed::client_from_kubeconfig(path).await?;
            (None, client, Some(path.clone()))
        }
        None => {
            let cp = ControlPlane::start_or_reuse_with(ControlPlaneOptions {
                state_dir: Some(options.state_dir.clone()),
                real_node: true,
                ..ControlPlaneOptions::default()
            })
            .await?;
            let client = cp.client().await?;
            let path = cp.kubeconfig_path().to_path_buf();
            (Some(cp), client, Some(path))
        }
    };
    // The testbed's PostgreSQL runs beside its etcd; with a cluster of one's own, a URL
    // given or a PostgreSQL started in the state folder.
    let mut database = None;
    let database_url = match (
        &options.database_url,
        control_plane.as_ref().and_then(ControlPlane::database_url),
    ) {
        (Some(url), _) => url.clone(),
        (None, Some(url)) => url,
        (None, None) => {
            let postgres = Postgres::start(&options.state_dir).await?;
            let url = postgres.url();
            database = Some(postgres);
            url
        }
    };
    let store = Store::connect(&database_url, Duration::from_secs(60)).await?;
    phases.done(match control_plane.as_ref() {
        Some(cp) if cp.reused() => "control plane and PostgreSQL (reused)",
        Some(_) => "control plane and PostgreSQL started",
        None => "cluster and PostgreSQL reached",
    });
    // The CRDs go in before the node starts: the API server rebuilds its OpenAPI document
    // after them (about a CPU second), which then overlaps the node's start, mostly a wait,
    // rather than the standby worker's model load. Waited for before `dev` says it is ready.
    install_crds(&client).await?;
    phases.done("CRDs established");
    let published = {
        let client = client.clone();
        tokio::spawn(async move { await_crds_published(&client).await })
    };
    // A control plane another `kinsight dev` started runs its pods on that one's node (one
    // kubelet per machine); a cluster of one's own has its kubelets.
    let node = match (&control_plane, image_build) {
        (Some(cp), Some(build)) if !cp.reused() => {
            build
                .await
                .map_err(|e| DevError::Other(format!("building the worker image: {e}")))??;
            let node = RealNode::start(
                cp,
                RealNodeOptions {
                    images: vec![image_archive],
                    ..RealNodeOptions::default()
                },
            )
            .await?;
            phases.done("worker image built, node Ready");
            Some(node)
        }
        _ => None,
    };
    let pod_address: Option<IpAddr> = control_plane
        .as_ref()
        .map(|_| crate::testbed::node::HOST_ADDRESS.into());
    let api_key = options
        .api_key
        .clone()
        .unwrap_or_else(|| format!("ks_{}", hex::encode(rand::random::<[u8; 16]>())));
    let webhook_secret = options
        .webhook_secret
        .clone()
        .unwrap_or_else(generate_secret);
    create_tenant(
        &client,
        KEYS_NAMESPACE,
        DEV_TENANT,
        &api_key,
        &webhook_secret,
    )
    .await?;

    phases.done("dev tenant");
    // Webhook receivers on this machine listen on 127.0.0.1, photos served to the workers
    // on the address pods reach it at.
    let mut egress = crate::net::EgressPolicy::allow_loopback();
    egress.allow.extend(pod_address.map(ipnet::IpNet::from));
    let metrics = std::sync::Arc::new(crate::controller::Metrics::default());
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|e| DevError::Other(format!("cannot listen on {}: {e}", options.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DevError::Other(e.to_string()))?;
    // Workers reach the API's result ingest where pods reach this machine: the API
    // listens there too, on the same port when it is free.
    let pod_listener = match pod_address {
        Some(ip) => Some(match TcpListener::bind((ip, addr.port())).await {
            Ok(listener) => listener,
            Err(_) => TcpListener::bind((ip, 0))
                .await
                .map_err(|e| DevError::Other(format!("cannot listen on {ip}: {e}")))?,
        }),
        None => None,
    };
    let ingest_addr = match &pod_listener {
        Some(listener) => listener
            .local_addr()
            .map_err(|e| DevError::Other(e.to_string()))?,
        None => addr,
    };
    let controller_config = ControllerConfig {
        results_url: format!("http://{ingest_addr}{INGEST_PATH}"),
        worker_image: DEV_IMAGE.to_owned(),
        // Workers read the catalog from its ConfigMap, the model files from the
        // catalog's folder mounted from this machine; ONNX Runtime is the image's.
        worker_catalog: Some(node::worker_catalog(&catalog, &catalog_path)?),
        metrics: metrics.clone(),
        models: models.clone(),
        retry: options.retry.clone(),
        egress,
        job_caps: options.job_caps,
        worker_cpu: options.worker_cpu.clone(),
        worker_cpu_request: Some(options.worker_cpu_request.clone()),
        // Workers stay up for their tenant's next group, as the chart's do.
        worker_linger: DEV_WORKER_LINGER,
        // A group posted to an idle installation starts at once.
        standby_workers: options.standby_workers,
        ..ControllerConfig::default()
    };
    let mut tasks = JoinSet::new();
    let mut graceful = JoinSet::new();
    let pod_logs = options.state_dir.join("pod-logs");
    if node.is_some() {
        // A state folder used before keeps that run's logs aside, one run back.
        if pod_logs.exists() {
            let previous = options.state_dir.join("pod-logs.previous");
            let _ = std::fs::remove_dir_all(&previous);
            std::fs::rename(&pod_logs, &previous).map_err(|e| {
                DevError::Other(format!("moving {} aside: {e}", pod_logs.display()))
            })?;
        }
        std::fs::create_dir_all(&pod_logs)
            .map_err(|e| DevError::Other(format!("creating {}: {e}", pod_logs.display())))?;
        // From before the first worker pod (the standby) starts.
        tasks.spawn(node::follow_pod_logs(
            client.clone(),
            DEV_TENANT.to_owned(),
            pod_logs.clone(),
        ));
    }
    let (stop, shutdown) = Shutdown::new();
    let controller_client = client.clone();
    let controller_store = store.clone();
    let controller_shutdown = shutdown.clone();
    graceful.spawn(async move {
        if let Err(e) = crate::controller::run(
            controller_client,
            controller_store,
            controller_config,
            controller_shutdown,
        )
        .await
        {
            tracing::error!(error = %e, "controller stopped");
        }
    });
    let standby_store = store.clone();
    let (app, key_watch, keys) = router(
        client.clone(),
        store,
        ApiConfig {
            keys_namespace: KEYS_NAMESPACE.to_owned(),
            models,
            rate_limit: crate::api::DEFAULT_RATE_LIMIT,
            in_flight_limit: crate::api::DEFAULT_IN_FLIGHT_LIMIT,
        },
    );
    tasks.spawn(key_watch);
    // The demo's first request comes right away: the key just made must be known by then.
    if !crate::api::wait_for_keys(&keys).await {
        return Err(DevError::Other(
            "the API could not list its API keys within 30 s".to_owned(),
        ));
    }
    phases.done("controller running, API keys listed");
    // One process, one port: the controller's metrics are served beside the API.
    let app = app.merge(metrics.router());
    for listener in std::iter::once(listener).chain(pod_listener) {
        let (app, shutdown) = (app.clone(), shutdown.clone());
        graceful.spawn(async move {
            // Stops accepting on a stop and finishes the requests in hand.
            let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.requested());
            if let Err(e) = served.await {
                tracing::error!(error = %e, "API server stopped");
            }
        });
    }
    // As on an installation that has run a while, the first group finds a worker up with its
    // models loaded (the pod registers through the API, so after it serves).
    if node.is_some() && options.standby_workers > 0 {
        if wait_for_standby(&standby_store, DEV_TENANT).await {
            phases.done("standby worker up, models loaded");
        } else {
            println!(
                "no standby worker waits after {} s: groups start pods of their own",
                STANDBY_WAIT.as_secs()
            );
        }
    }
    match published.await {
        Ok(Ok(true)) => phases.done("CRDs in the API server's OpenAPI document"),
        Ok(Ok(false)) => println!(
            "the API server's OpenAPI document lacks the CRDs still: `kubectl explain` may not know them yet"
        ),
        Ok(Err(e)) => println!("reading the API server's OpenAPI document: {e}"),
        Err(e) => println!("waiting for the API server's OpenAPI document: {e}"),
    }
    Ok(DevEnvironment {
        api_url: format!("http://{addr}"),
        api_key,
        webhook_secret,
        kubeconfig,
        pod_address,
        graceful,
        client: client.clone(),
        pod_logs,
        tasks,
        stopping: stop,
        phases,
        node,
        _control_plane: control_plane,
        _database: database,
    })
}

impl DevEnvironment {
    pub fn print_summary(&self) {
        println!(
            "kinsight dev is running (ready {:.1} s after start)",
            self.phases.total().as_secs_f64()
        );
        for (phase, took) in &self.phases.steps {
            println!("  {:>5.1} s  {phase}", took.as_secs_f64());
        }
        println!("  API:            {}", self.api_url);
        println!("  API key:        {}", self.api_key);
        println!("  webhook secret: {}", self.webhook_secret);
        if let Some(ip) = self.pod_address {
            println!("  pods reach:     this machine at {ip} (serve photos for them there)");
        }
        if let Some(path) = &self.kubeconfig {
            println!("  kubeconfig:     {}", path.display());
            println!(
                "  try:            kubectl --kubeconfig {} get imagegroups -A",
                path.display()
            );
        }
    }

    /// Serves until interrupted (Ctrl-C or SIGTERM) or a component stops; then lets the
    /// API finish the requests and the controller the webhooks in hand (at most
    /// [`STOP_WAIT`]). Returning drops the environment, which stops the control plane and
    /// PostgreSQL it started.
    pub async fn serve(mut self) {
        tokio::select! {
            () = crate::shutdown::signal() => println!("stopping"),
            _ = self.tasks.join_next() => eprintln!("a component stopped; exiting"),
            _ = self.graceful.join_next() => eprintln!("a component stopped; exiting"),
        }
        self.stop().await;
    }

    /// Stops the controller and the API cleanly (at most [`STOP_WAIT`]), then the rest;
    /// the control plane and PostgreSQL go when the environment is dropped.
    pub async fn stop(mut self) {
        if self.node.is_some() {
            match node::keep_pod_logs(&self.client, DEV_TENANT, &self.pod_logs).await {
                Ok(0) => {}
                Ok(kept) => println!(
                    "kept the logs of {kept} worker pods in {}",
                    self.pod_logs.display()
                ),
                Err(e) => eprintln!("keeping the worker pods' logs: {e}"),
            }
        }
        self.stopping.fire();
        let graceful = &mut self.graceful;
        if tokio::time::timeout(STOP_WAIT, async {
            while graceful.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            eprintln!("the controller or the API did not stop within {STOP_WAIT:?}");
        }
        self.graceful.shutdown().await;
        self.tasks.shutdown().await;
    }
}

/// The steps of a start and how long each took (the user sees where the wait went).
#[derive(Debug)]
struct Phases {
    started: Instant,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Default for Phases {
    fn default() -> Self {
        let now = Instant::now();
        Phases {
            started: now,
            last: now,
            steps: Vec::new(),
        }
    }
}

impl Phases {
    fn done(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.steps.push((phase, now - self.last));
        self.last = now;
    }

    fn total(&self) -> Duration {
        self.last - self.started
    }
}

/// How long `kinsight dev` waits for its controller and API to stop cleanly.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// `kinsight demo`: submits the sample photos as one group, prints every verified
/// webhook as it arrives, and returns once the group's completion event came.
pub async fn demo(options: DevOptions, photos: PathBuf, timeout: Duration) -> Result<(), DevError> {
    let env = start(options).await?;
    env.print_summary();
    let (photos_addr, _photos) = match env.pod_address {
        Some(ip) => serve_folder_on(photos.clone(), ip).await,
        None => serve_folder(photos.clone()).await,
    }
    .map_err(|e| DevError::Other(e.to_string()))?;
    let (hook_addr, mut events, _hook) = webhook_receiver(&env.webhook_secret)
        .await
        .map_err(DevError::Other)?;
    let mut names: Vec<String> = std::fs::read_dir(&photos)
        .map_err(|e| DevError::Other(format!("reading {}: {e}", photos.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png") || n.ends_with(".jpg") || n.ends_with(".jpeg"))
        .collect();
    names.sort();
    let images: Vec<_> = names
        .iter()
        .map(|n| serde_json::json!({ "url": format!("http://{photos_addr}/{n}"), "metadata": { "file": n } }))
        .collect();
    let body = serde_json::json!({
        "images": images,
        "models": ["object_detection", "image_classification"],
        "webhookUrl": format!("http://{hook_addr}/hook"),
        "metadata": { "demo": "sample photos" },
    });
    let http = reqwest::Client::new();
    let submitted = Instant::now();
    let response = http
        .post(format!("{}/v1/image-groups", env.api_url))
        .bearer_auth(&env.api_key)
        .json(&body)
        .send()
        .await
        .map_err(|e| DevError::Other(format!("submitting: {e}")))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::ACCEPTED {
        return Err(DevError::Other(format!(
            "the API answered {status}: {text}"
        )));
    }
    println!("submitted {} photos: {text}", names.len());
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut first_webhook = true;
    loop {
        tokio::select! {
            _ = &mut deadline => return Err(DevError::Other(format!("no image_group.completed within {timeout:?}"))),
            event = events.recv() => {
                let Some(event) = event else { return Err(DevError::Other("webhook receiver stopped".into())) };
                let kind = event.payload["type"].as_str().unwrap_or_default().to_owned();
                if first_webhook {
                    first_webhook = false;
                    println!(
                        "\nfirst webhook {:.2} s after the POST, {:.1} s after start",
                        submitted.elapsed().as_secs_f64(),
                        env.phases.started.elapsed().as_secs_f64()
                    );
                }
                println!(
                    "\n[{:>6.2}s] verified webhook {} ({kind})\n{}",
                    submitted.elapsed().as_secs_f64(),
                    event.id,
                    serde_json::to_string_pretty(&event.payload).unwrap_or_default()
                );
                if kind == "image_group.completed" {
                    println!("\ngroup completed in {:.2}s", submitted.elapsed().as_secs_f64());
                    let group = event.payload["data"]["groupId"].as_str().unwrap_or_default();
                    wait_until_recorded(&http, &env, group).await;
                    env.stop().await;
                    return Ok(());
                }
            }
        }
    }
}

/// Waits (at most 10 s) until the group's status records every delivery as done. The
/// controller runs in this process: exiting before it has recorded the last one would make
/// the next `kinsight dev` send that event again, to a receiver that is gone.
async fn wait_until_recorded(http: &reqwest::Client, env: &DevEnvironment, group: &str) {
    let url = format!("{}/v1/image-groups/{group}/deliveries", env.api_url);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let listed = http.get(&url).bearer_auth(&env.api_key).send().await;
        let body: serde_json::Value = match listed {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        // Pending or being sent (claimed by the dispatcher, its outcome not recorded yet).
        let open = |d: &serde_json::Value| d["state"] != "delivered" && d["state"] != "failed";
        let pending = body["deliveries"]
            .as_array()
            .is_none_or(|all| all.iter().any(open));
        if !pending {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("warning: the group's last deliveries were not recorded within 10 s");
}

fn absolute(path: &Path) -> Result<PathBuf, DevError> {
    std::path::absolute(path).map_err(|e| DevError::Other(format!("{}: {e}", path.display())))
}

/// The `kinsight` binary the worker image is built from: `KINSIGHT_BIN`, else the
/// one beside this executable (`cargo build` puts `kinsight` and `kinsight-dev` together).
pub fn product_binary() -> Result<PathBuf, DevError> {
    if let Some(path) = std::env::var_os("KINSIGHT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let own =
        std::env::current_exe().map_err(|e| DevError::Other(format!("own executable: {e}")))?;
    let beside = own.with_file_name("kinsight");
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(DevError::Other(format!(
            "the worker image is built from the kinsight binary, and there is none beside {} \
             (build both: cargo build --release; or set KINSIGHT_BIN)",
            own.display()
        )))
    }
}
