//! The controller's own worker Jobs on a real node (containerd + runc + kubelet +
//! kube-scheduler, see `kinsight::testbed::RealNode`), end to end: a group posted through
//! the REST API gets its worker Job scheduled on the node; the worker runs as a container of
//! kinsight's image with the Job's restricted security context exactly as
//! src/controller/job.rs builds it (uid 65532, read-only root filesystem), fetches the
//! photos, runs a model with the image's ONNX Runtime and model files, hands its results to
//! the API's result ingest with its projected ServiceAccount token (checked by TokenReview),
//! and the group completes with every image's result stored.
//!
//! How the pieces meet, as in a cluster:
//! - Pods sit on the node's bridge and reach only the host's bridge address
//!   ([`kinsight::testbed::node::HOST_ADDRESS`], 10.244.91.1), never its 127.0.0.1. So the
//!   API (its result ingest) and the photo server listen there: a cluster likewise gives
//!   pods a routable address for the services they call. The egress allow-list holds only
//!   that address (`10.244.91.1/32`), as an operator would open one private range; the
//!   production default (nothing private) is untouched.
//! - The controller's `worker_image` is the image the test builds and imports (tag not
//!   `latest`, so the kubelet's default `IfNotPresent` finds it and never asks a registry).
//!   No `worker_env`: ONNX Runtime and the models come from the image's own environment; the
//!   catalog comes from the ConfigMap the controller publishes, its model files resolved in
//!   the image (`/opt/kinsight/models`, the Dockerfile's and the chart's `modelsDir`).
//! - The worker's token: the Job projects it itself (with the cluster CA from
//!   `kube-root-ca.crt` and the namespace, where in-cluster clients read them), so it works
//!   on this control plane, whose ServiceAccount admission plugin is off.
//!
//! Needs root and what scripts/build-node.sh and scripts/install-node-packages.sh provide
//! (as tests/real_node.rs does); fails, with what is missing, otherwise.

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kinsight::controller::{ControllerConfig, WorkerCatalog};
use kinsight::dev::{create_tenant, install_crds, serve_folder_on};
use kinsight::inference::Catalog;
use kinsight::results::INGEST_PATH;
use kinsight::shutdown::Shutdown;
use kinsight::store::Store;
use kinsight::testbed::node::HOST_ADDRESS;
use kube::api::{Api, ListParams, LogParams};

use common::real_node::{Stack, run_bounded};
use common::{IMAGE_MODELS_DIR, KEYS_NAMESPACE, eventually, repo_path, serve_api};

/// The whole test, image build included.
const TEST_LIMIT: Duration = Duration::from_secs(400);
/// From the POST to the group's completion (pod start, model load, four photos).
const GROUP_LIMIT: Duration = Duration::from_secs(180);
const NAMESPACE: &str = "tenant-real-node";
const PHOTOS: [&str; 4] = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];
const MODEL: &str = "image_classification";

#[test]
fn a_group_runs_its_worker_job_on_the_real_node_and_completes() {
    run_bounded(TEST_LIMIT, the_test());
}

async fn the_test() {
    kinsight::install_crypto_provider();
    let test_started = Instant::now();
    let scratch = tempfile::tempdir().expect("temp dir");

    let Stack {
        node,
        plane,
        image,
        image_cleanup: _image_cleanup,
    } = Stack::start(
        &format!("real-node-e2e-{}", std::process::id()),
        true,
        scratch.path(),
    )
    .await;
    eprintln!(
        "control plane and node ready {:.1?} after the start",
        test_started.elapsed()
    );

    let client = plane.client().await.expect("client");
    let store = Store::connect(
        &plane.database_url().expect("the testbed's PostgreSQL"),
        Duration::from_secs(60),
    )
    .await
    .expect("store");
    install_crds(&client).await.expect("CRDs");
    let api_key = format!("test-key-{NAMESPACE}");
    create_tenant(
        &client,
        KEYS_NAMESPACE,
        NAMESPACE,
        &api_key,
        &kinsight::webhook::generate_secret(),
    )
    .await
    .expect("tenant");
    let catalog = Catalog::load(repo_path("models/catalog.yaml")).expect("catalog");
    let models: Vec<String> = catalog.names().map(str::to_owned).collect();

    let mut tasks = Vec::new();
    // The API, its result ingest included, and the photos on the bridge address: the
    // workers' way in.
    let bridge: std::net::IpAddr = HOST_ADDRESS.into();
    let (photos, photo_server) = serve_folder_on(repo_path("tests/fixtures/images"), bridge)
        .await
        .expect("bind the photo server on the bridge address");
    tasks.push(photo_server);
    let api_url = serve_api(&client, &store, &models, KEYS_NAMESPACE, bridge, &mut tasks).await;

    let config = |worker_memory: &str| ControllerConfig {
        models: models.clone(),
        worker_image: image.clone(),
        results_url: format!("{api_url}{INGEST_PATH}"),
        // The catalog through its ConfigMap, the model files from the image.
        worker_catalog: Some(WorkerCatalog::new(&catalog, IMAGE_MODELS_DIR)),
        // Nothing from this machine: the image's environment says where ONNX Runtime is.
        worker_env: Vec::new(),
        // The photo server's one private address, nothing else (the default opens none).
        egress: kinsight::net::EgressPolicy::parse(&HOST_ADDRESS.to_string()).expect("egress"),
        worker_cpu: "1".into(),
        worker_memory: worker_memory.into(),
        // A failed worker fails the test at once, with its log, instead of retrying.
        worker_backoff_limit: 0,
        worker_deadline: Duration::from_secs(240),
        ..ControllerConfig::default()
    };
    let start_controller = |config: ControllerConfig| {
        let (client, store) = (client.clone(), store.clone());
        tokio::spawn(async move {
            if let Err(e) =
                kinsight::controller::run(client, store, config, Shutdown::never()).await
            {
                eprintln!("controller stopped: {e}");
            }
        })
    };
    let controller = start_controller(config("1Gi"));

    let http = reqwest::Client::new();
    eventually(
        "the API accepts the tenant's key",
        Duration::from_secs(30),
        async || {
            http.get(format!("{api_url}/v1/image-groups/grp-none"))
                .bearer_auth(&api_key)
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND)
        },
    )
    .await;

    // The group, through the REST API.
    let images: Vec<_> = PHOTOS
        .iter()
        .enumerate()
        .map(|(i, n)| serde_json::json!({ "id": format!("i{i}"), "url": format!("http://{photos}/{n}") }))
        .collect();
    let posted = Instant::now();
    let group_id = post_group(&http, &api_url, &api_key, &images).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);
    let selector = format!("kinsight.io/group={group_id}");
    // When the worker's container was first seen running (or done), after the POST.
    let mut worker_running = None;
    let polled = loop {
        let (status, polled) = get(&http, &api_url, &api_key, &group_id).await;
        assert_eq!(status, 200, "{polled}");
        if worker_running.is_none() {
            let listed = pods.list(&ListParams::default().labels(&selector)).await;
            let started = listed
                .iter()
                .flat_map(|l| &l.items)
                .any(kinsight::testbed::container_started);
            worker_running = started.then(|| posted.elapsed());
        }
        // A failed Job completes the group too (its images `WorkerFailed`): stop at it.
        let failed = jobs
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("jobs")
            .items
            .into_iter()
            .any(|j| {
                j.status
                    .and_then(|s| s.conditions)
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
            });
        if failed || posted.elapsed() > GROUP_LIMIT {
            panic!(
                "the group did not complete ({}): {polled:#}\n{}",
                if failed {
                    "its Job failed"
                } else {
                    "timed out"
                },
                worker_report(&pods, &selector).await
            );
        }
        if polled["status"] == "completed" {
            break polled;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let completed_in = posted.elapsed();
    assert_eq!(polled["imagesDone"], 4, "{polled:#}");

    // The worker ran on the real node, from the image, as the Job says, and succeeded (its
    // last result is stored before it exits; the kubelet reports the exit a moment later).
    let worker_pods = eventually(
        "the worker pod finishes",
        Duration::from_secs(60),
        async || {
            let pods = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items;
            let done = pods.iter().all(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                matches!(phase, Some("Succeeded" | "Failed"))
            });
            (!pods.is_empty() && done).then_some(pods)
        },
    )
    .await;
    let succeeded = worker_pods
        .iter()
        .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"));
    assert!(succeeded, "{}", worker_report(&pods, &selector).await);
    assert_eq!(worker_pods.len(), 1, "one pod: {worker_pods:#?}");
    let pod = &worker_pods[0];
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(
        spec.node_name.as_deref(),
        Some(kinsight::testbed::node::NODE_NAME)
    );
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some(image.as_str()));
    assert_eq!(
        container.image_pull_policy.as_deref(),
        Some("IfNotPresent"),
        "the imported image is used, no registry asked"
    );
    let security = spec.security_context.as_ref().expect("pod security");
    assert_eq!(security.run_as_user, Some(65532));
    assert_eq!(security.run_as_non_root, Some(true));
    let container_security = container.security_context.as_ref().expect("security");
    assert_eq!(container_security.read_only_root_filesystem, Some(true));
    assert_eq!(container_security.allow_privilege_escalation, Some(false));
    let status = pod.status.as_ref().expect("pod status");
    let pod_ip = status.pod_ip.clone().unwrap_or_default();
    assert!(
        pod_ip.starts_with("10.244.91."),
        "on the bridge, not the host's network: {pod_ip:?}"
    );
    let created = pod.metadata.creation_timestamp.as_ref().expect("created").0;
    let started = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.started_at.clone())
        .expect("the container's start")
        .0;
    eprintln!(
        "worker pod on node {}, {pod_ip}: its container started {:.0} s after the pod was \
         created (the kubelet's 1 s timestamps), seen running {worker_running:.1?} after the POST",
        kinsight::testbed::node::NODE_NAME,
        started.duration_since(created).as_secs_f64()
    );
    let log = pods
        .logs(
            &pod.metadata.name.clone().expect("name"),
            &LogParams::default(),
        )
        .await
        .expect("worker log");
    eprintln!("worker log:\n{}", log.trim_end());
    // ONNX Runtime and the model files from the image's own places, every result stored.
    assert!(
        log.contains("library=/opt/kinsight/lib/libonnxruntime.so"),
        "{log}"
    );
    assert!(log.contains(&format!("file={IMAGE_MODELS_DIR}/")), "{log}");
    assert!(log.contains("stored=4"), "{log}");
    // What the worker itself sees of its confinement, as the kernel applies the pod's
    // security context: the image's user, no capabilities, no new privileges, the runtime's
    // seccomp filter, a read-only root and a writable emptyDir for scratch.
    let sandbox = log
        .lines()
        .find(|l| l.contains("worker sandbox"))
        .unwrap_or_else(|| panic!("no sandbox line in the worker log:\n{log}"));
    for seen in [
        "uid=65532",
        "cap_eff=0000000000000000",
        "no_new_privs=true",
        "seccomp=2",
        "root_fs=read-only",
        "scratch=writable",
    ] {
        assert!(sandbox.contains(seen), "{seen} not in {sandbox}");
    }
    // Its token came from the Job's own projected volume (no admission plugin mounts one
    // here): the ingest took its results, so TokenReview accepted it.
    assert!(
        spec.volumes.iter().flatten().any(|v| v
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .is_some_and(|s| s.iter().any(|s| s.service_account_token.is_some()))),
        "{spec:#?}"
    );

    // Every image's result is stored, with the model's output.
    let first_ref = group_ref(&client, &group_id).await;
    let results = store.group_results(&first_ref).await.expect("results");
    assert_eq!(results.len(), 4, "{results:#?}\n{log}");
    for (id, result) in &results {
        assert!(result.failure.is_none(), "{id}: {result:#?}\n{log}");
        assert!(
            result.outputs.contains_key(MODEL),
            "{id}: {result:#?}\n{log}"
        );
    }
    eprintln!(
        "group of {} photos completed {completed_in:.1?} after its POST",
        PHOTOS.len()
    );

    // Workers limited to 40 MiB: the kernel kills the worker (it maps ONNX Runtime and a
    // model), the Job fails, and each image fails with a reason that says how.
    controller.abort();
    let _ = controller.await;
    let controller = start_controller(config("40Mi"));
    let starved = post_group(&http, &api_url, &api_key, &images).await;
    let starved_ref = group_ref(&client, &starved).await;
    let failed = eventually(
        "each image of the starved group fails",
        GROUP_LIMIT,
        async || {
            let results = store.group_results(&starved_ref).await.ok()?;
            (results.len() == PHOTOS.len() && results.values().all(|r| r.failure.is_some()))
                .then_some(results)
        },
    )
    .await;
    let selector = format!("kinsight.io/group={starved}");
    for (id, result) in &failed {
        let failure = result.failure.as_ref().expect("failure");
        assert_eq!(failure.reason, "WorkerFailed", "{id}: {failure:?}");
        assert!(
            failure.message.contains("exit 137") && failure.message.contains("40Mi"),
            "{id}: {failure:?}\n{}",
            worker_report(&pods, &selector).await
        );
    }
    eprintln!(
        "a worker over its memory limit: {}",
        failed
            .values()
            .next()
            .and_then(|r| r.failure.as_ref())
            .map(|f| f.message.as_str())
            .unwrap_or_default()
    );
    controller.abort();
    let _ = controller.await;

    // A worker pod deleted while it runs is replaced by its Job (backoff limit 2 now), and
    // the group completes with every result: the new pod does the work order again (the
    // store takes each image once per generation).
    let controller = start_controller(ControllerConfig {
        worker_backoff_limit: 2,
        ..config("1Gi")
    });
    const MANY: usize = 1000;
    let many: Vec<_> = (0..MANY)
        .map(|i| serde_json::json!({ "id": format!("m{i}"), "url": format!("http://{photos}/{}", PHOTOS[i % PHOTOS.len()]) }))
        .collect();
    let long = post_group(&http, &api_url, &api_key, &many).await;
    let selector = format!("kinsight.io/group={long}");
    let running = eventually(
        "the long group's worker container runs",
        GROUP_LIMIT,
        async || {
            let pods = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            pods.items.into_iter().find(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                    })
            })
        },
    )
    .await;
    let deleted = running.metadata.name.clone().expect("pod name");
    let deleting = Instant::now();
    pods.delete(&deleted, &kube::api::DeleteParams::default())
        .await
        .expect("delete the worker pod");
    let polled = eventually("the long group completes", GROUP_LIMIT, async || {
        let (_, polled) = get(&http, &api_url, &api_key, &long).await;
        (polled["status"] == "completed").then_some(polled)
    })
    .await;
    assert_eq!(polled["imagesDone"], MANY, "{polled:#}");
    let long_ref = group_ref(&client, &long).await;
    let results = store.group_results(&long_ref).await.expect("results");
    assert_eq!(results.len(), MANY);
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, r)| r.failure.is_some())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    // The kubelet reports the replacement's exit a moment after its last result is stored.
    let finished: Vec<String> = eventually(
        "the replacement pod succeeds",
        Duration::from_secs(60),
        async || {
            let succeeded: Vec<String> = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
                .filter_map(|p| p.metadata.name)
                .collect();
            (!succeeded.is_empty()).then_some(succeeded)
        },
    )
    .await;
    assert!(
        !finished.contains(&deleted),
        "a replacement pod finished the work, not {deleted}: {finished:?}"
    );
    eprintln!(
        "worker pod {deleted} deleted while running; its replacement {} completed the group \
         of {MANY} {:.1?} later",
        finished.join(", "),
        deleting.elapsed()
    );
    controller.abort();

    for task in &tasks {
        task.abort();
    }
    let teardown = Instant::now();
    drop(node);
    drop(plane);
    eprintln!(
        "teardown {:.1?}; whole test {:.1?}",
        teardown.elapsed(),
        test_started.elapsed()
    );
}

async fn get(
    http: &reqwest::Client,
    api_url: &str,
    api_key: &str,
    group: &str,
) -> (u16, serde_json::Value) {
    let response = http
        .get(format!("{api_url}/v1/image-groups/{group}"))
        .bearer_auth(api_key)
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// The group's worker pods, their status and log, for a failure message.
async fn worker_report(pods: &Api<Pod>, selector: &str) -> String {
    let mut report = String::new();
    for pod in pods
        .list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let log = pods
            .logs(&name, &LogParams::default())
            .await
            .unwrap_or_else(|e| format!("(no log: {e})"));
        report.push_str(&format!("pod {name}: {:#?}\nlog:\n{log}\n", pod.status));
    }
    report
}

/// POSTs a group of `images` with the test's model through the REST API; its id.
async fn post_group(
    http: &reqwest::Client,
    api_url: &str,
    api_key: &str,
    images: &[serde_json::Value],
) -> String {
    let response = http
        .post(format!("{api_url}/v1/image-groups"))
        .bearer_auth(api_key)
        .json(&serde_json::json!({ "images": images, "models": [MODEL] }))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let body: serde_json::Value = response.json().await.expect("body");
    body["id"].as_str().expect("id").to_owned()
}

/// The stored group's reference (its uid keys its results).
async fn group_ref(client: &kube::Client, group: &str) -> kinsight::results::GroupRef {
    common::group_ref(
        &Api::<kinsight::crd::ImageGroup>::namespaced(client.clone(), NAMESPACE)
            .get(group)
            .await
            .expect("group"),
    )
}
