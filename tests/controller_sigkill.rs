//! The real `kinsight controller` binary, SIGKILLed at random moments while a group is
//! processed and its webhooks delivered, and restarted each time: no event is lost, a
//! re-sent event keeps its `webhook-id`, the group event is one event, and there is one Job.
//!
//! Webhooks go through a pass-through in front of the harness' verifying receiver that
//! forwards each request at once and then holds the answer for up to a second: an event is
//! received as soon as it is sent, but the controller learns so only later, so kills land
//! between "sent" and "recorded as delivered" (the case that makes re-sends).
//!
//! The first kill comes as soon as the first image event has arrived (so at least one kill
//! lands while delivery is under way: with the 12 events delivered within 2-3 s, a random
//! first wait often missed it); the rest of the kill schedule is random; the seed is
//! printed, and `KINSIGHT_SIGKILL_SEED=<n>` replays it. The last controller is stopped the
//! way the kubelet stops a pod, by SIGTERM, and must exit cleanly.
//!
//! The second test runs two replicas in the leader election, as the chart does, and adds a
//! PostgreSQL restart to the kills: the chaos of the state plane.

mod common;

crate::real_node_tests!(
    sigkilled_controller_loses_no_event,
    two_sigkilled_replicas_and_a_database_restart_lose_nothing,
);

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Harness, of_type, repo_path};
use kinsight::controller::ControllerConfig;
use kinsight::crd::{GroupPhase, ImageGroup, ImageGroupStatus};
use kinsight::dev::ReceivedWebhook;
use kube::Api;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const IMAGES: usize = 12;
/// The replicas' test: enough that results are still being stored and sent when PostgreSQL
/// restarts, after two kills.
const CHAOS_IMAGES: usize = 60;
/// From submission until `image_group.completed`, kills included.
const LIMIT: Duration = Duration::from_secs(240);

/// One run of the controller binary. Dropping it SIGKILLs the process (`kill_on_drop`), so
/// no exit path of the test leaves a controller behind.
struct ControllerProcess {
    child: Child,
}

impl ControllerProcess {
    /// The controller binary configured as the harness' own controller would be (`config`:
    /// [`Harness::controller_config`]), but with the test's retry schedule; a replica in the
    /// leader election under `identity` (a 3 s Lease), or alone without one.
    fn spawn(
        h: &Harness,
        kubeconfig: &Path,
        config: &ControllerConfig,
        log: &Path,
        identity: Option<&str>,
    ) -> Self {
        let log_file = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("controller log file")
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_kinsight"));
        command
            .arg("controller")
            .arg("--catalog")
            .arg(repo_path("models/catalog.yaml"))
            .args(["--retry-schedule", "1s,2s"])
            .arg("--allow-egress")
            .arg(config.egress.to_string())
            .arg("--results-url")
            .arg(&config.results_url)
            .arg("--keys-namespace")
            .arg(&config.tenancy.keys_namespace)
            .arg("--service-account")
            .arg(&config.tenancy.service_account.1)
            .arg("--lease-namespace")
            .arg(&config.tenancy.service_account.0)
            .arg("--worker-image")
            .arg(&config.worker_image);
        match identity {
            Some(identity) => {
                command
                    .args(["--identity", identity])
                    .args(["--lease-duration", "3s", "--lease-renew-before", "1s"])
                    // Each replica its own metrics port, as pods have.
                    .args(["--metrics-listen", "127.0.0.1:0"]);
            }
            None => {
                command.arg("--no-leader-election");
            }
        }
        if let Some(namespace) = &config.watch_namespace {
            command.arg("--watch-namespace").arg(namespace);
        }
        if let Some(catalog) = &config.worker_catalog {
            command.arg("--worker-models-dir").arg(&catalog.models_dir);
        }
        for (name, value) in &config.worker_env {
            command.arg("--worker-env").arg(format!("{name}={value}"));
        }
        command
            .env("KUBECONFIG", kubeconfig)
            .env("KINSIGHT_DATABASE_URL", h.cluster.database_url())
            .env("RUST_LOG", "info,kube=warn,tower=warn")
            // Flags above are the whole configuration; nothing leaks in from the test's env.
            .env_remove("KINSIGHT_CATALOG")
            .env_remove("KINSIGHT_RETRY_SCHEDULE")
            .env_remove("KINSIGHT_ALLOW_EGRESS")
            .env_remove("KINSIGHT_WORKER_IMAGE")
            .env_remove("KINSIGHT_GROUP_TTL")
            .stdin(Stdio::null())
            .stdout(log_file())
            .stderr(log_file())
            .kill_on_drop(true);
        let child = command.spawn().expect("controller binary starts");
        ControllerProcess { child }
    }

    /// SIGKILL (no chance to finish anything) and reap.
    async fn sigkill(mut self) {
        self.child.start_kill().expect("SIGKILL the controller");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("killed controller exits")
            .expect("wait");
        assert!(!status.success(), "the controller was killed: {status:?}");
    }

    /// SIGTERM, as the kubelet stops a pod: the controller finishes what it has in hand and
    /// exits 0, soon.
    async fn sigterm(mut self, log: &Path) {
        let pid = self.child.id().expect("the controller is running");
        common::run(
            std::process::Command::new("kill").args(["-TERM", &pid.to_string()]),
            "kill -TERM",
        );
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the controller did not stop within 20 s of SIGTERM; log:\n{}",
                    tail(log)
                )
            })
            .expect("wait");
        assert!(
            status.success(),
            "SIGTERM ends the controller cleanly, got {status:?}; log:\n{}",
            tail(log)
        );
    }

    /// Panics with the log if the process ended on its own (a crash is a finding).
    fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the controller exited by itself ({status:?}); log:\n{}",
                tail(log)
            );
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Forwards each webhook unchanged to `target` (the harness' verifying receiver), then
/// holds the answer for a random 0-1000 ms before passing it back.
async fn slow_answering_proxy(target: String) -> (String, tokio::task::JoinHandle<()>) {
    let http = reqwest::Client::new();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (http, target) = (http.clone(), target.clone());
                async move {
                    let mut request = http.post(&target).body(body);
                    for name in [
                        "content-type",
                        "webhook-id",
                        "webhook-timestamp",
                        "webhook-signature",
                    ] {
                        if let Some(value) = headers.get(name) {
                            request = request.header(name, value);
                        }
                    }
                    let status = match request.send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 502,
                    };
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=1000))).await;
                    axum::http::StatusCode::from_u16(status)
                        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY)
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, server)
}

fn drain(h: &mut Harness, into: &mut Vec<ReceivedWebhook>) {
    while let Ok(event) = h.webhooks.try_recv() {
        into.push(event);
    }
}

/// How many of the group's images have had their `image.completed` arrive.
fn images_arrived(events: &[ReceivedWebhook], group: &str) -> usize {
    of_type(events, "image.completed")
        .iter()
        .filter(|e| e.payload["data"]["groupId"] == group)
        .filter_map(|e| e.payload["data"]["imageId"].as_str())
        .collect::<HashSet<_>>()
        .len()
}

fn group_completed(events: &[ReceivedWebhook], group: &str) -> bool {
    of_type(events, "image_group.completed")
        .iter()
        .any(|e| e.payload["data"]["groupId"] == group)
}

async fn sigkilled_controller_loses_no_event() {
    if kinsight::testbed::use_existing_cluster() {
        eprintln!(
            "skipped: this test runs the controller binary against the local control plane's \
             kubeconfig; USE_EXISTING_CLUSTER is set"
        );
        return;
    }
    let mut h = Harness::start("tenant-sigkill").await;
    // The in-process controller stays out; the binary does the work.
    h.kill_controller().await;
    let kubeconfig: PathBuf = h
        .cluster
        .kubeconfig_path()
        .expect("a local control plane")
        .to_path_buf();
    let config = h.controller_config();
    let logs = tempfile::tempdir().expect("log dir");
    let log = logs.path().join("controller.log");

    let seed: u64 = std::env::var("KINSIGHT_SIGKILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill schedule seed: {seed} (replay with KINSIGHT_SIGKILL_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let kills = rng.random_range(6..=10);
    // Before each kill: none for the first (it follows the first image event), then 0.3-2.5 s.
    let waits: Vec<Duration> = (0..kills)
        .map(|n| match n {
            0 => Duration::ZERO,
            _ => Duration::from_millis(rng.random_range(300..=2500)),
        })
        .collect();

    let (hook_url, proxy) = slow_answering_proxy(h.hook_url.clone()).await;
    let _proxy = AbortOnDrop(proxy);
    let mut controller = ControllerProcess::spawn(&h, &kubeconfig, &config, &log, None);
    let group_id = h
        .post_photo_group(IMAGES, &["image_classification"], &hook_url)
        .await;
    let started = Instant::now();
    let deadline = started + LIMIT;

    // Kills start once delivery has: the first image event is in (the Job had to start, load
    // the model and process an image first, which on a loaded machine could outlast the whole
    // kill schedule).
    let mut events = Vec::new();
    if h.collect_webhooks_into(
        &mut events,
        deadline,
        |e| !of_type(e, "image.completed").is_empty(),
        |_| controller.assert_running(&log),
    )
    .await
    .is_err()
    {
        panic!(
            "no image.completed within {LIMIT:?}; controller log:\n{}",
            tail(&log)
        );
    }
    // Kills that landed while some, but not all, image events had arrived.
    let mut mid_delivery_kills = 0;
    for (n, wait) in waits.iter().enumerate() {
        tokio::time::sleep(*wait).await;
        controller.assert_running(&log);
        drain(&mut h, &mut events);
        let images_in = images_arrived(&events, &group_id);
        if (1..IMAGES).contains(&images_in) {
            mid_delivery_kills += 1;
        }
        controller.sigkill().await;
        drain(&mut h, &mut events);
        let distinct: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
        eprintln!(
            "kill {}/{kills} at {:.1}s with {images_in}/{IMAGES} image events in: {} webhook \
             requests received so far, {} distinct events",
            n + 1,
            started.elapsed().as_secs_f64(),
            events.len(),
            distinct.len()
        );
        controller = ControllerProcess::spawn(&h, &kubeconfig, &config, &log, None);
    }
    assert!(
        mid_delivery_kills > 0,
        "no kill landed while the image events were being delivered (seed {seed}); \
         the test did not exercise what it claims"
    );

    // The last controller runs undisturbed until the group event arrives.
    if h.collect_webhooks_into(
        &mut events,
        deadline,
        |e| group_completed(e, &group_id),
        |_| controller.assert_running(&log),
    )
    .await
    .is_err()
    {
        panic!(
            "no image_group.completed within {LIMIT:?}; received: {:#?}\ncontroller log:\n{}",
            common::webhook_summary(&events),
            tail(&log)
        );
    }

    let status = settled_completed_status(&mut h, &group_id, &mut events, &log).await;
    controller.assert_running(&log);
    controller.sigterm(&log).await;

    let (image_requests, group_requests) =
        assert_each_event_once(&h, &events, &group_id, &status, IMAGES).await;
    eprintln!(
        "seed {seed}: {kills} kills; {image_requests} image.completed requests for {IMAGES} \
         images ({} re-sent), {group_requests} image_group.completed request(s)",
        image_requests - IMAGES
    );
}

/// Waits for the group's final status (Completed, webhooks delivered: status is written after
/// sending), then a moment longer, so that a late re-send (a duplicate) would be seen too.
async fn settled_completed_status(
    h: &mut Harness,
    group_id: &str,
    events: &mut Vec<ReceivedWebhook>,
    log: &Path,
) -> ImageGroupStatus {
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    let final_status = common::poll(Duration::from_secs(30), async || {
        let status = groups
            .get(group_id)
            .await
            .expect("group")
            .status
            .unwrap_or_default();
        let delivered = status
            .conditions
            .iter()
            .any(|c| c.type_ == "WebhooksDelivered" && c.status == "True");
        (delivered && status.phase == GroupPhase::Completed).then_some(status)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drain(h, events);
    final_status.unwrap_or_else(|| {
        panic!(
            "group did not reach Completed with WebhooksDelivered=True; log:\n{}",
            tail(log)
        )
    })
}

/// Every image's result stored and its event arrived, re-sends only under the same
/// `webhook-id`, one group event after every image event, and one Job. Returns how many
/// image and group event requests arrived.
async fn assert_each_event_once(
    h: &Harness,
    events: &[ReceivedWebhook],
    group_id: &str,
    status: &ImageGroupStatus,
    images: usize,
) -> (usize, usize) {
    assert_eq!(status.images_done as usize, images);
    assert_eq!(status.images_failed, 0);
    let completed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .expect("Completed condition");
    assert_eq!(completed.status, "True", "{completed:?}");
    assert_eq!(
        h.stored_results(group_id).await.len(),
        images,
        "every image's result is stored"
    );

    let ours: Vec<&ReceivedWebhook> = events
        .iter()
        .filter(|e| e.payload["data"]["groupId"] == group_id)
        .collect();
    assert!(
        ours.iter().all(|e| e.payload["type"] == "image.completed"
            || e.payload["type"] == "image_group.completed"),
        "only image.completed and image_group.completed: {:#?}",
        ours.iter().map(|e| &e.payload["type"]).collect::<Vec<_>>()
    );
    // Every image's event arrived; a re-send after a kill keeps the webhook-id.
    let mut ids_by_image: HashMap<String, HashSet<String>> = HashMap::new();
    for e in ours
        .iter()
        .filter(|e| e.payload["type"] == "image.completed")
    {
        let image = e.payload["data"]["imageId"].as_str().unwrap_or_default();
        ids_by_image
            .entry(image.to_owned())
            .or_default()
            .insert(e.id.clone());
    }
    let expected: HashSet<String> = (0..images).map(|i| format!("i{i}")).collect();
    let arrived: HashSet<String> = ids_by_image.keys().cloned().collect();
    assert_eq!(arrived, expected, "every image.completed arrived");
    assert!(
        ids_by_image.values().all(|ids| ids.len() == 1),
        "duplicates only with the same webhook-id: {ids_by_image:?}"
    );
    let distinct: HashSet<&String> = ids_by_image.values().flatten().collect();
    assert_eq!(distinct.len(), images, "each image has its own webhook-id");
    let group_ids: HashSet<&str> = ours
        .iter()
        .filter(|e| e.payload["type"] == "image_group.completed")
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(
        group_ids.len(),
        1,
        "one image_group.completed event: {group_ids:?}"
    );
    let group_requests = ours
        .iter()
        .filter(|e| e.payload["type"] == "image_group.completed")
        .count();

    // The group event comes after every image event (per-group sequence).
    let max_image_seq = ours
        .iter()
        .filter(|e| e.payload["type"] == "image.completed")
        .map(|e| e.payload["data"]["sequence"].as_u64().expect("sequence"))
        .max()
        .expect("image events");
    let group_seq = ours
        .iter()
        .find(|e| e.payload["type"] == "image_group.completed")
        .and_then(|e| e.payload["data"]["sequence"].as_u64())
        .expect("sequence");
    assert!(group_seq > max_image_seq, "{group_seq} > {max_image_seq}");

    // However often the controller died, the group has exactly one Job.
    let jobs = common::jobs_of(&h.client, &h.namespace, group_id).await;
    assert_eq!(jobs.len(), 1, "exactly one Job for the group");
    assert_eq!(status.jobs.len(), 1, "{:?}", status.jobs);
    (ours.len() - group_requests, group_requests)
}

/// Controller replicas in the leader election, as a Deployment runs them: each has its own
/// name; a killed one is replaced by a new pod with a new name.
struct Replicas {
    running: Vec<(String, ControllerProcess)>,
    started: usize,
    logs: PathBuf,
}

impl Replicas {
    /// The name of the `n`th replica started (as a Deployment names each new pod anew).
    fn identity(n: usize) -> String {
        format!("replica-{n}")
    }

    fn log(logs: &Path, identity: &str) -> PathBuf {
        logs.join(format!("{identity}.log"))
    }

    fn add(&mut self, h: &Harness, kubeconfig: &Path, config: &ControllerConfig) {
        let identity = Self::identity(self.started);
        self.started += 1;
        let log = Self::log(&self.logs, &identity);
        let process = ControllerProcess::spawn(h, kubeconfig, config, &log, Some(&identity));
        self.running.push((identity, process));
    }

    /// SIGKILLs `identity` (no Lease handed back: the others wait for it to run out).
    async fn sigkill(&mut self, identity: &str) {
        let at = self
            .running
            .iter()
            .position(|(name, _)| name == identity)
            .unwrap_or_else(|| panic!("{identity} is not one of the running replicas"));
        let (_, process) = self.running.remove(at);
        process.sigkill().await;
    }

    fn assert_running(&mut self) {
        for (identity, process) in &mut self.running {
            process.assert_running(&Self::log(&self.logs, identity));
        }
    }

    /// Every replica's log tail, in the order they started, for a failure's message.
    fn tails(&self) -> String {
        (0..self.started)
            .map(|n| {
                let identity = Self::identity(n);
                let tail = tail(&Self::log(&self.logs, &identity));
                format!("--- {identity}:\n{tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The chaos: two replicas in the leader election deliver a group's events; the
/// leader is SIGKILLed while it admits the group, PostgreSQL restarts once delivery is under
/// way, then the replica that took over is SIGKILLed too; each is replaced by a new replica
/// (a new pod). No result is lost, no event is lost or sent under a second
/// `webhook-id`, and the group has one Job.
async fn two_sigkilled_replicas_and_a_database_restart_lose_nothing() {
    if kinsight::testbed::use_existing_cluster() {
        eprintln!(
            "skipped: this test runs the controller binary against the local control plane's \
             kubeconfig; USE_EXISTING_CLUSTER is set"
        );
        return;
    }
    let mut h = Harness::start_with_own_database("tenant-chaos").await;
    h.kill_controller().await;
    let kubeconfig: PathBuf = h
        .cluster
        .kubeconfig_path()
        .expect("a local control plane")
        .to_path_buf();
    let config = h.controller_config();
    let logs = tempfile::tempdir().expect("log dir");
    let mut replicas = Replicas {
        running: Vec::new(),
        started: 0,
        logs: logs.path().to_path_buf(),
    };
    let (hook_url, proxy) = slow_answering_proxy(h.hook_url.clone()).await;
    let _proxy = AbortOnDrop(proxy);
    replicas.add(&h, &kubeconfig, &config);
    replicas.add(&h, &kubeconfig, &config);
    let first_leader = common::eventually("a leader among the replicas", LIMIT, async || {
        h.lease_holder()
            .await
            .filter(|holder| holder.starts_with("replica-"))
    })
    .await;

    let group_id = h
        .post_photo_group(CHAOS_IMAGES, &["image_classification"], &hook_url)
        .await;
    let started = Instant::now();
    let deadline = started + LIMIT;
    // Kill 1: the leader, while it admits the group and makes its Job (or just after).
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=400))).await;
    replicas.sigkill(&first_leader).await;
    eprintln!(
        "killed the leader {first_leader} {:.1}s after the POST",
        started.elapsed().as_secs_f64()
    );
    replicas.add(&h, &kubeconfig, &config);

    let mut events = Vec::new();
    if h.collect_webhooks_into(
        &mut events,
        deadline,
        |e| !of_type(e, "image.completed").is_empty(),
        |_| replicas.assert_running(),
    )
    .await
    .is_err()
    {
        panic!(
            "no image.completed within {LIMIT:?}; logs:\n{}",
            replicas.tails()
        );
    }
    // The database restarts as soon as results flow (the first image event is in).
    drain(&mut h, &mut events);
    let images_before_restart = images_arrived(&events, &group_id);
    h.cluster
        .postgres_mut()
        .expect("the test's own PostgreSQL")
        .restart()
        .await
        .expect("PostgreSQL restarts");
    eprintln!(
        "{images_before_restart}/{CHAOS_IMAGES} image events in before PostgreSQL restarted; \
         {:.1}s after the POST",
        started.elapsed().as_secs_f64()
    );
    assert!(
        images_before_restart < CHAOS_IMAGES,
        "every image event came before the restart: the test did not exercise what it claims"
    );
    // Kill 2: the replica that took over, once it leads.
    let running: Vec<String> = replicas.running.iter().map(|(n, _)| n.clone()).collect();
    let second_leader = common::eventually("a new leader", LIMIT, async || {
        h.lease_holder()
            .await
            .filter(|holder| running.contains(holder))
    })
    .await;
    drain(&mut h, &mut events);
    eprintln!(
        "killed the new leader {second_leader} {:.1}s after the POST, {}/{CHAOS_IMAGES} image \
         events in",
        started.elapsed().as_secs_f64(),
        images_arrived(&events, &group_id)
    );
    replicas.sigkill(&second_leader).await;
    replicas.add(&h, &kubeconfig, &config);

    if h.collect_webhooks_into(
        &mut events,
        deadline,
        |e| group_completed(e, &group_id),
        |_| replicas.assert_running(),
    )
    .await
    .is_err()
    {
        panic!(
            "no image_group.completed within {LIMIT:?}; received: {:#?}\nlogs:\n{}",
            common::webhook_summary(&events),
            replicas.tails()
        );
    }
    let log = Replicas::log(&replicas.logs, &replicas.running[0].0);
    let status = settled_completed_status(&mut h, &group_id, &mut events, &log).await;
    replicas.assert_running();
    let (image_requests, group_requests) =
        assert_each_event_once(&h, &events, &group_id, &status, CHAOS_IMAGES).await;
    eprintln!(
        "{image_requests} image.completed requests for {CHAOS_IMAGES} images ({} re-sent), \
         {group_requests} image_group.completed request(s)",
        image_requests - CHAOS_IMAGES
    );
}
