//! The whole path against a real control plane: REST -> ImageGroup -> Job -> real node ->
//! `kinsight worker` (ONNX Runtime) -> result ingest -> PostgreSQL -> status, aggregate -> signed webhooks.

mod common;

crate::real_node_tests!(
    single_image_and_group_end_to_end,
    bad_input_gets_clear_errors_and_loses_nothing,
    controller_restart_loses_no_event_and_duplicates_no_job,
    a_failed_worker_job_fails_its_images_with_a_reason,
    a_worker_past_its_deadline_fails_its_images_and_the_group_completes,
    a_worker_job_deleted_by_hand_fails_its_images_and_the_group_completes,
    a_group_whose_work_order_is_larger_than_an_environment_variable_runs,
    a_group_bigger_than_one_job_runs_as_several_jobs_at_once,
    an_api_that_has_not_listed_its_keys_yet_says_unavailable_not_unauthorized,
    a_large_group_with_many_endpoints_delivers_everything_with_a_small_status,
    adding_images_and_models_reruns_only_what_is_new,
    images_added_while_a_job_runs_go_to_one_new_job_that_supersedes_it,
    subscriptions_receive_namespace_events_and_finished_groups_expire,
    truncated_files_fail_as_such_and_photo_quality_flags_the_blurred_photo,
    a_tenants_next_group_is_carried_by_the_worker_that_waits,
    a_carried_order_whose_carrier_goes_is_run_by_its_own_job,
    a_tenants_first_group_is_carried_by_its_standby_worker,
    a_workers_next_pod_does_only_the_images_left,
);

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Harness, eventually, of_type};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kinsight::crd::{GroupPhase, ImageGroup};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// Which waiting worker a Job's order went to, and the Job's parallelism (0: no pod of its own).
fn carried(job: &Job) -> (Option<String>, Option<i32>) {
    (
        job.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("kinsight.io/carried-by").cloned()),
        job.spec.as_ref().and_then(|s| s.parallelism),
    )
}

/// The work order the Job `job` was given, as its pod fetches it.
async fn work_order(h: &Harness, job: &str) -> serde_json::Value {
    let order = h
        .store
        .work_order(&h.namespace, job)
        .await
        .expect("read")
        .expect("the Job's work order");
    serde_json::to_value(order).expect("JSON")
}

/// Worker downloads may take 110 s: only the path under test (a deadline, a deletion)
/// ends a stuck one, however slowly a loaded machine's Job controller gets to it (the
/// default timeout is 30 s).
fn let_downloads_hang(config: &mut kinsight::controller::ControllerConfig) {
    config
        .worker_env
        .push(("KINSIGHT_DOWNLOAD_TIMEOUT".into(), "110s".into()));
}

/// Posts a group of one image whose server accepts the download and then sends nothing
/// for two minutes; returns the group's id.
async fn post_stuck_group(h: &Harness) -> String {
    let stuck = axum::Router::new().route(
        "/stuck.png",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(120)).await;
            ""
        }),
    );
    let url = format!(
        "{}/stuck.png",
        common::serve_on(h.pod_address(), stuck).await
    );
    let images = json!([{ "id": "stuck", "url": url }]);
    post_group(h, images, &["image_classification"]).await
}

/// The webhooks received until the group's `image_group.completed`.
async fn events_once_complete(h: &mut Harness) -> Vec<kinsight::dev::ReceivedWebhook> {
    h.collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await
}

/// The reason and message of the first `image.failed` event, once the group completed.
async fn failure_once_complete(h: &mut Harness) -> (String, String) {
    let events = events_once_complete(h).await;
    let failed = of_type(&events, "image.failed");
    let failure = &failed.first().expect("an image.failed event").payload["data"]["failure"];
    let text = |field: &str| failure[field].as_str().unwrap_or_default().to_owned();
    (text("reason"), text("message"))
}

/// The ids of the images that got an `image.completed` event, sorted, each once
/// (delivery is at least once).
fn completed_images(events: &[kinsight::dev::ReceivedWebhook]) -> Vec<&str> {
    let mut ids: Vec<&str> = of_type(events, "image.completed")
        .iter()
        .filter_map(|e| e.payload["data"]["imageId"].as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A group event's `(imagesDone, imagesFailed)`.
fn done_and_failed(data: &serde_json::Value) -> (Option<u64>, Option<u64>) {
    (data["imagesDone"].as_u64(), data["imagesFailed"].as_u64())
}

/// The status of the group `id`, as the API server has it now.
async fn group_status(h: &Harness, id: &str) -> kinsight::crd::ImageGroupStatus {
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    groups.get(id).await.expect("group").status.expect("status")
}

/// Creates a group through the REST API with the harness's webhook URL; returns its id.
async fn post_group(h: &Harness, images: serde_json::Value, models: &[&str]) -> String {
    let (status, body) = h
        .post(
            "/v1/image-groups",
            json!({ "images": images, "models": models, "webhookUrl": h.hook_url }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn single_image_and_group_end_to_end() {
    let mut h = Harness::start("tenant-e2e").await;

    // One image: coffee.png must come back with a cup.
    let (status, body) = h
        .post(
            "/v1/images",
            json!({
                "url": h.photo_url("coffee.png"),
                "models": ["object_detection"],
                "webhookUrl": h.hook_url,
                "metadata": { "listing": "42" }
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let image_id = body["id"].as_str().expect("id").to_owned();
    assert!(image_id.starts_with("img-"));

    let events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;
    let completed = of_type(&events, "image.completed");
    assert_eq!(completed.len(), 1, "{events:#?}");
    let data = &completed[0].payload["data"];
    assert_eq!(data["groupId"], image_id.as_str());
    assert_eq!(data["metadata"]["listing"], "42");
    assert_eq!(data["width"], 600);
    let detections = data["results"]["object_detection"]["detections"]
        .as_array()
        .expect("detections");
    let cup = detections
        .iter()
        .find(|d| d["label"] == "cup")
        .expect("a cup in coffee.png");
    assert!(
        (cup["confidence"].as_f64().unwrap_or(0.0) - 0.522).abs() < 0.05,
        "{cup}"
    );
    // The group event follows the image event and carries the aggregate.
    let group_event = of_type(&events, "image_group.completed")[0];
    assert!(
        group_event.payload["data"]["sequence"]
            .as_u64()
            .expect("sequence")
            > data["sequence"].as_u64().expect("sequence")
    );
    assert_eq!(
        group_event.payload["data"]["aggregate"]["objects"][0]["label"],
        "cup"
    );
    common::assert_payloads_conform(&events);

    // Polling gives the same answer.
    let (status, polled) = h.get(&format!("/v1/images/{image_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(polled["status"], "completed");
    assert!(
        polled["results"]["object_detection"]["detections"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["label"] == "cup"))
    );

    // A group of all four photos through both models.
    let images: Vec<_> = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
        .iter()
        .map(|n| json!({ "url": h.photo_url(n), "metadata": { "file": n } }))
        .collect();
    let (status, body) = h
        .post(
            "/v1/image-groups",
            json!({
                "images": images,
                "models": ["object_detection", "image_classification"],
                "webhookUrl": h.hook_url,
                "metadata": { "batch": "b1" }
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let group_id = body["id"].as_str().expect("id").to_owned();
    let events = h
        .collect_webhooks(LIMIT, |e| {
            of_type(e, "image_group.completed")
                .iter()
                .any(|g| g.payload["data"]["groupId"] == group_id.as_str())
        })
        .await;
    let mut image_events: Vec<_> = of_type(&events, "image.completed")
        .into_iter()
        .filter(|e| e.payload["data"]["groupId"] == group_id.as_str())
        .collect();
    // Delivery is at least once; receivers dedupe on webhook-id.
    image_events.sort_by_key(|e| e.id.clone());
    image_events.dedup_by_key(|e| e.id.clone());
    assert_eq!(image_events.len(), 4, "one event per image");
    let by_file: HashMap<String, &serde_json::Value> = image_events
        .iter()
        .map(|e| {
            (
                e.payload["data"]["metadata"]["file"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                &e.payload["data"],
            )
        })
        .collect();
    let top_class = |file: &str| {
        by_file[file]["results"]["image_classification"]["classes"][0]["label"].clone()
    };
    assert_eq!(top_class("coffee.png"), "espresso");
    assert_eq!(top_class("rocket.jpg"), "missile");
    assert_eq!(
        by_file["rocket.jpg"]["results"]["object_detection"].get("detections"),
        None,
        "no objects on the rocket photo"
    );
    let group_event = of_type(&events, "image_group.completed")
        .into_iter()
        .find(|e| e.payload["data"]["groupId"] == group_id.as_str())
        .expect("group event");
    let group_data = &group_event.payload["data"];
    assert_eq!(group_data["imagesDone"], 4);
    assert_eq!(group_data["metadata"]["batch"], "b1");
    let labels: HashSet<&str> = group_data["aggregate"]["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .filter_map(|o| o["label"].as_str())
        .collect();
    assert!(
        labels.contains("cup") && labels.contains("person") && labels.contains("cat"),
        "{labels:?}"
    );
    let max_image_seq = image_events
        .iter()
        .map(|e| e.payload["data"]["sequence"].as_u64().expect("sequence"))
        .max()
        .expect("image events");
    assert!(
        group_data["sequence"].as_u64().expect("sequence") > max_image_seq,
        "group event comes after its image events"
    );

    // Every payload conforms to its documented schema and stays small.
    common::assert_payloads_conform(&events);
    let (status, polled) = h.get(&format!("/v1/image-groups/{group_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(polled["status"], "completed");
    assert_eq!(polled["imagesDone"], 4);
    assert_eq!(polled["images"].as_array().map(Vec::len), Some(4));

    // What kubectl users see: status conditions, the owned Job, the owned results.
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    // The status follows the dispatcher's outcomes by one reconcile (well under a second).
    let group = eventually("the status counts every delivery", LIMIT, async || {
        let group = groups.get(&group_id).await.ok()?;
        let delivered = group
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "WebhooksDelivered" && c.status == "True");
        delivered.then_some(group)
    })
    .await;
    let status = group.status.expect("status");
    assert_eq!(status.observed_generation, group.metadata.generation);
    let completed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .expect("Completed condition");
    assert_eq!(completed.status, "True");
    assert_eq!(completed.observed_generation, group.metadata.generation);
    let delivered = status
        .conditions
        .iter()
        .find(|c| c.type_ == "WebhooksDelivered")
        .expect("WebhooksDelivered");
    assert_eq!(delivered.status, "True");
    // Every event went through: the groups' webhook URL has nothing left to remember, so
    // its circuit is forgotten (URLs given per request would otherwise pile up).
    // (The dispatcher sweeps its circuits within seconds.)
    eventually("the group URL's circuit is forgotten", LIMIT, async || {
        (h.metric("kinsight_webhook_tracked_endpoints") == Some(0.0)).then_some(())
    })
    .await;
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), &h.namespace);
    let job = jobs.get(&status.jobs[0]).await.expect("job");
    let labels = job.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("kinsight-controller")
    );
    let owner = &job.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(owner.kind, "ImageGroup");
    assert_eq!(owner.name, group_id);
    // Results are in the database, none in the API server.
    assert_eq!(h.stored_results(&group_id).await.len(), 4);

    // `kubectl get imagegroups` shows useful printer columns (kubectl is on the machine image).
    if let Some(kubeconfig) = h.cluster.kubeconfig_path() {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["get", "imagegroups", "-n", &h.namespace])
            .output()
            .expect("kubectl runs");
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("PHASE")
                && table.contains("DONE")
                && table.contains("TOTAL")
                && table.contains("AGE"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&group_id) && l.contains("Completed") && l.contains(" 4 ")),
            "{table}"
        );
    }
}

async fn bad_input_gets_clear_errors_and_loses_nothing() {
    let mut h = Harness::start("tenant-bad").await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/images", h.api_url);
    let valid = json!({ "url": h.photo_url("coffee.png"), "models": ["object_detection"] });

    let missing = http.post(&url).json(&valid).send().await.expect("send");
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let wrong = http
        .post(&url)
        .bearer_auth("not-a-key")
        .json(&valid)
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), 401);

    let problem = |status: u16, body: &serde_json::Value, code: &str| {
        assert_eq!(body["status"], status, "{body}");
        assert_eq!(body["code"], code, "{body}");
    };
    let (status, body) = h
        .post(
            "/v1/images",
            json!({ "url": h.photo_url("coffee.png"), "models": ["teleport"] }),
        )
        .await;
    assert_eq!(status, 422);
    problem(422, &body, "invalid_request");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("teleport")
    );
    let (status, body) = h
        .post(
            "/v1/images",
            json!({ "url": "file:///etc/passwd", "models": ["object_detection"] }),
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        body["detail"].as_str().unwrap_or_default().contains("url"),
        "{body}"
    );
    let (status, body) = h
        .post(
            "/v1/image-groups",
            json!({ "images": [], "models": ["object_detection"] }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    // A group too big to keep is refused with the bound it passes.
    let refused = async |images: Vec<serde_json::Value>| {
        let body = json!({ "images": images, "models": ["object_detection"] });
        let (status, body) = h.post("/v1/image-groups", body).await;
        assert_eq!(status, 422, "{body}");
        body["detail"].as_str().unwrap_or_default().to_owned()
    };
    let many = (0..=10_000)
        .map(|i| json!({ "url": format!("https://cdn.example/{i}.jpg") }))
        .collect();
    assert_eq!(
        refused(many).await,
        "images: at most 10000 images per group, got 10001"
    );
    let heavy = (0..3000)
        .map(|i| json!({ "url": format!("https://cdn.example/{i}.jpg"), "metadata": { "notes": "n".repeat(500) } }))
        .collect();
    let detail = refused(heavy).await;
    assert!(detail.contains("KiB as JSON, at most 1280 KiB"), "{detail}");
    let (status, body) = h.post("/v1/images", json!({ "url": h.photo_url("coffee.png"), "models": ["object_detection"], "surprise": 1 })).await;
    assert_eq!(status, 422, "unknown fields are refused: {body}");

    let malformed = http
        .post(&url)
        .bearer_auth(&h.api_key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(malformed.status(), 422);
    let text = http
        .post(&url)
        .bearer_auth(&h.api_key)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(text.status(), 415);
    let huge = http
        .post(&url)
        .bearer_auth(&h.api_key)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024 + 1])
        .send()
        .await
        .expect("send");
    assert_eq!(huge.status(), 413);
    let (status, body) = h.get("/v1/images/img-doesnotexist").await;
    assert_eq!(status, 404);
    problem(404, &body, "not_found");
    // Ids that would be more than a name in the API server's URL name nothing.
    for path in [
        "/v1/image-groups/grp-x%2Fstatus",
        "/v1/image-groups/grp-x%2F..%2F..%2Fkinsight-system%2Fimagegroups%2Fother",
        "/v1/image-groups/a%20b/deliveries",
    ] {
        let (status, body) = h.get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        problem(404, &body, "not_found");
    }
    // A route asked with a method it does not take: a problem too, with the methods it does.
    let wrong_method = http
        .delete(format!("{}/v1/image-groups", h.api_url))
        .bearer_auth(&h.api_key)
        .send()
        .await
        .expect("send");
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    assert_eq!(
        wrong_method.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = wrong_method.json().await.expect("a problem");
    problem(405, &body, "method_not_allowed");

    // Nothing of the refused requests became a group.
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    assert!(
        groups
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );

    // A group with one good and two bad images: the bad ones fail alone, with reasons.
    let (status, body) = h
        .post(
            "/v1/image-groups",
            json!({
                "images": [
                    { "id": "good", "url": h.photo_url("coffee.png") },
                    { "id": "missing", "url": h.photo_url("nope.png") },
                    { "id": "not-an-image", "url": h.photo_url("README.md") }
                ],
                "models": ["image_classification"],
                "webhookUrl": h.hook_url
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;
    let failed: HashMap<String, &serde_json::Value> = of_type(&events, "image.failed")
        .into_iter()
        .map(|e| {
            (
                e.payload["data"]["imageId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                &e.payload["data"]["failure"],
            )
        })
        .collect();
    assert_eq!(failed.len(), 2, "{events:#?}");
    assert_eq!(failed["missing"]["reason"], "DownloadHttpError");
    assert_eq!(failed["not-an-image"]["reason"], "UnsupportedFormat");
    assert_eq!(of_type(&events, "image.completed").len(), 1);
    let group_data = &of_type(&events, "image_group.completed")[0].payload["data"];
    assert_eq!(group_data["imagesDone"], 3);
    assert_eq!(group_data["imagesFailed"], 2);
    common::assert_payloads_conform(&events);

    // kubectl users get the same validation, reported in status.
    let group: ImageGroup = serde_json::from_value(json!({
        "apiVersion": "kinsight.io/v1alpha1",
        "kind": "ImageGroup",
        "metadata": { "name": "from-kubectl" },
        "spec": { "images": [{ "url": h.photo_url("coffee.png") }], "models": ["teleport"] }
    }))
    .expect("object");
    groups
        .create(&PostParams::default(), &group)
        .await
        .expect("create");
    let status = eventually(
        "the controller to report on the invalid group",
        Duration::from_secs(20),
        async || {
            let g = groups.get("from-kubectl").await.expect("get");
            g.status.filter(|s| s.observed_generation.is_some())
        },
    )
    .await;
    assert_eq!(status.phase, kinsight::crd::GroupPhase::Failed);
    let accepted = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Accepted")
        .expect("Accepted");
    assert_eq!(accepted.status, "False");
    assert_eq!(accepted.reason, "InvalidSpec");
    assert!(accepted.message.contains("teleport"));
    assert!(status.jobs.is_empty(), "no Job for an invalid group");

    // What the CRD schema can say, the API server itself refuses: nothing is stored.
    for (name, spec, field) in [
        (
            "no-images",
            json!({ "images": [], "models": ["object_detection"] }),
            "spec.images",
        ),
        (
            "bad-id",
            json!({ "images": [{ "id": "Not_A_Label", "url": h.photo_url("coffee.png") }], "models": ["object_detection"] }),
            "spec.images.id",
        ),
        (
            "ftp-url",
            json!({ "images": [{ "url": "ftp://example.com/a.png" }], "models": ["object_detection"] }),
            "spec.images.url",
        ),
    ] {
        let group: ImageGroup = serde_json::from_value(json!({
            "apiVersion": "kinsight.io/v1alpha1",
            "kind": "ImageGroup",
            "metadata": { "name": name },
            "spec": spec,
        }))
        .expect("object");
        match groups.create(&PostParams::default(), &group).await {
            Err(kube::Error::Api(refusal)) => {
                assert_eq!(refusal.code, 422, "{name}: {refusal:?}");
                assert!(
                    refusal.message.contains(field),
                    "{name}: {}",
                    refusal.message
                );
            }
            other => panic!("{name}: the API server took it: {other:?}"),
        }
        assert!(groups.get_opt(name).await.expect("get").is_none(), "{name}");
    }
}

async fn controller_restart_loses_no_event_and_duplicates_no_job() {
    let mut h = Harness::start("tenant-restart").await;
    let group_id = h
        .post_photo_group(
            8,
            &["object_detection", "image_classification"],
            &h.hook_url,
        )
        .await;

    // Kill the controller once the first image event arrived, mid-run, then start a new one.
    let mut events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image.completed").is_empty())
        .await;
    h.kill_controller().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.start_controller();
    let rest = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;
    events.extend(rest);

    let delivered: HashMap<String, HashSet<String>> = of_type(&events, "image.completed")
        .iter()
        .fold(HashMap::new(), |mut m, e| {
            m.entry(
                e.payload["data"]["imageId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default()
            .insert(e.id.clone());
            m
        });
    assert_eq!(
        delivered.len(),
        8,
        "every image event arrived: {delivered:?}"
    );
    assert!(
        delivered.values().all(|ids| ids.len() == 1),
        "a re-sent event keeps its webhook-id: {delivered:?}"
    );

    let jobs = common::jobs_of(&h.client, &h.namespace, &group_id).await;
    assert_eq!(jobs.len(), 1, "exactly one Job for the group");
    // The group event is recorded before the status that says Completed is written: the
    // webhook may arrive a moment before the status does.
    let status = eventually("the status counts every image", LIMIT, async || {
        let status = group_status(&h, &group_id).await;
        (status.images_done == 8).then_some(status)
    })
    .await;
    assert_eq!(status.jobs.len(), 1);
}

async fn a_failed_worker_job_fails_its_images_with_a_reason() {
    // Workers that cannot load ONNX Runtime exit with an error; no retries.
    let mut h = Harness::start_configured("tenant-broken", |c| {
        c.worker_env = vec![(
            "ORT_DYLIB_PATH".into(),
            "/nonexistent/libonnxruntime.so".into(),
        )];
        c.worker_backoff_limit = 0;
    })
    .await;
    let images = json!([{ "id": "coffee", "url": h.photo_url("coffee.png") }, { "id": "rocket", "url": h.photo_url("rocket.jpg") }]);
    let group_id = post_group(&h, images, &["image_classification"]).await;
    let events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;

    let mut failed: Vec<(String, String)> = of_type(&events, "image.failed")
        .iter()
        .map(|e| {
            let data = &e.payload["data"];
            (
                data["imageId"].as_str().unwrap_or_default().to_owned(),
                data["failure"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    failed.sort();
    failed.dedup();
    assert_eq!(
        failed,
        [
            ("coffee".to_owned(), "WorkerFailed".to_owned()),
            ("rocket".to_owned(), "WorkerFailed".to_owned())
        ]
    );
    assert!(of_type(&events, "image.completed").is_empty());
    let group = &of_type(&events, "image_group.completed")[0].payload["data"];
    assert_eq!(done_and_failed(group), (Some(2), Some(2)), "{group}");

    // Polling says the same, image by image.
    let (code, polled) = h.get(&format!("/v1/image-groups/{group_id}")).await;
    assert_eq!(code, 200, "{polled}");
    let images = polled["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{polled}");
    for image in images {
        assert_eq!(image["failure"]["reason"], "WorkerFailed", "{image}");
    }
    let jobs = common::jobs_of(&h.client, &h.namespace, &group_id).await;
    assert_eq!(jobs.len(), 1, "no second Job for failed images");
}

async fn a_worker_past_its_deadline_fails_its_images_and_the_group_completes() {
    let mut h = Harness::start_configured("tenant-deadline", |c| {
        c.worker_deadline = Duration::from_secs(5);
        c.worker_backoff_limit = 0;
        let_downloads_hang(c);
    })
    .await;
    let group_id = post_stuck_group(&h).await;
    let (reason, message) = failure_once_complete(&mut h).await;
    assert_eq!(reason, "WorkerFailed", "{message}");
    assert!(message.contains("DeadlineExceeded"), "{message}");
    let jobs = common::jobs_of(&h.client, &h.namespace, &group_id).await;
    let deadline = jobs[0]
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds);
    assert_eq!(deadline, Some(5));
}

async fn a_worker_job_deleted_by_hand_fails_its_images_and_the_group_completes() {
    let mut h = Harness::start_configured("tenant-deleted-job", let_downloads_hang).await;
    // The download hangs (for longer than the test waits), so the Job is surely running.
    let group_id = post_stuck_group(&h).await;
    let job = format!("{group_id}-g1");
    eventually("the worker Job exists", LIMIT, async || {
        !common::jobs_of(&h.client, &h.namespace, &group_id)
            .await
            .is_empty()
    })
    .await;
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), &h.namespace);
    jobs.delete(&job, &kube::api::DeleteParams::background())
        .await
        .expect("delete the Job");

    let (reason, message) = failure_once_complete(&mut h).await;
    assert_eq!(reason, "WorkerFailed", "{message}");
    assert!(message.contains("deleted"), "{message}");
}

async fn a_group_whose_work_order_is_larger_than_an_environment_variable_runs() {
    let mut h = Harness::start("tenant-long-urls").await;
    // Signed URLs of CDNs and object stores are long: 80 of 2000 characters make a work
    // order of about 160 KiB, more than Linux lets one environment variable hold.
    let padding = "s".repeat(1950);
    let images: Vec<_> = (0..80)
        .map(|i| {
            let url = format!("{}?signature={padding}", h.photo_url("rocket.jpg"));
            json!({ "id": format!("i{i}"), "url": url })
        })
        .collect();
    let group_id = post_group(&h, json!(images), &["image_classification"]).await;
    let events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;
    let order = work_order(&h, &format!("{group_id}-g1")).await;
    let size = serde_json::to_string(&order).expect("JSON").len();
    assert!(size > 128 * 1024, "{size} bytes");
    let group = &of_type(&events, "image_group.completed")[0].payload["data"];
    assert_eq!(done_and_failed(group), (Some(80), Some(0)), "{group}");
    let done = completed_images(&events);
    assert_eq!(done.len(), 80);
}

async fn a_group_bigger_than_one_job_runs_as_several_jobs_at_once() {
    let mut h = Harness::start_configured("tenant-shards", |c| c.images_per_job = 3).await;
    let hook = h.hook_url.clone();
    let group_id = h
        .post_photo_group(7, &["image_classification"], &hook)
        .await;
    let events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;
    assert_eq!(
        completed_images(&events),
        ["i0", "i1", "i2", "i3", "i4", "i5", "i6"]
    );
    let group = &of_type(&events, "image_group.completed")[0].payload["data"];
    assert_eq!(done_and_failed(group), (Some(7), Some(0)), "{group}");
    // Three Jobs of the one generation, the spec's images in runs of three, each with its
    // own work order.
    let status = group_status(&h, &group_id).await;
    let names: Vec<String> = ["g1", "g1-1", "g1-2"]
        .iter()
        .map(|s| format!("{group_id}-{s}"))
        .collect();
    assert_eq!(status.jobs, names);
    let mut ordered = Vec::new();
    for name in &names {
        let order = work_order(&h, name).await;
        let ids: Vec<String> = order["images"]
            .as_array()
            .expect("images")
            .iter()
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect();
        ordered.push(ids);
    }
    assert_eq!(
        ordered,
        [vec!["i0", "i1", "i2"], vec!["i3", "i4", "i5"], vec!["i6"]]
    );
}

async fn get_status(url: &str, key: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .get(format!("{url}/v1/image-groups/grp-none"))
        .bearer_auth(key)
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn an_api_that_has_not_listed_its_keys_yet_says_unavailable_not_unauthorized() {
    kinsight::install_crypto_provider();
    let config = || kinsight::api::ApiConfig {
        keys_namespace: common::KEYS_NAMESPACE.into(),
        models: vec!["object_detection".into()],
        rate_limit: kinsight::api::DEFAULT_RATE_LIMIT,
        in_flight_limit: kinsight::api::DEFAULT_IN_FLIGHT_LIMIT,
    };
    // An API server that never answers (nothing listens on port 1): no key is known yet,
    // so a key cannot be called invalid.
    let offline = kube::Client::try_from(kube::Config::new(
        "http://127.0.0.1:1".parse().expect("URL"),
    ))
    .expect("client");
    let nowhere = kinsight::store::Store::lazy("postgres://kinsight@127.0.0.1:1/kinsight")
        .expect("a database URL");
    let (app, watch, _keys) = kinsight::api::router(offline, nowhere, config());
    let watch = tokio::spawn(watch);
    let url = common::serve_on_loopback(app).await;
    let (status, body) = get_status(&url, "some-key").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");
    let probe = |path: &'static str| {
        let url = format!("{url}{path}");
        async move {
            reqwest::get(url)
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(
        (probe("/healthz").await, probe("/readyz").await),
        (200, 503)
    );
    watch.abort();

    // A real one: once listed, a known key works and an unknown one is refused.
    let cluster = kinsight::testbed::TestCluster::start()
        .await
        .expect("control plane");
    let client = cluster.client();
    let secret = kinsight::webhook::generate_secret();
    kinsight::dev::create_tenant(
        &client,
        common::KEYS_NAMESPACE,
        "tenant-early",
        "early-key",
        &secret,
    )
    .await
    .expect("tenant");
    let store = kinsight::store::Store::connect(&cluster.database_url(), Duration::from_secs(60))
        .await
        .expect("the testbed's PostgreSQL");
    let (app, watch, keys) = kinsight::api::router(client, store, config());
    tokio::spawn(watch);
    assert!(kinsight::api::wait_for_keys(&keys).await);
    let url = common::serve_on_loopback(app).await;
    assert_eq!(
        get_status(&url, "early-key").await.0,
        404,
        "authenticated; no such group"
    );
    assert_eq!(get_status(&url, "wrong-key").await.0, 401);
    let ready = reqwest::get(format!("{url}/readyz")).await.expect("GET");
    assert_eq!(ready.status(), 200);
}

async fn a_large_group_with_many_endpoints_delivers_everything_with_a_small_status() {
    let h = Harness::start("tenant-huge").await;
    // Seven endpoints: the group's own URL and six subscriptions.
    let secret = h.webhook_secret.clone();
    let subscriptions: Vec<_> = (0..6)
        .map(|i| (format!("sub-{i}"), h.hook_url.clone(), json!({})))
        .collect();
    let subscriptions: Vec<_> = subscriptions
        .iter()
        .map(|(n, u, e)| (n.as_str(), u.clone(), e.clone()))
        .collect();
    h.subscribe("hook-key", &secret, &subscriptions, LIMIT)
        .await;
    // A spec of about 1.5 MB (as kubectl can make; the REST API takes up to 1.25 MiB), whose
    // 100 images fail at once (nothing listens on port 9). With deliveries in the status,
    // its 700 records pushed the object past etcd's 1.5 MiB and the group never completed.
    let metadata: serde_json::Map<String, serde_json::Value> = (0..28)
        .map(|k| (format!("note-{k:02}"), json!("m".repeat(500))))
        .collect();
    let groups = h
        .create_unreachable_group("huge", 100, json!(metadata))
        .await;

    let status = eventually("every delivery of the group is made", LIMIT, async || {
        let status = groups.get("huge").await.expect("get").status?;
        let delivered = status
            .conditions
            .iter()
            .any(|c| c.type_ == "WebhooksDelivered" && c.reason == "AllDelivered");
        (status.phase == GroupPhase::Completed && delivered).then_some(status)
    })
    .await;
    // Every image event and the group event to each of the seven endpoints, in the
    // database; the status only counts them.
    let deliveries = h.deliveries("huge").await;
    assert_eq!(deliveries.len(), 7 * (100 + 1));
    assert_eq!(status.deliveries.len(), 7, "{:?}", status.deliveries);
    assert!(
        status
            .deliveries
            .iter()
            .all(|c| (c.delivered, c.pending, c.failed) == (101, 0, 0)),
        "{:?}",
        status.deliveries
    );
    let bytes = serde_json::to_vec(&status).expect("JSON").len();
    assert!(bytes < 8 * 1024, "a status of {bytes} bytes");
    assert!(
        !h.event_reasons("huge")
            .await
            .contains(&"StatusTooLarge".to_owned())
    );
    // The API pages through them.
    let (code, page) = h.get("/v1/image-groups/huge/deliveries?limit=500").await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["deliveries"].as_array().map(Vec::len), Some(500));
    let cursor = page["nextCursor"].as_str().expect("a next page");
    let (_, rest) = h
        .get(&format!(
            "/v1/image-groups/huge/deliveries?limit=500&cursor={cursor}"
        ))
        .await;
    assert_eq!(rest["deliveries"].as_array().map(Vec::len), Some(207));
    assert!(rest["nextCursor"].is_null(), "{}", rest["nextCursor"]);
    let first_ids: std::collections::HashSet<&str> = page["deliveries"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(rest["deliveries"].as_array().into_iter().flatten())
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(
        first_ids.len(),
        707,
        "the pages neither overlap nor miss one"
    );
    let (code, bad) = h.get("/v1/image-groups/huge/deliveries?limit=0").await;
    assert_eq!(
        (code, bad["code"].as_str()),
        (400, Some("invalid_parameter"))
    );
}

async fn adding_images_and_models_reruns_only_what_is_new() {
    let mut h = Harness::start("tenant-update").await;
    let images = json!([{ "id": "coffee", "url": h.photo_url("coffee.png") }, { "id": "rocket", "url": h.photo_url("rocket.jpg") }]);
    let group_id = post_group(&h, images, &["object_detection"]).await;
    let first = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
        .await;
    let first_group_seq = of_type(&first, "image_group.completed")[0].payload["data"]["sequence"]
        .as_u64()
        .expect("seq");
    let coffee_before = h.stored_results(&group_id).await["coffee"].clone();

    // Any write to the group moves its resourceVersion, and the controller writes its
    // status as deliveries are recorded: a PATCH must not answer 409 for that. Another
    // writer touches an annotation 5 times a second meanwhile, while no-op PATCHes (a model
    // the group has: at least 40, and until the other writer has written 5 times, however
    // fast this machine answers) and then the real one are sent; each must be accepted.
    // (Slower touches would rarely meet a PATCH; faster ones would leave too little room
    // for its retries on a loaded machine.)
    let patch = |body: serde_json::Value| {
        reqwest::Client::new()
            .patch(format!("{}/v1/image-groups/{group_id}", h.api_url))
            .bearer_auth(&h.api_key)
            .json(&body)
            .send()
    };
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let touching = std::sync::Arc::new(AtomicBool::new(true));
    let touches = std::sync::Arc::new(AtomicU32::new(0));
    let toucher = tokio::spawn({
        let (groups, group_id) = (groups.clone(), group_id.clone());
        let (touching, touches) = (touching.clone(), touches.clone());
        async move {
            while touching.load(Ordering::Relaxed) {
                let n = touches.load(Ordering::Relaxed);
                let touch = json!({ "metadata": { "annotations": { "test.kinsight.io/touch": n.to_string() } } });
                groups
                    .patch(&group_id, &PatchParams::default(), &Patch::Merge(&touch))
                    .await
                    .expect("touch the group");
                touches.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let mut refused = Vec::new();
    let patching_since = tokio::time::Instant::now();
    let mut n = 0;
    while n < 40 || touches.load(Ordering::Relaxed) < 5 {
        assert!(
            patching_since.elapsed() < Duration::from_secs(60),
            "the other writer wrote {} times in 60 s",
            touches.load(Ordering::Relaxed)
        );
        n += 1;
        let response = patch(json!({ "addModels": ["object_detection"] }))
            .await
            .expect("PATCH");
        if response.status() != 202 {
            refused.push((n, response.status().as_u16()));
        }
    }
    assert!(
        refused.is_empty(),
        "no-op PATCHes refused while the group is written: {refused:?}"
    );
    let response = patch(json!({ "addImages": [{ "id": "cat", "url": h.photo_url("chelsea.png") }], "addModels": ["image_classification"] }))
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 202);
    touching.store(false, Ordering::Relaxed);
    toucher.await.expect("toucher");
    let second = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.updated").is_empty())
        .await;
    assert!(
        of_type(&second, "image_group.completed").is_empty(),
        "a second completion is an update"
    );
    let updated = &of_type(&second, "image_group.updated")[0].payload["data"];
    assert_eq!(updated["imagesDone"], 3);
    assert!(updated["sequence"].as_u64().expect("sequence") > first_group_seq);
    let images = completed_images(&second);
    assert_eq!(
        images,
        ["cat", "coffee", "rocket"],
        "each image's updated data is delivered"
    );
    for event in of_type(&second, "image.completed") {
        let results = &event.payload["data"]["results"];
        assert!(
            results.get("object_detection").is_some()
                && results.get("image_classification").is_some(),
            "{results}"
        );
    }

    // The second Job got only what was new: the new model for old images, everything for
    // the new one (its work order is stored under its name).
    let order = work_order(&h, &format!("{group_id}-g2")).await;
    let items = order["images"].as_array().expect("images");
    assert_eq!(items.len(), 3);
    for item in items {
        match item["id"].as_str() {
            Some("cat") => assert!(item.get("models").is_none(), "{item}"),
            _ => assert_eq!(item["models"], json!(["image_classification"]), "{item}"),
        }
    }
    let coffee_after = h.stored_results(&group_id).await["coffee"].clone();
    assert_eq!(
        coffee_after.outputs["object_detection"], coffee_before.outputs["object_detection"],
        "the old model's output was kept, not recomputed"
    );
    assert!(coffee_after.outputs.contains_key("image_classification"));

    // The ledger keeps one record per image (the newest event, all delivered) plus both
    // group events: updates do not pile copies of every image's record into it.
    let recorded = h.deliveries(&group_id).await;
    let mut image_records: Vec<&str> = recorded
        .iter()
        .filter_map(|d| d.image_id.as_deref())
        .collect();
    image_records.sort_unstable();
    assert_eq!(image_records, ["cat", "coffee", "rocket"], "{recorded:#?}");
    let newest: Vec<&str> = of_type(&second, "image.completed")
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert!(
        recorded
            .iter()
            .filter(|d| d.image_id.is_some())
            .all(|d| newest.contains(&d.id.as_str())),
        "the records left are those of the update's events"
    );
    assert_eq!(recorded.len(), 5, "{recorded:#?}");
}

async fn images_added_while_a_job_runs_go_to_one_new_job_that_supersedes_it() {
    let mut h = Harness::start("tenant-supersede").await;
    // A photo whose first download takes 20 s keeps the first Job busy however slow this
    // machine is; later downloads (the new Job's) are immediate.
    let slow_url = h.slow_photo(Duration::from_secs(20)).await;
    let images = json!([{ "id": "quick", "url": h.photo_url("rocket.jpg") }, { "id": "slow", "url": slow_url }]);
    let group_id = post_group(&h, images, &["image_classification"]).await;
    // The first Job is mid-way: one image done, the slow one still downloading.
    let mut events = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image.completed").is_empty())
        .await;
    let response = reqwest::Client::new()
        .patch(format!("{}/v1/image-groups/{group_id}", h.api_url))
        .bearer_auth(&h.api_key)
        .json(&json!({ "addImages": [{ "id": "added", "url": h.photo_url("coffee.png") }] }))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 202);

    let first_job = format!("{group_id}-g1");
    eventually("the first Job is stopped", LIMIT, async || {
        common::jobs_of(&h.client, &h.namespace, &group_id)
            .await
            .iter()
            .all(|j| j.metadata.name.as_deref() != Some(first_job.as_str()))
    })
    .await;
    events.extend(
        h.collect_webhooks(LIMIT, |e| !of_type(e, "image_group.completed").is_empty())
            .await,
    );
    let images = completed_images(&events);
    assert_eq!(images, ["added", "quick", "slow"], "every image once done");
    let jobs = common::jobs_of(&h.client, &h.namespace, &group_id).await;
    let names: Vec<&str> = jobs
        .iter()
        .filter_map(|j| j.metadata.name.as_deref())
        .collect();
    assert_eq!(
        names,
        [format!("{group_id}-g2")],
        "only the new Job is left"
    );
    // Each work order is its Job's and goes with it; no ConfigMap is made for one.
    eventually(
        "the stopped Job's work order goes with it",
        LIMIT,
        async || {
            h.store
                .work_order(&h.namespace, &first_job)
                .await
                .expect("read")
                .is_none()
        },
    )
    .await;
    let kept = h
        .store
        .work_order(&h.namespace, &format!("{group_id}-g2"))
        .await
        .expect("read")
        .expect("the running Job's order");
    assert_eq!(
        (kept.group.name.as_str(), kept.generation),
        (group_id.as_str(), 2)
    );
    let maps: Api<ConfigMap> = Api::namespaced(h.client.clone(), &h.namespace);
    for job in [first_job, format!("{group_id}-g2")] {
        assert!(maps.get_opt(&job).await.expect("read").is_none(), "{job}");
    }
}

async fn subscriptions_receive_namespace_events_and_finished_groups_expire() {
    let h = Harness::start("tenant-subs").await;
    // This tenant keeps finished groups for 3 s (the controller's default: 7 days).
    let retention =
        json!({ "metadata": { "annotations": { kinsight::crd::RETENTION_ANNOTATION: "3s" } } });
    Api::<k8s_openapi::api::core::v1::Namespace>::all(h.client.clone())
        .patch(
            &h.namespace,
            &PatchParams::default(),
            &Patch::Merge(&retention),
        )
        .await
        .expect("annotate the tenant's namespace");

    // A namespace-wide subscription with its own signing key, for image events only.
    let secret = kinsight::webhook::generate_secret();
    let (sub_addr, mut sub_events, _sub_server) = kinsight::dev::webhook_receiver(&secret)
        .await
        .expect("receiver");
    h.subscribe(
        "partner-key",
        &secret,
        &[(
            "partner",
            format!("http://{sub_addr}/hook"),
            json!({
                "eventTypes": ["image.completed"],
                "selector": { "matchLabels": { "team": "listings" } },
                "headers": { "X-Partner": "p1" },
                "timeoutSeconds": 5
            }),
        )],
        Duration::from_secs(10),
    )
    .await;

    // A group the selector does not match (made through the API, no team label): nothing.
    let (status, body) = h
        .post("/v1/image-groups", json!({ "images": [{ "id": "c", "url": h.photo_url("coffee.png") }], "models": ["image_classification"] }))
        .await;
    assert_eq!(status, 202, "{body}");
    let unmatched = body["id"].as_str().expect("id").to_owned();
    // A labelled group made with kubectl, without its own webhook: the subscription gets its
    // image event (with the custom header), not the group event.
    let group_id = "labelled".to_owned();
    let group: ImageGroup = serde_json::from_value(json!({
        "apiVersion": "kinsight.io/v1alpha1",
        "kind": "ImageGroup",
        "metadata": { "name": group_id, "labels": { "team": "listings" } },
        "spec": { "images": [{ "id": "c", "url": h.photo_url("coffee.png") }], "models": ["image_classification"] }
    }))
    .expect("group");
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    let created = groups
        .create(&PostParams::default(), &group)
        .await
        .expect("create");
    // Its uid now: its 3 s retention may delete it before the event below is judged.
    let stored = common::group_ref(&created);
    let deadline = tokio::time::Instant::now() + LIMIT;
    // Judged once the unselected group is done, not while it might still be under way (and
    // before its 3 s retention can delete it; the subscription's event waits in the channel).
    let unmatched_status = eventually("the unselected group to complete", LIMIT, async || {
        let status = groups.get(&unmatched).await.expect("get").status?;
        (status.phase == GroupPhase::Completed).then_some(status)
    })
    .await;
    assert!(
        unmatched_status.deliveries.is_empty(),
        "no endpoint for the unselected group: {:?}",
        unmatched_status.deliveries
    );
    let Ok(Some(event)) = tokio::time::timeout_at(deadline, sub_events.recv()).await else {
        panic!(
            "no event for the selected group; its status: {:#?}",
            groups.get(&group_id).await.map(|g| g.status)
        );
    };
    assert_eq!(event.payload["type"], "image.completed");
    assert_eq!(
        event.payload["data"]["groupId"],
        group_id.as_str(),
        "only the selected group's events"
    );
    assert!(
        event
            .headers
            .contains(&("x-partner".to_owned(), "p1".to_owned())),
        "{:?}",
        event.headers
    );
    assert_eq!(
        event.payload["data"]["results"]["image_classification"]["classes"][0]["label"],
        "espresso"
    );

    // After its retention the group is deleted, and the garbage collector takes its
    // results and Job with it (owner references).
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), &h.namespace);
    let selector = ListParams::default().labels(&format!("kinsight.io/group={group_id}"));
    // Three lists a round: every 500 ms, not the default interval.
    let gone = common::poll_every(
        Duration::from_millis(500),
        Duration::from_secs(60),
        async || {
            let group_left = groups.get_opt(&group_id).await.expect("get").is_some();
            let results_left = !h
                .store
                .group_results(&stored)
                .await
                .expect("stored results")
                .is_empty();
            let jobs_left = !jobs.list(&selector).await.expect("list").items.is_empty();
            !group_left && !results_left && !jobs_left
        },
    )
    .await;
    assert!(
        gone.is_some(),
        "the group, its results and its Job are gone after the retention"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), sub_events.recv())
            .await
            .is_err(),
        "no group event to an image-only subscription"
    );
}

/// Issue 12: a partial download fails as `ImageTruncated` (never analysed on grey fill),
/// `photo_quality`, requested like a model, flags the blurred photo of the group, and the
/// group event's listing summary finds the crop-and-rescale copy, counts the flags and
/// suggests a cover that is neither blurred nor a later duplicate nor failed.
async fn truncated_files_fail_as_such_and_photo_quality_flags_the_blurred_photo() {
    let mut h = Harness::start("tenant-quality").await;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let read = |name: &str| std::fs::read(fixtures.join(name)).expect("bundled photo");
    let folder = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, bytes: &[u8]| std::fs::write(folder.path().join(name), bytes).expect("write");
    let rocket = read("rocket.jpg");
    write("cut.jpg", &rocket[..rocket.len() / 3]);
    let coffee = read("coffee.png");
    write("cut.png", &coffee[..coffee.len() / 3]);
    write("astronaut.png", &read("astronaut.png"));
    let astronaut = image::load_from_memory(&read("astronaut.png")).expect("decodes");
    // Blurred, a photo keeps its perceptual hash: the blurred one is of a photo not
    // otherwise in the group, so that it is no near-duplicate.
    let mut blurred = std::io::Cursor::new(Vec::new());
    image::load_from_memory(&rocket)
        .expect("decodes")
        .blur(4.0)
        .write_to(&mut blurred, image::ImageFormat::Png)
        .expect("png");
    write("blurred.png", blurred.get_ref());
    // A re-upload of the photo: `cut` % cut off each side, scaled to `scale` %, re-encoded.
    let reupload = |name: &str, cut: u32, scale: u32, format: image::ImageFormat| {
        let (width, height) = (astronaut.width(), astronaut.height());
        let mut out = std::io::Cursor::new(Vec::new());
        astronaut
            .crop_imm(
                width * cut / 100,
                height * cut / 100,
                width * (100 - 2 * cut) / 100,
                height * (100 - 2 * cut) / 100,
            )
            .resize(
                width * scale / 100,
                height * scale / 100,
                image::imageops::FilterType::Lanczos3,
            )
            .to_rgb8()
            .write_to(&mut out, format)
            .expect("encode");
        write(name, out.get_ref());
    };
    reupload("astronaut-copy.jpg", 6, 62, image::ImageFormat::Jpeg);
    // Added once the group is done.
    reupload("astronaut-later.png", 3, 80, image::ImageFormat::Png);
    write("chelsea.png", &read("chelsea.png"));
    write("coffee.png", &coffee);
    let (photos, server) =
        kinsight::dev::serve_folder_on(folder.path().to_path_buf(), h.pod_address())
            .await
            .expect("photo server");
    let url = |name: &str| format!("http://{photos}/{name}");

    let images = json!([
        { "id": "sharp", "url": url("astronaut.png") },
        { "id": "blurred", "url": url("blurred.png") },
        { "id": "cut-jpeg", "url": url("cut.jpg") },
        { "id": "cut-png", "url": url("cut.png") },
        { "id": "sharp-copy", "url": url("astronaut-copy.jpg") },
        { "id": "cat", "url": url("chelsea.png") },
        { "id": "coffee", "url": url("coffee.png") }
    ]);
    let group_id = post_group(
        &h,
        images,
        &["photo_quality", "object_detection", "content_safety"],
    )
    .await;
    let events = events_once_complete(&mut h).await;
    let data_of = |kind: &str| -> HashMap<String, serde_json::Value> {
        of_type(&events, kind)
            .into_iter()
            .map(|e| {
                let data = &e.payload["data"];
                (
                    data["imageId"].as_str().unwrap_or_default().to_owned(),
                    data.clone(),
                )
            })
            .collect()
    };
    let failed = data_of("image.failed");
    assert_eq!(failed.len(), 2, "{events:#?}");
    assert_eq!(failed["cut-jpeg"]["failure"]["reason"], "ImageTruncated");
    assert_eq!(failed["cut-png"]["failure"]["reason"], "ImageTruncated");
    let completed = data_of("image.completed");
    let flags = |id: &str| completed[id]["results"]["photo_quality"]["quality"]["flags"].clone();
    assert_eq!(flags("sharp"), json!([]), "{:#}", completed["sharp"]);
    assert!(
        flags("blurred")
            .as_array()
            .is_some_and(|f| f.contains(&json!("blurry"))),
        "{:#}",
        completed["blurred"]
    );
    for (id, data) in &completed {
        let safety = &data["results"]["content_safety"];
        assert!(safety["classes"].is_array(), "{id}: {safety:#}");
        assert!(
            safety.get("flags").is_none(),
            "{id} is a safe photo: {safety:#}"
        );
    }

    let group = of_type(&events, "image_group.completed");
    assert_eq!(group.len(), 1);
    let data = &group[0].payload["data"];
    assert_eq!(data["version"], "v1alpha2");
    let listing = &data["aggregate"]["listing"];
    assert_eq!(listing["photos"], 5, "{listing:#}");
    assert_eq!(listing["failed"], 2, "{listing:#}");
    assert_eq!(
        listing["duplicates"],
        json!({"maxDistance": 12, "setCount": 1, "photos": 2, "sets": [["sharp", "sharp-copy"]]}),
        "{listing:#}"
    );
    let blurry = listing["qualityFlags"]
        .as_array()
        .and_then(|flags| flags.iter().find(|f| f["flag"] == "blurry"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        blurry,
        json!({"flag": "blurry", "count": 1, "imageIds": ["blurred"]}),
        "{listing:#}"
    );
    assert!(listing.get("flaggedContent").is_none(), "{listing:#}");
    // Objects per photo: as many as the image events' detections say.
    let with_objects: Vec<&String> = completed
        .iter()
        .filter(|(_, d)| {
            d["results"]["object_detection"]["detections"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        listing["objectsPerPhoto"]["photosWithObjects"],
        with_objects.len(),
        "{listing:#}"
    );
    // The cover: the best-scored photo among those without a quality flag, not the
    // blurred one, not the later duplicate, not a failed one.
    let score = |id: &str| {
        completed[id]["results"]["photo_quality"]["quality"]["score"]
            .as_f64()
            .unwrap_or_default()
    };
    let best = ["sharp", "cat", "coffee"]
        .into_iter()
        .filter(|id| flags(id) == json!([]))
        .max_by(|a, b| score(a).total_cmp(&score(b)))
        .expect("an unflagged photo");
    assert_eq!(listing["cover"]["imageId"], best, "{listing:#}");
    let cover_score = listing["cover"]["qualityScore"]
        .as_f64()
        .unwrap_or_default();
    assert!((cover_score - score(best)).abs() < 1e-4, "{listing:#}");
    assert_ne!(listing["cover"]["imageId"], "sharp-copy");
    assert_ne!(listing["cover"]["imageId"], "blurred");
    common::assert_payloads_conform(&events);

    // An image added later is compared with the group's earlier ones.
    let response = reqwest::Client::new()
        .patch(format!("{}/v1/image-groups/{group_id}", h.api_url))
        .bearer_auth(&h.api_key)
        .json(&json!({ "addImages": [{ "id": "sharp-later", "url": url("astronaut-later.png") }] }))
        .send()
        .await
        .expect("PATCH");
    assert_eq!(response.status(), 202);
    let second = h
        .collect_webhooks(LIMIT, |e| !of_type(e, "image_group.updated").is_empty())
        .await;
    server.abort();
    let updated = &of_type(&second, "image_group.updated")[0].payload["data"];
    let listing = &updated["aggregate"]["listing"];
    assert_eq!(listing["photos"], 6, "{listing:#}");
    assert_eq!(
        listing["duplicates"]["sets"],
        json!([["sharp", "sharp-copy", "sharp-later"]]),
        "{listing:#}"
    );
    assert_eq!(listing["duplicates"]["photos"], 3, "{listing:#}");
    assert_eq!(listing["cover"]["imageId"], best, "{listing:#}");
    common::assert_payloads_conform(&second);
}

/// Workers wait this long for their tenant's next group: longer than a loaded machine takes
/// from one group's event to the next group's Job.
const LINGER: Duration = Duration::from_secs(20);

/// The group event of group `id` among `events`.
fn group_event<'a>(
    events: &'a [kinsight::dev::ReceivedWebhook],
    id: &str,
) -> Option<&'a kinsight::dev::ReceivedWebhook> {
    of_type(events, "image_group.completed")
        .into_iter()
        .find(|e| e.payload["data"]["groupId"] == id)
}

/// Waits for `group`'s `image_group.completed`; returns what arrived until then and that
/// event's data.
async fn until_group_event(
    h: &mut Harness,
    group: &str,
) -> (Vec<kinsight::dev::ReceivedWebhook>, serde_json::Value) {
    let events = h
        .collect_webhooks(LIMIT, |e| group_event(e, group).is_some())
        .await;
    let data = group_event(&events, group)
        .expect("the group event")
        .payload["data"]
        .clone();
    (events, data)
}

/// The pods the Job `job` made.
async fn pods_of_job(h: &Harness, job: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(h.client.clone(), &h.namespace);
    pods.list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .expect("list pods")
        .items
}

async fn a_tenants_next_group_is_carried_by_the_worker_that_waits() {
    let mut h = Harness::start_configured("tenant-carriers", |c| c.worker_linger = LINGER).await;
    let hook = h.hook_url.clone();
    let first = h
        .post_photo_group(2, &["image_classification"], &hook)
        .await;
    let mut events = h
        .collect_webhooks(LIMIT, |e| group_event(e, &first).is_some())
        .await;
    // The first group's worker now waits for the tenant's next group: it takes it, and that
    // group's Job gets no pod of its own.
    let version = common::jobs_version(&h.client, &h.namespace).await;
    let second = h
        .post_photo_group(3, &["image_classification"], &hook)
        .await;
    let second_job = format!("{second}-g1");
    let job = common::job_since(&h.client, &h.namespace, &version, &second_job, LIMIT).await;
    let first_job = format!("{first}-g1");
    assert_eq!(carried(&job), (Some(first_job.clone()), Some(0)));
    let (more, group) = until_group_event(&mut h, &second).await;
    events.extend(more);
    assert_eq!(done_and_failed(&group), (Some(3), Some(0)), "{group}");
    let second_images: Vec<&str> = of_type(&events, "image.completed")
        .iter()
        .filter(|e| e.payload["data"]["groupId"] == second.as_str())
        .filter_map(|e| e.payload["data"]["imageId"].as_str())
        .collect();
    assert_eq!(second_images.len(), 3, "{second_images:?}");
    assert!(
        pods_of_job(&h, &second_job).await.is_empty(),
        "no pod of its own"
    );
    assert_eq!(
        pods_of_job(&h, &first_job).await.len(),
        1,
        "one pod did both"
    );
    // Done, the carried Job goes (it has no pod to end it), and its order with it; the
    // status still names it.
    eventually("the carried Job is deleted once done", LIMIT, async || {
        common::jobs_of(&h.client, &h.namespace, &second)
            .await
            .is_empty()
    })
    .await;
    eventually("its order goes with it", LIMIT, async || {
        h.store
            .work_order(&h.namespace, &second_job)
            .await
            .expect("read")
            .is_none()
    })
    .await;
    assert_eq!(group_status(&h, &second).await.jobs, [second_job]);
}

async fn a_carried_order_whose_carrier_goes_is_run_by_its_own_job() {
    let mut h = Harness::start_configured("tenant-carrier-gone", |c| {
        c.worker_linger = LINGER;
        let_downloads_hang(c);
    })
    .await;
    let hook = h.hook_url.clone();
    let first = h
        .post_photo_group(1, &["image_classification"], &hook)
        .await;
    h.collect_webhooks(LIMIT, |e| group_event(e, &first).is_some())
        .await;
    // The next group's photo takes 20 s to download the first time: its carrier is surely
    // still at it when its Job (the first group's) is deleted.
    let slow = h.slow_photo(Duration::from_secs(20)).await;
    let second = post_group(
        &h,
        json!([{ "id": "slow", "url": slow }]),
        &["image_classification"],
    )
    .await;
    let second_job = format!("{second}-g1");
    let first_job = format!("{first}-g1");
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), &h.namespace);
    eventually("the second group's order is carried", LIMIT, async || {
        jobs.get_opt(&second_job)
            .await
            .expect("read")
            .and_then(|job| {
                job.metadata
                    .annotations?
                    .get("kinsight.io/carried-by")
                    .cloned()
            })
            == Some(first_job.clone())
    })
    .await;
    jobs.delete(&first_job, &kube::api::DeleteParams::background())
        .await
        .expect("delete the carrier's Job");
    // The order goes back to its own Job, which gets a pod and does it (the photo is quick
    // the second time).
    let (_, group) = until_group_event(&mut h, &second).await;
    assert_eq!(done_and_failed(&group), (Some(1), Some(0)), "{group}");
    assert!(
        !pods_of_job(&h, &second_job).await.is_empty(),
        "its own Job ran it"
    );
}

async fn a_tenants_first_group_is_carried_by_its_standby_worker() {
    let mut h = Harness::start_configured("tenant-standby", |c| {
        c.worker_linger = Duration::from_secs(5);
        c.standby_workers = 1;
    })
    .await;
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), &h.namespace);
    let standbys = ListParams::default().labels("kinsight.io/standby=true");
    // Before any group, the tenant has a standby worker, and it waits for an order once
    // its models are loaded.
    let standby = eventually("a standby worker waits", LIMIT, async || {
        let listed = jobs.list(&standbys).await.expect("list").items;
        let [job] = listed.as_slice() else {
            return None;
        };
        let name = job.metadata.name.clone().expect("name");
        let waiting = h.store.waiting_carriers(&h.namespace).await.expect("read");
        waiting.contains(&name).then_some(name)
    })
    .await;
    assert!(standby.starts_with("kinsight-standby-"), "{standby}");
    let hook = h.hook_url.clone();
    let version = common::jobs_version(&h.client, &h.namespace).await;
    let group = h
        .post_photo_group(2, &["image_classification"], &hook)
        .await;
    let group_job = format!("{group}-g1");
    let job = common::job_since(&h.client, &h.namespace, &version, &group_job, LIMIT).await;
    assert_eq!(carried(&job), (Some(standby.clone()), Some(0)));
    // `kubectl describe` says so (the status is written after the Job is made).
    let said = format!("on the waiting worker {standby}, no pod start");
    eventually(
        "the Scheduled condition names the standby",
        LIMIT,
        async || {
            // The Job may be seen before the status that names it is written.
            let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
            let group = groups.get(&group).await.expect("group");
            group.status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Scheduled" && c.message.contains(&said))
            })
        },
    )
    .await;
    let (events, data) = until_group_event(&mut h, &group).await;
    assert_eq!(done_and_failed(&data), (Some(2), Some(0)), "{data}");
    assert_eq!(completed_images(&events).len(), 2);
    assert!(
        pods_of_job(&h, &group_job).await.is_empty(),
        "the group's Job had no pod of its own"
    );
    // The standby stays up and waits again, with its one pod.
    eventually("the standby waits again", LIMIT, async || {
        h.store
            .waiting_carriers(&h.namespace)
            .await
            .expect("read")
            .contains(&standby)
    })
    .await;
    assert_eq!(pods_of_job(&h, &standby).await.len(), 1);
    // A standby that goes is made again.
    let uid = jobs.get(&standby).await.expect("the standby").metadata.uid;
    jobs.delete(&standby, &kube::api::DeleteParams::background())
        .await
        .expect("delete the standby");
    eventually("the standby is made again", LIMIT, async || {
        jobs.get_opt(&standby)
            .await
            .expect("read")
            .is_some_and(|job| job.metadata.uid != uid && job.metadata.deletion_timestamp.is_none())
    })
    .await;
}

/// A worker that dies mid-order (its pod deleted, as an eviction or a node drain does)
/// leaves its stored results behind: the Job's next pod asks for its order without the
/// images already stored (`?pending=true`), so no photo is downloaded, analysed or
/// announced twice.
async fn a_workers_next_pod_does_only_the_images_left() {
    let mut h = Harness::start_configured("tenant-next-pod", let_downloads_hang).await;
    // A photo host that counts downloads; slow.png hangs the first time it is asked for.
    let downloads: std::sync::Arc<std::sync::Mutex<HashMap<String, usize>>> = Default::default();
    let photo =
        std::fs::read(common::repo_path("tests/fixtures/images/coffee.png")).expect("photo");
    let counted = downloads.clone();
    let host = axum::Router::new().route(
        "/{name}",
        axum::routing::get(
            move |axum::extract::Path(name): axum::extract::Path<String>| {
                let times = {
                    let mut counts = counted.lock().expect("counts");
                    let n = counts.entry(name.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                let photo = photo.clone();
                async move {
                    if name == "slow.png" && times == 1 {
                        tokio::time::sleep(Duration::from_secs(100)).await;
                    }
                    ([("content-type", "image/png")], photo)
                }
            },
        ),
    );
    let base = common::serve_on(h.pod_address(), host).await;
    let group = post_group(
        &h,
        json!([
            { "id": "a", "url": format!("{base}/a.png") },
            { "id": "b", "url": format!("{base}/b.png") },
            { "id": "c", "url": format!("{base}/slow.png") },
        ]),
        &["image_classification"],
    )
    .await;
    let job = format!("{group}-g1");
    // a and b are analysed and stored while c's download hangs; then the pod goes.
    eventually("a's and b's results stored", LIMIT, async || {
        h.stored_results(&group).await.len() == 2
    })
    .await;
    let [pod] = pods_of_job(&h, &job)
        .await
        .try_into()
        .unwrap_or_else(|pods: Vec<_>| panic!("one pod while the first runs, got {}", pods.len()));
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(h.client.clone(), &h.namespace);
    pods.delete(
        pod.metadata.name.as_deref().expect("pod name"),
        &Default::default(),
    )
    .await
    .expect("delete the worker's pod");

    let (events, data) = until_group_event(&mut h, &group).await;
    assert_eq!(done_and_failed(&data), (Some(3), Some(0)), "{data}");
    let image_events = of_type(&events, "image.completed");
    assert_eq!(completed_images(&events), ["a", "b", "c"]);
    assert_eq!(image_events.len(), 3, "each image announced once");
    let first = pod.metadata.name.as_deref().unwrap_or_default();
    let after: Vec<String> = pods_of_job(&h, &job)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(
        after.iter().any(|name| name != first),
        "a second pod did the rest: {after:?}"
    );
    let downloads = downloads.lock().expect("counts").clone();
    assert_eq!(
        downloads,
        HashMap::from([
            ("a.png".to_owned(), 1),
            ("b.png".to_owned(), 1),
            ("slow.png".to_owned(), 2),
        ]),
        "the next pod fetched only the photo without a result"
    );
}
