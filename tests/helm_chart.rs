//! The Helm chart, linted and installed with Helm's own library (PyPI helm-sdkpy) into a
//! real API server: it must create the CRDs the code serves, the controller and API
//! Deployments, the catalog ConfigMap they mount and the RBAC they need.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Volume, VolumeMount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kinsight::controller::GpuSettings;
use kinsight::tenancy::TenantBindings;
use kinsight::testbed::TestCluster;
use kube::Api;

fn chart(args: &[&str]) -> serde_json::Value {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let output = Command::new(python)
        .arg("tests/helm/chart.py")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run helm (scripts/setup-onnxruntime.sh installs it)");
    assert!(
        output.status.success(),
        "helm failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from chart.py")
}

/// `chart.py ACTION` (install, upgrade) of the release into `kinsight-system` with `values`,
/// which must leave it deployed; returns Helm's answer.
async fn deployed(action: &'static str, kubeconfig: &str, values: String) -> serde_json::Value {
    let kubeconfig = kubeconfig.to_owned();
    let result = tokio::task::spawn_blocking(move || {
        chart(&[action, &kubeconfig, "kinsight-system", &values])
    })
    .await
    .expect("join");
    assert_eq!(result["info"]["status"], "deployed", "{}", result["info"]);
    result
}

/// The pod spec of the release's controller Deployment.
async fn controller_pod(client: &kube::Client) -> PodSpec {
    Api::<Deployment>::namespaced(client.clone(), "kinsight-system")
        .get("kinsight-controller")
        .await
        .expect("controller deployment")
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
}

/// The namespaces the tenancy checks use: two would-be tenants and a bystander.
async fn create_namespaces(admin: &kube::Client) {
    use k8s_openapi::api::core::v1::Namespace;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    for name in ["tenant-a", "tenant-b", "bystander"] {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))
                .expect("namespace");
        namespaces
            .create(&Default::default(), &ns)
            .await
            .expect("create namespace");
    }
}

#[test]
fn chart_lints_clean() {
    let result = chart(&["lint"]);
    assert_eq!(result["TotalChartsLinted"], 1, "{result}");
    assert_eq!(result["Errors"], serde_json::Value::Null, "{result}");
    assert!(result["Messages"].is_array(), "{result}");
    // Severity 1 is INFO (e.g. "icon is recommended"); warnings (2) and errors (3+) are not accepted.
    let worst = result["Messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["Severity"].as_u64())
        .max();
    assert!(worst.unwrap_or(0) <= 1, "{result}");
}

#[test]
fn chart_crds_equal_the_generated_crds() {
    let chart_copy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/kinsight/crds/kinsight.yaml"
    ))
    .expect("chart CRDs");
    let generated = kinsight::crd::all_crds_yaml().expect("yaml");
    assert_eq!(
        chart_copy, generated,
        "charts/kinsight/crds/kinsight.yaml is stale: copy crds/kinsight.yaml"
    );
}

#[test]
fn chart_catalog_equals_the_bundled_catalog() {
    let read = |path: &str| {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
            .expect(path)
    };
    assert_eq!(
        read("charts/kinsight/files/catalog.yaml"),
        read("models/catalog.yaml"),
        "charts/kinsight/files/catalog.yaml is stale: copy models/catalog.yaml"
    );
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The pod's volume `name`.
fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Where the pod's first container mounts the volume `name`.
fn mount<'a>(pod: &'a PodSpec, name: &str) -> &'a VolumeMount {
    pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no mount of {name}"))
}

/// The container reads the catalog from the chart's ConfigMap, mounted where
/// `KINSIGHT_CATALOG` points, with the models in the image's models folder.
fn assert_reads_the_catalog_config_map(pod: &PodSpec, container: &Container) {
    let catalog = env_value(container, "KINSIGHT_CATALOG").expect("KINSIGHT_CATALOG");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| catalog.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("{} mounts nothing at {catalog}", container.name));
    let source = volume(pod, &mount.name)
        .config_map
        .as_ref()
        .expect("a configMap volume");
    assert_eq!(source.name, "kinsight-catalog");
    assert_eq!(&catalog[mount.mount_path.len() + 1..], "catalog.yaml");
    assert_eq!(
        env_value(container, "KINSIGHT_MODELS_DIR"),
        Some("/opt/kinsight/models")
    );
}

#[tokio::test]
async fn chart_installs_into_a_real_cluster() {
    let cluster = TestCluster::start().await.expect("cluster");
    let Some(control_plane) = cluster.control_plane() else {
        // An existing cluster: installing a release there is the user's call, not a test's.
        return;
    };
    let kubeconfig = control_plane
        .kubeconfig_path()
        .to_string_lossy()
        .into_owned();
    let values = serde_json::json!({
        "image": { "tag": "test" },
        "database": { "secretName": "pg-app", "caSecretName": "pg-ca" },
        "worker": { "env": { "RUST_LOG": "info,kinsight=debug # not: a comment" }, "deadline": "90m",
                    "resources": { "cpu": "500m", "cpuRequest": "250m" },
            "scheduling": { "maxJobs": 40, "maxJobsPerNamespace": 5 }, "gpu": {
            "nodeSelector": { "nvidia.com/gpu.present": "true" },
            "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }],
            "runtimeClassName": "nvidia"
        }},
        "api": { "rateLimit": 25 },
        "controller": { "watchNamespace": "tenant-scoped" },
        "tracing": { "otlpEndpoint": "http://otel-collector.observability:4318" },
        "modelsVolume": { "persistentVolumeClaim": { "claimName": "shared-models", "readOnly": true } }
    })
    .to_string();
    let result = deployed("install", &kubeconfig, values).await;
    assert_eq!(result["name"], "kinsight");

    let client = cluster.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "imagegroups.kinsight.io",
        "webhooksubscriptions.kinsight.io",
    ] {
        assert!(
            crds.get_opt(name).await.expect("get").is_some(),
            "{name} installed"
        );
    }
    let controller_pod = controller_pod(&client).await;
    let container = &controller_pod.containers[0];
    assert_eq!(
        container.command.as_deref(),
        Some(&["kinsight".to_owned(), "controller".to_owned()][..])
    );
    assert_eq!(container.image.as_deref(), Some("kinsight:test"));
    assert!(
        container
            .args
            .as_ref()
            .is_some_and(|a| a.contains(&"--worker-image=kinsight:test".to_owned()))
    );
    // Worker environment values reach the controller verbatim, YAML-special characters too.
    assert!(
        container.args.as_ref().is_some_and(|a| a
            .contains(&"--worker-env=RUST_LOG=info,kinsight=debug # not: a comment".to_owned())),
        "{:?}",
        container.args
    );

    assert_eq!(
        env_value(container, "KINSIGHT_WORKER_DEADLINE"),
        Some("90m")
    );
    // Workers wait for their tenant's next group by default.
    assert_eq!(env_value(container, "KINSIGHT_WORKER_LINGER"), Some("5s"));
    // No standby workers unless asked: each holds a pod per tenant.
    assert_eq!(env_value(container, "KINSIGHT_STANDBY_WORKERS"), Some("0"));
    // The leader's Lease as kube-controller-manager's: replaced within 15 s of dying.
    assert_eq!(env_value(container, "KINSIGHT_LEASE_DURATION"), Some("15s"));
    assert_eq!(
        env_value(container, "KINSIGHT_LEASE_RENEW_BEFORE"),
        Some("5s")
    );
    // Worker pods' resources: the CPU limit and request given, the chart's memory.
    assert_eq!(env_value(container, "KINSIGHT_WORKER_CPU"), Some("500m"));
    assert_eq!(
        env_value(container, "KINSIGHT_WORKER_CPU_REQUEST"),
        Some("250m")
    );
    assert_eq!(env_value(container, "KINSIGHT_WORKER_MEMORY"), Some("1Gi"));
    // A controller scoped to one namespace.
    assert_eq!(
        env_value(container, "KINSIGHT_WATCH_NAMESPACE"),
        Some("tenant-scoped")
    );
    // The listing summary's near-duplicate distance: the chart's default.
    assert_eq!(
        env_value(container, "KINSIGHT_DUPLICATE_DISTANCE"),
        Some("12")
    );
    // Fair scheduling: the values given, the chart's defaults for the rest.
    let scheduling = [
        "KINSIGHT_MAX_WORKER_JOBS",
        "KINSIGHT_MAX_WORKER_JOBS_PER_NAMESPACE",
        "KINSIGHT_SMALL_WORK_IMAGES",
        "KINSIGHT_SMALL_WORK_LANE_JOBS",
    ]
    .map(|name| env_value(container, name));
    assert_eq!(scheduling, [Some("40"), Some("5"), Some("10"), Some("2")]);
    // The kubelet probes the port the controller serves /metrics, /healthz and /readyz on.
    assert_eq!(
        env_value(container, "KINSIGHT_METRICS_LISTEN"),
        Some("0.0.0.0:9090")
    );
    let ports = container.ports.as_deref().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9090),
        "{ports:?}"
    );
    for (probe, path) in [
        (&container.readiness_probe, "/readyz"),
        (&container.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
    }
    // Workers reach the API's result ingest through its Service.
    assert_eq!(
        env_value(container, "KINSIGHT_RESULTS_URL"),
        Some("http://kinsight-api.kinsight-system.svc/internal/v1/results")
    );

    // The catalog: the bundled one by default, in a ConfigMap both Deployments mount.
    let catalog = Api::<ConfigMap>::namespaced(client.clone(), "kinsight-system")
        .get("kinsight-catalog")
        .await
        .expect("catalog ConfigMap");
    let text = catalog
        .data
        .as_ref()
        .and_then(|d| d.get("catalog.yaml"))
        .expect("catalog.yaml");
    let bundled =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/models/catalog.yaml"))
            .expect("bundled catalog");
    assert_eq!(text, &bundled);
    assert_reads_the_catalog_config_map(&controller_pod, container);
    let api = Api::<Deployment>::namespaced(client.clone(), "kinsight-system")
        .get("kinsight-api")
        .await
        .expect("api deployment");
    let api_pod = api.spec.expect("spec").template.spec.expect("pod");
    assert_reads_the_catalog_config_map(&api_pod, &api_pod.containers[0]);
    // A stopping API's delay and drain, in a form its parser takes, fit in the pod's grace
    // period (past it the kubelet kills it mid-request).
    let stop_setting = |name: &str| {
        let value = env_value(&api_pod.containers[0], name).expect(name);
        kinsight::webhook::parse_duration(value).expect("the API accepts the chart's value")
    };
    let stopping = stop_setting("KINSIGHT_SHUTDOWN_DELAY") + stop_setting("KINSIGHT_DRAIN_TIMEOUT");
    let grace = api_pod
        .termination_grace_period_seconds
        .expect("a grace period");
    assert!(
        stopping.as_secs() > 0 && stopping.as_secs() < grace as u64,
        "delay + drain {stopping:?} within {grace} s"
    );
    // The front door's limits: the value given, the chart's default for the other, each in a
    // form the API's flag takes.
    let limits = ["KINSIGHT_RATE_LIMIT", "KINSIGHT_MAX_IN_FLIGHT_IMAGES"]
        .map(|name| env_value(&api_pod.containers[0], name));
    assert_eq!(limits, [Some("25"), Some("10000")]);
    assert!(
        limits
            .iter()
            .flatten()
            .all(|v| v.parse::<std::num::NonZeroU32>().is_ok())
    );
    // Span export: the controller, the API and (through the controller) worker Jobs.
    const COLLECTOR: &str = "http://otel-collector.observability:4318";
    for container in [container, &api_pod.containers[0]] {
        assert_eq!(
            env_value(container, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some(COLLECTOR)
        );
    }
    assert!(
        container.args.as_ref().is_some_and(|a| a.contains(&format!(
            "--worker-env=OTEL_EXPORTER_OTLP_ENDPOINT={COLLECTOR}"
        ))),
        "{:?}",
        container.args
    );
    // Both read the database URL from the Secret the values name (CloudNativePG's key).
    for container in [container, &api_pod.containers[0]] {
        let from = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "KINSIGHT_DATABASE_URL")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("KINSIGHT_DATABASE_URL from a Secret");
        assert_eq!((from.name.as_str(), from.key.as_str()), ("pg-app", "uri"));
        // With the database's CA given, the store verifies the server with it (libpq's
        // variables, which `src/store/connection.rs` reads).
        assert_eq!(env_value(container, "PGSSLMODE"), Some("verify-full"));
        assert_eq!(
            env_value(container, "PGSSLROOTCERT"),
            Some("/etc/kinsight/database-ca/ca.crt")
        );
    }
    for pod in [&controller_pod, &api_pod] {
        let secret = volume(pod, "database-ca")
            .secret
            .as_ref()
            .expect("from a Secret");
        assert_eq!(secret.secret_name.as_deref(), Some("pg-ca"));
        let item = &secret.items.as_ref().expect("one key")[0];
        assert_eq!(
            (item.key.as_str(), item.path.as_str()),
            ("ca.crt", "ca.crt")
        );
        let ca = mount(pod, "database-ca");
        assert_eq!(ca.mount_path, "/etc/kinsight/database-ca");
        assert_eq!(ca.read_only, Some(true));
    }

    // The GPU values reach the controller in a form its own parser takes.
    let gpu = GpuSettings::parse(env_value(container, "KINSIGHT_WORKER_GPU").expect("GPU env"))
        .expect("the controller accepts the chart's GPU settings");
    assert_eq!(gpu.resource_name, "nvidia.com/gpu");
    assert_eq!(gpu.count, 1);
    assert_eq!(gpu.node_selector["nvidia.com/gpu.present"], "true");
    assert_eq!(gpu.tolerations.len(), 1);
    assert_eq!(gpu.tolerations[0].operator.as_deref(), Some("Exists"));
    assert_eq!(gpu.runtime_class_name.as_deref(), Some("nvidia"));
    // The models volume: mounted where the catalog's files are, and handed to worker Jobs.
    for pod in [&controller_pod, &api_pod] {
        let claim = volume(pod, "models")
            .persistent_volume_claim
            .as_ref()
            .expect("a PVC");
        assert_eq!(claim.claim_name, "shared-models");
        assert_eq!(mount(pod, "models").mount_path, "/opt/kinsight/models");
    }
    let workers_volume = kinsight::controller::WorkerCatalog::parse_models_volume(
        env_value(container, "KINSIGHT_WORKER_MODELS_VOLUME").expect("models volume env"),
    )
    .expect("the controller accepts the chart's models volume");
    assert_eq!(
        workers_volume.persistent_volume_claim.map(|c| c.claim_name),
        Some("shared-models".to_owned())
    );
    // Helm's defaults, too: an empty runtime class is none.
    let defaults: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/charts/kinsight/values.yaml"
        ))
        .expect("values"),
    )
    .expect("values YAML");
    let default_gpu = serde_json::to_string(&defaults["worker"]["gpu"]).expect("JSON");
    assert_eq!(GpuSettings::parse(&default_gpu), Ok(GpuSettings::default()));

    // What each component does with the API, asked of the API server's own RBAC
    // authorizer for the chart's ServiceAccounts.
    // (account, namespace, API group, resource, subresource, verb, allowed?)
    #[rustfmt::skip]
    let checks = [
        // kinsight's own resources, everywhere (nothing runs outside tenants: the code).
        (CONTROLLER, "tenant-a", "kinsight.io", "imagegroups", "", "watch", true),
        (CONTROLLER, "tenant-a", "kinsight.io", "imagegroups", "", "delete", true),
        (CONTROLLER, "tenant-a", "kinsight.io", "imagegroups", "status", "patch", true),
        (CONTROLLER, "tenant-a", "kinsight.io", "webhooksubscriptions", "", "watch", true),
        (CONTROLLER, "tenant-a", "kinsight.io", "webhooksubscriptions", "status", "patch", true),
        // Worker Jobs are counted cluster-wide for the caps, written only in tenants.
        (CONTROLLER, "", "batch", "jobs", "", "watch", true),
        // tenant-a is no tenant yet: nothing may be written or read there.
        (CONTROLLER, "tenant-a", "batch", "jobs", "", "create", false),
        (CONTROLLER, "tenant-a", "", "secrets", "", "get", false),
        (CONTROLLER, "tenant-a", "", "configmaps", "", "patch", false),
        (CONTROLLER, "tenant-a", "", "serviceaccounts", "", "patch", false),
        (CONTROLLER, "tenant-a", "", "pods", "", "list", false),
        (CONTROLLER, "tenant-a", "events.k8s.io", "events", "", "create", false),
        (CONTROLLER, "kube-system", "batch", "jobs", "", "create", false),
        (CONTROLLER, "kube-system", "", "secrets", "", "get", false),
        (CONTROLLER, "kube-system", "", "configmaps", "", "patch", false),
        // The only roles it can hand out are its own tenant rights.
        (CONTROLLER, "tenant-a", "rbac.authorization.k8s.io", "roles", "", "patch", false),
        (CONTROLLER, "", "rbac.authorization.k8s.io", "clusterroles", "", "bind", false),
        (CONTROLLER, "", "rbac.authorization.k8s.io", "clusterroles", "", "escalate", false),
        // Tenants: labelled namespaces; a tenant's retention is an annotation on it.
        (CONTROLLER, "", "", "namespaces", "", "watch", true),
        (CONTROLLER, "", "", "namespaces", "", "patch", false),
        // ... and the namespaces API-key records name.
        (CONTROLLER, KEYS, "", "secrets", "", "watch", true),
        (CONTROLLER, "kinsight-system", "", "secrets", "", "get", false),
        // Its Lease, for leader election.
        (CONTROLLER, "kinsight-system", "coordination.k8s.io", "leases", "", "update", true),
        (API, "tenant-a", "kinsight.io", "imagegroups", "", "create", true),
        (API, "tenant-a", "kinsight.io", "imagegroups", "", "patch", true),
        (API, "tenant-a", "kinsight.io", "imagegroups", "", "list", true),
        // Workers' tokens, when they send results.
        (API, "", "authentication.k8s.io", "tokenreviews", "", "create", true),
        // The API-key Secrets, and no other: not the database's in the release namespace,
        // not a tenant's, not one by name in the keys namespace (only its labelled watch).
        (API, KEYS, "", "secrets", "", "watch", true),
        (API, KEYS, "", "secrets", "", "get", false),
        (API, "kinsight-system", "", "secrets", "", "get", false),
        (API, "kinsight-system", "", "secrets", "", "list", false),
        (API, "tenant-a", "", "secrets", "", "get", false),
        // A worker's identity can do nothing in the API server: its results go through the
        // API's ingest, which takes them only for its own namespace's groups
        // (tests/result_ingest.rs).
        (WORKER, "tenant-a", "kinsight.io", "imagegroups", "status", "patch", false),
        (WORKER, "tenant-a", "", "configmaps", "", "create", false),
        (WORKER, "tenant-a", "", "secrets", "", "get", false),
    ];
    assert_access(&client, &checks).await;
    tenants_come_and_go(&cluster, &client, container).await;
}

const CONTROLLER: &str = "system:serviceaccount:kinsight-system:kinsight-controller";
const API: &str = "system:serviceaccount:kinsight-system:kinsight-api";
const WORKER: &str = "system:serviceaccount:tenant-a:kinsight-worker";
/// The chart's default namespace of API-key records.
const KEYS: &str = "kinsight-system-keys";

type Check<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str, &'a str, bool);

async fn assert_access(client: &kube::Client, checks: &[Check<'_>]) {
    for &(user, namespace, group, resource, subresource, verb, expected) in checks {
        assert_eq!(
            allowed(client, user, namespace, group, resource, subresource, verb).await,
            expected,
            "{user} may {verb} {group}/{resource}/{subresource} in {namespace:?}: {expected}"
        );
    }
}

/// The controller's tenant watch, run with the chart's RBAC (as the controller's
/// ServiceAccount): a namespace becomes a tenant by its label or an API-key record, gets
/// the controller's rights and the workers' NetworkPolicy, and loses them all, with the
/// worker's identity and catalog, when it stops being one.
async fn tenants_come_and_go(cluster: &TestCluster, admin: &kube::Client, container: &Container) {
    use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use kinsight::controller::{CATALOG_CONFIG_MAP, WORKER_ACCOUNT};
    use kinsight::tenancy::{TENANT_BINDING, TENANT_LABEL, WORKER_NETWORK_POLICY};
    use kube::api::{Patch, PatchParams, PostParams};

    let controller = as_user(cluster, CONTROLLER).await;
    create_namespaces(admin).await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    // The controller's own code cannot write before a namespace is a tenant either.
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": WORKER_ACCOUNT } }))
            .expect("service account");
    let refused = Api::<ServiceAccount>::namespaced(controller.clone(), "tenant-a")
        .create(&PostParams::default(), &sa)
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
        "{refused:?}"
    );
    // Nor can it give itself more: binding cluster-admin anywhere is refused.
    let escalation: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": TENANT_BINDING },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin" },
        "subjects": [{ "kind": "ServiceAccount", "name": "kinsight-controller", "namespace": "kinsight-system" }]
    }))
    .expect("role binding");
    let refused = Api::<RoleBinding>::namespaced(controller.clone(), "bystander")
        .create(&PostParams::default(), &escalation)
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
        "{refused:?}"
    );

    let config = chart_tenancy(container);
    assert_eq!(config.keys_namespace, KEYS);
    assert_eq!(config.bindings, TenantBindings::Controller);
    let (tenants, watch) = watch_tenants(controller.clone(), config).await;

    // tenant-a by its label, tenant-b by an API-key record; a key record naming kube-system
    // does not make it a tenant.
    namespaces
        .patch(
            "tenant-a",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({ "metadata": { "labels": { TENANT_LABEL: "true" } } }),
            ),
        )
        .await
        .expect("label tenant-a");
    // In this order: once tenant-b is in, the watch has seen kube-system's record.
    for tenant in ["kube-system", "tenant-b"] {
        let key: Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": tenant, "labels": { "kinsight.io/api-key": "true" } },
            "stringData": { "key-sha256": kinsight::api::hash_key(tenant), "tenant-namespace": tenant }
        }))
        .expect("key record");
        Api::<Secret>::namespaced(admin.clone(), KEYS)
            .create(&PostParams::default(), &key)
            .await
            .expect("create key record");
    }
    for tenant in ["tenant-a", "tenant-b"] {
        wait_until(&format!("{tenant} is a tenant"), async || {
            tenants.contains(tenant)
                && allowed(admin, CONTROLLER, tenant, "batch", "jobs", "", "create").await
                && exists::<NetworkPolicy>(admin, tenant, WORKER_NETWORK_POLICY).await
        })
        .await;
        let policy = Api::<NetworkPolicy>::namespaced(admin.clone(), tenant)
            .get(WORKER_NETWORK_POLICY)
            .await
            .expect("the workers' NetworkPolicy");
        let spec = policy.spec.expect("spec");
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_owned(), "Egress".to_owned()][..])
        );
        assert!(spec.ingress.is_none(), "no ingress to workers");
    }
    assert!(!tenants.contains("kube-system"));
    assert!(!exists::<RoleBinding>(admin, "kube-system", TENANT_BINDING).await);
    #[rustfmt::skip]
    assert_access(admin, &[
        (CONTROLLER, "tenant-a", "batch", "jobs", "", "delete", true),
        // A carried order whose carrier ended goes back to its own Job.
        (CONTROLLER, "tenant-a", "batch", "jobs", "", "patch", true),
        (CONTROLLER, "tenant-a", "", "secrets", "", "get", true),
        (CONTROLLER, "tenant-a", "", "configmaps", "", "patch", true),
        (CONTROLLER, "tenant-a", "events.k8s.io", "events", "", "create", true),
        // A failed worker's pods, to say how it ended; read only.
        (CONTROLLER, "tenant-a", "", "pods", "", "list", true),
        (CONTROLLER, "tenant-a", "", "pods", "", "delete", false),
        // Still nothing elsewhere, and still no Secret written.
        (CONTROLLER, "bystander", "batch", "jobs", "", "create", false),
        (CONTROLLER, "bystander", "", "pods", "", "list", false),
        (CONTROLLER, "kube-system", "", "secrets", "", "get", false),
        (CONTROLLER, "tenant-a", "", "secrets", "", "create", false),
    ]).await;
    // What a reconcile then makes there, with the controller's own rights.
    let params = PatchParams::apply("kinsight-controller").force();
    Api::<ServiceAccount>::namespaced(controller.clone(), "tenant-a")
        .patch(WORKER_ACCOUNT, &params, &Patch::Apply(&sa))
        .await
        .expect("the worker's ServiceAccount");
    let catalog: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(
        serde_json::json!({ "metadata": { "name": CATALOG_CONFIG_MAP }, "data": { "catalog.yaml": "models: []" } }),
    )
    .expect("catalog");
    Api::<ConfigMap>::namespaced(controller.clone(), "tenant-a")
        .patch(CATALOG_CONFIG_MAP, &params, &Patch::Apply(&catalog))
        .await
        .expect("the catalog ConfigMap");

    // tenant-a stops being a tenant: everything the controller had there goes.
    namespaces
        .patch(
            "tenant-a",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "metadata": { "labels": { TENANT_LABEL: null } } })),
        )
        .await
        .expect("unlabel tenant-a");
    wait_until("tenant-a's objects removed", async || {
        !tenants.contains("tenant-a")
            && !exists::<RoleBinding>(admin, "tenant-a", TENANT_BINDING).await
            && !exists::<ServiceAccount>(admin, "tenant-a", WORKER_ACCOUNT).await
            && !exists::<ConfigMap>(admin, "tenant-a", CATALOG_CONFIG_MAP).await
            && !exists::<NetworkPolicy>(admin, "tenant-a", WORKER_NETWORK_POLICY).await
    })
    .await;
    assert!(!allowed(admin, CONTROLLER, "tenant-a", "batch", "jobs", "", "create").await);
    assert!(tenants.contains("tenant-b"), "the other tenant stays");
    watch.abort();
}

/// The tenancy settings the chart gives the controller (its Deployment's `container`).
fn chart_tenancy(container: &Container) -> kinsight::tenancy::TenancyConfig {
    use kinsight::controller::{CATALOG_CONFIG_MAP, WORKER_ACCOUNT};
    let network_policy = kinsight::tenancy::parse_network_policy(
        env_value(container, "KINSIGHT_WORKER_NETWORK_POLICY").expect("network policy env"),
    )
    .expect("the controller accepts the chart's NetworkPolicy");
    let bindings = match env_value(container, "KINSIGHT_TENANT_BINDINGS") {
        Some("controller") => TenantBindings::Controller,
        Some("preinstalled") => TenantBindings::Preinstalled,
        other => panic!("KINSIGHT_TENANT_BINDINGS: {other:?}"),
    };
    kinsight::tenancy::TenancyConfig {
        keys_namespace: env_value(container, "KINSIGHT_KEYS_NAMESPACE")
            .expect("keys namespace env")
            .to_owned(),
        tenant_role: env_value(container, "KINSIGHT_TENANT_ROLE")
            .expect("tenant role env")
            .to_owned(),
        service_account: (
            "kinsight-system".to_owned(),
            env_value(container, "KINSIGHT_SERVICE_ACCOUNT")
                .expect("service account env")
                .to_owned(),
        ),
        worker_account: WORKER_ACCOUNT.to_owned(),
        catalog_config_map: CATALOG_CONFIG_MAP.to_owned(),
        network_policy: Some(network_policy),
        bindings,
    }
}

/// The controller's tenant watch running as `controller`, once it has listed everything.
async fn watch_tenants(
    controller: kube::Client,
    config: kinsight::tenancy::TenancyConfig,
) -> (kinsight::tenancy::Tenants, tokio::task::JoinHandle<()>) {
    let tenants = kinsight::tenancy::Tenants::default();
    let (listed, mut ready) = tokio::sync::watch::channel(false);
    let watch = tokio::spawn(kinsight::tenancy::run(
        controller,
        config,
        tenants.clone(),
        listed,
        || {},
    ));
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .expect("tenants listed in time")
        .expect("tenant watch running");
    (tenants, watch)
}

/// With `controller.tenantBindings=chart` the chart binds the controller's tenant role in
/// the namespaces it lists and the controller may create no RoleBinding anywhere: a
/// labelled namespace outside the list waits until an upgrade lists it, and a namespace that
/// stops being a tenant keeps the chart's binding.
#[tokio::test]
async fn chart_made_bindings_leave_the_controller_no_rolebinding_rights() {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use kinsight::tenancy::{TENANT_BINDING, TENANT_LABEL, WORKER_NETWORK_POLICY};
    use kube::api::{Patch, PatchParams};

    let cluster = TestCluster::start().await.expect("cluster");
    let Some(control_plane) = cluster.control_plane() else {
        return;
    };
    let kubeconfig = control_plane
        .kubeconfig_path()
        .to_string_lossy()
        .into_owned();
    let admin = cluster.client();
    // The listed namespaces exist before the install, as the chart's bindings go there.
    create_namespaces(&admin).await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let values = |listed: &[&str]| {
        serde_json::json!({
            "image": { "tag": "test" },
            "controller": { "tenantBindings": "chart", "tenantNamespaces": listed }
        })
        .to_string()
    };
    deployed("install", &kubeconfig, values(&["tenant-a"])).await;
    let config = chart_tenancy(&controller_pod(&admin).await.containers[0]);
    assert_eq!(config.bindings, TenantBindings::Preinstalled);

    #[rustfmt::skip]
    assert_access(&admin, &[
        // No RoleBinding may be made, changed or removed by the controller, anywhere.
        (CONTROLLER, "bystander", "rbac.authorization.k8s.io", "rolebindings", "", "create", false),
        (CONTROLLER, "kube-system", "rbac.authorization.k8s.io", "rolebindings", "", "create", false),
        (CONTROLLER, "tenant-a", "rbac.authorization.k8s.io", "rolebindings", "", "create", false),
        (CONTROLLER, "tenant-a", "rbac.authorization.k8s.io", "rolebindings", "", "patch", false),
        (CONTROLLER, "tenant-a", "rbac.authorization.k8s.io", "rolebindings", "", "delete", false),
        (CONTROLLER, "", "rbac.authorization.k8s.io", "clusterroles", "", "bind", false),
        // Its tenant rights where the chart bound them, and nowhere else.
        (CONTROLLER, "tenant-a", "batch", "jobs", "", "create", true),
        (CONTROLLER, "tenant-a", "", "secrets", "", "get", true),
        (CONTROLLER, "tenant-b", "batch", "jobs", "", "create", false),
        (CONTROLLER, "bystander", "batch", "jobs", "", "create", false),
        (CONTROLLER, "kube-system", "", "secrets", "", "get", false),
    ]).await;

    let controller = as_user(&cluster, CONTROLLER).await;
    let (tenants, watch) = watch_tenants(controller, config).await;
    let label = async |name: &str, value: serde_json::Value| {
        namespaces
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({ "metadata": { "labels": { TENANT_LABEL: value } } }),
                ),
            )
            .await
            .expect("label namespace");
    };
    label("tenant-a", "true".into()).await;
    label("tenant-b", "true".into()).await;
    wait_until(
        "tenant-a is a tenant, with its workers' policy",
        async || {
            tenants.contains("tenant-a")
                && exists::<NetworkPolicy>(&admin, "tenant-a", WORKER_NETWORK_POLICY).await
        },
    )
    .await;
    // tenant-b is labelled but not listed: it waits, and nobody bound anything there.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !tenants.contains("tenant-b"),
        "no tenant without its binding"
    );
    assert!(!exists::<RoleBinding>(&admin, "tenant-b", TENANT_BINDING).await);
    assert!(!exists::<NetworkPolicy>(&admin, "tenant-b", WORKER_NETWORK_POLICY).await);

    // The platform team lists it: the upgrade binds the role, and tenant-b is a tenant.
    deployed("upgrade", &kubeconfig, values(&["tenant-a", "tenant-b"])).await;
    wait_until("tenant-b is a tenant once the chart binds it", async || {
        tenants.contains("tenant-b")
            && exists::<NetworkPolicy>(&admin, "tenant-b", WORKER_NETWORK_POLICY).await
    })
    .await;

    // tenant-a stops being a tenant: the controller's objects go, the chart's binding stays.
    label("tenant-a", serde_json::Value::Null).await;
    wait_until("tenant-a's workers' policy removed", async || {
        !tenants.contains("tenant-a")
            && !exists::<NetworkPolicy>(&admin, "tenant-a", WORKER_NETWORK_POLICY).await
    })
    .await;
    assert!(exists::<RoleBinding>(&admin, "tenant-a", TENANT_BINDING).await);
    assert!(tenants.contains("tenant-b"));
    watch.abort();
}

/// A client acting as `user` (impersonated by the cluster's admin), with the groups every
/// ServiceAccount has.
async fn as_user(cluster: &TestCluster, user: &str) -> kube::Client {
    let control_plane = cluster.control_plane().expect("a local control plane");
    let kubeconfig =
        kube::config::Kubeconfig::read_from(control_plane.kubeconfig_path()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let namespace = user.split(':').nth(2).expect("a ServiceAccount user");
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".to_owned(),
    ]);
    kube::Client::try_from(config).expect("client")
}

async fn exists<K>(client: &kube::Client, namespace: &str, name: &str) -> bool
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .expect("get")
        .is_some()
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the API server's authorizer lets the ServiceAccount user `user`
/// (`system:serviceaccount:<namespace>:<name>`) do `verb` on the resource in `namespace`.
async fn allowed(
    client: &kube::Client,
    user: &str,
    namespace: &str,
    group: &str,
    resource: &str,
    subresource: &str,
    verb: &str,
) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", user.split(':').nth(2).unwrap_or_default()), "system:authenticated"],
            "resourceAttributes": {
                "namespace": namespace, "group": group, "resource": resource,
                "subresource": subresource, "verb": verb
            }
        }
    }))
    .expect("a SubjectAccessReview");
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&Default::default(), &review)
        .await
        .expect("the API server reviews access");
    answer.status.is_some_and(|s| s.allowed)
}
