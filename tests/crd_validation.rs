//! Validation where Kubernetes applies it: the CRD schemas (crds/kinsight.yaml) carry bounds,
//! patterns and enums, so the real API server itself refuses an invalid ImageGroup or
//! WebhookSubscription at create (what `kubectl apply` does), with the schema's message,
//! instead of storing it for the controller to reject afterwards. (Messages as the testbed's
//! API server, 1.20, words them: newer ones add the index, `spec.images[0].url`.)

use kinsight::crd::{ImageGroup, MAX_IMAGES, WebhookSubscription};
use kinsight::testbed::TestCluster;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// The API server's answer to creating `object`: (code, message), or None when stored.
async fn create<K>(api: &Api<K>, object: Value) -> Option<(u16, String)>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let object: K = serde_json::from_value(object).expect("the object parses as its type");
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some((status.code, status.message)),
        Err(other) => panic!("create: {other}"),
    }
}

fn group(name: &str, spec: Value) -> Value {
    json!({ "apiVersion": "kinsight.io/v1alpha1", "kind": "ImageGroup",
            "metadata": { "name": name }, "spec": spec })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_invalid_objects_with_the_schemas_message() {
    let cluster = TestCluster::start().await.expect("cluster");
    let client = cluster.client();
    kinsight::dev::install_crds(&client)
        .await
        .expect("install CRDs");
    let groups: Api<ImageGroup> = Api::namespaced(client.clone(), "default");
    let image = json!({ "url": "https://photos.example/a.jpg" });

    // A valid group is stored: what follows is refused for its one fault alone.
    let valid = json!({ "images": [image], "models": ["object_detection"] });
    assert_eq!(create(&groups, group("valid", valid)).await, None);

    let too_many = vec![image.clone(); MAX_IMAGES + 1];
    let refusals = [
        (
            json!({ "images": too_many, "models": ["object_detection"] }),
            "spec.images in body should have at most 10000 items",
        ),
        (
            json!({ "images": [{ "url": "ftp://photos.example/a.jpg" }], "models": ["object_detection"] }),
            "spec.images.url in body should match '^[hH][tT][tT][pP][sS]?://'",
        ),
        (
            json!({ "images": [{ "id": "Not_A_Label", "url": "https://photos.example/a.jpg" }],
                    "models": ["object_detection"] }),
            "spec.images.id in body should match",
        ),
        (
            json!({ "images": [image], "models": ["object_detection", "object_detection"] }),
            "spec.models[1]: Duplicate value: \"object_detection\"",
        ),
        (
            json!({ "images": [image], "models": ["Object Detection"] }),
            "spec.models in body should match '^[a-z][a-z0-9_-]*$'",
        ),
        (
            json!({ "images": [image], "models": ["object_detection"],
                    "webhook": { "url": "https://hooks.example/in",
                                 "secretRef": { "name": "../secrets", "key": "secret" } } }),
            "spec.webhook.secretRef.name in body should match",
        ),
        (
            json!({ "images": [image], "models": [] }),
            "spec.models: Invalid value: 0: spec.models in body should have at least 1 items",
        ),
    ];
    for (i, (spec, message)) in refusals.into_iter().enumerate() {
        let refused = create(&groups, group(&format!("invalid-{i}"), spec)).await;
        let (code, text) = refused.unwrap_or_else(|| panic!("invalid-{i} was stored"));
        assert_eq!(code, 422, "{text}");
        assert!(
            text.contains(message),
            "invalid-{i}: {text:?} lacks {message:?}"
        );
    }

    // An unknown enum value: an event type no kinsight sends.
    let subscriptions: Api<WebhookSubscription> = Api::namespaced(client.clone(), "default");
    let subscription = json!({ "apiVersion": "kinsight.io/v1alpha1", "kind": "WebhookSubscription",
        "metadata": { "name": "typo" },
        "spec": { "url": "https://hooks.example/in", "eventTypes": ["image.exploded"],
                  "secretRef": { "name": "signing", "key": "secret" } } });
    let (code, text) = create(&subscriptions, subscription)
        .await
        .expect("the subscription is refused");
    assert_eq!(code, 422, "{text}");
    assert!(
        text.contains("spec.eventTypes: Unsupported value: \"image.exploded\""),
        "{text}"
    );

    // What `kinsight dev` waits for before it says it is ready: the API server's OpenAPI
    // document (which `kubectl explain` and kubectl's validation read) describes both
    // kinds, their fields and bounds as the CRDs carry them.
    assert!(
        kinsight::dev::await_crds_published(&client)
            .await
            .expect("the OpenAPI document read"),
        "the CRDs never appeared in the OpenAPI document"
    );
    let request = http::Request::get("/openapi/v2")
        .body(Vec::new())
        .expect("request");
    let document: Value = client.request(request).await.expect("OpenAPI document");
    let definitions = &document["definitions"];
    let group = &definitions["io.kinsight.v1alpha1.ImageGroup"]["properties"];
    for field in ["images", "models", "webhook"] {
        assert!(
            group["spec"]["properties"][field].is_object(),
            "spec.{field} missing from the published ImageGroup: {:#}",
            group["spec"]
        );
    }
    let images = &group["spec"]["properties"]["images"];
    assert_eq!(images["maxItems"], json!(MAX_IMAGES), "{images:#}");
    let subscription = &definitions["io.kinsight.v1alpha1.WebhookSubscription"]["properties"];
    assert!(
        subscription["spec"]["properties"]["eventTypes"].is_object(),
        "{subscription:#}"
    );
}
