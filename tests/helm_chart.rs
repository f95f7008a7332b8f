//! The Helm chart, linted and installed with Helm's own library (PyPI helm-sdkpy) into a
//! real API server: it must create the CRDs the code serves, the controller and API
//! Deployments and the RBAC they need.

use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
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

#[test]
fn chart_lints_clean() {
    let result = chart(&["lint"]);
    assert_eq!(result["Errors"], serde_json::Value::Null, "{result}");
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
    let result =
        tokio::task::spawn_blocking(move || chart(&["install", &kubeconfig, "kinsight-system"]))
            .await
            .expect("join");
    assert!(result.to_string().contains("deployed"), "{result}");

    let client = cluster.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "imagegroups.kinsight.io",
        "imageresults.kinsight.io",
        "webhooksubscriptions.kinsight.io",
    ] {
        assert!(
            crds.get_opt(name).await.expect("get").is_some(),
            "{name} installed"
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "kinsight-system");
    let controller = deployments
        .get("kinsight-controller")
        .await
        .expect("controller deployment");
    let container = &controller
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .containers[0];
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
    assert!(
        deployments
            .get_opt("kinsight-api")
            .await
            .expect("get")
            .is_some()
    );
    let role = Api::<ClusterRole>::all(client)
        .get("kinsight-controller")
        .await
        .expect("controller role");
    let rules = role.rules.unwrap_or_default();
    assert!(rules.iter().any(|r| {
        r.resources
            .as_ref()
            .is_some_and(|res| res.contains(&"jobs".to_owned()))
            && r.verbs.contains(&"create".to_owned())
    }));
}
