//! The worker Job of a group: one per generation of the group's spec, with a deterministic
//! name so a controller restart finds the Job it created instead of making a second one.
//!
//! The pod reads the model catalog from a ConfigMap the controller keeps in the group's
//! namespace ([`catalog_config_map`]) and the model files from its image, and
//! asks for a GPU when one of its models wants one ([`GpuSettings`]). It projects its own
//! ServiceAccount token, the one credential the worker needs ([`service_account_volume`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, Container,
    DownwardAPIProjection, DownwardAPIVolumeFile, EmptyDirVolumeSource, EnvVar, KeyToPath,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccount,
    ServiceAccountTokenProjection, Toleration, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ControllerConfig;
use super::scheduler::{KUEUE_QUEUE_LABEL, LANE_LABEL, Placement};
use crate::crd::{GROUP_LABEL, ImageGroup, label_value};
use crate::inference::{Catalog, ExecutionProvider};
use crate::worker::{
    JOB_NAME_ENV, LINGER_ENV, SHAPE_ENV, STANDBY_ENV, WORK_ORDER_URL_ENV, WorkOrder, work_order_url,
};

const EGRESS_ENV: &str = "KINSIGHT_ALLOW_EGRESS";
/// The result ingest's URL, read by `kinsight worker --results-url`.
pub const RESULTS_URL_ENV: &str = "KINSIGHT_RESULTS_URL";
const CATALOG_ENV: &str = "KINSIGHT_CATALOG";
const MODELS_DIR_ENV: &str = "KINSIGHT_MODELS_DIR";

/// The ConfigMap holding the catalog in each tenant namespace.
pub const CATALOG_CONFIG_MAP: &str = "kinsight-worker-catalog";
/// Its one key: the catalog YAML.
pub const CATALOG_KEY: &str = "catalog.yaml";
/// Where worker pods mount that ConfigMap.
pub const CATALOG_MOUNT_PATH: &str = "/etc/kinsight/catalog";
/// SHA-256 (hex) of the catalog, on the ConfigMap and on the pod template of every Job made
/// with it, so a changed catalog is visible on the Jobs that ran with the old one.
pub const CATALOG_HASH_ANNOTATION: &str = "kinsight.io/catalog-sha256";
const CATALOG_VOLUME: &str = "catalog";
const MODELS_VOLUME: &str = "models";
/// Writable scratch space (an `emptyDir`) under a read-only root filesystem.
const SCRATCH_VOLUME: &str = "scratch";
const SCRATCH_PATH: &str = "/tmp";
/// The worker's ServiceAccount credentials, where in-cluster clients read them.
const ACCOUNT_VOLUME: &str = "service-account";
const ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The cluster's CA, published into every namespace by kube-controller-manager (1.20+).
const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";
/// The kubelet refreshes the token well before this (at 80% of its life).
const TOKEN_SECONDS: i64 = 3607;
/// The image's `nonroot` user, as the chart runs the controller and the API.
const WORKER_UID: i64 = 65532;

/// The catalog the controller hands to its workers.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerCatalog {
    /// The catalog YAML as the controller loaded it.
    pub yaml: String,
    /// Models whose Jobs ask for a GPU (`gpu: true`).
    pub gpu_models: BTreeSet<String>,
    /// Where the catalog's relative model and labels files are inside worker pods.
    pub models_dir: String,
    /// A volume holding the model files (a PersistentVolumeClaim, an NFS share, ...),
    /// mounted read-only at `models_dir`; `None`: they are in the worker image.
    pub models_volume: Option<Volume>,
}

impl WorkerCatalog {
    pub fn new(catalog: &Catalog, models_dir: impl Into<String>) -> Self {
        WorkerCatalog {
            yaml: catalog.yaml().to_owned(),
            gpu_models: catalog.gpu_models().map(str::to_owned).collect(),
            models_dir: models_dir.into(),
            models_volume: None,
        }
    }

    /// Parses a volume source (JSON or YAML, as in a pod spec, without the name), e.g.
    /// `{"persistentVolumeClaim": {"claimName": "models", "readOnly": true}}`.
    pub fn parse_models_volume(text: &str) -> Result<Volume, String> {
        let mut source: serde_json::Map<String, serde_json::Value> = serde_yaml::from_str(text)
            .map_err(|e| format!("models volume: expected a volume source object: {e}"))?;
        source.remove("name");
        if source.len() != 1 {
            return Err(format!(
                "models volume: expected exactly one volume source (e.g. persistentVolumeClaim), \
                 got {}",
                source.len()
            ));
        }
        source.insert("name".to_owned(), MODELS_VOLUME.into());
        serde_json::from_value(serde_json::Value::Object(source))
            .map_err(|e| format!("models volume: {e}"))
    }

    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.yaml.as_bytes()))
    }
}

/// What the pods of Jobs running a GPU model get (`--worker-gpu`, JSON or YAML in the
/// camelCase field names, as Helm's `toJson` writes `worker.gpu`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GpuSettings {
    /// The extended resource the device plugin advertises.
    pub resource_name: String,
    /// How many of it the worker container requests (and is limited to).
    pub count: u32,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// E.g. `nvidia` where the NVIDIA container runtime is not the node's default.
    pub runtime_class_name: Option<String>,
}

impl Default for GpuSettings {
    fn default() -> Self {
        GpuSettings {
            resource_name: "nvidia.com/gpu".to_owned(),
            count: 1,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            runtime_class_name: None,
        }
    }
}

impl GpuSettings {
    /// Parses and checks the settings (JSON or YAML); missing fields keep their defaults.
    pub fn parse(text: &str) -> Result<GpuSettings, String> {
        let mut settings: GpuSettings = if text.trim().is_empty() {
            GpuSettings::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| format!("GPU settings: {e}"))?
        };
        // Helm renders an unset value as "".
        settings.runtime_class_name = settings.runtime_class_name.filter(|n| !n.is_empty());
        // Extended resources are `<domain>/<name>`; anything else is not a device plugin's.
        let qualified = settings
            .resource_name
            .split_once('/')
            .is_some_and(|(domain, name)| domain.contains('.') && !name.is_empty());
        if !qualified {
            return Err(format!(
                "GPU settings: resourceName must be an extended resource like nvidia.com/gpu, got {:?}",
                settings.resource_name
            ));
        }
        if settings.count == 0 {
            return Err("GPU settings: count must be at least 1".into());
        }
        Ok(settings)
    }
}

/// Images one worker Job takes at most ([`ControllerConfig::images_per_job`] may say
/// fewer): a bigger group runs as several Jobs at once (more pods, on more nodes), and each
/// Job's work order stays small (the group's URLs are bounded by
/// [`crate::crd::MAX_GROUP_URL_BYTES`] together).
pub const MAX_IMAGES_PER_JOB: usize = 1000;

/// The name of a generation's `shard`-th Job (the first has no shard suffix). Job names
/// end up in the pods' `job-name` label: at most 63 characters.
pub fn job_name(group: &str, generation: i64, shard: usize) -> String {
    let suffix = match shard {
        0 => format!("-g{generation}"),
        k => format!("-g{generation}-{k}"),
    };
    if group.len() + suffix.len() <= 63 {
        return format!("{group}{suffix}");
    }
    let digest = hex::encode(Sha256::digest(group.as_bytes()));
    let keep = 63 - suffix.len() - 9;
    format!(
        "{}-{}{suffix}",
        group[..keep].trim_end_matches(['-', '.']),
        &digest[..8]
    )
}

pub fn labels(group: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "kinsight".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "worker".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), label_value(group)),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "kinsight-controller".to_owned(),
        ),
        (GROUP_LABEL.to_owned(), label_value(group)),
    ])
}

pub fn build_job(
    group: &ImageGroup,
    name: &str,
    order: &WorkOrder,
    config: &ControllerConfig,
    placement: &Placement,
) -> Result<Job, serde_json::Error> {
    let group_name = group.name_any();
    let catalog = config.worker_catalog.as_ref();
    // By what the Job will run: a CPU model added to a group with a GPU model runs alone.
    let wants_gpu = catalog.is_some_and(|c| {
        order
            .images
            .iter()
            .flat_map(|item| item.models(order))
            .any(|m| c.gpu_models.contains(m))
    });
    // The pod fetches its order (stored under the Job's name) from the API's internal end.
    let mut env = vec![EnvVar {
        name: WORK_ORDER_URL_ENV.to_owned(),
        value: Some(work_order_url(&config.results_url, name)),
        value_from: None,
    }];
    // Set here unless the operator's `worker_env` names it: an explicit setting wins.
    let mut default_env = |name: &str, value: String| {
        if !config.worker_env.iter().any(|(k, _)| k == name) {
            env.push(EnvVar {
                name: name.to_owned(),
                value: Some(value),
                value_from: None,
            });
        }
    };
    // Where the worker hands its results.
    default_env(RESULTS_URL_ENV, config.results_url.clone());
    // The group's trace: the worker's spans join it.
    if let Some(trace) = crate::trace::of_group(group.annotations(), group.uid().as_deref()) {
        default_env(
            crate::trace::ENV,
            crate::trace::handed_on(&trace).to_string(),
        );
    }
    // Workers download images under the same egress rules the controller sends webhooks with.
    if !config.egress.allow.is_empty() {
        default_env(EGRESS_ENV, config.egress.to_string());
    }
    // CUDA keeps its compiled kernels under $HOME, which is read-only here.
    if wants_gpu {
        default_env("CUDA_CACHE_PATH", format!("{SCRATCH_PATH}/cuda-cache"));
    }
    if let Some(catalog) = catalog {
        default_env(CATALOG_ENV, format!("{CATALOG_MOUNT_PATH}/{CATALOG_KEY}"));
        default_env(MODELS_DIR_ENV, catalog.models_dir.clone());
    }
    env.extend(config.worker_env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: Some(v.clone()),
        value_from: None,
    }));
    let mut limits = BTreeMap::from([
        ("cpu".to_owned(), Quantity(config.worker_cpu.clone())),
        ("memory".to_owned(), Quantity(config.worker_memory.clone())),
    ]);
    let gpu = &config.gpu;
    if wants_gpu {
        limits.insert(gpu.resource_name.clone(), Quantity(gpu.count.to_string()));
    }
    // Requests equal limits (a predictable CPU quota: the worker sizes its threads by its
    // limit; extended resources such as GPUs must have both, equal), but for a CPU request
    // the operator lowers on purpose.
    let mut requests = limits.clone();
    if let Some(cpu) = &config.worker_cpu_request {
        requests.insert("cpu".to_owned(), Quantity(cpu.clone()));
    }
    let resources = ResourceRequirements {
        limits: Some(limits),
        requests: Some(requests),
        ..ResourceRequirements::default()
    };
    // `auto`: CUDA when the pod's ONNX Runtime and node have it, else the CPU (and the
    // worker's log says which).
    let provider = if wants_gpu {
        ExecutionProvider::Auto
    } else {
        ExecutionProvider::Cpu
    };
    let mut volumes = vec![
        // The root filesystem is read-only; what libraries write (a CUDA cache) goes here.
        Volume {
            name: SCRATCH_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("256Mi".to_owned())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        service_account_volume(),
    ];
    let mut mounts = vec![
        VolumeMount {
            name: SCRATCH_VOLUME.to_owned(),
            mount_path: SCRATCH_PATH.to_owned(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: ACCOUNT_VOLUME.to_owned(),
            mount_path: ACCOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    if let Some(catalog) = catalog {
        volumes.push(config_map_volume(
            CATALOG_VOLUME,
            CATALOG_CONFIG_MAP,
            CATALOG_KEY,
        ));
        mounts.push(VolumeMount {
            name: CATALOG_VOLUME.to_owned(),
            mount_path: CATALOG_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        if let Some(models) = &catalog.models_volume {
            volumes.push(models.clone());
            mounts.push(VolumeMount {
                name: models.name.clone(),
                mount_path: catalog.models_dir.clone(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    let annotations =
        catalog.map(|c| BTreeMap::from([(CATALOG_HASH_ANNOTATION.to_owned(), c.sha256())]));
    let non_empty = |m: &BTreeMap<String, String>| (!m.is_empty()).then(|| m.clone());
    // Which slots the Job takes, for the scheduler; Kueue's Jobs are Kueue's to start.
    let mut job_labels = labels(&group_name);
    let suspend = match placement {
        Placement::Kinsight(lane) => {
            job_labels.insert(LANE_LABEL.to_owned(), lane.as_str().to_owned());
            None
        }
        Placement::Kueue(queue) => {
            job_labels.insert(KUEUE_QUEUE_LABEL.to_owned(), queue.clone());
            Some(true)
        }
    };
    let mut job = Job {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: group.namespace(),
            labels: Some(job_labels),
            owner_references: group.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(config.worker_backoff_limit),
            // A worker that hangs must not hold its group for ever: past this the Job
            // fails, and the images it left get `WorkerFailed` with the reason.
            active_deadline_seconds: Some(
                i64::try_from(config.worker_deadline.as_secs().max(1)).unwrap_or(i64::MAX),
            ),
            ttl_seconds_after_finished: Some(3600),
            suspend,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&group_name)),
                    annotations,
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    service_account_name: Some(WORKER_ACCOUNT.to_owned()),
                    containers: vec![Container {
                        name: "worker".to_owned(),
                        image: Some(config.worker_image.clone()),
                        command: Some(vec!["kinsight".to_owned(), "worker".to_owned()]),
                        args: Some(vec![
                            "--execution-provider".to_owned(),
                            provider.to_string(),
                        ]),
                        env: Some(env),
                        resources: Some(resources),
                        volume_mounts: Some(mounts),
                        security_context: Some(worker_container_security()),
                        ..Container::default()
                    }],
                    security_context: Some(worker_pod_security()),
                    volumes: Some(volumes),
                    node_selector: wants_gpu.then(|| non_empty(&gpu.node_selector)).flatten(),
                    tolerations: (wants_gpu && !gpu.tolerations.is_empty())
                        .then(|| gpu.tolerations.clone()),
                    runtime_class_name: wants_gpu.then(|| gpu.runtime_class_name.clone()).flatten(),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    };
    // Kueue's Jobs start when Kueue says: they neither carry nor are carried.
    if matches!(placement, Placement::Kinsight(_)) && !config.worker_linger.is_zero() {
        let linger = config.worker_linger.as_secs_f64();
        let shape = pod_shape(&job)?;
        let env = job
            .spec
            .as_mut()
            .and_then(|spec| spec.template.spec.as_mut())
            .and_then(|pod| pod.containers.first_mut())
            .map(|worker| worker.env.get_or_insert_with(Vec::new));
        if let Some(env) = env {
            for (name, value) in [
                (JOB_NAME_ENV, name.to_owned()),
                (SHAPE_ENV, shape),
                (LINGER_ENV, linger.to_string()),
            ] {
                env.push(EnvVar {
                    name: name.to_owned(),
                    value: Some(value),
                    value_from: None,
                });
            }
        }
    }
    Ok(job)
}

/// The annotation of a Job whose order a carrier does (its value: the carrier's Job); such
/// a Job has no pod of its own (`parallelism: 0`) unless its carrier ends first.
pub const CARRIED_BY_ANNOTATION: &str = "kinsight.io/carried-by";

/// What a worker pod is, as far as which orders it can run: its spec and annotations but
/// for what belongs to its Job alone (the order's URL, the group's trace), hashed. Two Jobs
/// with the same shape run the same image, models catalog, settings and resources.
fn pod_shape(job: &Job) -> Result<String, serde_json::Error> {
    let template = job.spec.as_ref().map(|spec| &spec.template);
    let mut pod = template.and_then(|t| t.spec.clone()).unwrap_or_default();
    for container in &mut pod.containers {
        if let Some(env) = container.env.as_mut() {
            env.retain(|e| e.name != WORK_ORDER_URL_ENV && e.name != crate::trace::ENV);
        }
    }
    let annotations = template.and_then(|t| t.metadata.as_ref()?.annotations.clone());
    let text = serde_json::to_vec(&(pod, annotations))?;
    Ok(hex::encode(&Sha256::digest(&text)[..16]))
}

/// The shape a Job's worker carries orders for (`None`: it does not carry).
pub fn job_shape(job: &Job) -> Option<String> {
    let worker = job
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?;
    worker
        .env
        .iter()
        .flatten()
        .find(|e| e.name == SHAPE_ENV)
        .and_then(|e| e.value.clone())
}

/// `job` with no pod of its own, its order carried by the worker of Job `carrier`.
pub fn carried_job(mut job: Job, carrier: &str) -> Job {
    job.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CARRIED_BY_ANNOTATION.to_owned(), carrier.to_owned());
    if let Some(spec) = job.spec.as_mut() {
        spec.parallelism = Some(0);
    }
    job
}

/// The Job carrying `job`'s order, while `job` has no pod of its own.
pub fn carrier_of(job: &Job) -> Option<&str> {
    let no_pods = job.spec.as_ref().and_then(|s| s.parallelism) == Some(0);
    no_pods
        .then(|| job.annotations().get(CARRIED_BY_ANNOTATION))
        .flatten()
        .map(String::as_str)
}

/// The label of a standby worker's Job (one with no order of its own, see
/// [`standby_job`]); the scheduler does not count it, the Jobs whose orders it carries are.
pub const STANDBY_LABEL: &str = "kinsight.io/standby";

/// Whether `job` is a standby worker's.
pub fn is_standby(job: &Job) -> bool {
    job.labels().get(STANDBY_LABEL).is_some_and(|v| v == "true")
}

/// The `index`-th standby worker Job of `namespace`: a pod of the shape of the
/// namespace's CPU Jobs with no order of its own, which loads the catalog's CPU models and
/// waits for orders the controller hands it, up to `idle` between two (then it ends and
/// the controller makes another). Named by its shape, so a changed catalog, image or
/// setting makes new ones. `None` when workers do not wait for orders (no linger).
pub fn standby_job(
    namespace: &str,
    index: usize,
    idle: std::time::Duration,
    config: &ControllerConfig,
) -> Result<Option<Job>, serde_json::Error> {
    if config.worker_linger.is_zero() {
        return Ok(None);
    }
    let mut group = ImageGroup::new(
        "standby",
        crate::crd::ImageGroupSpec {
            images: Vec::new(),
            models: Vec::new(),
            webhook: None,
            metadata: BTreeMap::new(),
        },
    );
    group.metadata.namespace = Some(namespace.to_owned());
    // An order of no GPU model: the shape of the namespace's CPU Jobs.
    let order = WorkOrder {
        group: crate::results::GroupRef {
            namespace: namespace.to_owned(),
            name: "standby".to_owned(),
            uid: String::new(),
        },
        generation: 1,
        models: Vec::new(),
        images: Vec::new(),
        traceparent: None,
    };
    let placeholder = "standby";
    let mut job = build_job(
        &group,
        placeholder,
        &order,
        config,
        &Placement::Kinsight(super::fair_queue::Lane::Main),
    )?;
    let Some(shape) = job_shape(&job) else {
        return Ok(None);
    };
    let name = format!("kinsight-standby-{}-{index}", &shape[..shape.len().min(12)]);
    let mut labels = labels("standby");
    labels.remove(GROUP_LABEL);
    labels.remove("app.kubernetes.io/instance");
    labels.insert(STANDBY_LABEL.to_owned(), "true".to_owned());
    job.metadata.name = Some(name.clone());
    job.metadata.labels = Some(labels.clone());
    job.metadata.owner_references = None;
    if let Some(spec) = job.spec.as_mut() {
        // It lives as long as orders come; the Jobs it carries keep their own deadlines.
        spec.active_deadline_seconds = None;
        if let Some(meta) = spec.template.metadata.as_mut() {
            meta.labels = Some(labels);
        }
        let worker = spec
            .template
            .spec
            .as_mut()
            .and_then(|pod| pod.containers.first_mut());
        if let Some(env) = worker.and_then(|w| w.env.as_mut()) {
            env.retain(|e| e.name != WORK_ORDER_URL_ENV);
            for e in env.iter_mut().filter(|e| e.name == JOB_NAME_ENV) {
                e.value = Some(name.clone());
            }
            env.push(EnvVar {
                name: STANDBY_ENV.to_owned(),
                value: Some(idle.as_secs_f64().to_string()),
                value_from: None,
            });
        }
    }
    Ok(Some(job))
}

/// The worker fetches and decodes what customers point it at, so it runs with nothing to
/// spare: not root (the image's `nonroot` user, as the controller and API run), the
/// runtime's default seccomp profile, no capabilities, no privilege escalation and a
/// read-only root filesystem (the "restricted" Pod Security Standard).
fn worker_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(WORKER_UID),
        run_as_group: Some(WORKER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

fn worker_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The worker's token (it proves to the result ingest whose worker is calling), the
/// cluster's CA and the namespace, projected by the Job itself: the `kube-api-access-*`
/// volume the ServiceAccount admission plugin adds since Kubernetes 1.21, at the same path.
/// So the worker has its token whether or not admission mounts one (clusters without the
/// plugin, such as the testbed's, or a 1.20 one mounting a legacy Secret); where it does,
/// this mount at its path makes it add none.
fn service_account_volume() -> Volume {
    Volume {
        name: ACCOUNT_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".to_owned(),
                        expiration_seconds: Some(TOKEN_SECONDS),
                        audience: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: ROOT_CA_CONFIG_MAP.to_owned(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".to_owned(),
                            path: "ca.crt".to_owned(),
                            mode: None,
                        }]),
                        optional: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".to_owned(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".to_owned()),
                                field_path: "metadata.namespace".to_owned(),
                            }),
                            ..DownwardAPIVolumeFile::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            default_mode: None,
        }),
        ..Volume::default()
    }
}

/// A volume of one key of a ConfigMap.
fn config_map_volume(volume: &str, config_map: &str, key: &str) -> Volume {
    Volume {
        name: volume.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map.to_owned(),
            items: Some(vec![KeyToPath {
                key: key.to_owned(),
                path: key.to_owned(),
                mode: None,
            }]),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The catalog's ConfigMap in a tenant namespace, mounted by every worker Job there.
pub fn catalog_config_map(namespace: &str, catalog: &WorkerCatalog) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CATALOG_CONFIG_MAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            annotations: Some(BTreeMap::from([(
                CATALOG_HASH_ANNOTATION.to_owned(),
                catalog.sha256(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            CATALOG_KEY.to_owned(),
            catalog.yaml.clone(),
        )])),
        ..ConfigMap::default()
    }
}

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "kinsight".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "kinsight-controller".to_owned(),
        ),
    ])
}

/// The worker's identity in a tenant namespace. It may do nothing in the API server: its
/// token only proves to kinsight's result ingest which namespace's worker is calling.
pub const WORKER_ACCOUNT: &str = "kinsight-worker";

pub fn worker_account(namespace: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(WORKER_ACCOUNT.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "kinsight-controller".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    }
}

/// Whether the Job has finished, and how.
pub fn finished(job: &Job) -> Option<bool> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find_map(|c| match (c.type_.as_str(), c.status.as_str()) {
            ("Complete", "True") => Some(true),
            ("Failed", "True") => Some(false),
            _ => None,
        })
}

/// The failure (reason, message) for the images a worker Job left without a result, once
/// it has ended: finished, failed, or gone before it was seen to finish (deleted by hand,
/// or by its TTL while no controller ran). `None` while it runs.
pub fn left_images_failure(job: Option<&Job>) -> Option<(&'static str, String)> {
    let Some(job) = job else {
        return Some((
            "WorkerFailed",
            "the worker job was deleted before processing this image".to_owned(),
        ));
    };
    if finished(job)? {
        return Some((
            "NoResult",
            "the worker finished without a result for this image".to_owned(),
        ));
    }
    let message = "the worker job failed before processing this image";
    Some((
        "WorkerFailed",
        match failure_reason(job) {
            Some(why) => format!("{message} ({why})"),
            None => message.to_owned(),
        },
    ))
}

/// How the worker's container ended, from the failed Job's pods (`job-name` label): an
/// OOM kill first (with the memory limit it hit), else the last non-zero exit and its
/// reason. The Job's own condition says only that its pods failed.
pub fn worker_termination(pods: &[Pod]) -> Option<String> {
    // (reason, exit code, memory limit) of every non-zero exit, current or last.
    let mut ended = Vec::new();
    for pod in pods {
        let limit = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .map(|q| q.0.as_str());
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref());
        for status in statuses.into_iter().flatten() {
            let states = [status.state.as_ref(), status.last_state.as_ref()];
            for t in states
                .into_iter()
                .flatten()
                .filter_map(|s| s.terminated.as_ref())
            {
                if t.exit_code != 0 {
                    ended.push((t.reason.as_deref(), t.exit_code, limit));
                }
            }
        }
    }
    let oom = ended
        .iter()
        .find(|(reason, _, _)| *reason == Some("OOMKilled"));
    if let Some((_, code, limit)) = oom {
        return Some(match limit {
            Some(limit) => {
                format!("the worker was OOMKilled (exit {code}) at its memory limit of {limit}")
            }
            None => format!("the worker was OOMKilled (exit {code})"),
        });
    }
    // 137 is SIGKILL: where the runtime missed the OOM event (containerd may see the exit
    // first), the limit is still the likely cause.
    ended.first().map(|(reason, code, limit)| {
        let reason = reason.unwrap_or("no reason given");
        match limit {
            Some(limit) if *code == 137 => format!(
                "the worker was killed (exit 137, {reason}) with a memory limit of {limit}: \
                 out of memory, or killed from outside"
            ),
            _ => format!("the worker exited with {code} ({reason})"),
        }
    })
}

/// Why a failed Job failed, as its `Failed` condition says (e.g. `DeadlineExceeded: Job was
/// active longer than specified deadline`).
fn failure_reason(job: &Job) -> Option<String> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let failed = conditions
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")?;
    match (failed.reason.as_deref(), failed.message.as_deref()) {
        (Some(reason), Some(message)) => Some(format!("{reason}: {message}")),
        (Some(text), None) | (None, Some(text)) => Some(text.to_owned()),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ImageEntry, ImageGroupSpec};
    use crate::results::GroupRef;
    use crate::worker::WorkItem;

    const MAIN: Placement = Placement::Kinsight(super::super::fair_queue::Lane::Main);

    fn group(models: &[&str]) -> ImageGroup {
        let mut group = ImageGroup::new(
            "listing-42",
            ImageGroupSpec {
                images: vec![ImageEntry {
                    id: None,
                    url: "https://example.com/a.jpg".into(),
                    metadata: BTreeMap::new(),
                }],
                models: models.iter().map(|m| m.to_string()).collect(),
                webhook: None,
                metadata: BTreeMap::new(),
            },
        );
        group.metadata.namespace = Some("tenant-a".into());
        group.metadata.uid = Some("uid-1".into());
        group
    }

    fn order(models: &[&str]) -> WorkOrder {
        WorkOrder {
            group: GroupRef {
                namespace: "tenant-a".into(),
                name: "listing-42".into(),
                uid: "uid-1".into(),
            },
            generation: 1,
            models: models.iter().map(|m| m.to_string()).collect(),
            images: vec![WorkItem {
                id: "0".into(),
                url: "https://example.com/a.jpg".into(),
                models: Vec::new(),
            }],
            traceparent: None,
        }
    }

    const CATALOG_YAML: &str = "models: []  # stands in for the real text\n";

    fn config() -> ControllerConfig {
        ControllerConfig {
            worker_catalog: Some(WorkerCatalog {
                yaml: CATALOG_YAML.into(),
                gpu_models: BTreeSet::from(["big_detector".to_owned()]),
                models_dir: "/opt/kinsight/models".into(),
                models_volume: None,
            }),
            gpu: GpuSettings::parse(
                r#"{"nodeSelector": {"accelerator": "nvidia-h100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "runtimeClassName": "nvidia"}"#,
            )
            .expect("settings"),
            results_url: "http://kinsight-api.kinsight:8080/internal/v1/results".into(),
            ..ControllerConfig::default()
        }
    }

    fn job_for(
        models: &[&str],
        config: &ControllerConfig,
    ) -> (PodSpec, Option<BTreeMap<String, String>>) {
        let job = build_job(
            &group(models),
            "listing-42-g1",
            &order(models),
            config,
            &MAIN,
        )
        .expect("job");
        let template = job.spec.expect("spec").template;
        (
            template.spec.expect("pod spec"),
            template.metadata.and_then(|m| m.annotations),
        )
    }

    /// The ConfigMap behind the volume `name`, its one key, and the file the worker reads
    /// it from (mounted read-only).
    fn config_map_mount(pod: &PodSpec, name: &str) -> (String, String, String) {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let source = volume.config_map.as_ref().expect("a configMap volume");
        let item = &source.items.as_ref().expect("items")[0];
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} is not mounted"));
        assert_eq!(mount.read_only, Some(true));
        let file = format!("{}/{}", mount.mount_path, item.path);
        (source.name.clone(), item.key.clone(), file)
    }

    #[test]
    fn a_failed_job_says_why_and_every_job_has_a_deadline() {
        use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
        let condition = |type_: &str, reason: Option<&str>, message: Option<&str>| JobCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: reason.map(str::to_owned),
            message: message.map(str::to_owned),
            ..JobCondition::default()
        };
        let job = |conditions: Vec<JobCondition>| Job {
            status: Some(JobStatus {
                conditions: Some(conditions),
                ..JobStatus::default()
            }),
            ..Job::default()
        };
        let deadline = job(vec![condition(
            "Failed",
            Some("DeadlineExceeded"),
            Some("Job was active longer than specified deadline"),
        )]);
        assert_eq!(
            failure_reason(&deadline).as_deref(),
            Some("DeadlineExceeded: Job was active longer than specified deadline")
        );
        let bare = job(vec![condition(
            "Failed",
            Some("BackoffLimitExceeded"),
            None,
        )]);
        assert_eq!(
            failure_reason(&bare).as_deref(),
            Some("BackoffLimitExceeded")
        );
        let complete = job(vec![condition("Complete", Some("Done"), None)]);
        assert_eq!(failure_reason(&complete), None);

        // What the images a Job left get: by how it ended; nothing while it runs.
        let reason = left_images_failure;
        assert_eq!(reason(Some(&job(Vec::new()))), None);
        let (why, message) = reason(Some(&deadline)).expect("failed");
        assert_eq!(why, "WorkerFailed");
        assert!(
            message.ends_with("(DeadlineExceeded: Job was active longer than specified deadline)"),
            "{message}"
        );
        assert_eq!(reason(Some(&complete)).map(|(r, _)| r), Some("NoResult"));
        let (why, message) = reason(None).expect("gone");
        assert_eq!(why, "WorkerFailed");
        assert!(message.contains("deleted"), "{message}");

        let mut config = config();
        config.worker_deadline = std::time::Duration::from_secs(1800);
        let built = build_job(
            &group(&["object_detection"]),
            "listing-42-g1",
            &order(&["object_detection"]),
            &config,
            &MAIN,
        )
        .expect("job");
        assert_eq!(
            built.spec.and_then(|s| s.active_deadline_seconds),
            Some(1800)
        );
    }

    #[test]
    fn a_jobs_lane_is_on_its_labels_and_a_kueue_job_starts_suspended_in_its_queue() {
        let models = ["image_classification"];
        let build = |placement: &Placement| {
            build_job(
                &group(&models),
                "listing-42-g1",
                &order(&models),
                &config(),
                placement,
            )
            .expect("job")
        };
        let label = |job: &Job, key: &str| job.labels().get(key).cloned();
        let suspend = |job: &Job| job.spec.as_ref().and_then(|s| s.suspend);
        let main = build(&MAIN);
        assert_eq!(label(&main, LANE_LABEL).as_deref(), Some("main"));
        assert_eq!(
            (label(&main, KUEUE_QUEUE_LABEL), suspend(&main)),
            (None, None)
        );
        let small = build(&Placement::Kinsight(super::super::fair_queue::Lane::Small));
        assert_eq!(label(&small, LANE_LABEL).as_deref(), Some("small"));
        let kueue = build(&Placement::Kueue("team-a".into()));
        assert_eq!(label(&kueue, KUEUE_QUEUE_LABEL).as_deref(), Some("team-a"));
        assert_eq!(
            label(&kueue, LANE_LABEL),
            None,
            "Kueue's, not a kinsight slot"
        );
        assert_eq!(suspend(&kueue), Some(true));
    }

    fn env_of(container: &Container) -> BTreeMap<String, String> {
        container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn a_models_volume_is_mounted_read_only_at_the_models_folder() {
        let mut config = config();
        let volume = WorkerCatalog::parse_models_volume(
            "persistentVolumeClaim: {claimName: shared-models, readOnly: true}",
        )
        .expect("a volume source");
        if let Some(catalog) = config.worker_catalog.as_mut() {
            catalog.models_volume = Some(volume);
        }
        let (pod, _) = job_for(&["object_detection"], &config);
        let volumes = pod.volumes.expect("volumes");
        let models = volumes
            .iter()
            .find(|v| v.name == "models")
            .expect("the models volume");
        let claim = models.persistent_volume_claim.as_ref().expect("a PVC");
        assert_eq!(claim.claim_name, "shared-models");
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "models")
            .expect("mounted");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/opt/kinsight/models", Some(true))
        );
        // Not a volume source, or two at once: refused with a reason.
        for bad in ["[1, 2]", "{}", "{emptyDir: {}, hostPath: {path: /m}}"] {
            let error = WorkerCatalog::parse_models_volume(bad).expect_err(bad);
            assert!(error.starts_with("models volume:"), "{error}");
        }
    }

    #[test]
    fn cpu_jobs_mount_the_catalog_and_ask_for_no_gpu() {
        let config = config();
        let (pod, annotations) = job_for(&["object_detection"], &config);
        let worker = &pod.containers[0];
        assert_eq!(
            worker.args.as_deref(),
            Some(&["--execution-provider".to_owned(), "cpu".to_owned()][..])
        );
        let resources = worker.resources.as_ref().expect("resources");
        for side in [&resources.requests, &resources.limits] {
            let side = side.as_ref().expect("requests and limits");
            assert_eq!(side.get("cpu"), Some(&Quantity("1".into())));
            assert!(!side.contains_key("nvidia.com/gpu"), "{side:?}");
        }
        assert_eq!(pod.node_selector, None);
        assert_eq!(pod.tolerations, None);
        assert_eq!(pod.runtime_class_name, None);
        // A lower CPU request makes Burstable pods: the limit (and memory) stay.
        let burstable = ControllerConfig {
            worker_cpu_request: Some("250m".into()),
            ..config.clone()
        };
        let (pod, _) = job_for(&["object_detection"], &burstable);
        let resources = pod.containers[0].resources.as_ref().expect("resources");
        let (requests, limits) = (
            resources.requests.as_ref().expect("requests"),
            resources.limits.as_ref().expect("limits"),
        );
        assert_eq!(requests.get("cpu"), Some(&Quantity("250m".into())));
        assert_eq!(limits.get("cpu"), Some(&Quantity("1".into())));
        assert_eq!(requests.get("memory"), limits.get("memory"));

        // The catalog: the namespace's ConfigMap, mounted, named by KINSIGHT_CATALOG.
        let (catalog_map, catalog_key, catalog_file) = config_map_mount(&pod, "catalog");
        assert_eq!(catalog_map, CATALOG_CONFIG_MAP);
        assert_eq!(catalog_key, CATALOG_KEY);
        let env = env_of(worker);
        assert_eq!(env["KINSIGHT_CATALOG"], catalog_file);
        assert_eq!(catalog_file, "/etc/kinsight/catalog/catalog.yaml");
        assert_eq!(env["KINSIGHT_MODELS_DIR"], "/opt/kinsight/models");
        // The work order: fetched by the Job's name from the API's internal end, beside the
        // result ingest; never inline (a long one would keep the process from starting),
        // and no ConfigMap per Job.
        assert_eq!(
            env["KINSIGHT_WORK_ORDER_URL"],
            "http://kinsight-api.kinsight:8080/internal/v1/work-orders/listing-42-g1"
        );
        assert!(!env.contains_key("KINSIGHT_WORK_ORDER"));
        assert!(!env.contains_key("KINSIGHT_WORK_ORDER_FILE"));
        assert!(pod.volumes.iter().flatten().all(|v| v.name != "work-order"));
        let hash = hex::encode(Sha256::digest(CATALOG_YAML.as_bytes()));
        assert_eq!(
            annotations
                .as_ref()
                .and_then(|a| a.get(CATALOG_HASH_ANNOTATION)),
            Some(&hash)
        );

        // The ConfigMap the mount reads holds that very catalog.
        let cm = catalog_config_map("tenant-a", config.worker_catalog.as_ref().expect("catalog"));
        assert_eq!(cm.metadata.name.as_deref(), Some(catalog_map.as_str()));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("tenant-a"));
        assert_eq!(
            cm.data
                .as_ref()
                .and_then(|d| d.get(CATALOG_KEY))
                .map(String::as_str),
            Some(CATALOG_YAML)
        );
        assert_eq!(
            cm.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/managed-by"))
                .map(String::as_str),
            Some("kinsight-controller")
        );
    }

    #[test]
    fn worker_pods_run_restricted_with_a_writable_tmp() {
        let config = config();
        for (models, gpu) in [
            (&["object_detection"][..], false),
            (&["big_detector"][..], true),
        ] {
            let (pod, _) = job_for(models, &config);
            let pod_security = pod.security_context.as_ref().expect("pod securityContext");
            assert_eq!(pod_security.run_as_non_root, Some(true));
            assert!(pod_security.run_as_user.is_some_and(|uid| uid > 0));
            assert_eq!(
                pod_security
                    .seccomp_profile
                    .as_ref()
                    .map(|p| p.type_.as_str()),
                Some("RuntimeDefault")
            );
            let worker = &pod.containers[0];
            let security = worker
                .security_context
                .as_ref()
                .expect("container securityContext");
            assert_eq!(security.allow_privilege_escalation, Some(false));
            assert_eq!(security.read_only_root_filesystem, Some(true));
            assert_eq!(security.privileged, None);
            let dropped = security.capabilities.as_ref().and_then(|c| c.drop.clone());
            assert_eq!(dropped, Some(vec!["ALL".to_owned()]));
            assert_eq!(
                security.capabilities.as_ref().and_then(|c| c.add.as_ref()),
                None
            );

            // /tmp is the one writable place: an emptyDir of bounded size.
            let tmp = worker
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == "/tmp")
                .expect("/tmp mounted");
            assert_ne!(tmp.read_only, Some(true));
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == tmp.name)
                .expect("its volume");
            let scratch = volume.empty_dir.as_ref().expect("an emptyDir");
            assert!(scratch.size_limit.is_some());
            // On a GPU, CUDA's kernel cache goes there rather than to the read-only $HOME.
            let cache = env_of(worker).get("CUDA_CACHE_PATH").cloned();
            assert_eq!(
                cache.is_some_and(|path| path.starts_with("/tmp/")),
                gpu,
                "{models:?}"
            );
        }
    }

    #[test]
    fn gpu_jobs_request_a_gpu_on_gpu_nodes() {
        let config = config();
        // One GPU model among CPU ones is enough.
        let (pod, _) = job_for(&["object_detection", "big_detector"], &config);
        let worker = &pod.containers[0];
        assert_eq!(
            worker.args.as_deref(),
            Some(&["--execution-provider".to_owned(), "auto".to_owned()][..])
        );
        let resources = worker.resources.as_ref().expect("resources");
        for side in [&resources.requests, &resources.limits] {
            let side = side.as_ref().expect("requests and limits");
            assert_eq!(side.get("nvidia.com/gpu"), Some(&Quantity("1".into())));
            assert_eq!(side.get("memory"), Some(&Quantity("1Gi".into())));
        }
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([(
                "accelerator".to_owned(),
                "nvidia-h100".to_owned()
            )]))
        );
        let tolerations = pod.tolerations.expect("tolerations");
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));
        assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
        // GPU Jobs read the catalog the same way.
        assert_eq!(
            env_of(worker)["KINSIGHT_CATALOG"],
            "/etc/kinsight/catalog/catalog.yaml"
        );

        // Another device plugin's resource, two of them.
        let mut config = config;
        config.gpu.resource_name = "amd.com/gpu".into();
        config.gpu.count = 2;
        let (pod, _) = job_for(&["big_detector"], &config);
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits");
        assert_eq!(limits.get("amd.com/gpu"), Some(&Quantity("2".into())));
        assert!(!limits.contains_key("nvidia.com/gpu"));
    }

    #[test]
    fn a_gpu_group_whose_new_work_is_cpu_only_gets_a_cpu_job() {
        // The group has a GPU model, but it already ran: only the added CPU model is left.
        let models = ["big_detector", "object_detection"];
        let mut work = order(&models);
        work.images[0].models = vec!["object_detection".into()];
        let job =
            build_job(&group(&models), "listing-42-g2", &work, &config(), &MAIN).expect("job");
        let pod = job.spec.expect("spec").template.spec.expect("pod spec");
        let worker = &pod.containers[0];
        assert_eq!(
            worker.args.as_deref(),
            Some(&["--execution-provider".to_owned(), "cpu".to_owned()][..])
        );
        let limits = worker
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits");
        assert!(!limits.contains_key("nvidia.com/gpu"), "{limits:?}");
        assert_eq!(pod.runtime_class_name, None);
    }

    #[test]
    fn explicit_worker_env_wins_and_no_catalog_means_no_mount() {
        let mut config = config();
        config.worker_env = vec![("KINSIGHT_MODELS_DIR".into(), "/models".into())];
        let (pod, _) = job_for(&["object_detection"], &config);
        let names: Vec<&str> = pod.containers[0]
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == "KINSIGHT_MODELS_DIR")
            .filter_map(|e| e.value.as_deref())
            .collect();
        assert_eq!(names, ["/models"], "set once, to the operator's value");

        // Without a published catalog the worker uses its image's, and nothing is a GPU model.
        config.worker_catalog = None;
        let (pod, annotations) = job_for(&["big_detector"], &config);
        let volumes: Vec<&str> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["scratch", "service-account"]);
        assert!(!env_of(&pod.containers[0]).contains_key("KINSIGHT_CATALOG"));
        assert_eq!(annotations, None);
        assert_eq!(pod.runtime_class_name, None);
    }

    #[test]
    fn the_worker_token_is_projected_where_in_cluster_clients_read_it() {
        let (pod, _) = job_for(&["object_detection"], &config());
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == ACCOUNT_VOLUME)
            .expect("the ServiceAccount volume");
        let sources = volume
            .projected
            .as_ref()
            .and_then(|p| p.sources.clone())
            .expect("projected");
        let token = sources
            .iter()
            .find_map(|s| s.service_account_token.as_ref())
            .expect("a token");
        assert_eq!(
            (token.path.as_str(), token.audience.as_deref()),
            ("token", None)
        );
        let ca = sources
            .iter()
            .find_map(|s| s.config_map.as_ref())
            .expect("the CA");
        assert_eq!(ca.name, "kube-root-ca.crt");
        let namespace = sources
            .iter()
            .find_map(|s| s.downward_api.as_ref()?.items.as_ref()?.first())
            .expect("the namespace");
        assert_eq!(namespace.path, "namespace");
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == ACCOUNT_VOLUME)
            .expect("mounted");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/var/run/secrets/kubernetes.io/serviceaccount", Some(true))
        );
        assert_eq!(pod.service_account_name.as_deref(), Some(WORKER_ACCOUNT));
    }

    #[test]
    fn workers_stay_up_for_orders_of_their_own_shape_and_a_carried_job_has_no_pod() {
        let built = |group: &ImageGroup,
                     name: &str,
                     models: &[&str],
                     config: &ControllerConfig,
                     placement: &Placement| {
            build_job(group, name, &order(models), config, placement).expect("job")
        };
        let mut config = config();
        let listing = group(&["object_detection"]);
        // Off (no linger): no carrier variables, no shape.
        let plain = built(
            &listing,
            "listing-42-g1",
            &["object_detection"],
            &config,
            &MAIN,
        );
        assert_eq!(job_shape(&plain), None);

        config.worker_linger = std::time::Duration::from_millis(5_500);
        let first = built(
            &listing,
            "listing-42-g1",
            &["object_detection"],
            &config,
            &MAIN,
        );
        let worker = &first
            .spec
            .as_ref()
            .expect("spec")
            .template
            .spec
            .as_ref()
            .expect("pod")
            .containers[0];
        let env = env_of(worker);
        assert_eq!(env["KINSIGHT_JOB_NAME"], "listing-42-g1");
        assert_eq!(env["KINSIGHT_WORKER_LINGER"], "5.5");
        let shape = job_shape(&first).expect("a shape");
        assert_eq!(env["KINSIGHT_WORKER_SHAPE"], shape);

        // Another group's Job (its own name, order URL and trace) has the same shape ...
        let mut other = group(&["object_detection"]);
        other.metadata.name = Some("listing-43".into());
        other.metadata.uid = Some("uid-2".into());
        other.metadata.annotations = Some(BTreeMap::from([(
            crate::trace::ANNOTATION.to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]));
        let second = built(
            &other,
            "listing-43-g1",
            &["object_detection"],
            &config,
            &MAIN,
        );
        assert_eq!(job_shape(&second).as_deref(), Some(shape.as_str()));
        // ... and a GPU model's Job, or other resources, another one.
        let gpu = built(&listing, "listing-42-g2", &["big_detector"], &config, &MAIN);
        assert_ne!(job_shape(&gpu).expect("a shape"), shape);
        let bigger = ControllerConfig {
            worker_memory: "4Gi".into(),
            ..config.clone()
        };
        let roomier = built(
            &listing,
            "listing-42-g1",
            &["object_detection"],
            &bigger,
            &MAIN,
        );
        assert_ne!(job_shape(&roomier).expect("a shape"), shape);
        // Kueue starts its Jobs itself: they neither carry nor are carried.
        let kueue = Placement::Kueue("team-a".into());
        let queued = built(
            &listing,
            "listing-42-g1",
            &["object_detection"],
            &config,
            &kueue,
        );
        assert_eq!(job_shape(&queued), None);

        // Carried: no pod of its own, and it says by whom.
        assert_eq!(carrier_of(&second), None);
        let carried = carried_job(second, "listing-42-g1");
        assert_eq!(carried.spec.as_ref().and_then(|s| s.parallelism), Some(0));
        assert_eq!(carrier_of(&carried), Some("listing-42-g1"));
    }

    #[test]
    fn a_standby_has_the_shape_of_the_namespaces_cpu_jobs_and_no_order_or_group() {
        let mut config = config();
        let idle = std::time::Duration::from_secs(600);
        // No linger: workers do not wait for orders, so there is no standby.
        assert_eq!(
            standby_job("tenant-a", 0, idle, &config).expect("built"),
            None
        );
        config.worker_linger = std::time::Duration::from_secs(5);
        let standby = standby_job("tenant-a", 0, idle, &config)
            .expect("built")
            .expect("a standby");
        let listing = group(&["object_detection"]);
        let cpu = build_job(
            &listing,
            "listing-42-g1",
            &order(&["object_detection"]),
            &config,
            &MAIN,
        )
        .expect("job");
        let gpu = build_job(
            &listing,
            "listing-42-g2",
            &order(&["big_detector"]),
            &config,
            &MAIN,
        )
        .expect("job");
        let shape = job_shape(&standby).expect("a shape");
        assert_eq!(job_shape(&cpu).as_deref(), Some(shape.as_str()));
        assert_ne!(job_shape(&gpu).as_deref(), Some(shape.as_str()));
        // Named by its shape and index, in the tenant's namespace, owned by no group.
        let name = standby.name_any();
        assert_eq!(name, format!("kinsight-standby-{}-0", &shape[..12]));
        assert_eq!(standby.namespace().as_deref(), Some("tenant-a"));
        assert!(standby.owner_references().is_empty());
        // A worker Job the watch sees and the scheduler does not count: no group, no lane.
        assert!(is_standby(&standby) && !is_standby(&cpu));
        let labels = standby.labels();
        assert_eq!(labels["app.kubernetes.io/component"], "worker");
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "kinsight-controller"
        );
        assert!(!labels.contains_key(GROUP_LABEL) && !labels.contains_key(LANE_LABEL));
        let spec = standby.spec.as_ref().expect("spec");
        assert_eq!(spec.active_deadline_seconds, None);
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone());
        assert_eq!(pod_labels.as_ref(), Some(labels));
        // No order of its own: it waits as itself, for up to its idle time.
        let env = env_of(&spec.template.spec.as_ref().expect("pod").containers[0]);
        assert!(!env.contains_key("KINSIGHT_WORK_ORDER_URL"), "{env:?}");
        assert_eq!(env["KINSIGHT_JOB_NAME"], name);
        assert_eq!(env["KINSIGHT_WORKER_SHAPE"], shape);
        assert_eq!(env["KINSIGHT_WORKER_LINGER"], "5");
        assert_eq!(env["KINSIGHT_WORKER_STANDBY"], "600");
        // Another index, another name; a changed setting, another shape and name.
        let second = standby_job("tenant-a", 1, idle, &config).expect("built");
        assert_eq!(
            second.map(|j| j.name_any()),
            Some(format!("kinsight-standby-{}-1", &shape[..12]))
        );
        config.worker_memory = "4Gi".into();
        let changed = standby_job("tenant-a", 0, idle, &config)
            .expect("built")
            .expect("a standby");
        assert_ne!(changed.name_any(), name);
    }

    #[test]
    fn gpu_settings_parse_from_helm_values() {
        // Helm's `toJson` of the chart's defaults.
        let settings = GpuSettings::parse(
            r#"{"resourceName":"nvidia.com/gpu","count":1,"nodeSelector":{},"tolerations":[],"runtimeClassName":""}"#,
        )
        .expect("defaults");
        assert_eq!(settings, GpuSettings::default());
        // YAML works too; missing fields keep their defaults.
        let settings =
            GpuSettings::parse("nodeSelector: {gpu: \"true\"}\nruntimeClassName: nvidia")
                .expect("yaml");
        assert_eq!(settings.resource_name, "nvidia.com/gpu");
        assert_eq!(settings.node_selector["gpu"], "true");
        assert_eq!(settings.runtime_class_name.as_deref(), Some("nvidia"));
        for (bad, expected) in [
            (r#"{"resourceName": "gpu"}"#, "extended resource"),
            (r#"{"count": 0}"#, "at least 1"),
            (r#"{"nodeSelectors": {}}"#, "unknown field `nodeSelectors`"),
            (r#"{"tolerations": "all"}"#, "tolerations"),
        ] {
            let err = GpuSettings::parse(bad).expect_err(bad);
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn job_names_are_deterministic_and_fit_labels() {
        assert_eq!(job_name("grp-abc", 3, 0), "grp-abc-g3");
        assert_eq!(job_name("grp-abc", 3, 4), "grp-abc-g3-4");
        let long = "x".repeat(80);
        let name = job_name(&long, 12, 0);
        assert!(name.len() <= 63, "{name}");
        assert!(name.ends_with("-g12"));
        assert_eq!(name, job_name(&long, 12, 0));
        assert_ne!(job_name(&"y".repeat(80), 12, 0), name);
        let shard = job_name(&long, 12, 9);
        assert!(shard.len() <= 63 && shard.ends_with("-g12-9"), "{shard}");
    }

    #[test]
    fn a_failed_workers_pods_say_how_it_ended() {
        let pod = |reason: Option<&str>, code: i32, limit: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({
                "spec": { "containers": [{
                    "name": "worker",
                    "resources": limit.map(|l| serde_json::json!({ "limits": { "memory": l } })),
                }]},
                "status": { "containerStatuses": [{
                    "name": "worker", "image": "kinsight", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": { "terminated": { "exitCode": code, "reason": reason } },
                }]},
            }))
            .expect("pod")
        };
        // An OOM kill wins over another pod's plain failure, and names the limit.
        let pods = [
            pod(Some("Error"), 1, None),
            pod(Some("OOMKilled"), 137, Some("64Mi")),
        ];
        assert_eq!(
            worker_termination(&pods).as_deref(),
            Some("the worker was OOMKilled (exit 137) at its memory limit of 64Mi")
        );
        assert_eq!(
            worker_termination(&[pod(Some("Error"), 2, None)]).as_deref(),
            Some("the worker exited with 2 (Error)")
        );
        // Killed at the limit, the OOM event missed: the limit is named all the same.
        assert_eq!(
            worker_termination(&[pod(Some("Error"), 137, Some("40Mi"))]).as_deref(),
            Some(
                "the worker was killed (exit 137, Error) with a memory limit of 40Mi: out of \
                 memory, or killed from outside"
            )
        );
        // A clean exit, or no pods left: nothing to add.
        assert_eq!(worker_termination(&[pod(Some("Completed"), 0, None)]), None);
        assert_eq!(worker_termination(&[]), None);
    }
}
