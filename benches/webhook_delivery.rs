//! Webhook delivery throughput and latency of the real controller against a real local control
//! plane: `cargo bench --bench webhook_delivery` (a command, not a test; `harness = false`).
//!
//! ImageGroups are created through the kube API (as the REST API does) and each image's result
//! is stored as the result ingest stores it (`Store::store_results`, which records the image
//! events with the results, `BATCH` images a call) right after its group exists;
//! no worker runs (Jobs stay pending: there is no node). The controller runs in this
//! process on its own runtime, and a fast receiver on 127.0.0.1 records each `webhook-id` and
//! when it arrived (no signature check: that is the receiver's cost, not the controller's).
//!
//! Measured: `image.completed` deliveries per second over the run, and the latency from a
//! result's write to its event's first receipt (p50/p90/p99/max); plus where the time goes:
//! CPU seconds of kube-apiserver, etcd, the controller's runtime and this harness, and the
//! API server's own request counts, durations and bytes per verb and resource.
//!
//! Settings (environment): `GROUP_COUNT` (10; not `GROUPS`, which bash keeps for itself), `IMAGES` per group (1000, at most 10,000),
//! `SUBSCRIPTIONS` per namespace besides each group's own webhook (0; each its own URL on
//! the receiver), `VERIFY=1` to check every request's Standard Webhooks signature, `EVENTS`
//! to wait for (GROUP_COUNT x IMAGES x endpoints), `WRITERS` result writers at once at
//! most (64; there is one per worker Job, 1000 images each, and it has one write in
//! flight at a time, as a worker's upload does), `BATCH` results per
//! write (1; a worker's upload stores up to 500 in one), `RATE` results stored per second at
//! most (0: as fast as the writers go; an offered load below capacity shows the latency of
//! the path itself rather than of a backlog), `QUEUED_FIRST=1` to store every
//! result before the controller starts (the delivery path alone; rate and latency then count
//! from its start), `NAMESPACES` the groups are spread over (1; each is a tenant),
//! `MAX_SECS` for the measured part (900), `RUST_LOG` (warn).

mod common;

use common::{Envelope, ms, percentile, print_api_requests};
use kinsight::testbed::api_metrics;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kinsight::api::{SIGNING_SECRET_KEY, SIGNING_SECRET_NAME};
use kinsight::controller::{ControllerConfig, ImageEvents, MAX_IMAGES_PER_JOB, job_name};
use kinsight::crd::{
    ImageEntry, ImageGroup, ImageGroupSpec, SecretKeyRef, WebhookSubscription, WebhookTarget,
};
use kinsight::inference::{Catalog, ClassScore, ModelOutput};
use kinsight::results::{GroupRef, ImageResult, ModelResult, Timings};
use kinsight::store::Store;
use kinsight::testbed::TestCluster;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};

const NAMESPACE_PREFIX: &str = "bench-webhooks";
const KEYS_NAMESPACE: &str = "kinsight-system";
const MODEL: &str = "image_classification";
/// Thread names (at most 15 characters: that is what /proc keeps) tell CPU use apart.
const CONTROLLER_THREADS: &str = "kinsight-ctrl";
const HARNESS_THREADS: &str = "bench-harness";

struct Settings {
    groups: usize,
    images: usize,
    /// WebhookSubscriptions per namespace, besides each group's own webhook.
    subscriptions: usize,
    /// Check each request's signature at the receiver.
    verify: bool,
    events: usize,
    writers: usize,
    namespaces: usize,
    max: Duration,
    /// Results per write (the ingest stores a worker's batch in one).
    batch: usize,
    /// Results stored per second at most (0: as fast as the writers go).
    rate: f64,
    /// Store every result before the controller starts: the delivery path alone.
    queued_first: bool,
}

fn setting<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let groups = setting("GROUP_COUNT", 10usize).max(1);
        let images = setting("IMAGES", 1000usize).clamp(1, kinsight::crd::MAX_IMAGES);
        let subscriptions = setting("SUBSCRIPTIONS", 0usize).min(50);
        let all = groups * images * (subscriptions + 1);
        let events = setting("EVENTS", all).clamp(1, all);
        Settings {
            groups,
            images,
            subscriptions,
            verify: setting("VERIFY", 0u8) == 1,
            events,
            writers: setting("WRITERS", 64usize).max(1),
            namespaces: setting("NAMESPACES", 1usize).clamp(1, groups),
            max: Duration::from_secs(setting("MAX_SECS", 900u64)),
            batch: setting("BATCH", 1usize).clamp(1, kinsight::results::MAX_BATCH),
            queued_first: setting("QUEUED_FIRST", 0u8) == 1,
            rate: setting("RATE", 0.0f64).max(0.0),
        }
    }
}

/// What the receiver saw.
#[derive(Default)]
struct Received {
    requests: u64,
    /// Requests whose `webhook-id` had been received before.
    duplicates: u64,
    ids: HashSet<String>,
    /// First receipt of each image's `image.completed`, by (endpoint, group, image).
    images: HashMap<(String, String, String), Instant>,
    /// Requests whose signature did not verify (with `VERIFY=1`).
    bad_signatures: u64,
    group_events: u64,
    other_events: u64,
    last_image_event: Option<Instant>,
}

type Shared<T> = Arc<Mutex<T>>;

/// The receiver's state: what it saw, and the verifier of signatures (with `VERIFY=1`).
#[derive(Clone)]
struct Receiver {
    received: Shared<Received>,
    verifier: Option<Arc<standardwebhooks::Webhook>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    UrlPath(endpoint): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let received = receiver.received;
    if let Some(verifier) = &receiver.verifier
        && verifier.verify(&body, &headers).is_err()
    {
        received.lock().expect("receiver state").bad_signatures += 1;
        return StatusCode::BAD_REQUEST;
    }
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(event) = serde_json::from_slice::<Envelope>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut r = received.lock().expect("receiver state");
    r.requests += 1;
    if !r.ids.insert(id) {
        r.duplicates += 1;
        return StatusCode::NO_CONTENT;
    }
    match (
        event.kind.as_str(),
        event.data.group_id,
        event.data.image_id,
    ) {
        ("image.completed", Some(group), Some(image)) => {
            r.images.entry((endpoint, group, image)).or_insert(at);
            r.last_image_event = Some(at);
        }
        ("image_group.completed", _, _) => r.group_events += 1,
        _ => r.other_events += 1,
    }
    StatusCode::NO_CONTENT
}

/// `count` WebhookSubscriptions in `namespace`, each to its own URL under `hooks`, signed
/// with the tenant's secret.
async fn subscribe(client: &kube::Client, namespace: &str, hooks: &str, count: usize) {
    let api: Api<WebhookSubscription> = Api::namespaced(client.clone(), namespace);
    for k in 0..count {
        let subscription: WebhookSubscription = serde_json::from_value(serde_json::json!({
            "apiVersion": "kinsight.io/v1alpha1",
            "kind": "WebhookSubscription",
            "metadata": { "name": format!("sub-{k}") },
            "spec": {
                "url": format!("{hooks}/sub-{k}"),
                "secretRef": { "name": SIGNING_SECRET_NAME, "key": SIGNING_SECRET_KEY },
            },
        }))
        .expect("subscription");
        api.create(&PostParams::default(), &subscription)
            .await
            .expect("create WebhookSubscription");
    }
}

/// When each result's write returned, by (group, image).
#[derive(Default)]
struct Written {
    at: HashMap<(String, String), Instant>,
    groups_created: usize,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn group_spec(images: usize, hook: &str) -> ImageGroupSpec {
    ImageGroupSpec {
        images: (0..images)
            .map(|i| ImageEntry {
                id: Some(format!("i{i}")),
                // Never fetched: no worker runs.
                url: format!("http://127.0.0.1:9/bench/{i}.jpg"),
                metadata: BTreeMap::new(),
            })
            .collect(),
        models: vec![MODEL.to_owned()],
        webhook: Some(WebhookTarget {
            url: hook.to_owned(),
            secret_ref: SecretKeyRef {
                name: SIGNING_SECRET_NAME.to_owned(),
                key: SIGNING_SECRET_KEY.to_owned(),
            },
        }),
        metadata: BTreeMap::from([("bench".to_owned(), "webhook_delivery".to_owned())]),
    }
}

/// A tiny result, as a worker would write it for one classified image.
fn result_spec(group: &str, image: &str) -> ImageResult {
    ImageResult {
        group: group.to_owned(),
        image_id: image.to_owned(),
        failure: None,
        width: Some(64),
        height: Some(48),
        perceptual_hash: None,
        outputs: BTreeMap::from([(
            MODEL.to_owned(),
            ModelResult {
                output: ModelOutput {
                    classes: vec![ClassScore {
                        label: "espresso".to_owned(),
                        confidence: 0.9,
                    }],
                    ..ModelOutput::default()
                },
                error: None,
                inference_ms: 1.0,
            },
        )]),
        timings: Timings::default(),
    }
}

fn namespace(k: usize) -> String {
    format!("{NAMESPACE_PREFIX}-{k}")
}

/// Creates the groups one after the other (round robin over the namespaces), waits for
/// their Jobs (as a worker would exist only then), then stores their results as their
/// workers would, all groups at once.
async fn produce(
    client: kube::Client,
    settings: Arc<Settings>,
    store: Store,
    hook: String,
    written: Shared<Written>,
) {
    let (groups, images, writers) = (settings.groups, settings.images, settings.writers);
    let mut made = Vec::new();
    for g in 0..groups {
        let name = format!("bench-g{g:02}");
        let ns = namespace(g % settings.namespaces);
        let api: Api<ImageGroup> = Api::namespaced(client.clone(), &ns);
        let object = ImageGroup {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            spec: group_spec(images, &hook),
            status: None,
        };
        let created = api
            .create(&PostParams::default(), &object)
            .await
            .expect("create ImageGroup");
        let group = GroupRef {
            namespace: ns,
            name: name.clone(),
            uid: created.uid().expect("uid"),
        };
        written.lock().expect("written").groups_created += 1;
        // The ingest's own rules: a batch's image events are recorded with its results.
        made.push((group, Arc::new(ImageEvents::new(Arc::new(created)))));
    }
    if !settings.queued_first {
        // A worker writes results only once the controller has made its Job.
        for (group, _) in &made {
            let jobs: Api<Job> = Api::namespaced(client.clone(), &group.namespace);
            let job = job_name(&group.name, 1, 0);
            let deadline = Instant::now() + Duration::from_secs(60);
            while jobs.get_opt(&job).await.ok().flatten().is_none() {
                assert!(Instant::now() < deadline, "no Job {job} after 60 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // As workers write them: one writer per worker Job (a group's images in runs of
    // MAX_IMAGES_PER_JOB by place), each with one batch in flight at a time, all at once
    // (at most WRITERS). With a rate, each writer takes its share of it.
    let shards: Vec<(&GroupRef, &ImageEvents, Vec<usize>)> = made
        .iter()
        .flat_map(|(group, planner)| {
            (0..images)
                .collect::<Vec<_>>()
                .chunks(MAX_IMAGES_PER_JOB)
                .map(|shard| (group, planner.as_ref(), shard.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect();
    let count = shards.len();
    let paced_from = Instant::now();
    let (store, written_ref) = (&store, &written);
    let settings = &settings;
    futures::stream::iter(shards.into_iter().enumerate())
        .for_each_concurrent(writers, |(w, (group, planner, shard))| async move {
            for (k, batch) in shard.chunks(settings.batch).enumerate() {
                if settings.rate > 0.0 {
                    let n = (k * count + w) * settings.batch;
                    let due = paced_from + Duration::from_secs_f64(n as f64 / settings.rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let specs: Vec<ImageResult> = batch
                    .iter()
                    .map(|i| result_spec(&group.name, &format!("i{i}")))
                    .collect();
                let started = Instant::now();
                // Transient API errors are retried; a lasting one ends the run.
                let mut tries = 0;
                while let Err(e) = store.store_results(group, 1, &specs, Some(planner)).await {
                    tries += 1;
                    assert!(tries < 5, "writing results of {}: {e}", group.name);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let done = Instant::now();
                let mut w = written_ref.lock().expect("written");
                w.first.get_or_insert(started);
                w.last = Some(done);
                for i in batch {
                    w.at.insert((group.name.clone(), format!("i{i}")), done);
                }
            }
        })
        .await;
}

/// CPU seconds (user + system) of a process or thread from its `stat` file.
fn cpu_seconds(stat_path: &Path, ticks: f64) -> Option<f64> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// CPU seconds of PostgreSQL: the postmaster with the backends it has reaped, plus every
/// backend alive now (one process per connection).
fn postgres_cpu_seconds(postmaster: u32, ticks: f64) -> f64 {
    let stat = |pid: &str| -> Option<Vec<f64>> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields = text.rsplit_once(')')?.1.split_whitespace();
        Some(fields.map(|f| f.parse().unwrap_or(0.0)).collect())
    };
    // After the command: state, ppid, ..., utime (11), stime (12), cutime (13), cstime (14).
    let own = stat(&postmaster.to_string())
        .map(|f| f.iter().skip(11).take(4).sum::<f64>())
        .unwrap_or(0.0);
    let children: f64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| stat(&entry.file_name().to_string_lossy()))
        .filter(|f| f.get(1).copied() == Some(f64::from(postmaster)))
        .map(|f| f.iter().skip(11).take(2).sum::<f64>())
        .sum();
    (own + children) / ticks
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds by component: control-plane processes by name, this process' threads by
/// thread-name prefix.
fn cpu_snapshot(pids: &[u32], ticks: f64) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if let Some(s) = cpu_seconds(Path::new(&format!("/proc/{pid}/stat")), ticks) {
            *out.entry(comm.trim().to_owned()).or_default() += s;
        }
    }
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let label = if comm.starts_with(CONTROLLER_THREADS) {
                "controller (in-process runtime)"
            } else if comm.starts_with(HARNESS_THREADS) {
                "bench harness (receiver, writers)"
            } else {
                "bench other threads"
            };
            if let Some(s) = cpu_seconds(&task.path().join("stat"), ticks) {
                *out.entry(label.to_owned()).or_default() += s;
            }
        }
    }
    out
}

fn main() {
    if !common::started_by_cargo_bench("webhook_delivery") {
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    kinsight::install_crypto_provider();
    let settings = Settings::from_env();
    let harness = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(HARNESS_THREADS)
        .enable_all()
        .build()
        .expect("harness runtime");
    let controller = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CONTROLLER_THREADS)
        .enable_all()
        .build()
        .expect("controller runtime");
    harness.block_on(run(Arc::new(settings), controller.handle().clone()));
    controller.shutdown_background();
}

async fn run(settings: Arc<Settings>, controller_rt: tokio::runtime::Handle) {
    let setup_started = Instant::now();
    let cluster = TestCluster::start().await.expect("control plane starts");
    let client = cluster.client();
    let store = Store::connect(&cluster.database_url(), Duration::from_secs(60))
        .await
        .expect("the testbed's PostgreSQL");
    kinsight::dev::install_crds(&client)
        .await
        .expect("CRDs install");
    // Every tenant signs with the same secret here, so one verifier checks them all.
    let secret = kinsight::webhook::generate_secret();
    for k in 0..settings.namespaces {
        kinsight::dev::create_tenant(
            &client,
            KEYS_NAMESPACE,
            &namespace(k),
            &format!("bench-api-key-{k}"),
            &secret,
        )
        .await
        .expect("tenant");
    }
    let catalog = Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/models/catalog.yaml"))
        .expect("catalog");

    let received: Shared<Received> = Shared::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let hooks = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let hook = format!("{hooks}/request");
    let verifier = settings
        .verify
        .then(|| Arc::new(standardwebhooks::Webhook::new(&secret).expect("the signing secret")));
    let app = Router::new()
        .route("/hook/{endpoint}", post(receive))
        .with_state(Receiver {
            received: received.clone(),
            verifier,
        });
    for k in 0..settings.namespaces {
        subscribe(&client, &namespace(k), &hooks, settings.subscriptions).await;
    }
    let receiver = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // The controller gets its own client, made on its own runtime, so that its HTTP
    // connections (and their CPU) are its own.
    let config = ControllerConfig {
        models: catalog.names().map(str::to_owned).collect(),
        egress: kinsight::net::EgressPolicy::allow_loopback(),
        // No worker runs here.
        results_url: "http://127.0.0.1:9/unused".to_owned(),
        retry: kinsight::webhook::RetrySchedule(vec![
            Duration::from_secs(1),
            Duration::from_secs(2),
        ]),
        ..ControllerConfig::default()
    };
    let kubeconfig = cluster
        .control_plane()
        .map(|cp| cp.kubeconfig_path().to_path_buf());
    let controller_store = store.clone();
    let start_controller = move || {
        controller_rt.spawn(async move {
            let client = match kubeconfig {
                Some(path) => kinsight::testbed::client_from_kubeconfig(&path)
                    .await
                    .expect("client"),
                None => kube::Client::try_default().await.expect("client"),
            };
            if let Err(e) = kinsight::controller::run(
                client,
                controller_store,
                config,
                kinsight::shutdown::Shutdown::never(),
            )
            .await
            {
                eprintln!("controller stopped: {e}");
            }
        })
    };
    let written: Shared<Written> = Shared::default();
    let produce_all = || {
        tokio::spawn(produce(
            client.clone(),
            settings.clone(),
            store.clone(),
            hook.clone(),
            written.clone(),
        ))
    };
    // The delivery path alone: every result is stored before a controller runs.
    let queued = if settings.queued_first {
        let producer = produce_all();
        producer.await.expect("every result stored first");
        eprintln!(
            "{} results stored before the controller starts",
            written.lock().expect("written").at.len()
        );
        true
    } else {
        false
    };
    let controller = start_controller();

    let pids = cluster
        .control_plane()
        .map(|cp| cp.pids())
        .unwrap_or_default();
    let ticks = clock_ticks();
    let postmaster = cluster
        .control_plane()
        .and_then(|cp| cp.postgres())
        .map(|p| p.pid());
    let postgres_cpu = || postmaster.map(|pid| postgres_cpu_seconds(pid, ticks));
    let postgres_before = postgres_cpu();
    let statements = statements_reset(&store).await;
    let cpu_before = cpu_snapshot(&pids, ticks);
    let api_before = api_metrics(&client).await;
    eprintln!(
        "setup {:.1}s; {} groups x {} images in {} namespace(s), {} endpoint(s) each, waiting for {} image.completed, {} writers, limit {}s",
        setup_started.elapsed().as_secs_f64(),
        settings.groups,
        settings.images,
        settings.namespaces,
        settings.subscriptions + 1,
        settings.events,
        settings.writers,
        settings.max.as_secs()
    );

    let started = Instant::now();
    let producer = if queued {
        tokio::spawn(async {})
    } else {
        produce_all()
    };
    let mut last_report = (Instant::now(), 0usize);
    let mut target_reached_at: Option<Instant> = None;
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (events, group_events) = {
            let r = received.lock().expect("received");
            (r.images.len(), r.group_events)
        };
        if events >= settings.events && target_reached_at.is_none() {
            target_reached_at = Some(Instant::now());
        }
        // After the target, a short wait for the group events (informational).
        if let Some(at) = target_reached_at
            && (group_events as usize >= settings.groups * (settings.subscriptions + 1)
                || at.elapsed() > Duration::from_secs(30))
        {
            break "complete";
        }
        if started.elapsed() > settings.max {
            break "time limit";
        }
        if producer.is_finished()
            && written.lock().expect("written").at.len() < settings.groups * settings.images
        {
            break "producer failed";
        }
        if last_report.0.elapsed() >= Duration::from_secs(10) {
            let (groups, writes) = {
                let w = written.lock().expect("written");
                (w.groups_created, w.at.len())
            };
            let rate = (events - last_report.1) as f64 / last_report.0.elapsed().as_secs_f64();
            eprintln!(
                "{:>5.0}s  groups {groups:>3}  results written {writes:>6}  image.completed received {events:>6}  ({rate:.0}/s over the last interval)  group events {group_events}",
                started.elapsed().as_secs_f64()
            );
            last_report = (Instant::now(), events);
        }
    };
    let mut cpu_after = cpu_snapshot(&pids, ticks);
    if let (Some(before), Some(after)) = (postgres_before, postgres_cpu()) {
        // Reported as a difference like the others: the before snapshot gets a zero.
        cpu_after.insert("postgres (all backends)".to_owned(), after - before);
    }
    let api_after = api_metrics(&client).await;
    let statement_rows = if statements {
        read_statements(&store).await
    } else {
        None
    };
    let measured = started.elapsed();
    producer.abort();
    let _ = producer.await;
    controller.abort();

    // Size of one group as the controller reads and writes it each reconcile.
    let sample = Api::<ImageGroup>::namespaced(client.clone(), &namespace(0))
        .get_opt("bench-g00")
        .await
        .ok()
        .flatten();
    receiver.abort();

    let w = written.lock().expect("written");
    let r = received.lock().expect("received");
    let mut latencies: Vec<Duration> = Vec::new();
    let mut early = 0;
    for ((_, group, image), at) in &r.images {
        if let Some(wrote) = w.at.get(&(group.clone(), image.clone())) {
            if at < wrote {
                early += 1;
            }
            // Queued first: from when a controller could first send it.
            latencies.push(at.saturating_duration_since((*wrote).max(started)));
        }
    }
    latencies.sort_unstable();
    // Queued first: the rate is over the controller's run.
    let first_write = if queued {
        started
    } else {
        w.first.unwrap_or(started)
    };
    let window = r
        .last_image_event
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(first_write));
    let writes_window = w
        .last
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(first_write));
    let per_sec = |n: usize, d: Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };

    println!();
    println!(
        "webhook delivery benchmark ({outcome} after {:.1}s)",
        measured.as_secs_f64()
    );
    println!(
        "  {} groups x {} images in {} namespace(s), {} endpoint(s) per group{}, model {MODEL}, one result writer per worker Job (at most {} at once), {} results a write{}",
        settings.groups,
        settings.images,
        settings.namespaces,
        settings.subscriptions + 1,
        if settings.verify {
            " (every signature checked)"
        } else {
            ""
        },
        settings.writers,
        settings.batch,
        if queued {
            "; every result stored before the controller started (rate and latency from its start)"
        } else {
            ""
        }
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| results written | {} in {:.1} s ({:.0}/s) |",
        w.at.len(),
        writes_window.as_secs_f64(),
        per_sec(w.at.len(), writes_window)
    );
    println!(
        "| image.completed received (distinct) | {} |",
        r.images.len()
    );
    println!(
        "| deliveries/s (first write -> last event) | {:.1} |",
        per_sec(r.images.len(), window)
    );
    println!(
        "| webhook requests / duplicates | {} / {} |",
        r.requests, r.duplicates
    );
    println!("| image_group.completed received | {} |", r.group_events);
    if settings.verify {
        println!(
            "| requests whose signature did not verify | {} |",
            r.bad_signatures
        );
    }
    println!(
        "| latency write -> receipt p50 | {} |",
        ms(percentile(&latencies, 50.0))
    );
    println!("| latency p90 | {} |", ms(percentile(&latencies, 90.0)));
    println!("| latency p99 | {} |", ms(percentile(&latencies, 99.0)));
    println!(
        "| latency max | {} |",
        ms(latencies.last().copied().unwrap_or_default())
    );
    if early > 0 {
        println!("| events received before their write returned (counted as 0) | {early} |");
    }
    if let Some(group) = &sample {
        let status = group.status.clone().unwrap_or_default();
        let bytes = serde_json::to_vec(group).map(|b| b.len()).unwrap_or(0);
        println!(
            "| one group object (bench-g00) | {} KiB, its status counting {} endpoints |",
            bytes / 1024,
            status.deliveries.len()
        );
    }
    println!();
    println!(
        "CPU seconds during the measured part ({:.1} s wall, 2 cores):",
        measured.as_secs_f64()
    );
    println!("| component | CPU s |");
    println!("|---|---|");
    let mut cpu: Vec<(String, f64)> = cpu_after
        .iter()
        .map(|(k, v)| (k.clone(), v - cpu_before.get(k).copied().unwrap_or(0.0)))
        .collect();
    cpu.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (name, seconds) in cpu {
        println!("| {name} | {seconds:.1} |");
    }
    if let (Some(before), Some(after)) = (api_before, api_after) {
        print_api_requests(&before, &after);
    }
    if let Some(rows) = statement_rows {
        print_statements(&rows);
    }
    drop(cluster);
}

/// With `KINSIGHT_POSTGRES_STATEMENTS=1`, PostgreSQL keeps per-statement figures: start
/// them afresh for the measured part.
async fn statements_reset(store: &Store) -> bool {
    if std::env::var(kinsight::testbed::postgres::STATEMENTS_ENV).as_deref() != Ok("1") {
        return false;
    }
    let sql =
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset();";
    match store.execute_batch(sql).await {
        Ok(()) => true,
        Err(e) => {
            eprintln!("pg_stat_statements unavailable: {e}");
            false
        }
    }
}

/// The statements that took the database's time during the measured part.
async fn read_statements(store: &Store) -> Option<Vec<Vec<String>>> {
    let rows = store
        .query_text(
            r"SELECT round(total_exec_time)::text || ' ms', calls::text,
                    round((total_exec_time / calls)::numeric, 3)::text || ' ms',
                    regexp_replace(left(query, 110), '\s+', ' ', 'g')
             FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12",
        )
        .await;
    rows.map_err(|e| eprintln!("reading pg_stat_statements: {e}"))
        .ok()
}

fn print_statements(rows: &[Vec<String>]) {
    println!();
    println!("Database statements by time (pg_stat_statements):");
    println!("| total | calls | mean | statement |");
    println!("|---|---|---|---|");
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}
