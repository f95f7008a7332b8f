//! Bounded images in flight per tenant, on the real control plane with the real workers: the
//! cap in a tenant's key record applies without a restart; a request past it is 429 with
//! `Retry-After` naming the limit, the count and the cap; one that alone exceeds it is 422;
//! finished images (results stored) free their places. Then the count's
//! cost in the store with a tenant at its cap of 10,000 open groups.

mod common;

crate::real_node_tests!(
    images_in_flight_are_capped_per_tenant_and_freed_as_they_finish,
    admission_cost_with_a_tenant_at_its_cap
);

use std::time::{Duration, Instant};

use common::Harness;
use kinsight::store::Admission;
use serde_json::{Value, json};

async fn post_raw(h: &Harness, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", h.api_url))
        .bearer_auth(&h.api_key)
        .json(&body)
        .send()
        .await
        .expect("POST")
}

fn group(urls: &[String], models: &[String]) -> Value {
    let images: Vec<Value> = urls.iter().map(|url| json!({ "url": url })).collect();
    json!({ "images": images, "models": models })
}

async fn images_in_flight_are_capped_per_tenant_and_freed_as_they_finish() {
    let h = Harness::start("tenant-in-flight").await;
    h.set_key_field(kinsight::api::IN_FLIGHT_LIMIT_FIELD, "3")
        .await;
    let photo = h.photo_url("coffee.png");
    // The API's key watch picks the cap up: four images alone are then too many (refused
    // before anything else is looked at, so the unknown model keeps this from creating a
    // group while the old cap holds).
    let too_many = group(&vec![photo.clone(); 4], &["no-such-model".to_owned()]);
    common::eventually(
        "the key's cap applies",
        Duration::from_secs(10),
        async || {
            let (status, body) = h.post("/v1/image-groups", too_many.clone()).await;
            status == 422 && body["code"] == "over_in_flight_cap"
        },
    )
    .await;
    let (_, body) = h.post("/v1/image-groups", too_many).await;
    assert_eq!(body["limit"], "in_flight_images", "{body}");
    assert_eq!((&body["requested"], &body["cap"]), (&json!(4), &json!(3)));

    // Two images held up in their download: in flight for a while.
    let slow = [
        h.slow_photo(Duration::from_secs(8)).await,
        h.slow_photo(Duration::from_secs(8)).await,
    ];
    let (status, held) = h.post("/v1/image-groups", group(&slow, &h.models)).await;
    assert_eq!(status, 202, "{held}");
    let held = held["id"].as_str().expect("id").to_owned();

    // Two more would make 4 of 3.
    let refused = post_raw(
        &h,
        "/v1/image-groups",
        group(&[photo.clone(), photo.clone()], &h.models),
    )
    .await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    assert_eq!(
        refused.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/problem+json"[..])
    );
    let problem: Value = refused.json().await.expect("problem");
    assert_eq!(problem["code"], "in_flight_limited", "{problem}");
    assert_eq!(problem["limit"], "in_flight_images");
    assert_eq!(
        (&problem["inFlight"], &problem["requested"], &problem["cap"]),
        (&json!(2), &json!(2), &json!(3)),
        "{problem}"
    );
    // One more fits: 3 of 3.
    let (status, single) = h
        .post("/v1/images", json!({ "url": photo, "models": h.models }))
        .await;
    assert_eq!(status, 202, "{single}");
    let single = single["id"].as_str().expect("id").to_owned();

    // Finished images (a result stored, here each image's first) are no longer in flight:
    // once all three are, three more fit again.
    for path in [
        format!("/v1/images/{single}"),
        format!("/v1/image-groups/{held}"),
    ] {
        common::eventually(
            &format!("{path} completes"),
            Duration::from_secs(90),
            async || {
                let (_, body) = h.get(&path).await;
                body["status"] == "completed"
            },
        )
        .await;
    }
    let three = group(&[photo.clone(), photo.clone(), photo.clone()], &h.models);
    common::eventually(
        "three images fit again",
        Duration::from_secs(30),
        async || {
            let (status, body) = h.post("/v1/image-groups", three.clone()).await;
            assert!(status == 202 || status == 429, "{status} {body}");
            status == 202
        },
    )
    .await;

    // A group deleted with kubectl frees its places at once, not when its downloads end
    // (here: a minute) or at the periodic retention sweep.
    let stuck = [
        h.slow_photo(Duration::from_secs(60)).await,
        h.slow_photo(Duration::from_secs(60)).await,
        h.slow_photo(Duration::from_secs(60)).await,
    ];
    common::eventually(
        "the three earlier images finish",
        Duration::from_secs(90),
        async || h.store.images_in_flight(&h.namespace).await.ok() == Some(0),
    )
    .await;
    let (status, stuck) = h.post("/v1/image-groups", group(&stuck, &h.models)).await;
    assert_eq!(status, 202, "{stuck}");
    let stuck = stuck["id"].as_str().expect("id").to_owned();
    let (status, _) = h
        .post("/v1/images", json!({ "url": photo, "models": h.models }))
        .await;
    assert_eq!(status, 429, "the cap of 3 is taken by the stuck group");
    let groups: kube::Api<kinsight::crd::ImageGroup> =
        kube::Api::namespaced(h.client.clone(), &h.namespace);
    groups
        .delete(&stuck, &kube::api::DeleteParams::background())
        .await
        .expect("kubectl delete");
    let deleted = Instant::now();
    common::eventually(
        "the deleted group's places are free",
        Duration::from_secs(15),
        async || {
            let (status, body) = h
                .post("/v1/images", json!({ "url": photo, "models": h.models }))
                .await;
            assert!(status == 202 || status == 429, "{status} {body}");
            status == 202
        },
    )
    .await;
    println!(
        "places freed {:.1?} after the group was deleted",
        deleted.elapsed()
    );
}

/// The count a POST pays for reads only the tenant's open groups (finished ones leave the
/// table), so its cost is bounded by the cap. Prints the cost of one admission with 1 and
/// with 10,000 open groups side by side; checks the count is exact at the cap.
async fn admission_cost_with_a_tenant_at_its_cap() {
    let (_postgres, store, _dir) = common::database().await;
    const CAP: u32 = 10_000;
    let timed = async |namespace: &str, name: &str| {
        let started = Instant::now();
        let uid = format!("{namespace}/{name}");
        let admission = store
            .admit_images(namespace, name, Some(&uid), 1, CAP)
            .await
            .expect("admit");
        (admission, started.elapsed())
    };
    // A first statement pays for the connection and the plan: not what is measured.
    store.images_in_flight("tenant-warm").await.expect("count");
    let (first, empty) = timed("tenant-a", "grp-0").await;
    assert_eq!(first, Admission::Admitted(1));
    // The groups between, in one statement (admitting them one by one only takes longer).
    store
        .execute_batch(&format!(
            "INSERT INTO admissions (namespace, name, uid, images_open)
             SELECT 'tenant-a', 'grp-' || i, 'grp-' || i, 1 FROM generate_series(1, {}) AS i",
            CAP - 2
        ))
        .await
        .expect("open groups");
    let (last, full) = timed("tenant-a", "grp-last").await;
    assert_eq!(last, Admission::Admitted(u64::from(CAP)));
    assert_eq!(
        timed("tenant-a", "grp-over").await.0,
        Admission::Full(u64::from(CAP))
    );
    // Another tenant is not held back by this one's count.
    assert_eq!(timed("tenant-b", "grp-0").await.0, Admission::Admitted(1));
    assert_eq!(
        store.images_in_flight("tenant-a").await.expect("count"),
        u64::from(CAP)
    );
    eprintln!(
        "admission of one image: {:.2} ms with 1 open group, {:.2} ms with {CAP} open groups",
        empty.as_secs_f64() * 1e3,
        full.as_secs_f64() * 1e3
    );
}
