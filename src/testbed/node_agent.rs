//! A node agent that plays the kubelet for Jobs' pods, the way kwok simulates nodes.
//!
//! It registers a Node, binds unscheduled pods to it (there is no scheduler in the testbed),
//! runs the first container's `kinsight ...` command of each pod bound to it as a local
//! process, and reports the pod's phase and exit code back, so the real Job controller sees
//! workers start and finish. Each worker gets a kubeconfig with a token minted for its pod's
//! ServiceAccount (TokenRequest API), so it has exactly the RBAC it would have in a cluster.
//!
//! Node names must be unique per agent: at start, pods shown Running on this node have no
//! process any more and are failed with reason `NodeAgentRestarted`.
//!
//! Standing in for the scheduler, it binds only pods this node can take: their node selector
//! matches its labels, they tolerate its `NoSchedule`/`NoExecute` taints, and the extended
//! resources they ask for (GPUs) are within what it advertises
//! ([`NodeAgentOptions::extended_resources`], none by default). CPU and memory are not
//! counted; [`NodeAgentOptions::max_pods`] bounds the load instead.
//!
//! `configMap` volumes are written to a folder per pod. There is no mount namespace, so a
//! volume mount is imitated by rewriting: environment values and arguments that start with
//! the mount path are pointed at that folder instead (see [`mount_config_maps`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Container, EnvVar, Node, ObjectReference, Pod, Secret, ServiceAccount,
    Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinSet};

use super::{ServerTrust, TestbedError, now_rfc3339, write_token_kubeconfig};

/// The program name in a container command that maps to [`NodeAgentOptions::binary`].
pub const KINSIGHT_COMMAND: &str = "kinsight";
/// Pod (and container) reason when the command is not `kinsight ...`.
pub const REASON_UNSUPPORTED: &str = "UnsupportedImage";
/// Pod reason for pods that were running when a previous agent on this node went away.
pub const REASON_AGENT_RESTARTED: &str = "NodeAgentRestarted";
/// Pod reason when env or the ServiceAccount token could not be resolved in time.
pub const REASON_CONFIG_ERROR: &str = "CreateContainerConfigError";
/// Pod reason when the process could not be started.
pub const REASON_START_ERROR: &str = "StartError";

const NODE_IP: &str = "127.0.0.1";
const ONLY_KINSIGHT: &str = "this node agent runs only `kinsight ...` commands";
const ORPHAN_MESSAGE: &str =
    "the node agent restarted while this pod was running; its process is gone";
/// How long missing Secrets, ConfigMaps or ServiceAccounts are waited for.
const CONFIG_RETRY_FOR: Duration = Duration::from_secs(30);
const TOKEN_SECONDS: i64 = 24 * 3600;
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Environment passed through from the agent; the rest comes from the pod and the options.
const PASSTHROUGH_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ"];

/// How to run a [`run`] node agent.
#[derive(Debug, Clone)]
pub struct NodeAgentOptions {
    /// The Node object this agent registers and runs pods for.
    pub node_name: String,
    /// What a container's `command[0] == "kinsight"` runs: the project's own binary.
    pub binary: PathBuf,
    /// Pods' stdout and stderr go to `{log_dir}/{namespace}_{pod}.log`.
    pub log_dir: PathBuf,
    /// Added to every worker's environment (after the pod's own env).
    pub extra_env: Vec<(String, String)>,
    /// At most this many worker processes at once; other bound pods stay Pending.
    pub max_pods: usize,
    /// The API server URL written into workers' kubeconfigs. `None`: the ambient kube
    /// config's (`KUBECONFIG`, `~/.kube/config`).
    pub server_url: Option<String>,
    /// PEM CA bundle workers trust for that server; `None`: `insecure-skip-tls-verify`.
    pub server_ca_pem: Option<Vec<u8>>,
    /// Only take (bind and run) pods in this namespace; `None`: all namespaces. Lets several
    /// agents share one cluster, say tests against `USE_EXISTING_CLUSTER`.
    pub namespace: Option<String>,
    /// Extended resources the node advertises, e.g. `nvidia.com/gpu` -> `1`. Pods asking
    /// for one it lacks (or more of it) stay unbound, as on a cluster without such nodes.
    pub extended_resources: BTreeMap<String, String>,
    /// Labels the node gets besides `kubernetes.io/hostname`, `kubernetes.io/os` and `type`.
    pub node_labels: BTreeMap<String, String>,
    /// Taints of the node; pods must tolerate the `NoSchedule` and `NoExecute` ones.
    pub taints: Vec<Taint>,
}

impl Default for NodeAgentOptions {
    /// Node `kinsight-local`, this executable as the binary, logs under the temp folder.
    fn default() -> Self {
        NodeAgentOptions::new(
            "kinsight-local",
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from(KINSIGHT_COMMAND)),
            std::env::temp_dir().join("kinsight-pod-logs"),
        )
    }
}

impl NodeAgentOptions {
    /// Options with no extra env, 4 concurrent pods and the ambient server URL.
    pub fn new(
        node_name: impl Into<String>,
        binary: impl Into<PathBuf>,
        log_dir: impl Into<PathBuf>,
    ) -> Self {
        NodeAgentOptions {
            node_name: node_name.into(),
            binary: binary.into(),
            log_dir: log_dir.into(),
            extra_env: Vec::new(),
            max_pods: 4,
            server_url: None,
            server_ca_pem: None,
            namespace: None,
            extended_resources: BTreeMap::new(),
            node_labels: BTreeMap::new(),
            taints: Vec::new(),
        }
    }

    /// The node's labels: the standard ones and [`NodeAgentOptions::node_labels`].
    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_owned(), self.node_name.clone()),
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            ("type".to_owned(), "kinsight-node-agent".to_owned()),
        ]);
        labels.extend(self.node_labels.clone());
        labels
    }
}

/// Runs the node agent until the returned future is dropped (or the pod watch fails for
/// good). Dropping it kills every worker process it started.
pub async fn run(client: kube::Client, opts: NodeAgentOptions) -> Result<(), TestbedError> {
    if opts.node_name.is_empty() {
        return Err(TestbedError::Config("node agent needs a node name".into()));
    }
    if opts.max_pods == 0 {
        return Err(TestbedError::Config(
            "node agent max_pods must be at least 1".into(),
        ));
    }
    let (server_url, trust) = worker_server(&client, &opts).await?;
    tracing::debug!(%server_url, "workers' API server");
    std::fs::create_dir_all(&opts.log_dir)
        .map_err(|e| TestbedError::io(format!("creating {}", opts.log_dir.display()), e))?;
    // Workers' kubeconfigs (they hold tokens) and volumes live only as long as the agent.
    let state_dir = tempfile::Builder::new()
        .prefix("kinsight-node-agent-")
        .tempdir()
        .map_err(|e| TestbedError::io("creating the node agent's state folder", e))?;
    register_node(&client, &opts).await?;
    tracing::info!(node = %opts.node_name, max_pods = opts.max_pods, "node agent running");

    let ctx = Arc::new(Ctx {
        semaphore: Arc::new(Semaphore::new(opts.max_pods)),
        client: client.clone(),
        server_url,
        trust,
        state_dir: state_dir.path().to_path_buf(),
        opts,
    });
    let mut agent = Agent {
        ctx,
        tasks: JoinSet::new(),
        running: HashMap::new(),
        task_pods: HashMap::new(),
        done: HashSet::new(),
        unschedulable: HashSet::new(),
        listing: None,
    };
    let pods_api: Api<Pod> = match &agent.ctx.opts.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let pods = watcher(pods_api, watcher::Config::default()).default_backoff();
    let mut pods = std::pin::pin!(pods);
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    loop {
        tokio::select! {
            event = pods.next() => match event {
                Some(Ok(event)) => agent.on_event(event).await,
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch error (retrying)"),
                None => return Err(TestbedError::Config("the pod watch ended".into())),
            },
            Some(finished) = agent.tasks.join_next_with_id(), if !agent.tasks.is_empty() => {
                agent.on_task_finished(finished);
            }
            _ = heartbeat.tick() => {
                if let Err(e) = patch_node_status(&agent.ctx.client, &agent.ctx.opts).await {
                    tracing::warn!(error = %e, "node heartbeat failed");
                }
            }
        }
    }
}

/// Server URL and trust for workers' kubeconfigs: the options', else a loopback server
/// published in `kube-public/cluster-info` (a local control plane), else the ambient kube
/// config's, else any server in `cluster-info` (kubeadm clusters publish one).
async fn worker_server(
    client: &kube::Client,
    opts: &NodeAgentOptions,
) -> Result<(String, ServerTrust), TestbedError> {
    let trust = match &opts.server_ca_pem {
        Some(pem) => ServerTrust::CaPem(pem.clone()),
        None => ServerTrust::Insecure,
    };
    if let Some(url) = &opts.server_url {
        return Ok((url.clone(), trust));
    }
    let published = published_server(client).await;
    if let Some((url, published_trust)) = &published
        && is_loopback_url(url)
    {
        return Ok((url.clone(), opts_or(trust, published_trust)));
    }
    super::install_crypto_provider();
    match kube::Config::infer().await {
        Ok(config) => {
            let trust = match (&opts.server_ca_pem, &config.root_cert) {
                (None, Some(ders)) if !ders.is_empty() && !config.accept_invalid_certs => {
                    ServerTrust::CaPem(super::cluster::ders_to_pem(ders))
                }
                _ => trust,
            };
            Ok((config.cluster_url.to_string(), trust))
        }
        Err(e) => match published {
            Some((url, published_trust)) => Ok((url, opts_or(trust, &published_trust))),
            None => Err(TestbedError::Config(format!(
                "node agent: no server_url, no kube-public/cluster-info and no usable \
                 kubeconfig: {e}"
            ))),
        },
    }
}

/// The options' CA if they name one, else what the cluster published.
fn opts_or(from_opts: ServerTrust, published: &ServerTrust) -> ServerTrust {
    match from_opts {
        ServerTrust::CaPem(_) => from_opts,
        ServerTrust::Insecure => published.clone(),
    }
}

fn is_loopback_url(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The server in `kube-public/cluster-info`, with its CA if it has one.
async fn published_server(client: &kube::Client) -> Option<(String, ServerTrust)> {
    use super::control_plane::{CLUSTER_INFO_NAME, CLUSTER_INFO_NAMESPACE};
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), CLUSTER_INFO_NAMESPACE);
    let cm = cms.get_opt(CLUSTER_INFO_NAME).await.ok()??;
    let text = cm.data?.remove("kubeconfig")?;
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).ok()?;
    let cluster = kubeconfig.clusters.into_iter().find_map(|c| c.cluster)?;
    let server = cluster.server?;
    let trust = match cluster.certificate_authority_data {
        Some(data) if cluster.insecure_skip_tls_verify != Some(true) => {
            use base64::Engine as _;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(data)
                .ok()?;
            ServerTrust::CaPem(pem)
        }
        _ => ServerTrust::Insecure,
    };
    Some((server, trust))
}

struct Ctx {
    client: kube::Client,
    opts: NodeAgentOptions,
    server_url: String,
    trust: ServerTrust,
    /// Workers' kubeconfigs and configMap volumes.
    state_dir: PathBuf,
    semaphore: Arc<Semaphore>,
}

struct Agent {
    ctx: Arc<Ctx>,
    /// One task per pod this agent runs; dropping the set kills their processes.
    tasks: JoinSet<()>,
    /// Pod uid -> its task.
    running: HashMap<String, AbortHandle>,
    task_pods: HashMap<tokio::task::Id, String>,
    /// Pods this agent has finished with (never started again).
    done: HashSet<String>,
    /// Pods this node cannot take, already reported as such.
    unschedulable: HashSet<String>,
    /// Uids seen during a (re)list, to forget pods that went away meanwhile.
    listing: Option<HashSet<String>>,
}

impl Agent {
    async fn on_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.listing = Some(HashSet::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(seen), Some(uid)) = (self.listing.as_mut(), pod.metadata.uid.as_ref())
                {
                    seen.insert(uid.clone());
                }
                self.on_pod(pod).await;
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.listing.take() {
                    self.done.retain(|uid| seen.contains(uid));
                    self.unschedulable.retain(|uid| seen.contains(uid));
                    let gone: Vec<String> = self
                        .running
                        .keys()
                        .filter(|uid| !seen.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.stop(&uid);
                    }
                }
            }
            watcher::Event::Apply(pod) => self.on_pod(pod).await,
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.stop(uid);
                    self.done.remove(uid);
                    self.unschedulable.remove(uid);
                }
            }
        }
    }

    fn stop(&mut self, uid: &str) {
        if let Some(handle) = self.running.remove(uid) {
            tracing::info!(uid, "stopping the process of a deleted pod");
            handle.abort();
        }
    }

    fn on_task_finished(
        &mut self,
        finished: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) {
        let id = match &finished {
            Ok((id, ())) => *id,
            Err(e) => {
                if e.is_panic() {
                    tracing::error!(error = %e, "a pod task panicked");
                }
                e.id()
            }
        };
        if let Some(uid) = self.task_pods.remove(&id) {
            self.running.remove(&uid);
            self.done.insert(uid);
        }
    }

    async fn on_pod(&mut self, pod: Pod) {
        let (Some(uid), Some(namespace), Some(name), Some(spec)) = (
            pod.metadata.uid.clone(),
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
            pod.spec.as_ref(),
        ) else {
            return;
        };
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        match spec.node_name.as_deref().filter(|n| !n.is_empty()) {
            None => {
                let ours = matches!(
                    spec.scheduler_name.as_deref(),
                    None | Some("") | Some("default-scheduler")
                );
                if !(ours && !deleting && phase == "Pending") {
                    return;
                }
                match unfit_reason(&pod, &self.ctx.opts) {
                    None => bind(&pods, &name, &self.ctx.opts.node_name).await,
                    Some(reason) => {
                        if self.unschedulable.insert(uid.clone()) {
                            let key = PodKey {
                                namespace,
                                name,
                                uid,
                            };
                            tracing::info!(pod = %key, %reason, "not binding a pod this node cannot take");
                            report_unschedulable(&self.ctx, &key, &reason).await;
                        }
                    }
                }
            }
            Some(node) if node == self.ctx.opts.node_name => {
                if deleting {
                    // Graceful deletion waits for the kubelet: stop, then finish the delete.
                    self.stop(&uid);
                    self.done.insert(uid.clone());
                    if pod.metadata.deletion_grace_period_seconds != Some(0) {
                        let dp = DeleteParams {
                            grace_period_seconds: Some(0),
                            preconditions: Some(Preconditions {
                                uid: Some(uid.clone()),
                                resource_version: None,
                            }),
                            ..DeleteParams::default()
                        };
                        match pods.delete(&name, &dp).await {
                            Ok(_) => {}
                            Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => {}
                            Err(e) => tracing::warn!(
                                %namespace, pod = %name, error = %e,
                                "finishing a pod's deletion failed"
                            ),
                        }
                    }
                    return;
                }
                if self.running.contains_key(&uid) || self.done.contains(&uid) {
                    return;
                }
                match phase {
                    "Succeeded" | "Failed" => {
                        self.done.insert(uid);
                    }
                    "Pending" => {
                        let ctx = self.ctx.clone();
                        let handle = self.tasks.spawn(run_pod(ctx, pod));
                        self.task_pods.insert(handle.id(), uid.clone());
                        self.running.insert(uid, handle);
                    }
                    _ => {
                        // Shown running here, but no process of ours: an earlier agent died.
                        self.done.insert(uid.clone());
                        let key = PodKey {
                            namespace,
                            name,
                            uid,
                        };
                        let container = first_container(&pod);
                        let started_at = running_started_at(&pod);
                        tracing::warn!(pod = %key, "failing a pod an earlier node agent ran");
                        let ctx = self.ctx.clone();
                        self.tasks.spawn(async move {
                            let end = Ending {
                                exit_code: 137,
                                reason: REASON_AGENT_RESTARTED.into(),
                                message: Some(ORPHAN_MESSAGE.into()),
                                pod_reason: true,
                                started_at,
                                finished_at: now_rfc3339(),
                            };
                            report_finished(&ctx, &key, &container, 0, &end).await;
                        });
                    }
                }
            }
            Some(_) => {}
        }
    }
}

async fn bind(pods: &Api<Pod>, name: &str, node: &str) {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..ObjectReference::default()
        },
    };
    match pods
        .create_subresource::<_, Value>("binding", name, &PostParams::default(), &binding)
        .await
    {
        Ok(_) => tracing::debug!(pod = name, node, "bound"),
        // Already bound (by us on an earlier event, or by someone else) or gone.
        Err(kube::Error::Api(s)) if s.code == 409 || s.is_not_found() => {}
        Err(e) => tracing::warn!(pod = name, error = %e, "binding failed"),
    }
}

/// Why this node cannot take the pod, or `None` when it can: what the scheduler (and the
/// kubelet's admission) would find against the node selector, the node's taints and its
/// extended resources. Node affinity is not looked at.
fn unfit_reason(pod: &Pod, opts: &NodeAgentOptions) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let labels = opts.labels();
    for (key, value) in spec.node_selector.iter().flatten() {
        if labels.get(key) != Some(value) {
            return Some(format!(
                "node selector {key}={value} does not match the node's labels"
            ));
        }
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    for taint in &opts.taints {
        let repels = matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute");
        if repels && !tolerations.iter().any(|t| tolerates(t, taint)) {
            let value = taint.value.as_deref().unwrap_or_default();
            return Some(format!(
                "the node's taint {}={value}:{} is not tolerated",
                taint.key, taint.effect
            ));
        }
    }
    let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
    for container in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let resources = container.resources.as_ref();
        // The API server defaults requests to limits; read limits should requests be absent.
        let amounts = resources
            .and_then(|r| r.requests.as_ref())
            .or_else(|| resources.and_then(|r| r.limits.as_ref()));
        for (name, quantity) in amounts.into_iter().flatten() {
            if !is_extended_resource(name) {
                continue;
            }
            let Ok(count) = quantity.0.parse::<u64>() else {
                return Some(format!("{name}: {:?} is not a whole number", quantity.0));
            };
            *wanted.entry(name.as_str()).or_default() += count;
        }
    }
    for (name, count) in wanted {
        let offered = opts
            .extended_resources
            .get(name)
            .and_then(|q| q.parse::<u64>().ok())
            .unwrap_or(0);
        if count > offered {
            return Some(format!(
                "Insufficient {name}: the pod asks for {count}, the node has {offered}"
            ));
        }
    }
    None
}

/// Kubernetes' toleration matching (an empty key with `Exists` tolerates every taint).
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or_default();
    let exists = toleration.operator.as_deref() == Some("Exists");
    let key_ok = (key.is_empty() && exists) || key == taint.key;
    let value_ok = exists
        || toleration.value.as_deref().unwrap_or_default()
            == taint.value.as_deref().unwrap_or_default();
    effect_ok && key_ok && value_ok
}

/// Device-plugin resources such as `nvidia.com/gpu` (not cpu, memory, storage, hugepages).
fn is_extended_resource(name: &str) -> bool {
    name.split_once('/')
        .is_some_and(|(domain, _)| !domain.ends_with("kubernetes.io") && domain != "requests")
}

/// What `kubectl describe pod` shows for a pod no node fits.
async fn report_unschedulable(ctx: &Ctx, key: &PodKey, reason: &str) {
    let mut scheduled = condition("PodScheduled", false, Some("Unschedulable"), &now_rfc3339());
    scheduled["message"] = format!("0/1 nodes are available: {reason}").into();
    patch_pod_status(ctx, key, json!({ "conditions": [scheduled] })).await;
}

#[derive(Debug, Clone)]
struct PodKey {
    namespace: String,
    name: String,
    uid: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a container run ended, as reported in its `state.terminated`.
#[derive(Debug, Clone)]
struct Ending {
    exit_code: i32,
    reason: String,
    message: Option<String>,
    /// Also set the pod-level `reason`/`message` (for failures of the agent, not the worker).
    pod_reason: bool,
    started_at: Option<String>,
    finished_at: String,
}

impl Ending {
    fn before_start(reason: &str, exit_code: i32, message: String) -> Ending {
        let now = now_rfc3339();
        Ending {
            exit_code,
            reason: reason.to_string(),
            message: Some(message),
            pod_reason: true,
            started_at: Some(now.clone()),
            finished_at: now,
        }
    }

    fn terminated(&self) -> Value {
        let mut t = json!({
            "exitCode": self.exit_code,
            "reason": self.reason,
            "finishedAt": self.finished_at,
        });
        if let Some(s) = &self.started_at {
            t["startedAt"] = s.clone().into();
        }
        if let Some(m) = &self.message {
            t["message"] = m.clone().into();
        }
        t
    }
}

/// What a pod's first container resolves to on this node.
#[derive(Debug, Clone, PartialEq)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Why a pod cannot be started; `retry` when waiting may help (a Secret not created yet).
#[derive(Debug, Clone, PartialEq)]
struct Refusal {
    reason: &'static str,
    exit_code: i32,
    message: String,
    retry: bool,
}

impl Refusal {
    fn fatal(reason: &'static str, exit_code: i32, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            exit_code,
            message: message.into(),
            retry: false,
        }
    }

    fn config(message: impl Into<String>, retry: bool) -> Refusal {
        Refusal {
            reason: REASON_CONFIG_ERROR,
            exit_code: 128,
            message: message.into(),
            retry,
        }
    }
}

/// Runs one pod to completion (restarting its process per `restartPolicy`).
async fn run_pod(ctx: Arc<Ctx>, pod: Pod) {
    let key = PodKey {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    };
    let container = first_container(&pod);
    let Ok(_permit) = ctx.semaphore.clone().acquire_owned().await else {
        return;
    };
    let deadline = Instant::now() + CONFIG_RETRY_FOR;
    let (launch, _kubeconfig) = loop {
        match prepare(&ctx, &pod, &key).await {
            Ok(ready) => break ready,
            Err(refusal) if refusal.retry && Instant::now() < deadline => {
                tracing::debug!(pod = %key, reason = %refusal.message, "waiting to start");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(refusal) => {
                tracing::warn!(
                    pod = %key, reason = refusal.reason, message = %refusal.message,
                    "cannot start pod"
                );
                let end = Ending::before_start(refusal.reason, refusal.exit_code, refusal.message);
                report_finished(&ctx, &key, &container, 0, &end).await;
                return;
            }
        }
    };
    let restart_policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    let log_path = ctx
        .opts
        .log_dir
        .join(format!("{}_{}.log", key.namespace, key.name));
    let mut restart_count: i32 = 0;
    let mut last_state = json!({});
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut child = match spawn(&launch, &log_path) {
            Ok(child) => child,
            Err(message) => {
                let end = Ending::before_start(REASON_START_ERROR, 128, message);
                report_finished(&ctx, &key, &container, restart_count, &end).await;
                return;
            }
        };
        let started_at = now_rfc3339();
        let pid = child.id().unwrap_or_default();
        tracing::info!(pod = %key, pid, program = %launch.program.display(), "started");
        report_running(
            &ctx,
            &key,
            &container,
            pid,
            restart_count,
            &started_at,
            &last_state,
        )
        .await;
        let exit_code = match child.wait().await {
            Ok(status) => exit_code_of(status),
            Err(e) => {
                tracing::warn!(pod = %key, error = %e, "waiting for the process failed");
                let _ = child.kill().await;
                128
            }
        };
        let end = Ending {
            exit_code,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            pod_reason: false,
            started_at: Some(started_at),
            finished_at: now_rfc3339(),
        };
        tracing::info!(pod = %key, exit_code, "process exited");
        let restart = match restart_policy.as_str() {
            "Always" => true,
            "OnFailure" => exit_code != 0,
            _ => false,
        };
        if !restart {
            report_finished(&ctx, &key, &container, restart_count, &end).await;
            return;
        }
        restart_count = restart_count.saturating_add(1);
        last_state = json!({ "terminated": end.terminated() });
        report_backoff(&ctx, &key, &container, restart_count, &last_state).await;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn spawn(launch: &Launch, log_path: &Path) -> Result<tokio::process::Child, String> {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))
    };
    let stdout = open()?;
    let stderr = open()?;
    tokio::process::Command::new(&launch.program)
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", launch.program.display()))
}

fn exit_code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 128,
    }
}

/// Files a pod's task leaves on this machine (the worker kubeconfig, which holds a token;
/// its volumes), deleted when the task ends.
#[derive(Default)]
struct PodFiles(Vec<PathBuf>);

impl Drop for PodFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
        }
    }
}

/// Resolves the command, environment, volumes and ServiceAccount kubeconfig of a pod.
async fn prepare(ctx: &Ctx, pod: &Pod, key: &PodKey) -> Result<(Launch, PodFiles), Refusal> {
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .ok_or_else(|| Refusal::fatal(REASON_UNSUPPORTED, 127, "the pod has no containers"))?;
    let (program, raw_args) = map_command(container, &ctx.opts.binary)?;
    let mut files = PodFiles::default();
    let mounts = mount_config_maps(ctx, pod, container, key, &mut files).await?;
    let mut env = Env::default();
    for name in PASSTHROUGH_ENV {
        if let Ok(value) = std::env::var(name) {
            env.set(name, value);
        }
    }
    env.set("HOSTNAME", key.name.clone());
    resolve_env(ctx, pod, container, &key.namespace, &mut env).await?;
    let args = raw_args
        .iter()
        .map(|a| redirect(&expand_vars(a, &env), &mounts))
        .collect();
    for (_, value) in &mut env.vars {
        *value = redirect(value, &mounts);
    }
    for (k, v) in &ctx.opts.extra_env {
        env.set(k, v.clone());
    }
    if let Some(path) = service_account_kubeconfig(ctx, pod, key).await? {
        env.set("KUBECONFIG", path.display().to_string());
        files.0.push(path);
    }
    Ok((
        Launch {
            program,
            args,
            env: env.vars,
        },
        files,
    ))
}

/// A volume mount as this agent imitates it: the mount path and the local folder it stands for.
type Mount = (String, PathBuf);

/// Writes the `configMap` volumes the container mounts into a folder per pod, and returns
/// each mount path with its folder, longest path first (other volume types are not
/// supported and are left out).
///
/// This is the testbed's stand-in for a mount. There is no container runtime and no mount
/// namespace, so the process cannot see files at the mount path; instead [`redirect`]
/// rewrites environment values and arguments that start with a mount path to the same
/// path under its folder. A program that builds such paths by itself is not redirected.
async fn mount_config_maps(
    ctx: &Ctx,
    pod: &Pod,
    container: &Container,
    key: &PodKey,
    files: &mut PodFiles,
) -> Result<Vec<Mount>, Refusal> {
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    let pod_dir = ctx.state_dir.join(format!(
        "{}_{}_{}-volumes",
        key.namespace, key.name, key.uid
    ));
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.config_map.as_ref());
        let Some(source) = source else { continue };
        let folder = pod_dir.join(&mount.name);
        if !files.0.contains(&pod_dir) {
            files.0.push(pod_dir.clone());
        }
        let optional = source.optional == Some(true);
        let entries = match get_object(&config_maps, &source.name, "configmap").await? {
            Some(cm) => config_map_files(&cm),
            None if optional => BTreeMap::new(),
            None => {
                return Err(Refusal::config(
                    format!("configmap {}/{} not found", key.namespace, source.name),
                    true,
                ));
            }
        };
        // `items` picks keys and names their files; without it every key is a file.
        let wanted: Vec<(String, String)> = match &source.items {
            Some(items) => items
                .iter()
                .map(|i| (i.key.clone(), i.path.clone()))
                .collect(),
            None => entries.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        std::fs::create_dir_all(&folder)
            .map_err(|e| Refusal::config(format!("creating {}: {e}", folder.display()), false))?;
        for (entry, file) in wanted {
            let Some(bytes) = entries.get(&entry) else {
                if optional {
                    continue;
                }
                return Err(Refusal::config(
                    format!(
                        "configmap {}/{} has no key {entry}",
                        key.namespace, source.name
                    ),
                    true,
                ));
            };
            let relative = Path::new(&file);
            if !relative
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return Err(Refusal::config(
                    format!(
                        "volume {}: item path {file:?} leaves the volume",
                        mount.name
                    ),
                    false,
                ));
            }
            let target = folder.join(relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    Refusal::config(format!("creating {}: {e}", parent.display()), false)
                })?;
            }
            std::fs::write(&target, bytes).map_err(|e| {
                Refusal::config(format!("writing {}: {e}", target.display()), false)
            })?;
        }
        let path = match mount.sub_path.as_deref().filter(|p| !p.is_empty()) {
            Some(sub) => folder.join(sub),
            None => folder,
        };
        mounts.push((mount.mount_path.trim_end_matches('/').to_owned(), path));
    }
    // A root mount would swallow every absolute path: not something to imitate.
    mounts.retain(|(mount_path, _)| !mount_path.is_empty());
    mounts.sort_by_key(|(mount_path, _)| std::cmp::Reverse(mount_path.len()));
    Ok(mounts)
}

/// A ConfigMap's entries as file contents (`data` and `binaryData`).
fn config_map_files(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let text = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()));
    let binary = cm
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()));
    text.chain(binary).collect()
}

/// `value` with a leading mount path replaced by its folder (see [`mount_config_maps`]).
fn redirect(value: &str, mounts: &[Mount]) -> String {
    for (mount_path, folder) in mounts {
        if value == mount_path {
            return folder.display().to_string();
        }
        if let Some(rest) = value
            .strip_prefix(mount_path.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            return folder.join(rest).display().to_string();
        }
    }
    value.to_owned()
}

/// `kinsight ...` (or a path ending in `/kinsight`) runs `binary`; anything else is refused.
fn map_command(container: &Container, binary: &Path) -> Result<(PathBuf, Vec<String>), Refusal> {
    let image = container.image.as_deref().unwrap_or("");
    let mut words = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten());
    let Some(first) = container.command.as_ref().and_then(|c| c.first()) else {
        return Err(Refusal::fatal(
            REASON_UNSUPPORTED,
            127,
            format!(
                "container {:?} (image {image:?}) has no command; {ONLY_KINSIGHT}",
                container.name
            ),
        ));
    };
    let is_kinsight =
        Path::new(first).file_name().and_then(|f| f.to_str()) == Some(KINSIGHT_COMMAND);
    if !is_kinsight {
        return Err(Refusal::fatal(
            REASON_UNSUPPORTED,
            127,
            format!(
                "container {:?} (image {image:?}) runs {first:?}; {ONLY_KINSIGHT}",
                container.name
            ),
        ));
    }
    words.next();
    Ok((binary.to_path_buf(), words.cloned().collect()))
}

/// An ordered environment where later settings replace earlier ones.
#[derive(Debug, Default, Clone, PartialEq)]
struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_string(), value)),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Kubernetes' `$(VAR)` expansion: defined variables are substituted, `$$` is a literal `$`,
/// anything else is left as written.
fn expand_vars(input: &str, env: &Env) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(value) = env.get(&inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

async fn resolve_env(
    ctx: &Ctx,
    pod: &Pod,
    container: &Container,
    namespace: &str,
    env: &mut Env,
) -> Result<(), Refusal> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(r) = &source.config_map_ref {
            match get_object(&config_maps, &r.name, "configmap").await? {
                Some(cm) => {
                    for (k, v) in config_map_entries(&cm) {
                        env.set(&format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(Refusal::config(
                        format!("configmap {namespace}/{} not found", r.name),
                        true,
                    ));
                }
            }
        }
        if let Some(r) = &source.secret_ref {
            match get_object(&secrets, &r.name, "secret").await? {
                Some(secret) => {
                    for (k, v) in secret.data.iter().flatten() {
                        let v = String::from_utf8(v.0.clone()).map_err(|_| {
                            Refusal::config(
                                format!("secret {namespace}/{} key {k} is not UTF-8", r.name),
                                false,
                            )
                        })?;
                        env.set(&format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(Refusal::config(
                        format!("secret {namespace}/{} not found", r.name),
                        true,
                    ));
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = env_value(pod, var, &secrets, &config_maps, namespace, env).await? {
            env.set(&var.name, value);
        }
    }
    Ok(())
}

/// One `env` entry's value; `None` when an optional reference is missing.
async fn env_value(
    pod: &Pod,
    var: &EnvVar,
    secrets: &Api<Secret>,
    config_maps: &Api<ConfigMap>,
    namespace: &str,
    env: &Env,
) -> Result<Option<String>, Refusal> {
    let Some(from) = &var.value_from else {
        return Ok(Some(expand_vars(var.value.as_deref().unwrap_or(""), env)));
    };
    if let Some(field) = &from.field_ref {
        return field_value(pod, &field.field_path)
            .map(Some)
            .ok_or_else(|| {
                Refusal::config(
                    format!(
                        "env {}: unsupported fieldRef {:?}",
                        var.name, field.field_path
                    ),
                    false,
                )
            });
    }
    if let Some(sel) = &from.secret_key_ref {
        let optional = sel.optional == Some(true);
        let Some(secret) = get_object(secrets, &sel.name, "secret").await? else {
            return missing(
                optional,
                format!("secret {namespace}/{} not found", sel.name),
            );
        };
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&sel.key)) else {
            return missing(
                optional,
                format!("secret {namespace}/{} has no key {}", sel.name, sel.key),
            );
        };
        return String::from_utf8(bytes.0.clone()).map(Some).map_err(|_| {
            Refusal::config(
                format!(
                    "secret {namespace}/{} key {} is not UTF-8",
                    sel.name, sel.key
                ),
                false,
            )
        });
    }
    if let Some(sel) = &from.config_map_key_ref {
        let optional = sel.optional == Some(true);
        let Some(cm) = get_object(config_maps, &sel.name, "configmap").await? else {
            return missing(
                optional,
                format!("configmap {namespace}/{} not found", sel.name),
            );
        };
        return match config_map_entries(&cm)
            .into_iter()
            .find(|(k, _)| *k == sel.key)
        {
            Some((_, v)) => Ok(Some(v)),
            None => missing(
                optional,
                format!("configmap {namespace}/{} has no key {}", sel.name, sel.key),
            ),
        };
    }
    Err(Refusal::config(
        format!(
            "env {}: unsupported valueFrom (only fieldRef, secretKeyRef, configMapKeyRef)",
            var.name
        ),
        false,
    ))
}

fn missing(optional: bool, message: String) -> Result<Option<String>, Refusal> {
    if optional {
        Ok(None)
    } else {
        Err(Refusal::config(message, true))
    }
}

async fn get_object<K>(api: &Api<K>, name: &str, what: &str) -> Result<Option<K>, Refusal>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| Refusal::config(format!("reading {what} {name}: {e}"), true))
}

/// A ConfigMap's entries; `binaryData` only when it is UTF-8.
fn config_map_entries(cm: &ConfigMap) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        if let Ok(text) = String::from_utf8(v.0.clone()) {
            out.push((k.clone(), text));
        }
    }
    out
}

/// The downward-API fields a kubelet resolves for `fieldRef`.
fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let subscript = |prefix: &str| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(key.to_string())
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => Some(service_account_name(pod)),
        "status.hostIP" | "status.podIP" | "status.hostIPs" | "status.podIPs" => {
            Some(NODE_IP.to_string())
        }
        _ => {
            if let Some(key) = subscript("metadata.labels['") {
                Some(meta.labels.as_ref()?.get(&key)?.clone())
            } else if let Some(key) = subscript("metadata.annotations['") {
                Some(meta.annotations.as_ref()?.get(&key)?.clone())
            } else {
                None
            }
        }
    }
}

fn service_account_name(pod: &Pod) -> String {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.service_account_name.clone())
        .or_else(|| spec.and_then(|s| s.service_account.clone()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// Mints a token for the pod's ServiceAccount and writes a kubeconfig with it; `None` when
/// the pod opts out of automounting.
async fn service_account_kubeconfig(
    ctx: &Ctx,
    pod: &Pod,
    key: &PodKey,
) -> Result<Option<PathBuf>, Refusal> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.automount_service_account_token)
        == Some(false)
    {
        return Ok(None);
    }
    let sa_name = service_account_name(pod);
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &key.namespace);
    // Bind the token to the pod (it dies with it) when the pod names its ServiceAccount; the
    // API server refuses the binding for pods that leave it to defaulting (no admission
    // plugin fills it in here), and those get an unbound, expiring token.
    let names_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .is_some_and(|n| n == sa_name);
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: names_account.then(|| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(key.name.clone()),
                uid: Some(key.uid.clone()),
            }),
        },
        status: None,
    };
    let minted = accounts
        .create_subresource::<_, TokenRequest>("token", &sa_name, &PostParams::default(), &request)
        .await;
    let token = match minted {
        Ok(tr) => tr.status.map(|s| s.token).filter(|t| !t.is_empty()),
        Err(kube::Error::Api(s)) if s.is_not_found() => {
            if sa_name == "default" {
                // No serviceaccount controller runs in the testbed; a cluster would have one.
                create_default_service_account(&accounts).await;
            }
            return Err(Refusal::config(
                format!("serviceaccount {}/{sa_name} not found", key.namespace),
                true,
            ));
        }
        Err(e) => {
            return Err(Refusal::config(
                format!(
                    "minting a token for serviceaccount {}/{sa_name}: {e}",
                    key.namespace
                ),
                is_transient(&e),
            ));
        }
    };
    let Some(token) = token else {
        return Err(Refusal::config("the TokenRequest returned no token", true));
    };
    let path = ctx.state_dir.join(format!(
        "{}_{}_{}.kubeconfig",
        key.namespace, key.name, key.uid
    ));
    write_token_kubeconfig(&path, &ctx.server_url, &ctx.trust, &token, &key.namespace)
        .map_err(|e| Refusal::config(e.to_string(), false))?;
    Ok(Some(path))
}

/// Whether retrying a failed call may help (not for requests the server rejects as invalid).
fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => !(400..500).contains(&s.code) || matches!(s.code, 404 | 409 | 429),
        _ => true,
    }
}

async fn create_default_service_account(accounts: &Api<ServiceAccount>) {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    match accounts.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => tracing::warn!(error = %e, "creating the default serviceaccount failed"),
    }
}

/// Name and image of the container the agent runs (the first one).
#[derive(Debug, Clone, Default)]
struct ContainerInfo {
    name: String,
    image: String,
}

fn first_container(pod: &Pod) -> ContainerInfo {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| ContainerInfo {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
        })
        .unwrap_or_default()
}

fn running_started_at(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let started = statuses
        .first()?
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()?;
    serde_json::to_value(started)
        .ok()?
        .as_str()
        .map(str::to_string)
}

fn condition(kind: &str, status: bool, reason: Option<&str>, now: &str) -> Value {
    let mut c = json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "lastTransitionTime": now,
        "lastProbeTime": null,
    });
    if let Some(r) = reason {
        c["reason"] = r.into();
    }
    c
}

async fn report_running(
    ctx: &Ctx,
    key: &PodKey,
    container: &ContainerInfo,
    pid: u32,
    restart_count: i32,
    started_at: &str,
    last_state: &Value,
) {
    let now = now_rfc3339();
    let mut status = json!({
        "phase": "Running",
        "hostIP": NODE_IP,
        "podIP": NODE_IP,
        "podIPs": [{ "ip": NODE_IP }],
        "conditions": [
            condition("PodScheduled", true, None, &now),
            condition("Initialized", true, None, &now),
            condition("ContainersReady", true, None, &now),
            condition("Ready", true, None, &now),
        ],
        "containerStatuses": [{
            "name": container.name,
            "image": container.image,
            "imageID": "",
            "containerID": format!("kinsight://{pid}"),
            "ready": true,
            "started": true,
            "restartCount": restart_count,
            "state": { "running": { "startedAt": started_at } },
            "lastState": last_state,
        }],
    });
    if restart_count == 0 {
        // The pod's start, not the latest restart's.
        status["startTime"] = started_at.into();
    }
    patch_pod_status(ctx, key, status).await;
}

async fn report_backoff(
    ctx: &Ctx,
    key: &PodKey,
    container: &ContainerInfo,
    restart_count: i32,
    last_state: &Value,
) {
    let now = now_rfc3339();
    let status = json!({
        "conditions": [
            condition("PodScheduled", true, None, &now),
            condition("Initialized", true, None, &now),
            condition("ContainersReady", false, Some("ContainersNotReady"), &now),
            condition("Ready", false, Some("ContainersNotReady"), &now),
        ],
        "containerStatuses": [{
            "name": container.name,
            "image": container.image,
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": restart_count,
            "state": { "waiting": { "reason": "CrashLoopBackOff" } },
            "lastState": last_state,
        }],
    });
    patch_pod_status(ctx, key, status).await;
}

async fn report_finished(
    ctx: &Ctx,
    key: &PodKey,
    container: &ContainerInfo,
    restart_count: i32,
    end: &Ending,
) {
    let now = now_rfc3339();
    let phase = if end.exit_code == 0 {
        "Succeeded"
    } else {
        "Failed"
    };
    let mut status = json!({
        "phase": phase,
        "hostIP": NODE_IP,
        "conditions": [
            condition("PodScheduled", true, None, &now),
            condition("Initialized", true, None, &now),
            condition("ContainersReady", false, Some("PodCompleted"), &now),
            condition("Ready", false, Some("PodCompleted"), &now),
        ],
        "containerStatuses": [{
            "name": container.name,
            "image": container.image,
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": restart_count,
            "state": { "terminated": end.terminated() },
        }],
    });
    if end.pod_reason {
        // Set when the agent ends a pod itself (it may never have started).
        if let Some(started) = &end.started_at {
            status["startTime"] = started.clone().into();
        }
        status["reason"] = end.reason.clone().into();
        if let Some(m) = &end.message {
            status["message"] = m.clone().into();
        }
    }
    patch_pod_status(ctx, key, status).await;
}

/// Merge-patches a pod's status, guarded by its uid so a same-named new pod is left alone.
async fn patch_pod_status(ctx: &Ctx, key: &PodKey, status: Value) {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let patch = json!({ "metadata": { "uid": key.uid }, "status": status });
    for attempt in 1..=5 {
        match pods
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => return,
            Err(e) => {
                tracing::warn!(pod = %key, attempt, error = %e, "patching pod status failed");
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
        }
    }
}

/// Creates (or refreshes) the Node object, with its labels and taints, and marks it Ready.
async fn register_node(client: &kube::Client, opts: &NodeAgentOptions) -> Result<(), TestbedError> {
    let node_name = opts.node_name.as_str();
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = opts.labels();
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node_name, "labels": labels },
        "spec": { "taints": opts.taints },
    }))
    .map_err(|e| TestbedError::Config(format!("node object: {e}")))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let patch =
                json!({ "metadata": { "labels": labels }, "spec": { "taints": opts.taints } });
            nodes
                .patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| TestbedError::kube(format!("labelling node {node_name}"), e))?;
        }
        Err(e) => return Err(TestbedError::kube(format!("creating node {node_name}"), e)),
    }
    patch_node_status(client, opts)
        .await
        .map_err(|e| TestbedError::kube(format!("marking node {node_name} ready"), e))
}

async fn patch_node_status(
    client: &kube::Client,
    opts: &NodeAgentOptions,
) -> Result<(), kube::Error> {
    let node_name = opts.node_name.as_str();
    let nodes: Api<Node> = Api::all(client.clone());
    let now = now_rfc3339();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut resources =
        json!({ "cpu": cpus.to_string(), "memory": memory_quantity(), "pods": "110" });
    for (name, quantity) in &opts.extended_resources {
        resources[name] = quantity.clone().into();
    }
    let status = json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kinsight node agent is ready",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
            "addresses": [
                { "type": "InternalIP", "address": NODE_IP },
                { "type": "Hostname", "address": node_name },
            ],
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "",
                "kernelVersion": "", "osImage": "kinsight node agent",
                "containerRuntimeVersion": "kinsight://local-process",
                "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
            },
        }
    });
    nodes
        .patch_status(node_name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map(|_| ())
}

/// Total memory from `/proc/meminfo` as a quantity (`8Gi` if unknown).
fn memory_quantity() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{kib}Ki"))
        })
        .unwrap_or_else(|| "8Gi".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(command: Option<&[&str]>, args: Option<&[&str]>) -> Container {
        Container {
            name: "worker".into(),
            image: Some("ghcr.io/x/kinsight:1".into()),
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            args: args.map(|c| c.iter().map(|s| s.to_string()).collect()),
            ..Container::default()
        }
    }

    #[test]
    fn kinsight_maps_to_the_binary() {
        let bin = Path::new("/opt/kinsight");
        let c = container(Some(&["kinsight", "worker"]), Some(&["--job", "a"]));
        let (program, args) = map_command(&c, bin).expect("mapped");
        assert_eq!(program, bin);
        assert_eq!(args, ["worker", "--job", "a"]);
        let c = container(Some(&["/usr/local/bin/kinsight"]), None);
        assert_eq!(
            map_command(&c, bin).expect("mapped").1,
            Vec::<String>::new()
        );
    }

    #[test]
    fn other_programs_are_refused() {
        let bin = Path::new("/opt/kinsight");
        for c in [
            container(Some(&["python", "x.py"]), None),
            container(None, Some(&["kinsight"])),
            container(Some(&[]), None),
        ] {
            let refusal = map_command(&c, bin).expect_err("refused");
            assert_eq!(refusal.reason, REASON_UNSUPPORTED);
            assert!(!refusal.retry);
        }
    }

    #[test]
    fn var_expansion_follows_kubernetes() {
        let mut env = Env::default();
        env.set("A", "x".into());
        env.set("B", "y".into());
        env.set("A", "z".into());
        assert_eq!(env.vars.len(), 2);
        assert_eq!(expand_vars("$(A)-$(B)", &env), "z-y");
        assert_eq!(expand_vars("$$(A)", &env), "$(A)");
        assert_eq!(expand_vars("$(NOPE) $(A", &env), "$(NOPE) $(A");
        assert_eq!(expand_vars("cost $5 $", &env), "cost $5 $");
        assert_eq!(expand_vars("héllo $(B)é", &env), "héllo yé");
    }

    #[test]
    fn field_refs_resolve() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u1",
                "labels": { "job-name": "j" }, "annotations": { "a/b": "c" }
            },
            "spec": { "containers": [{ "name": "w" }], "nodeName": "n1" }
        }))
        .expect("pod");
        assert_eq!(field_value(&pod, "metadata.name").as_deref(), Some("p"));
        assert_eq!(
            field_value(&pod, "metadata.namespace").as_deref(),
            Some("ns")
        );
        assert_eq!(field_value(&pod, "metadata.uid").as_deref(), Some("u1"));
        assert_eq!(field_value(&pod, "spec.nodeName").as_deref(), Some("n1"));
        assert_eq!(
            field_value(&pod, "spec.serviceAccountName").as_deref(),
            Some("default")
        );
        assert_eq!(
            field_value(&pod, "metadata.labels['job-name']").as_deref(),
            Some("j")
        );
        assert_eq!(
            field_value(&pod, "metadata.annotations['a/b']").as_deref(),
            Some("c")
        );
        assert_eq!(field_value(&pod, "metadata.labels['none']"), None);
        assert_eq!(field_value(&pod, "spec.weird"), None);
    }

    #[test]
    fn odd_pods_do_not_panic() {
        let pod: Pod = serde_json::from_value(json!({ "metadata": {} })).expect("pod");
        assert_eq!(first_container(&pod).name, "");
        assert_eq!(service_account_name(&pod), "default");
        assert_eq!(running_started_at(&pod), None);
    }

    #[test]
    fn started_at_is_read_back() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {},
            "status": { "containerStatuses": [{
                "name": "w", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                "state": { "running": { "startedAt": "2024-05-01T10:00:00Z" } }
            }]}
        }))
        .expect("pod");
        assert_eq!(
            running_started_at(&pod).as_deref(),
            Some("2024-05-01T10:00:00Z")
        );
    }

    #[test]
    fn exit_codes_include_signals() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code_of(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code_of(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn ending_terminated_shape() {
        let end = Ending::before_start(REASON_UNSUPPORTED, 127, "nope".into());
        let t = end.terminated();
        assert_eq!(t["exitCode"], 127);
        assert_eq!(t["reason"], REASON_UNSUPPORTED);
        assert_eq!(t["message"], "nope");
        assert!(t["startedAt"].is_string() && t["finishedAt"].is_string());
    }

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback_url("https://127.0.0.1:6443"));
        assert!(is_loopback_url("https://127.0.0.1:6443/"));
        assert!(is_loopback_url("https://localhost:6443"));
        assert!(is_loopback_url("https://[::1]:6443"));
        assert!(!is_loopback_url("https://10.0.0.5:6443"));
        assert!(!is_loopback_url("https://kind-control-plane:6443"));
        assert!(!is_loopback_url(""));
    }

    fn gpu_pod(extra_spec: Value) -> Pod {
        let mut spec = json!({
            "containers": [{
                "name": "worker",
                "resources": {
                    "requests": { "cpu": "1", "nvidia.com/gpu": "1" },
                    "limits": { "cpu": "1", "nvidia.com/gpu": "1" }
                }
            }]
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value(json!({ "metadata": { "name": "p" }, "spec": spec })).expect("pod")
    }

    fn gpu_node() -> NodeAgentOptions {
        let mut opts = NodeAgentOptions::new("n1", "/bin/sh", "/tmp");
        opts.extended_resources = BTreeMap::from([("nvidia.com/gpu".into(), "1".into())]);
        opts.node_labels = BTreeMap::from([("accelerator".into(), "nvidia".into())]);
        opts.taints = vec![Taint {
            key: "nvidia.com/gpu".into(),
            value: Some("present".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        }];
        opts
    }

    #[test]
    fn pods_bind_only_where_they_fit() {
        let tolerating = json!({
            "nodeSelector": { "accelerator": "nvidia" },
            "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }]
        });
        assert_eq!(
            unfit_reason(&gpu_pod(tolerating.clone()), &gpu_node()),
            None
        );

        // A node without GPUs (the default) does not take GPU pods.
        let plain = NodeAgentOptions::new("n0", "/bin/sh", "/tmp");
        let reason = unfit_reason(&gpu_pod(json!({})), &plain).expect("unfit");
        assert!(reason.contains("Insufficient nvidia.com/gpu"), "{reason}");
        // Nor more GPUs than it has.
        let mut two = gpu_pod(tolerating.clone());
        if let Some(r) = two
            .spec
            .as_mut()
            .and_then(|s| s.containers[0].resources.as_mut())
        {
            r.requests = None;
            r.limits = Some(BTreeMap::from([(
                "nvidia.com/gpu".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("2".into()),
            )]));
        }
        let reason = unfit_reason(&two, &gpu_node()).expect("unfit");
        assert!(reason.contains("asks for 2, the node has 1"), "{reason}");

        let wrong_selector = json!({
            "nodeSelector": { "accelerator": "amd" },
            "tolerations": tolerating["tolerations"]
        });
        let reason = unfit_reason(&gpu_pod(wrong_selector), &gpu_node()).expect("unfit");
        assert!(reason.contains("accelerator=amd"), "{reason}");
        let untolerated = json!({ "nodeSelector": { "accelerator": "nvidia" } });
        let reason = unfit_reason(&gpu_pod(untolerated), &gpu_node()).expect("unfit");
        assert!(
            reason.contains("taint nvidia.com/gpu=present:NoSchedule"),
            "{reason}"
        );

        // Pods asking for nothing special fit a plain node, as before.
        let cpu_pod: Pod = serde_json::from_value(json!({
            "metadata": {}, "spec": { "containers": [{ "name": "w", "resources": { "requests": { "cpu": "1", "memory": "1Gi" } } }] }
        }))
        .expect("pod");
        assert_eq!(unfit_reason(&cpu_pod, &plain), None);
    }

    #[test]
    fn tolerations_match_like_kubernetes() {
        let taint = Taint {
            key: "gpu".into(),
            value: Some("yes".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let toleration = |key: Option<&str>,
                          operator: Option<&str>,
                          value: Option<&str>,
                          effect: Option<&str>| Toleration {
            key: key.map(str::to_owned),
            operator: operator.map(str::to_owned),
            value: value.map(str::to_owned),
            effect: effect.map(str::to_owned),
            toleration_seconds: None,
        };
        assert!(tolerates(
            &toleration(Some("gpu"), Some("Equal"), Some("yes"), None),
            &taint
        ));
        assert!(tolerates(
            &toleration(Some("gpu"), None, Some("yes"), Some("NoSchedule")),
            &taint
        ));
        assert!(tolerates(
            &toleration(None, Some("Exists"), None, None),
            &taint
        ));
        assert!(!tolerates(
            &toleration(Some("gpu"), Some("Equal"), Some("no"), None),
            &taint
        ));
        assert!(!tolerates(
            &toleration(Some("gpu"), Some("Exists"), None, Some("NoExecute")),
            &taint
        ));
        assert!(!tolerates(
            &toleration(Some("other"), Some("Exists"), None, None),
            &taint
        ));
    }

    #[test]
    fn mounted_paths_are_redirected_to_the_volume_folder() {
        let mounts = vec![
            (
                "/etc/kinsight/catalog/sub".to_owned(),
                PathBuf::from("/state/p/sub-vol"),
            ),
            (
                "/etc/kinsight/catalog".to_owned(),
                PathBuf::from("/state/p/catalog"),
            ),
        ];
        assert_eq!(
            redirect("/etc/kinsight/catalog/catalog.yaml", &mounts),
            "/state/p/catalog/catalog.yaml"
        );
        assert_eq!(
            redirect("/etc/kinsight/catalog", &mounts),
            "/state/p/catalog"
        );
        assert_eq!(
            redirect("/etc/kinsight/catalog/sub/x", &mounts),
            "/state/p/sub-vol/x"
        );
        // Only whole path segments, and only at the start.
        assert_eq!(
            redirect("/etc/kinsight/catalogue.yaml", &mounts),
            "/etc/kinsight/catalogue.yaml"
        );
        assert_eq!(
            redirect("x=/etc/kinsight/catalog/a", &mounts),
            "x=/etc/kinsight/catalog/a"
        );
        assert_eq!(redirect("cpu", &mounts), "cpu");
    }

    #[test]
    fn config_map_files_include_binary_data() {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": "c" },
            "data": { "catalog.yaml": "models: []" },
            "binaryData": { "blob": "AAE=" }
        }))
        .expect("configmap");
        let files = config_map_files(&cm);
        assert_eq!(files["catalog.yaml"], b"models: []");
        assert_eq!(files["blob"], [0u8, 1]);
    }

    #[test]
    fn memory_is_a_quantity() {
        let q = memory_quantity();
        assert!(q.ends_with("Ki") || q == "8Gi", "{q}");
    }
}
