//! Least privilege as a tenant and an operator see it, on the real control plane: signing
//! Secrets must be marked for kinsight, nothing runs in a namespace that is not a tenant,
//! and credentials in URLs stay out of Events and the controller's log. (The RBAC itself:
//! tests/helm_chart.rs.)

mod common;

crate::real_node_tests!(
    a_subscription_naming_an_unmarked_secret_is_refused_until_the_secret_is_marked,
    a_group_outside_the_tenants_waits_until_its_namespace_becomes_one,
    tokens_in_webhook_urls_are_redacted_in_events_and_logs,
    subscription_headers_come_from_a_marked_secret,
    a_second_installation_leaves_the_first_ones_tenants_and_groups_alone
);

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Harness, eventually};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kinsight::crd::{ImageGroup, WebhookSubscription};
use kinsight::tenancy::{SIGNING_LABEL, TENANT_LABEL};
use kinsight::webhook::{CircuitConfig, RetrySchedule, generate_secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

/// `type=status/reason: message` of a condition, or "" while it has none.
fn condition(conditions: &[Condition], kind: &str) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| format!("{}/{}: {}", c.status, c.reason, c.message))
        .unwrap_or_default()
}

/// Waits until `condition` (as [`condition`] gives it) starts with `prefix`, and returns it.
async fn settles_on(
    what: &str,
    mut condition: impl AsyncFnMut() -> String,
    prefix: &str,
) -> String {
    eventually(what, LIMIT, async || {
        let now = condition().await;
        now.starts_with(prefix).then_some(now)
    })
    .await
}

/// Sets the label `key: "true"` on an object, as its owner would with kubectl.
async fn label<K>(api: &Api<K>, name: &str, key: &str)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { key: "true" } } })),
    )
    .await
    .expect("label");
}

async fn a_subscription_naming_an_unmarked_secret_is_refused_until_the_secret_is_marked() {
    let h = Harness::start("lp-signing").await;
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &h.namespace);
    // Another team's Secret of the same form: kinsight must not sign with it.
    let other: Secret = serde_json::from_value(json!({
        "metadata": { "name": "other-team" },
        "stringData": { "key": generate_secret() }
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &other)
        .await
        .expect("create secret");
    let subs: Api<WebhookSubscription> = Api::namespaced(h.client.clone(), &h.namespace);
    let sub: WebhookSubscription = serde_json::from_value(json!({
        "apiVersion": "kinsight.io/v1alpha1", "kind": "WebhookSubscription",
        "metadata": { "name": "oracle" },
        "spec": { "url": h.hook_url, "secretRef": { "name": "other-team", "key": "key" } }
    }))
    .expect("subscription");
    subs.create(&PostParams::default(), &sub)
        .await
        .expect("create subscription");
    let ready = async || {
        let sub = subs.get("oracle").await.expect("get");
        condition(&sub.status.unwrap_or_default().conditions, "Ready")
    };
    let refused = settles_on(
        "the subscription is refused",
        ready,
        "False/SecretNotMarked",
    )
    .await;
    assert!(
        refused.contains("label it kinsight.io/webhook-signing=true"),
        "{refused}"
    );

    // Marked by its owner, it signs.
    label(&secrets, "other-team", SIGNING_LABEL).await;
    // A new spec generation is checked again at once (the Secret is not watched).
    subs.patch(
        "oracle",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "timeoutSeconds": 5 } })),
    )
    .await
    .expect("touch");
    settles_on("the subscription is ready", ready, "True/").await;
}

async fn a_group_outside_the_tenants_waits_until_its_namespace_becomes_one() {
    let outsider = "lp-outsider";
    // Scoped to the outsider namespace: a controller watching every namespace would also
    // answer the other tests' groups (each a tenant of its own installation only).
    let h = Harness::start_configured("lp-tenant", |c| {
        c.watch_namespace = Some(outsider.to_owned());
    })
    .await;
    let ns: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": outsider } })).expect("namespace");
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), outsider);
    let group: ImageGroup = serde_json::from_value(json!({
        "apiVersion": "kinsight.io/v1alpha1", "kind": "ImageGroup",
        "metadata": { "name": "g" },
        "spec": { "images": [{ "url": "http://127.0.0.1:9/a.jpg" }], "models": ["image_classification"] }
    }))
    .expect("group");
    groups
        .create(&PostParams::default(), &group)
        .await
        .expect("group");
    let accepted = async || {
        let group = groups.get("g").await.expect("get");
        condition(&group.status.unwrap_or_default().conditions, "Accepted")
    };
    let refused = settles_on("the group is refused", accepted, "False/NotATenant").await;
    assert!(
        refused.contains("label it kinsight.io/tenant=true"),
        "{refused}"
    );
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), outsider);
    assert!(
        jobs.list(&Default::default())
            .await
            .expect("jobs")
            .items
            .is_empty(),
        "nothing runs outside tenants"
    );

    label(&namespaces, outsider, TENANT_LABEL).await;
    eventually("the group is accepted and runs", LIMIT, async || {
        accepted().await.starts_with("True/")
            && !jobs
                .list(&Default::default())
                .await
                .expect("jobs")
                .items
                .is_empty()
    })
    .await;
}

/// Everything this process logs from now on (the harness runs the controller in it), at
/// debug for kinsight, as an operator raising `RUST_LOG` would see it.
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let writer = buffer.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info,kinsight=debug,kube=warn,tower=warn")
        .with_ansi(false)
        .with_writer(move || Capture(writer.clone()))
        .try_init()
        .expect("the only log subscriber of this test binary");
    buffer
}

async fn tokens_in_webhook_urls_are_redacted_in_events_and_logs() {
    let logs = capture_logs();
    let h = Harness::start_configured("lp-redact", |c| {
        c.circuit = CircuitConfig {
            failure_threshold: 1,
            cool_down: Duration::from_secs(60),
            max_cool_down: Duration::from_secs(60),
            ..CircuitConfig::default()
        };
        c.retry = RetrySchedule(vec![Duration::from_secs(1); 5]);
    })
    .await;
    // Nothing listens on port 9: the first attempt fails and the circuit opens.
    let url = "http://alice:pa55@127.0.0.1:9/hook?token=SECRET123&v=1".to_owned();
    h.subscribe(
        "signing",
        &generate_secret(),
        &[("tokened", url, json!({}))],
        LIMIT,
    )
    .await;
    h.create_unreachable_group("g", 1, json!({})).await;
    let note = async || {
        h.events_about("tokened")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("WebhookCircuitOpened"))
            .and_then(|e| e.note)
    };
    eventually("the circuit-opened Event", LIMIT, async || {
        note().await.is_some()
    })
    .await;
    let note = note().await.unwrap_or_default();
    assert!(
        note.contains("http://redacted@127.0.0.1:9/hook?token=redacted&v=redacted"),
        "{note}"
    );
    assert!(
        !note.contains("SECRET123") && !note.contains("pa55"),
        "{note}"
    );
    // The controller's log line for the same change names the endpoint redacted too, and
    // nothing it logged (attempts, retries, reconciles) carries the credentials.
    let text = || String::from_utf8_lossy(&logs.lock().expect("log buffer")).into_owned();
    eventually("the health change in the log", LIMIT, async || {
        text()
            .lines()
            .any(|l| l.contains("webhook endpoint health changed") && l.contains("token=redacted"))
    })
    .await;
    let text = text();
    assert!(
        text.contains("webhook attempt failed"),
        "the failed attempts are logged"
    );
    for secret in ["SECRET123", "pa55"] {
        let leaks: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} in the log: {leaks:#?}");
    }
}

async fn subscription_headers_come_from_a_marked_secret() {
    let mut h = Harness::start("lp-headers").await;
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &h.namespace);
    for (name, data, marked) in [
        ("hook-signing", json!({ "key": h.webhook_secret }), true),
        (
            "hook-auth",
            json!({ "X-Api-Token": "t0k-from-secret" }),
            false,
        ),
    ] {
        let labels = if marked {
            json!({ SIGNING_LABEL: "true" })
        } else {
            json!({})
        };
        let secret: Secret = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels }, "stringData": data
        }))
        .expect("secret");
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .expect("create secret");
    }
    let subs: Api<WebhookSubscription> = Api::namespaced(h.client.clone(), &h.namespace);
    let sub: WebhookSubscription = serde_json::from_value(json!({
        "apiVersion": "kinsight.io/v1alpha1", "kind": "WebhookSubscription",
        "metadata": { "name": "with-token" },
        "spec": {
            "url": h.hook_url,
            "secretRef": { "name": "hook-signing", "key": "key" },
            "headersFrom": { "name": "hook-auth" }
        }
    }))
    .expect("subscription");
    subs.create(&PostParams::default(), &sub)
        .await
        .expect("create subscription");
    let ready = async || {
        let sub = subs.get("with-token").await.expect("get");
        condition(&sub.status.unwrap_or_default().conditions, "Ready")
    };
    // The headers Secret needs the same mark as a signing one.
    eventually(
        "the unmarked headers Secret is refused",
        LIMIT,
        async || {
            ready()
                .await
                .starts_with("False/SecretNotMarked: headersFrom: Secret hook-auth")
        },
    )
    .await;
    label(&secrets, "hook-auth", SIGNING_LABEL).await;
    subs.patch(
        "with-token",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "timeoutSeconds": 5 } })),
    )
    .await
    .expect("touch");
    settles_on("the subscription is ready", ready, "True/").await;

    // The group's own webhook and the subscription both go to the receiver; only the
    // subscription's carries the Secret's header.
    h.create_unreachable_group("g", 1, json!({})).await;
    let received = h
        .collect_webhooks(LIMIT, |got| {
            got.iter().any(|w| {
                w.headers
                    .iter()
                    .any(|(n, v)| n == "x-api-token" && v == "t0k-from-secret")
            })
        })
        .await;
    assert!(!received.is_empty());
}

/// Two installations of kinsight in one cluster (say staging and production, each with its
/// own keys namespace and ServiceAccount): the second one starting leaves the first one's
/// tenants alone (their RoleBinding, worker ServiceAccount and catalog are not removed, not
/// even to be made again), and, scoped to its own namespace, it writes nothing on the first
/// one's groups.
async fn a_second_installation_leaves_the_first_ones_tenants_and_groups_alone() {
    use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use kube::ResourceExt;

    let h = Harness::start("lp-first").await;
    // A tenant of the first installation by its key record only (the tenant label would
    // make it every installation's).
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    namespaces
        .patch(
            &h.namespace,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { TENANT_LABEL: null } } })),
        )
        .await
        .expect("unlabel");
    let first = h.controller_config().tenancy;
    let bindings: Api<RoleBinding> = Api::namespaced(h.client.clone(), &h.namespace);
    let accounts: Api<ServiceAccount> = Api::namespaced(h.client.clone(), &h.namespace);
    let catalogs: Api<ConfigMap> = Api::namespaced(h.client.clone(), &h.namespace);
    let uids = async || {
        let binding = bindings.get_opt(kinsight::tenancy::TENANT_BINDING).await;
        let account = accounts.get_opt(&first.worker_account).await;
        let catalog = catalogs.get_opt(&first.catalog_config_map).await;
        match (binding, account, catalog) {
            (Ok(Some(b)), Ok(Some(a)), Ok(Some(c))) => Some([b.uid(), a.uid(), c.uid()]),
            _ => None,
        }
    };
    // A group of the first installation's tenant: its worker Job makes the tenant's worker
    // ServiceAccount and catalog.
    let hook = h.hook_url.clone();
    let g1 = h
        .post_photo_group(1, &["image_classification"], &hook)
        .await;
    let before = eventually(
        "the first installation sets its tenant up",
        LIMIT,
        async || uids().await,
    )
    .await;

    // The second installation: its own keys namespace, ServiceAccount and tenant.
    let second_tenant = "lp-second";
    kinsight::dev::create_tenant_labelled(
        &h.client,
        "lp-second-keys",
        second_tenant,
        "second-key",
        &generate_secret(),
        false,
    )
    .await
    .expect("the second installation's tenant");
    let mut second = h.controller_config();
    second.tenancy.keys_namespace = "lp-second-keys".into();
    second.tenancy.service_account = ("lp-second-system".into(), "kinsight-controller".into());
    second.watch_namespace = Some(second_tenant.into());
    let (client, store) = (h.client.clone(), h.store.clone());
    let controller = tokio::spawn(async move {
        let never = kinsight::shutdown::Shutdown::never();
        if let Err(e) = kinsight::controller::run(client, store, second, never).await {
            eprintln!("second controller stopped: {e}");
        }
    });
    let theirs: Api<RoleBinding> = Api::namespaced(h.client.clone(), second_tenant);
    eventually(
        "the second installation binds its own tenant",
        LIMIT,
        async || {
            theirs
                .get_opt(kinsight::tenancy::TENANT_BINDING)
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await;

    // Another group, with both controllers running.
    let groups = h.create_unreachable_group("g2", 1, json!({})).await;
    let accepted = async |name: &str| {
        let group = groups.get(name).await.expect("get");
        condition(&group.status.unwrap_or_default().conditions, "Accepted")
    };
    settles_on(
        "the first installation accepts its group",
        async || accepted("g2").await,
        "True/",
    )
    .await;
    // ... and nothing else writes on either group.
    for _ in 0..30 {
        for name in [g1.as_str(), "g2"] {
            let now = accepted(name).await;
            assert!(now.starts_with("True/"), "{name}: {now}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its tenant set-up is the same objects as before the second one started.
    assert_eq!(uids().await, Some(before));
    controller.abort();
}
