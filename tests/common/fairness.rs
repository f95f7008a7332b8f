//! One tenant's backlog and another tenant's single photo, on the harness' control plane:
//! the fairness e2e (tests/fairness.rs) checks it, the bench (benches/fair_scheduling.rs)
//! times it with and without caps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use kinsight::controller::{KUEUE_QUEUE_LABEL, LANE_LABEL};
use kinsight::dev::create_tenant;
use kube::ResourceExt;
use kube::api::ListParams;

use super::Harness;

/// A's backlog.
#[derive(Clone, Copy, Debug)]
pub struct Backlog {
    pub groups: usize,
    pub images: usize,
    /// From A's last POST to B's.
    pub head_start: Duration,
}

/// What happened.
#[derive(Debug)]
pub struct BacklogRun {
    /// From B's POST to its image's `image.completed`.
    pub single_image_wait: Duration,
    /// A's groups not yet completed when B's image event arrived.
    pub backlog_left: usize,
    /// From A's first POST to A's last `image_group.completed`.
    pub backlog_time: Duration,
    /// Images done per A group, as their `image_group.completed` said.
    pub backlog_done: Vec<u64>,
    pub peak: JobPeak,
    /// An A group was seen waiting with `Scheduled=False/QueuedBehind` (and the message).
    pub queued_message: Option<String>,
    /// B's group's `Scheduled` reason after its image was done.
    pub single_image_reason: Option<String>,
}

/// The most running worker Jobs seen at once (Kueue's excluded), by lane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobPeak {
    pub main: usize,
    pub main_per_tenant: usize,
    pub small: usize,
    pub small_per_tenant: usize,
    pub samples: usize,
}

/// A second tenant of the harness, with its own API key; events signed like the first's.
pub async fn add_tenant(h: &Harness, namespace: &str) -> String {
    let key = format!("test-key-{namespace}");
    create_tenant(
        &h.client,
        &h.keys_namespace,
        namespace,
        &key,
        &h.webhook_secret,
    )
    .await
    .expect("second tenant");
    // The API's key watch takes it up.
    let http = reqwest::Client::new();
    for _ in 0..100 {
        let answer = http
            .get(format!("{}/v1/image-groups/grp-none", h.api_url))
            .bearer_auth(&key)
            .send()
            .await;
        if answer.is_ok_and(|r| r.status() == reqwest::StatusCode::NOT_FOUND) {
            return key;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the API did not take up the key of {namespace}");
}

/// Posts `count` of the sample photos as one group with `key`; returns the group's id.
pub async fn post_photos(h: &Harness, key: &str, count: usize) -> String {
    let names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];
    let images: Vec<_> = (0..count)
        .map(|i| serde_json::json!({ "id": format!("i{i}"), "url": h.photo_url(names[i % names.len()]) }))
        .collect();
    let body = serde_json::json!({ "images": images, "models": ["image_classification"], "webhookUrl": h.hook_url });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/image-groups", h.api_url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.expect("JSON");
    body["id"].as_str().expect("id").to_owned()
}

/// Tenant A (the harness') posts the backlog; B (`b_key`) then posts one photo. Waits for
/// every group to complete (within `limit`).
pub async fn backlog_then_one_photo(
    h: &mut Harness,
    (b_namespace, b_key): (&str, &str),
    backlog: Backlog,
    limit: Duration,
) -> BacklogRun {
    let deadline = tokio::time::Instant::now() + limit;
    let peak = Arc::new(Mutex::new(JobPeak::default()));
    let sampler = tokio::spawn(sample_jobs(h.client.clone(), peak.clone()));
    let started = Instant::now();
    let a_key = h.api_key.clone();
    let mut backlog_ids = Vec::new();
    for _ in 0..backlog.groups {
        backlog_ids.push(post_photos(h, &a_key, backlog.images).await);
    }
    tokio::time::sleep(backlog.head_start).await;
    let watcher = tokio::spawn(watch_for_queued(h.client.clone(), h.namespace.clone()));
    let b_posted = Instant::now();
    let b_id = post_photos(h, b_key, 1).await;

    let mut received = Vec::new();
    let mut completed: HashMap<String, (Instant, u64)> = HashMap::new();
    let mut b_done = None;
    let backlog_set: HashSet<&String> = backlog_ids.iter().collect();
    let mut backlog_left = None;
    while completed.len() < backlog_ids.len() || b_done.is_none() {
        let event = tokio::time::timeout_at(deadline, h.webhooks.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out: {} of {} backlog groups done, the photo {}",
                    completed.len(),
                    backlog_ids.len(),
                    if b_done.is_some() { "done" } else { "not done" }
                )
            })
            .expect("webhook receiver");
        let data = &event.payload["data"];
        let group = data["groupId"].as_str().unwrap_or_default().to_owned();
        match event.payload["type"].as_str() {
            Some("image.completed") if group == b_id && b_done.is_none() => {
                b_done = Some(b_posted.elapsed());
                backlog_left = Some(backlog_ids.len() - completed.len());
            }
            Some("image_group.completed") if backlog_set.contains(&group) => {
                let done = data["imagesDone"].as_u64().unwrap_or(0);
                completed.insert(group, (Instant::now(), done));
            }
            _ => {}
        }
        received.push(event);
    }
    let backlog_end = completed
        .values()
        .map(|(at, _)| *at)
        .max()
        .unwrap_or(started);
    sampler.abort();
    watcher.abort();
    let queued_message = watcher.await.ok().flatten();
    let single_image_reason = scheduled(&h.client, b_namespace, &b_id)
        .await
        .map(|c| c.reason);
    let peak = *peak.lock().expect("peak");
    BacklogRun {
        single_image_wait: b_done.unwrap_or_default(),
        backlog_left: backlog_left.unwrap_or(0),
        backlog_time: backlog_end.duration_since(started),
        backlog_done: backlog_ids
            .iter()
            .map(|id| completed.get(id).map_or(0, |(_, n)| *n))
            .collect(),
        peak,
        queued_message,
        single_image_reason,
    }
}

/// The group's `Scheduled` condition, if it has one.
pub async fn scheduled(
    client: &kube::Client,
    namespace: &str,
    group: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    kube::Api::<kinsight::crd::ImageGroup>::namespaced(client.clone(), namespace)
        .get(group)
        .await
        .ok()?
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Scheduled")
}

/// Lists the worker Jobs every 100 ms and keeps the most running at once. A Job of a
/// group whose status says Completed holds no slot (the controller gives it back once the
/// results are stored, while the worker exits): the groups are listed after the Jobs, so a
/// slot handed on before the Jobs' listing shows its group Completed.
async fn sample_jobs(client: kube::Client, peak: Arc<Mutex<JobPeak>>) {
    let jobs: kube::Api<Job> = kube::Api::all(client.clone());
    let groups: kube::Api<kinsight::crd::ImageGroup> = kube::Api::all(client);
    let selector = ListParams::default().labels("app.kubernetes.io/component=worker");
    loop {
        let listed = match jobs.list(&selector).await {
            Ok(list) => groups
                .list(&ListParams::default())
                .await
                .ok()
                .map(|g| (list, g)),
            Err(_) => None,
        };
        if let Some((list, groups)) = listed {
            let completed: HashSet<(String, String)> = groups
                .items
                .iter()
                .filter(|g| {
                    g.status
                        .as_ref()
                        .is_some_and(|s| s.phase == kinsight::crd::GroupPhase::Completed)
                })
                .map(|g| (g.namespace().unwrap_or_default(), g.name_any()))
                .collect();
            let group_done = |job: &Job| {
                job.owner_references().iter().any(|o| {
                    o.kind == "ImageGroup"
                        && completed
                            .contains(&(job.namespace().unwrap_or_default(), o.name.clone()))
                })
            };
            let mut main: BTreeMap<String, usize> = BTreeMap::new();
            let mut small: BTreeMap<String, usize> = BTreeMap::new();
            for job in list
                .items
                .iter()
                .filter(|j| is_running(j) && !group_done(j))
            {
                let lane = if job.labels().get(LANE_LABEL).map(String::as_str) == Some("small") {
                    &mut small
                } else {
                    &mut main
                };
                *lane.entry(job.namespace().unwrap_or_default()).or_default() += 1;
            }
            let mut peak = peak.lock().expect("peak");
            peak.main = peak.main.max(main.values().sum());
            peak.small = peak.small.max(small.values().sum());
            peak.main_per_tenant = peak
                .main_per_tenant
                .max(main.values().copied().max().unwrap_or(0));
            peak.small_per_tenant = peak
                .small_per_tenant
                .max(small.values().copied().max().unwrap_or(0));
            peak.samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A kinsight Job not finished and not Kueue's.
fn is_running(job: &Job) -> bool {
    let finished = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        });
    !finished && !job.labels().contains_key(KUEUE_QUEUE_LABEL)
}

/// The first `QueuedBehind` message seen on a group of `namespace` (polled every 200 ms).
async fn watch_for_queued(client: kube::Client, namespace: String) -> Option<String> {
    let groups: kube::Api<kinsight::crd::ImageGroup> = kube::Api::namespaced(client, &namespace);
    loop {
        if let Ok(list) = groups.list(&ListParams::default()).await {
            let queued = list
                .items
                .into_iter()
                .filter_map(|g| g.status)
                .flat_map(|s| s.conditions)
                .find(|c| c.type_ == "Scheduled" && c.reason == "QueuedBehind");
            if let Some(c) = queued {
                return Some(c.message);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
