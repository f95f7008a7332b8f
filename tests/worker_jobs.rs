//! Worker Jobs the Kubernetes way, on a real control plane: the controller publishes its
//! catalog into the tenant namespace as a ConfigMap, the Job's pod mounts it and reads the
//! model files from the models folder, and a Job running a GPU model asks for a GPU with
//! the configured node selector, tolerations and runtime class.
//!
//! The real node is made a GPU node here the way a device plugin and a platform team would:
//! it advertises `nvidia.com/gpu: 1` (the Node's status capacity, as Kubernetes documents for
//! extended resources), carries a label and a `NoSchedule` taint, and its containerd answers
//! the RuntimeClass handler `nvidia` (with runc), so kube-scheduler places the pod and the
//! kubelet runs it only because the Job asked for all of it. There is no GPU or CUDA on the
//! test machine: the worker (`--execution-provider auto`) falls back to the CPU and says so.

mod common;

crate::real_node_tests!(a_gpu_model_from_the_mounted_catalog_runs_in_a_gpu_job);

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Harness, repo_path};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Toleration};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kinsight::controller::{
    CATALOG_CONFIG_MAP, CATALOG_HASH_ANNOTATION, CATALOG_KEY, GpuSettings, WorkerCatalog,
};
use kinsight::crd::{GroupPhase, ImageGroup};
use kinsight::inference::Catalog;
use kinsight::inference::catalog::CatalogFile;
use kinsight::results::ImageResult;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The whole test, control plane start included.
const LIMIT: Duration = Duration::from_secs(300);
/// From the group's creation until it is complete.
const GROUP_LIMIT: Duration = Duration::from_secs(180);

const MODEL: &str = "catalog_only_classifier";
const NODE_LABEL: &str = "kinsight.io/test-accelerator";
const RUNTIME_CLASS: &str = "kinsight-test-nvidia";

/// A catalog with one model under a name no other catalog has: the bundled classifier,
/// marked as a GPU model. Its files stay in `models/`, found through the models folder.
fn catalog_only_yaml() -> String {
    let bundled = std::fs::read_to_string(repo_path("models/catalog.yaml")).expect("catalog");
    let mut file: CatalogFile = serde_yaml::from_str(&bundled).expect("catalog YAML");
    let mut entry = file
        .models
        .into_iter()
        .find(|m| m.name == "image_classification")
        .expect("the bundled classifier");
    entry.name = MODEL.to_owned();
    entry.gpu = true;
    file.models = vec![entry];
    format!(
        "# only in this test\n{}",
        serde_yaml::to_string(&file).expect("YAML")
    )
}

async fn a_gpu_model_from_the_mounted_catalog_runs_in_a_gpu_job() {
    if kinsight::testbed::use_existing_cluster() {
        eprintln!("skipped: makes the testbed's node a GPU node");
        return;
    }
    tokio::time::timeout(LIMIT, gpu_job_end_to_end())
        .await
        .expect("the test finished in time");
}

async fn gpu_job_end_to_end() {
    let mut h = Harness::start("tenant-gpu").await;
    // The binary's only test: the node stays a GPU node until its stack goes.
    let nodes: Api<Node> = Api::all(h.client.clone());
    let node = kinsight::testbed::node::NODE_NAME;
    let gpu = json!({ "nvidia.com/gpu": "1" });
    nodes
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "capacity": gpu, "allocatable": gpu } })),
        )
        .await
        .expect("the node advertises a GPU");
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": { "labels": { NODE_LABEL: "nvidia" } },
                "spec": { "taints": [
                    { "key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule" }
                ] }
            })),
        )
        .await
        .expect("the node is labelled and tainted");

    // The controller's catalog exists only in memory and in the ConfigMap it publishes:
    // the file is gone before any worker starts.
    let yaml = catalog_only_yaml();
    let catalog = {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("catalog.yaml");
        std::fs::write(&path, &yaml).expect("write catalog");
        Catalog::load_with_models_dir(&path, Some(&repo_path("models"))).expect("test catalog")
    };
    assert_eq!(catalog.gpu_models().collect::<Vec<_>>(), [MODEL]);

    // The API server refuses pods naming a RuntimeClass that does not exist.
    let runtime_class: RuntimeClass = serde_json::from_value(
        json!({ "metadata": { "name": RUNTIME_CLASS }, "handler": "nvidia" }),
    )
    .expect("runtime class");
    match Api::<RuntimeClass>::all(h.client.clone())
        .create(&PostParams::default(), &runtime_class)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating the RuntimeClass: {e}"),
    }
    let gpu = GpuSettings::parse(&format!(
        r#"{{"nodeSelector": {{"{NODE_LABEL}": "nvidia"}},
            "tolerations": [{{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}}],
            "runtimeClassName": "{RUNTIME_CLASS}"}}"#
    ))
    .expect("GPU settings");
    h.kill_controller().await;
    let mut config = h.controller_config();
    config.models = vec![MODEL.to_owned()];
    // The model files are the image's.
    config.worker_catalog = Some(WorkerCatalog::new(&catalog, common::IMAGE_MODELS_DIR));
    config.gpu = gpu;
    h.start_controller_with(config);

    // A platform team's group (the REST API only knows the bundled catalog).
    let groups: Api<ImageGroup> = Api::namespaced(h.client.clone(), &h.namespace);
    let group: ImageGroup = serde_json::from_value(json!({
        "apiVersion": "kinsight.io/v1alpha1",
        "kind": "ImageGroup",
        "metadata": { "name": "gpu-group" },
        "spec": {
            "models": [MODEL],
            "images": [
                { "id": "coffee", "url": h.photo_url("coffee.png") },
                { "id": "rocket", "url": h.photo_url("rocket.jpg") }
            ]
        }
    }))
    .expect("group");
    groups
        .create(&PostParams::default(), &group)
        .await
        .expect("create group");

    let finished = common::poll(GROUP_LIMIT, async || {
        let current = groups.get("gpu-group").await.expect("group");
        let status = current.status.unwrap_or_default();
        matches!(status.phase, GroupPhase::Completed | GroupPhase::Failed).then_some(status)
    })
    .await;
    let Some(status) = finished else {
        let status = groups.get("gpu-group").await.expect("group").status;
        let pods = Api::<Pod>::namespaced(h.client.clone(), &h.namespace)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let pod_states: Vec<_> = pods
            .iter()
            .map(|p| (p.metadata.name.clone(), p.status.clone()))
            .collect();
        panic!("the group did not complete in time: {status:?}\npods: {pod_states:#?}");
    };
    assert_eq!(status.phase, GroupPhase::Completed, "{status:?}");
    assert_eq!(status.images_done, 2);
    assert_eq!(status.images_failed, 0, "{status:?}");

    // Correct results from the model only the mounted catalog names.
    let results = h.stored_results("gpu-group").await;
    let top_class = |result: &ImageResult| {
        result.outputs[MODEL]
            .output
            .classes
            .first()
            .map(|c| c.label.clone())
    };
    assert_eq!(top_class(&results["coffee"]).as_deref(), Some("espresso"));
    assert_eq!(top_class(&results["rocket"]).as_deref(), Some("missile"));

    // The tenant namespace holds the catalog, as the controller loaded it.
    let config_map = Api::<ConfigMap>::namespaced(h.client.clone(), &h.namespace)
        .get(CATALOG_CONFIG_MAP)
        .await
        .expect("the catalog ConfigMap");
    assert_eq!(
        config_map.data.as_ref().and_then(|d| d.get(CATALOG_KEY)),
        Some(&yaml)
    );
    let labels = config_map.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("kinsight-controller")
    );
    let catalog_hash = config_map
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CATALOG_HASH_ANNOTATION))
        .cloned()
        .expect("catalog hash");

    // The Job asked for a GPU node the way the settings say.
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), &h.namespace);
    let job = jobs.get(&status.jobs[0]).await.expect("job");
    let template = job.spec.expect("job spec").template;
    assert_eq!(
        template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CATALOG_HASH_ANNOTATION)),
        Some(&catalog_hash)
    );
    let pod_spec = template.spec.expect("pod spec");
    let worker = &pod_spec.containers[0];
    let resources = worker.resources.clone().expect("resources");
    for side in [resources.requests, resources.limits] {
        assert_eq!(
            side.unwrap_or_default().get("nvidia.com/gpu"),
            Some(&Quantity("1".into()))
        );
    }
    assert_eq!(
        worker.args.as_deref(),
        Some(&["--execution-provider".to_owned(), "auto".to_owned()][..])
    );
    // Spelled out here, not taken from the parsed settings: a parser that dropped or
    // changed a field would otherwise agree with itself.
    assert_eq!(
        pod_spec.node_selector,
        Some(BTreeMap::from([(
            NODE_LABEL.to_owned(),
            "nvidia".to_owned()
        )]))
    );
    let expected_toleration = Toleration {
        key: Some("nvidia.com/gpu".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        value: None,
        toleration_seconds: None,
    };
    assert_eq!(pod_spec.tolerations, Some(vec![expected_toleration]));
    assert_eq!(pod_spec.runtime_class_name.as_deref(), Some(RUNTIME_CLASS));

    // The worker says where the model ran: no CUDA here, so the CPU, and why. Its results
    // are written before it exits, so the pod may still be finishing.
    let succeeded = async || {
        Api::<Pod>::namespaced(h.client.clone(), &h.namespace)
            .list(&ListParams::default().labels("kinsight.io/group=gpu-group"))
            .await
            .expect("pods")
            .items
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
    };
    common::eventually(
        "the worker pod succeeds",
        Duration::from_secs(30),
        async || succeeded().await.is_some(),
    )
    .await;
    let pod = succeeded().await.expect("a worker pod that succeeded");
    let log = h
        .pod_log(pod.metadata.name.as_deref().unwrap_or_default())
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("model loaded") && l.contains(&format!("model={MODEL}")))
        .unwrap_or_else(|| panic!("no load line for {MODEL} in the worker log:\n{log}"));
    let cpu = "execution_provider=CPU (CUDA requested via auto but ";
    let cuda = "execution_provider=CUDA:0 (CUDA available, via auto)";
    assert!(line.contains(cpu) || line.contains(cuda), "{line}");
    eprintln!("worker: {line}");
}
