//! The result ingest (`POST /internal/v1/results`) against the real API server's
//! TokenReview: only the worker ServiceAccount of the group's own namespace may store
//! results, only for images of a group that exists with the uid its work order named; every
//! refusal is a clear problem+json, and nothing is stored by a refused batch. Work orders
//! (`GET /internal/v1/work-orders/{job}`) are read the same way: only by the worker of the
//! Job's namespace.

mod common;

crate::real_node_tests!(
    only_the_namespaces_worker_stores_results_of_its_groups,
    only_the_namespaces_worker_reads_its_work_orders,
);

use std::time::Duration;

use common::Harness;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kinsight::controller::WORKER_ACCOUNT;
use kinsight::crd::ImageGroup;
use kinsight::results::{GroupRef, INGEST_PATH, ImageResult};
use kinsight::worker::{WORK_ORDERS_PATH, WorkOrder};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use serde_json::json;

/// A token of ServiceAccount `namespace/name` (made if missing), as a kubelet would mount.
async fn token_of(client: &kube::Client, namespace: &str, name: &str) -> String {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let _ = namespaces.create(&PostParams::default(), &ns).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    let _ = accounts.create(&PostParams::default(), &account).await;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    accounts
        .create_subresource::<_, TokenRequest>("token", name, &PostParams::default(), &request)
        .await
        .expect("a token")
        .status
        .expect("status")
        .token
}

/// Posts a group of images "a" and "b" that cannot be fetched (nothing listens on port 9).
async fn post_unfetchable_group(h: &Harness) -> (String, GroupRef) {
    let (status, body) = h
        .post(
            "/v1/image-groups",
            json!({ "images": [{ "id": "a", "url": "http://127.0.0.1:9/a.jpg" }, { "id": "b", "url": "http://127.0.0.1:9/b.jpg" }],
                    "models": ["image_classification"] }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let group = h.group_ref(&id).await;
    (id, group)
}

async fn only_the_namespaces_worker_stores_results_of_its_groups() {
    let h = Harness::start("tenant-ingest").await;
    // A group whose one image cannot be fetched (nothing listens on port 9): its worker
    // stores a failure for "a"; image "b" is this test's.
    let (id, group) = post_unfetchable_group(&h).await;
    let url = format!("{}{INGEST_PATH}", h.api_url);
    let http = reqwest::Client::new();
    let send = async |token: Option<&str>, body: serde_json::Value| {
        let mut request = http.post(&url).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let (status, kind, text) = common::answer(request).await;
        if status >= 400 {
            assert_eq!(kind, "application/problem+json", "{status} {text}");
        }
        (status, text)
    };
    let result = |image: &str| {
        serde_json::to_value(ImageResult::failed(
            &id,
            image,
            "DownloadFailed",
            "test".into(),
        ))
        .expect("JSON")
    };
    let batch = |group: serde_json::Value, results: Vec<serde_json::Value>| json!({ "group": group, "generation": 1, "results": results });
    let ours = serde_json::to_value(&group).expect("JSON");

    let worker = token_of(&h.client, &h.namespace, WORKER_ACCOUNT).await;
    let intruder = token_of(&h.client, &h.namespace, "intruder").await;
    let elsewhere = token_of(&h.client, "tenant-ingest-other", WORKER_ACCOUNT).await;

    let (status, text) = send(None, batch(ours.clone(), vec![result("b")])).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = send(Some("not-a-token"), batch(ours.clone(), vec![result("b")])).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = send(Some(&intruder), batch(ours.clone(), vec![result("b")])).await;
    assert_eq!(status, 403, "another account of the namespace: {text}");
    let (status, text) = send(Some(&elsewhere), batch(ours.clone(), vec![result("b")])).await;
    assert_eq!(status, 403, "the worker of another namespace: {text}");
    let stale =
        json!({ "namespace": group.namespace, "name": group.name, "uid": "an-earlier-group" });
    let (status, text) = send(Some(&worker), batch(stale, vec![result("b")])).await;
    assert_eq!(
        status, 410,
        "a group of that name, but not the one the order named: {text}"
    );
    let (status, text) = send(Some(&worker), batch(ours.clone(), vec![result("zzz")])).await;
    assert_eq!(status, 422, "an image the group does not have: {text}");
    assert!(text.contains("zzz"), "{text}");
    let (status, text) = send(
        Some(&worker),
        batch(ours.clone(), vec![result("b"), result("b")]),
    )
    .await;
    assert_eq!(status, 422, "{text}");
    let (status, text) = send(Some(&worker), batch(ours.clone(), vec![])).await;
    assert_eq!(status, 422, "{text}");
    let (status, text) = send(Some(&worker), json!({ "group": ours, "results": "nope" })).await;
    assert_eq!(status, 422, "{text}");
    assert!(
        !h.stored_results(&id).await.contains_key("b"),
        "no refused batch stored anything"
    );

    let (status, text) = send(Some(&worker), batch(ours.clone(), vec![result("b")])).await;
    assert_eq!(status, 204, "{text}");
    // The same batch again (a worker retrying after a lost answer) changes nothing.
    let (status, text) = send(Some(&worker), batch(ours.clone(), vec![result("b")])).await;
    assert_eq!(status, 204, "{text}");
    // The group was just read for those batches: another namespace's worker naming its
    // uid under its own namespace still finds no such group there.
    let borrowed =
        json!({ "namespace": "tenant-ingest-other", "name": group.name, "uid": group.uid });
    let (status, text) = send(Some(&elsewhere), batch(borrowed, vec![result("a")])).await;
    assert_eq!(status, 410, "another namespace's group: {text}");
    let stored = common::eventually("b stored", Duration::from_secs(10), async || {
        h.stored_results(&id).await.remove("b")
    })
    .await;
    assert_eq!(
        stored.failure.map(|f| f.reason).as_deref(),
        Some("DownloadFailed")
    );

    // Past the read's time to live (2 s) the group held is confirmed (a metadata read),
    // and batches still land; once the group is deleted, within that time they are refused.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, text) = send(Some(&worker), batch(ours.clone(), vec![result("b")])).await;
    assert_eq!(
        status, 204,
        "the group confirmed after its time to live: {text}"
    );
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    groups
        .delete(&group.name, &DeleteParams::default())
        .await
        .expect("the group deleted");
    common::eventually(
        "the group gone",
        Duration::from_secs(30),
        async || match groups.get_opt(&group.name).await {
            Ok(None) => Some(()),
            _ => None,
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, text) = send(Some(&worker), batch(ours, vec![result("b")])).await;
    assert_eq!(status, 410, "a deleted group's batch: {text}");
}

async fn only_the_namespaces_worker_reads_its_work_orders() {
    let h = Harness::start("tenant-orders").await;
    let (id, group) = post_unfetchable_group(&h).await;
    let job = kinsight::controller::job_name(&id, 1, 0);
    let http = reqwest::Client::new();
    let get = async |token: Option<&str>, job: &str| {
        let mut request = http.get(format!("{}{WORK_ORDERS_PATH}/{job}", h.api_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let (status, kind, text) = common::answer(request).await;
        if status >= 400 {
            assert_eq!(kind, "application/problem+json", "{status} {text}");
        }
        (status, text)
    };
    let worker = token_of(&h.client, &h.namespace, WORKER_ACCOUNT).await;
    let intruder = token_of(&h.client, &h.namespace, "intruder").await;
    let elsewhere = token_of(&h.client, "tenant-orders-other", WORKER_ACCOUNT).await;

    // The controller stores the order before it creates the Job.
    let text = common::eventually(
        "the Job's work order",
        Duration::from_secs(60),
        async || {
            let (status, text) = get(Some(&worker), &job).await;
            (status == 200).then_some(text)
        },
    )
    .await;
    let order: WorkOrder = serde_json::from_str(&text).expect("a work order");
    assert_eq!(order.group, group);
    assert_eq!(order.generation, 1);
    assert_eq!(order.models, ["image_classification"]);
    let ids: Vec<&str> = order.images.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(order.images[0].url, "http://127.0.0.1:9/a.jpg");

    let (status, text) = get(None, &job).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = get(Some("not-a-token"), &job).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = get(Some(&intruder), &job).await;
    assert_eq!(status, 403, "another account of the namespace: {text}");
    // Another namespace's worker is told nothing of this namespace's orders.
    let (status, text) = get(Some(&elsewhere), &job).await;
    assert_eq!(status, 404, "the worker of another namespace: {text}");
    let (status, text) = get(Some(&worker), "no-such-job-g1").await;
    assert_eq!(status, 404, "{text}");

    // A Job's next pod asks only for what has no result yet: an image with a stored result
    // (here a failure, as a worker records an image it cannot fetch) is left out.
    h.store
        .write_results(
            &group,
            1,
            &[ImageResult::failed(
                &id,
                "a",
                "DownloadFailed",
                "test".into(),
            )],
        )
        .await
        .expect("stored");
    let (status, text) = get(Some(&worker), &format!("{job}?pending=true")).await;
    assert_eq!(status, 200, "{text}");
    let pending: WorkOrder = serde_json::from_str(&text).expect("a work order");
    let ids: Vec<&str> = pending.images.iter().map(|i| i.id.as_str()).collect();
    // ("b" too once the Job's own worker has stored its failure.)
    assert!(ids == ["b"] || ids.is_empty(), "{ids:?}");
    assert_eq!((pending.group, pending.models), (order.group, order.models));
    // Without the question, the order as stored.
    let (_, text) = get(Some(&worker), &job).await;
    let whole: WorkOrder = serde_json::from_str(&text).expect("a work order");
    assert_eq!(whole.images.len(), 2);
    let (status, text) = get(Some(&worker), &format!("{job}?pending=maybe")).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("pending"), "{text}");
}
