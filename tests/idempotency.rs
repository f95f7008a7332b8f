//! `Idempotency-Key` on the REST API's POSTs, against the real control plane and PostgreSQL:
//! a retry gets the first answer and creates nothing more, another request under the same key
//! is refused, keys are per tenant, concurrent retries create one group; and the store's
//! claim, lease, release and expiry.

mod common;

crate::real_node_tests!(
    a_retried_post_gets_the_first_answer_and_creates_one_group_per_tenant,
    a_key_is_claimed_once_released_on_failure_taken_over_after_its_lease_and_expires
);

use std::time::Duration;

use common::{Harness, database};
use kinsight::crd::ImageGroup;
use kinsight::store::{KeyClaim, StoredResponse};
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

/// POSTs `body` to `path` with `api_key` and, when given, `key`; returns the status, the
/// `Idempotent-Replayed` header and the body.
async fn post(
    h: &Harness,
    api_key: &str,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, bool, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", h.api_url))
        .bearer_auth(api_key)
        .json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn groups_in(h: &Harness, namespace: &str) -> Vec<String> {
    Api::<ImageGroup>::namespaced(h.client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .expect("list groups")
        .items
        .into_iter()
        .filter_map(|g| g.metadata.name)
        .collect()
}

fn group_body(h: &Harness, image: &str) -> Value {
    json!({ "images": [{ "url": h.photo_url(image) }], "models": ["image_classification"] })
}

async fn a_retried_post_gets_the_first_answer_and_creates_one_group_per_tenant() {
    let h = Harness::start("tenant-idem-a").await;
    let body = group_body(&h, "coffee.png");

    let (status, replayed, first) =
        post(&h, &h.api_key, "/v1/image-groups", Some("order-42"), &body).await;
    assert_eq!(status, 202, "{first}");
    assert!(!replayed);
    let id = first["id"].as_str().expect("id").to_owned();
    for _ in 0..2 {
        let (status, replayed, again) =
            post(&h, &h.api_key, "/v1/image-groups", Some("order-42"), &body).await;
        assert_eq!((status, &again), (202, &first));
        assert!(replayed, "a replayed answer says so");
    }
    assert_eq!(groups_in(&h, &h.namespace).await, [id.as_str()]);

    // The same key for another request: refused, nothing created.
    let other = group_body(&h, "rocket.jpg");
    let (status, _, problem) =
        post(&h, &h.api_key, "/v1/image-groups", Some("order-42"), &other).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["code"], "idempotency_key_reused");
    let (status, _, problem) = post(&h, &h.api_key, "/v1/images", Some("order-42"), &body).await;
    assert_eq!(status, 422, "another path is another request: {problem}");
    assert_eq!(problem["code"], "idempotency_key_reused");
    assert_eq!(groups_in(&h, &h.namespace).await, [id.as_str()]);

    // Malformed keys are refused before anything happens.
    let long = "k".repeat(256);
    for bad in ["", long.as_str(), "two words"] {
        let (status, _, problem) =
            post(&h, &h.api_key, "/v1/image-groups", Some(bad), &other).await;
        assert_eq!(status, 422, "{bad:?}: {problem}");
        assert_eq!(problem["code"], "invalid_request");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("Idempotency-Key"),
            "{problem}"
        );
    }
    assert_eq!(groups_in(&h, &h.namespace).await, [id.as_str()]);

    // Another tenant's same key is its own.
    let (namespace_b, key_b) = ("tenant-idem-b", "test-key-tenant-idem-b");
    kinsight::dev::create_tenant(
        &h.client,
        &h.keys_namespace,
        namespace_b,
        key_b,
        &kinsight::webhook::generate_secret(),
    )
    .await
    .expect("second tenant");
    let answer_b = common::poll(Duration::from_secs(10), async || {
        let (status, _, answer) =
            post(&h, key_b, "/v1/image-groups", Some("order-42"), &other).await;
        (status != 401).then_some((status, answer))
    })
    .await
    .expect("the second tenant's key is loaded");
    assert_eq!(answer_b.0, 202, "{}", answer_b.1);
    let id_b = answer_b.1["id"].as_str().expect("id").to_owned();
    assert_ne!(id_b, id);
    assert_eq!(groups_in(&h, namespace_b).await, [id_b.as_str()]);
    let (status, replayed, again_b) =
        post(&h, key_b, "/v1/image-groups", Some("order-42"), &other).await;
    assert_eq!((status, replayed, &again_b), (202, true, &answer_b.1));
    assert_eq!(groups_in(&h, &h.namespace).await, [id.as_str()]);

    // Retries sent at once: one group; each gets its answer or "in progress".
    let concurrent = group_body(&h, "chelsea.png");
    let answers = futures::future::join_all((0..8).map(|_| {
        post(
            &h,
            &h.api_key,
            "/v1/image-groups",
            Some("order-43"),
            &concurrent,
        )
    }))
    .await;
    let mut ids: Vec<&str> = Vec::new();
    for (status, _, answer) in &answers {
        match status {
            202 => ids.push(answer["id"].as_str().expect("id")),
            409 => assert_eq!(answer["code"], "idempotency_key_in_progress", "{answer}"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!(!ids.is_empty(), "{answers:?}");
    ids.dedup();
    assert_eq!(ids.len(), 1, "{answers:?}");
    let mut names = groups_in(&h, &h.namespace).await;
    names.sort();
    let mut expected = vec![id.clone(), ids[0].to_owned()];
    expected.sort();
    assert_eq!(names, expected);

    // Replays take keys too; without a key nothing changes: two POSTs, two groups.
    let since = json!({ "since": "2026-01-01T00:00:00Z" });
    let (status, _, first) = post(
        &h,
        &h.api_key,
        "/v1/deliveries/replay",
        Some("replay-1"),
        &since,
    )
    .await;
    assert_eq!(status, 202, "{first}");
    let (status, replayed, again) = post(
        &h,
        &h.api_key,
        "/v1/deliveries/replay",
        Some("replay-1"),
        &since,
    )
    .await;
    assert_eq!((status, replayed, &again), (202, true, &first));
    let plain = group_body(&h, "astronaut.png");
    let (a, _, _) = post(&h, &h.api_key, "/v1/image-groups", None, &plain).await;
    let (b, _, _) = post(&h, &h.api_key, "/v1/image-groups", None, &plain).await;
    assert_eq!((a, b), (202, 202));
    assert_eq!(groups_in(&h, &h.namespace).await.len(), 4);
}

async fn a_key_is_claimed_once_released_on_failure_taken_over_after_its_lease_and_expires() {
    let (_postgres, store, _dir) = database().await;
    let lease = Duration::from_secs(60);
    let keep = Duration::from_secs(3600);
    let claim = async |ns: &str, key: &str, hash: &str, lease, keep| {
        store
            .claim_idempotency_key(ns, key, hash, lease, keep)
            .await
            .expect("claim")
    };
    let answer = StoredResponse {
        status: 202,
        headers: vec![("location".into(), "/v1/image-groups/grp-1".into())],
        body: br#"{"id":"grp-1"}"#.to_vec(),
    };

    // Claimed once; meanwhile the same request waits, another is refused.
    let KeyClaim::Claimed(first) = claim("t-a", "k", "h1", lease, keep).await else {
        panic!("a fresh key is claimed");
    };
    assert_eq!(
        claim("t-a", "k", "h1", lease, keep).await,
        KeyClaim::InProgress
    );
    assert_eq!(claim("t-a", "k", "h2", lease, keep).await, KeyClaim::Reused);
    // Another tenant's key of the same name is another key.
    assert!(matches!(
        claim("t-b", "k", "h2", lease, keep).await,
        KeyClaim::Claimed(_)
    ));
    // Only the holder records; then every retry gets the answer.
    assert!(
        !store
            .record_idempotent_response("t-a", "k", "not-the-claim", &answer)
            .await
            .expect("record")
    );
    assert!(
        store
            .record_idempotent_response("t-a", "k", &first, &answer)
            .await
            .expect("record")
    );
    assert_eq!(
        claim("t-a", "k", "h1", lease, keep).await,
        KeyClaim::Done(answer.clone())
    );
    assert_eq!(claim("t-a", "k", "h2", lease, keep).await, KeyClaim::Reused);
    // A finished key is not released.
    assert!(
        !store
            .release_idempotency_key("t-a", "k", &first)
            .await
            .expect("release")
    );

    // A failure releases the key: the retry runs.
    let KeyClaim::Claimed(failing) = claim("t-a", "f", "h1", lease, keep).await else {
        panic!("claimed");
    };
    assert!(
        store
            .release_idempotency_key("t-a", "f", &failing)
            .await
            .expect("release")
    );
    assert!(matches!(
        claim("t-a", "f", "h1", lease, keep).await,
        KeyClaim::Claimed(_)
    ));

    // A claim whose process died is taken over after its lease, by the same request only.
    let short = Duration::from_millis(100);
    let KeyClaim::Claimed(dead) = claim("t-a", "d", "h1", short, keep).await else {
        panic!("claimed");
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(claim("t-a", "d", "h2", lease, keep).await, KeyClaim::Reused);
    let KeyClaim::Claimed(heir) = claim("t-a", "d", "h1", lease, keep).await else {
        panic!("taken over");
    };
    assert_ne!(heir, dead);
    assert!(
        !store
            .record_idempotent_response("t-a", "d", &dead, &answer)
            .await
            .expect("record"),
        "the dead claim's late answer is not written"
    );

    // Keys older than `keep` count as unused, and are purged in batches.
    let expiring = Duration::from_millis(200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        claim("t-a", "k", "h2", lease, expiring).await,
        KeyClaim::Claimed(_)
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for key in ["p1", "p2", "p3"] {
        assert!(matches!(
            claim("t-c", key, "h", lease, keep).await,
            KeyClaim::Claimed(_)
        ));
    }
    // Everything but t-c's three fresh keys: t-a's k, f, d and t-b's k.
    let purged = store
        .purge_idempotency_keys(expiring, 2)
        .await
        .expect("purge");
    assert_eq!(purged, 4);
    assert_eq!(
        store
            .query_text("SELECT count(*)::text FROM idempotency_keys")
            .await
            .expect("count"),
        [["3"]]
    );
}
