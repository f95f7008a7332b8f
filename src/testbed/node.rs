//! A real node beside a [`ControlPlane`]: containerd's CRI plugin with runc, a CNI bridge,
//! kubelet 1.20.2 and kube-proxy 1.20.2 (Services' ClusterIPs), as local processes, the way `shared/testbed-real-node/RECIPE.md` found
//! them to work on these machines (root in a container, cgroup v1, no registry).
//!
//! The control plane must be started with [`ControlPlaneOptions::real_node`], which adds
//! kube-scheduler, the `nodelifecycle` controller and the kubelet's own token. The binaries
//! and the pod sandbox image come from `scripts/build-node.sh`, containerd, runc and the CNI
//! plugins from `scripts/install-node-packages.sh`.
//!
//! Only one kubelet can run on a machine (fixed ports 10250/10248, one `/kubepods` cgroup
//! tree, host paths such as `/var/log/pods`), so [`RealNode::start`] first takes a
//! machine-wide lock and holds it until the node is dropped; a second node waits.
//!
//! The kubelet changes the host; dropping the node undoes what it can: the pods' processes
//! are killed and removed through containerd, the kubelet's and the pods' mounts unmounted,
//! the bridge, the network namespaces, the kubelet's cgroups and the host folders that were
//! not there before removed, and the sysctls it sets put back.
//!
//! [`ControlPlaneOptions::real_node`]: super::ControlPlaneOptions::real_node

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

use super::control_plane::{ControlPlane, default_bin_dir, is_executable};
use super::{TestbedError, tail_file};

/// The Node's name. With it the kubelet reports InternalIP = Hostname = 127.0.0.1, so the API
/// server reaches it (logs, exec) on loopback; `--node-ip` refuses loopback addresses.
pub const NODE_NAME: &str = "127.0.0.1";
/// The pod sandbox image `scripts/build-node.sh` builds (as `pause.tar` in the binary folder).
pub const PAUSE_IMAGE: &str = "localhost/kinsight-pause:3.4.1";
/// The pod network's bridge and range: pods get 10.244.91.x/24 and reach each other and the
/// host at 10.244.91.1, and Services through kube-proxy (see [`RealNode::start_kube_proxy`]).
pub const BRIDGE: &str = "kinsight0";
pub const POD_SUBNET: &str = "10.244.91.0/24";
/// The control plane's `--service-cluster-ip-range`, and the `kubernetes` Service's ClusterIP.
const SERVICE_SUBNET: &str = "10.0.0.0/24";
pub const HOST_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 244, 91, 1);
/// The bridge's own MAC (locally administered), fixed for as long as it lives.
const BRIDGE_MAC: &str = "02:6b:69:6e:73:01";
const KUBELET: &str = "kubelet";
const KUBE_PROXY: &str = "kube-proxy";
const CONTAINERD: &str = "containerd";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Held while a node runs: one kubelet per machine.
const LOCK_FILE: &str = "/run/kinsight-real-node.lock";
/// How long a second node waits for the first to go.
const LOCK_WAIT: Duration = Duration::from_secs(600);
/// Sysctls the kubelet (1.20) sets on start, and the CNI bridge might; put back on drop.
const HOST_SYSCTLS: [&str; 5] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    // kube-proxy's iptables mode sets it (for NodePorts on 127.0.0.1).
    "net/ipv4/conf/all/route_localnet",
];
/// Host paths the kubelet, containerd's CRI and CNI create whatever they are told; removed on
/// drop when they were not there before.
const HOST_DIRS: [&str; 6] = [
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/run/netns",
    "/run/containerd",
];
const NETNS_DIR: &str = "/run/netns";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const LOG_TAIL_LINES: usize = 40;

/// How to start a [`RealNode`].
#[derive(Debug, Clone)]
pub struct RealNodeOptions {
    /// Folder with `kubelet` and `pause.tar`; `None`: the control plane's default folder
    /// (`KUBEBUILDER_ASSETS`, else `~/.cache/kinsight/k8s-1.20.2/bin`).
    pub bin_dir: Option<PathBuf>,
    /// OCI archives imported into containerd before the kubelet starts (pods use them with
    /// `imagePullPolicy: Never`; no registry is reachable).
    pub images: Vec<PathBuf>,
    /// How long to wait for containerd, and for the Node to be Ready and schedulable.
    pub start_timeout: Duration,
    /// Further CRI runtime handlers, each run by runc as the default one is: a RuntimeClass
    /// naming one (say `nvidia`, as on a GPU node) is then answered, without what the
    /// vendor's runtime would add (this machine has no GPU).
    pub runtime_handlers: Vec<String>,
}

impl Default for RealNodeOptions {
    fn default() -> Self {
        RealNodeOptions {
            bin_dir: None,
            images: Vec::new(),
            start_timeout: Duration::from_secs(120),
            runtime_handlers: Vec::new(),
        }
    }
}

/// A running kubelet + containerd. Dropping it stops them and cleans the host (see the module
/// documentation); drop it before its [`ControlPlane`].
pub struct RealNode {
    dir: PathBuf,
    socket: PathBuf,
    log_dir: PathBuf,
    kubelet: Option<Child>,
    containerd: Option<Child>,
    kube_proxy: Option<Child>,
    /// kube-proxy's binary, for `--cleanup` of its iptables rules on drop.
    kube_proxy_bin: PathBuf,
    host: HostState,
    client: kube::Client,
    /// Forward the bridge address's ports to the API server's and PostgreSQL's loopback
    /// listeners; stopped on drop.
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    // Released last, once the host is clean.
    _lock: File,
}

/// What the host looked like before the node started.
struct HostState {
    sysctls: Vec<(&'static str, String)>,
    missing_dirs: Vec<&'static str>,
    netns: BTreeSet<String>,
    cgroups_without_kubepods: Vec<PathBuf>,
    bridge_made: bool,
    /// iptables chains named KUBE-*, by table: `kube-proxy --cleanup` leaves its canaries
    /// and the KUBE-MARK-* chains (a kubelet's too), which go if they were not there.
    kube_chains: BTreeSet<(&'static str, String)>,
}

impl RealNode {
    /// Starts containerd and the kubelet against `plane`, and waits until the Node is Ready and
    /// its `not-ready` taint is gone (pods can then be scheduled on it).
    pub async fn start(
        plane: &ControlPlane,
        opts: RealNodeOptions,
    ) -> Result<RealNode, TestbedError> {
        let started = Instant::now();
        let bin_dir = opts
            .bin_dir
            .clone()
            .or_else(default_bin_dir)
            .ok_or_else(|| {
                TestbedError::Config("no binary folder: set KUBEBUILDER_ASSETS or HOME".into())
            })?;
        preflight(plane, &bin_dir)?;
        let lock = machine_lock().await?;
        let host = HostState::record()?;
        let dir = plane.state_dir().join("node");
        let log_dir = plane.log_dir();
        let mut node = RealNode {
            socket: dir.join("containerd/containerd.sock"),
            dir,
            log_dir,
            kubelet: None,
            containerd: None,
            kube_proxy: None,
            kube_proxy_bin: bin_dir.join(KUBE_PROXY),
            host,
            client: plane.client().await?,
            forwarders: Vec::new(),
            _lock: lock,
        };
        // On any error below, dropping `node` stops what was started and cleans the host.
        node.boot(plane, &bin_dir, &opts).await?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "real node ready"
        );
        Ok(node)
    }

    async fn boot(
        &mut self,
        plane: &ControlPlane,
        bin_dir: &Path,
        opts: &RealNodeOptions,
    ) -> Result<(), TestbedError> {
        let dir = self.dir.clone();
        for sub in [
            "containerd/root",
            "containerd/state",
            "cni/net.d",
            "cni/ipam",
            "kubelet/root",
            "kubelet/pki",
            "kubelet/volume-plugins",
        ] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|e| TestbedError::io(format!("creating {}", path.display()), e))?;
        }
        self.host.bridge_made = true;
        make_bridge()?;
        // Pods reach the host only on the bridge: the API server (which advertises this
        // address, see ControlPlaneOptions::real_node) and PostgreSQL answer there too.
        let api_port = plane
            .server_url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| TestbedError::Config("no port in the API server's URL".into()))?;
        let mut ports = vec![api_port];
        ports.extend(plane.postgres().map(|p| p.port()));
        for port in ports {
            self.forwarders.push(forward_from_bridge(port).await?);
        }
        self.start_kube_proxy(plane)?;
        write_file(
            &dir.join("containerd/config.toml"),
            &containerd_config(&dir, &opts.runtime_handlers),
        )?;
        // containerd's CRI reads the folder live; with the network configured from the
        // start the node is Ready as soon as the kubelet reports.
        write_file(
            &dir.join("cni/net.d/10-kinsight-bridge.conflist"),
            &cni_config(&dir.join("cni/ipam")),
        )?;

        let mut containerd = Command::new(CONTAINERD);
        containerd
            .arg("--config")
            .arg(dir.join("containerd/config.toml"));
        self.containerd = Some(spawn(CONTAINERD, containerd, &self.log_dir)?);
        let deadline = Instant::now() + opts.start_timeout;
        while !self
            .ctr(&["version"])
            .await
            .is_ok_and(|o| o.status.success())
        {
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(self.timeout_error(CONTAINERD, opts.start_timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.import(&bin_dir.join("pause.tar")).await?;
        for image in &opts.images {
            self.import(image).await?;
        }

        write_file(
            &dir.join("kubelet/config.yaml"),
            &kubelet_config(&dir.join("kubelet/volume-plugins")),
        )?;
        let mut kubelet = Command::new(bin_dir.join(KUBELET));
        kubelet
            .arg(format!(
                "--config={}",
                dir.join("kubelet/config.yaml").display()
            ))
            .arg(format!(
                "--kubeconfig={}",
                plane.node_kubeconfig_path().display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                self.socket.display()
            ))
            .arg(format!("--root-dir={}", dir.join("kubelet/root").display()))
            .arg(format!("--cert-dir={}", dir.join("kubelet/pki").display()))
            .arg("--v=2");
        self.kubelet = Some(spawn(KUBELET, kubelet, &self.log_dir)?);
        self.wait_until_schedulable(opts.start_timeout).await?;
        self.wait_for_kube_proxy(opts.start_timeout).await
    }

    /// Until kube-proxy's health check answers 200: it has applied the Services it found.
    async fn wait_for_kube_proxy(&mut self, timeout: Duration) -> Result<(), TestbedError> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let answered = http
                .get("http://127.0.0.1:10256/healthz")
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if answered.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(KUBE_PROXY, timeout));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// kube-proxy in its iptables mode, as most clusters run it: a pod's connection to a
    /// ClusterIP (the pods route the service range to the host, see [`cni_config`]) is
    /// DNATed by the host to an endpoint and forwarded back onto the bridge, so the node
    /// turns on `net.ipv4.ip_forward` (put back on drop) and has every Service connection
    /// masqueraded (`--masquerade-all`: the endpoint answers the host, which undoes the
    /// NAT; pods on one bridge would otherwise answer each other directly), and sends no
    /// ICMP redirects on its bridge. The userspace mode would need neither, but it raises
    /// its open-file limit, which root here may not. Its rules are removed on drop
    /// (`kube-proxy --cleanup`), and first, should an earlier run have left some.
    fn start_kube_proxy(&mut self, plane: &ControlPlane) -> Result<(), TestbedError> {
        cleanup_kube_proxy(&self.kube_proxy_bin);
        for (sysctl, value) in [
            ("net/ipv4/ip_forward".to_owned(), "1"),
            // The bridge goes on drop, and its settings with it.
            (format!("net/ipv4/conf/{BRIDGE}/send_redirects"), "0"),
        ] {
            let path = Path::new("/proc/sys").join(sysctl);
            std::fs::write(&path, value)
                .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))?;
        }
        let mut proxy = Command::new(&self.kube_proxy_bin);
        proxy
            .arg(format!(
                "--kubeconfig={}",
                plane.kubeconfig_path().display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg("--proxy-mode=iptables")
            .arg("--masquerade-all")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--cluster-cidr={POD_SUBNET}"))
            .arg("--healthz-bind-address=127.0.0.1:10256")
            .arg("--metrics-bind-address=127.0.0.1:10249")
            // Leave the host's conntrack limits and its own OOM score alone (root here
            // lacks CAP_SYS_RESOURCE for a negative one anyway).
            .args(["--conntrack-max-per-core=0", "--conntrack-min=0"])
            .args([
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
            ])
            .arg("--oom-score-adj=0")
            .arg("--v=2");
        self.kube_proxy = Some(spawn(KUBE_PROXY, proxy, &self.log_dir)?);
        Ok(())
    }

    /// Imports an OCI archive (`scripts/build-image.sh --oci-archive`) into containerd's
    /// Kubernetes namespace.
    pub async fn import(&self, archive: &Path) -> Result<(), TestbedError> {
        let path = archive.display().to_string();
        let output = self
            .ctr(&["-n", "k8s.io", "images", "import", &path])
            .await
            .map_err(|e| TestbedError::io("running ctr", e))?;
        super::succeeded(format!("ctr -n k8s.io images import {path}"), &output)
    }

    /// containerd's socket.
    pub fn containerd_socket(&self) -> &Path {
        &self.socket
    }

    /// Where containerd and the kubelet log (`containerd.log`, `kubelet.log`).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Process ids of containerd, the kubelet and kube-proxy.
    pub fn pids(&self) -> Vec<u32> {
        [&self.containerd, &self.kubelet, &self.kube_proxy]
            .into_iter()
            .flatten()
            .map(Child::id)
            .collect()
    }

    /// Deletes every pod at once (no grace period) and waits, up to `limit`, until containerd
    /// runs none of their containers any more: the kubelet then tears them down itself
    /// (volumes unmounted, CNI networks removed). Dropping the node without it still cleans
    /// up, through containerd. Returns whether every container went in time.
    pub async fn remove_pods(&self, limit: Duration) -> Result<bool, TestbedError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let listed = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={NODE_NAME}")))
            .await
            .map_err(|e| TestbedError::kube("listing the node's pods", e))?;
        for pod in listed.items {
            let (Some(name), Some(namespace)) = (pod.metadata.name, pod.metadata.namespace) else {
                continue;
            };
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            match api
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(TestbedError::kube(format!("deleting pod {name}"), e)),
            }
        }
        let deadline = Instant::now() + limit;
        loop {
            if self.running_tasks().await.is_empty() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn running_tasks(&self) -> Vec<String> {
        match self.ctr(&["-n", "k8s.io", "tasks", "ls", "-q"]).await {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }

    async fn ctr(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        tokio::process::Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
    }

    async fn wait_until_schedulable(&mut self, timeout: Duration) -> Result<(), TestbedError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await {
                if is_schedulable(&node) {
                    return Ok(());
                }
                if node.spec.as_ref().is_none_or(|s| s.pod_cidr.is_none())
                    && Api::<CSINode>::all(self.client.clone())
                        .get_opt(NODE_NAME)
                        .await
                        .is_ok_and(|c| c.is_some())
                {
                    give_pod_range(&nodes).await;
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(KUBELET, timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_alive(&mut self) -> Result<(), TestbedError> {
        for (name, child) in [
            (CONTAINERD, &mut self.containerd),
            (KUBELET, &mut self.kubelet),
            (KUBE_PROXY, &mut self.kube_proxy),
        ] {
            let Some(child) = child else { continue };
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.log_dir.join(format!("{name}.log"));
                return Err(TestbedError::ProcessExited {
                    component: name.to_string(),
                    status: status.to_string(),
                    log_tail: tail_file(&log, LOG_TAIL_LINES),
                    log,
                });
            }
        }
        Ok(())
    }

    fn timeout_error(&self, name: &str, timeout: Duration) -> TestbedError {
        let log = self.log_dir.join(format!("{name}.log"));
        TestbedError::StartTimeout {
            component: name.to_string(),
            seconds: timeout.as_secs(),
            log_tail: tail_file(&log, LOG_TAIL_LINES),
            log,
        }
    }

    /// The blocking part of the teardown (in `Drop`).
    fn stop_and_clean(&mut self) {
        if let Some(kubelet) = self.kubelet.take() {
            stop_process(kubelet, Duration::from_secs(10));
        }
        if let Some(proxy) = self.kube_proxy.take() {
            stop_process(proxy, Duration::from_secs(5));
            cleanup_kube_proxy(&self.kube_proxy_bin);
        }
        // The pods outlive the kubelet: kill and remove them while containerd still runs, or
        // their shims (and so their mounts) stay.
        if let Some(containerd) = self.containerd.take() {
            let ctr = |args: &[&str]| {
                Command::new("ctr")
                    .arg("-a")
                    .arg(&self.socket)
                    .args(["-n", "k8s.io"])
                    .args(args)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            let tasks = ctr(&["tasks", "ls", "-q"]);
            for task in tasks.lines() {
                ctr(&["tasks", "kill", "-s", "SIGKILL", task]);
            }
            for task in tasks.lines() {
                ctr(&["tasks", "delete", "--force", task]);
            }
            for container in ctr(&["containers", "ls", "-q"]).lines() {
                ctr(&["containers", "delete", container]);
            }
            stop_process(containerd, Duration::from_secs(10));
        }
        // The kubelet's rshared bind mount of its root folder, and what pods left below it.
        for mount in mounts_below(&self.dir) {
            unmount(&mount);
        }
        self.host.restore();
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        for forwarder in &self.forwarders {
            forwarder.abort();
        }
        self.stop_and_clean();
    }
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode")
            .field("dir", &self.dir)
            .field("pids", &self.pids())
            .finish()
    }
}

impl HostState {
    fn record() -> Result<HostState, TestbedError> {
        let mut sysctls = Vec::new();
        for name in HOST_SYSCTLS {
            let path = Path::new("/proc/sys").join(name);
            let value = std::fs::read_to_string(&path)
                .map_err(|e| TestbedError::io(format!("reading {}", path.display()), e))?;
            sysctls.push((name, value.trim().to_string()));
        }
        let missing_dirs = HOST_DIRS
            .into_iter()
            .filter(|d| !Path::new(d).exists())
            .collect();
        let cgroups_without_kubepods = cgroup_hierarchies()
            .into_iter()
            .filter(|h| !h.join("kubepods").exists())
            .collect();
        Ok(HostState {
            sysctls,
            missing_dirs,
            netns: dir_entries(Path::new(NETNS_DIR)),
            cgroups_without_kubepods,
            bridge_made: false,
            kube_chains: kube_chains(),
        })
    }

    /// Undoes what the node changed outside its state folder (best effort: each step is
    /// independent, and a failure is logged).
    fn restore(&self) {
        for entry in dir_entries(Path::new(NETNS_DIR)).difference(&self.netns) {
            let path = Path::new(NETNS_DIR).join(entry);
            unmount(&path);
            let _ = std::fs::remove_file(&path);
        }
        if self.bridge_made {
            run_quietly("ip", &["link", "del", BRIDGE]);
        }
        let added: Vec<_> = kube_chains()
            .difference(&self.kube_chains)
            .cloned()
            .collect();
        for (table, chain) in &added {
            run_quietly("iptables", &["-t", table, "-F", chain]);
        }
        for (table, chain) in &added {
            if !run_quietly("iptables", &["-t", table, "-X", chain]) {
                tracing::warn!(
                    table,
                    chain,
                    "could not remove an iptables chain the node made"
                );
            }
        }
        for hierarchy in &self.cgroups_without_kubepods {
            remove_cgroup_tree(&hierarchy.join("kubepods"));
        }
        for (name, value) in &self.sysctls {
            let path = Path::new("/proc/sys").join(name);
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if now.trim() != value
                && let Err(e) = std::fs::write(&path, value)
            {
                tracing::warn!(sysctl = name, error = %e, "could not restore a sysctl");
            }
        }
        for dir in &self.missing_dirs {
            for mount in mounts_below(Path::new(dir)) {
                unmount(&mount);
            }
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir, error = %e, "could not remove a host folder the node made");
            }
        }
    }
}

/// What is needed before anything starts, each missing piece named with its remedy.
fn preflight(plane: &ControlPlane, bin_dir: &Path) -> Result<(), TestbedError> {
    use std::os::unix::fs::MetadataExt as _;
    let uid = std::fs::metadata("/proc/self")
        .map_err(|e| TestbedError::io("reading /proc/self", e))?
        .uid();
    if uid != 0 {
        return Err(TestbedError::Config(format!(
            "a real node runs containers and a kubelet: it needs root (running as uid {uid})"
        )));
    }
    let mut missing = Vec::new();
    for tool in [CONTAINERD, "runc", "ctr", "ip"] {
        if find_in_path(tool).is_none() {
            missing.push(format!("{tool} (scripts/install-node-packages.sh)"));
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        if !is_executable(&Path::new(CNI_BIN_DIR).join(plugin)) {
            missing.push(format!(
                "{CNI_BIN_DIR}/{plugin} (scripts/install-node-packages.sh)"
            ));
        }
    }
    if !is_executable(&bin_dir.join(KUBELET))
        || !is_executable(&bin_dir.join(KUBE_PROXY))
        || !bin_dir.join("pause.tar").is_file()
    {
        missing.push(format!(
            "kubelet, kube-proxy and pause.tar in {} (scripts/build-node.sh)",
            bin_dir.display()
        ));
    }
    if !plane.node_kubeconfig_path().is_file() {
        missing.push(
            "the kubelet's kubeconfig: start the control plane with `real_node: true`".into(),
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(TestbedError::Config(format!(
            "a real node cannot start; missing: {}",
            missing.join("; ")
        )))
    }
}

/// Takes the machine-wide node lock, waiting for another node to go.
async fn machine_lock() -> Result<File, TestbedError> {
    let file =
        File::create(LOCK_FILE).map_err(|e| TestbedError::io(format!("opening {LOCK_FILE}"), e))?;
    let deadline = Instant::now() + LOCK_WAIT;
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !told {
                    tracing::info!("another real node runs on this machine; waiting for it");
                    told = true;
                }
                if Instant::now() >= deadline {
                    return Err(TestbedError::Config(format!(
                        "another real node held {LOCK_FILE} for {} s",
                        LOCK_WAIT.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(TestbedError::io(format!("locking {LOCK_FILE}"), e));
            }
        }
    }
}

/// Makes the pod bridge with its host address, so that the CNI bridge plugin can run with
/// `isGateway: false` (with `true` it turns on `net.ipv4.ip_forward`). One left by an earlier
/// run that did not clean up is taken over (and removed at the end all the same).
fn make_bridge() -> Result<(), TestbedError> {
    let exists = run_quietly("ip", &["link", "show", BRIDGE]);
    let address = format!("{HOST_ADDRESS}/24");
    // A fixed MAC: a Linux bridge otherwise takes the lowest of its ports', so it changes
    // when a pod's veth goes, and pods' ARP entries for the host point at a MAC that no
    // longer answers for up to half a minute (seen: downloads from the host timing out in
    // the pod that replaced a deleted one).
    let mut steps = vec![
        vec!["link", "set", BRIDGE, "address", BRIDGE_MAC],
        vec!["addr", "replace", address.as_str(), "dev", BRIDGE],
        vec!["link", "set", BRIDGE, "up"],
    ];
    if !exists {
        steps.insert(0, vec!["link", "add", BRIDGE, "type", "bridge"]);
    }
    for args in steps {
        let output = Command::new("ip")
            .args(&args)
            .output()
            .map_err(|e| TestbedError::io("running ip", e))?;
        super::succeeded(format!("ip {}", args.join(" ")), &output)?;
    }
    Ok(())
}

/// Accepts connections on the bridge address's `port` and relays each to 127.0.0.1:`port`.
async fn forward_from_bridge(port: u16) -> Result<tokio::task::JoinHandle<()>, TestbedError> {
    let listener = tokio::net::TcpListener::bind((HOST_ADDRESS, port))
        .await
        .map_err(|e| TestbedError::io(format!("listening on {HOST_ADDRESS}:{port}"), e))?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}

/// The iptables chains named KUBE-* in the tables kube-proxy and the kubelet use.
fn kube_chains() -> BTreeSet<(&'static str, String)> {
    let mut chains = BTreeSet::new();
    for table in ["mangle", "nat", "filter"] {
        let Ok(out) = Command::new("iptables")
            .args(["-t", table, "-S"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(chain) = line.strip_prefix("-N ").filter(|c| c.starts_with("KUBE-")) {
                chains.insert((table, chain.trim().to_owned()));
            }
        }
    }
    chains
}

/// Removes the iptables chains and rules kube-proxy made (all its modes'), leaving the
/// rest of the host's alone.
fn cleanup_kube_proxy(binary: &Path) {
    let done = Command::new(binary)
        .arg("--cleanup")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !done {
        tracing::warn!("kube-proxy --cleanup failed: its iptables rules may remain");
    }
}

fn containerd_config(dir: &Path, handlers: &[String]) -> String {
    let d = dir.display();
    let runc = |name: &str| {
        format!(
            r#"    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}.options]
        SystemdCgroup = false
"#
        )
    };
    let runtimes: String = std::iter::once("runc")
        .chain(handlers.iter().map(String::as_str))
        .map(runc)
        .collect();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Root here lacks CAP_SYS_RESOURCE: the negative oom_score_adj the CRI asks for a sandbox
  # (-998) makes runc's init fail, and so every pod.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
{runtimes}  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni/net.d"
"#
    )
}

fn cni_config(ipam_dir: &Path) -> String {
    let doc = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "kinsight-bridge",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": false,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_SUBNET, "gateway": HOST_ADDRESS }]],
                // Service ClusterIPs go to the host (see add_service_rule).
                "routes": [{ "dst": SERVICE_SUBNET, "gw": HOST_ADDRESS }],
                "dataDir": ipam_dir,
            }
        }]
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

fn kubelet_config(volume_plugins: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# All on loopback: the API server reaches the kubelet (logs, exec) at the node's Hostname
# address, 127.0.0.1:10250.
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# The API server has no kubelet client certificate: it calls anonymously. Only on loopback.
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
failSwapOn: false
runtimeRequestTimeout: 2m
volumePluginDir: {}
# Never evict or collect images because a shared disk is full.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
# Set explicitly, the update frequency above would also be the report frequency: a PATCH of
# the whole node status every 5 s, each fanned out to the controller manager and scheduler.
# A change (Ready) is still reported at the next 5 s check; the node lease says it is alive.
nodeStatusReportFrequency: 1m
# Kubernetes 1.27's defaults (1.20 has 5 and 10): at 5 requests/s the kubelet's own pod
# status writes, ConfigMap reads and token requests queue behind each other, and a pod
# bound at once waited seconds before the kubelet started it once a few dozen had run.
kubeAPIQPS: 50
kubeAPIBurst: 100
# Its events likewise (recent defaults; 1.20 has 5 and 10). At its start the kubelet records
# a SystemOOM event for every OOM kill still in the kernel's log (a machine that ran tests
# has dozens): at 5 a second those held back the first pods' Started events for seconds.
eventRecordQPS: 50
eventBurst: 100
# No KUBE-* iptables chains on the host (only kube-proxy and dockershim need them).
makeIPTablesUtilChains: false
"#,
        volume_plugins.display()
    )
}

/// Whether a container of `pod` has started, running or ended (its log can be read from
/// then on).
pub fn container_started(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|statuses| {
            statuses.iter().any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
        })
}

/// Gives the registered node its pod range, the CNI's ([`POD_SUBNET`]), as a cluster's
/// `nodeipam` controller would (the controller manager's `nodeipam` waits 10 s before its
/// first look at the nodes, and holds back the controllers started after it). Why: a
/// kubelet watches, once at its start, for its node's pod range and reports its status as
/// soon as it has one; without one the node turns Ready only at the kubelet's next status
/// update, up to 5 s (`nodeStatusUpdateFrequency`) after it registered. Given once the
/// kubelet has made its CSINode: a status reported before says "CSINode is not yet
/// initialized", not Ready. A failed write is tried again on the next look.
async fn give_pod_range(nodes: &Api<Node>) {
    let patch = serde_json::json!({ "spec": { "podCIDR": POD_SUBNET, "podCIDRs": [POD_SUBNET] } });
    if let Err(e) = nodes
        .patch(NODE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(error = %e, "giving the node its pod range");
    }
}

/// Ready, and without the `node.kubernetes.io/not-ready` taint (which only the
/// `nodelifecycle` controller lifts).
fn is_schedulable(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "node.kubernetes.io/not-ready"));
    ready && !tainted
}

fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Child, TestbedError> {
    let log = log_dir.join(format!("{name}.log"));
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| TestbedError::io(format!("opening {}", log.display()), e))
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .spawn()
        .map_err(|e| TestbedError::io(format!("starting {name} ({:?})", cmd.get_program()), e))?;
    tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
    Ok(child)
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop_process(mut child: Child, grace: Duration) {
    super::signal(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn run_quietly(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// `/proc/self/mounts` writes spaces, tabs, newlines and backslashes as octal escapes.
fn unescape_mount_path(field: &str) -> PathBuf {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    PathBuf::from(out)
}

/// Unmounts `path` (lazily if it is busy); logs when neither works.
fn unmount(path: &Path) {
    let p = path.display().to_string();
    if !run_quietly("umount", &[&p]) && !run_quietly("umount", &["-l", &p]) {
        tracing::debug!(path = %p, "not unmounted (not a mount point?)");
    }
}

fn dir_entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup v1 hierarchies (and the v2 one, if mounted there) under /sys/fs/cgroup.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    dir_entries(Path::new(CGROUP_ROOT))
        .into_iter()
        .map(|name| Path::new(CGROUP_ROOT).join(name))
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

/// Removes a cgroup and its children (empty once their processes are gone), deepest first.
fn remove_cgroup_tree(root: &Path) {
    if !root.is_dir() {
        return;
    }
    let mut dirs = vec![root.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
        }
        i += 1;
    }
    for dir in dirs.iter().rev() {
        if let Err(e) = std::fs::remove_dir(dir) {
            tracing::warn!(cgroup = %dir.display(), error = %e, "could not remove a cgroup");
        }
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn write_file(path: &Path, contents: &str) -> Result<(), TestbedError> {
    std::fs::write(path, contents)
        .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/tmp/a\040b/c\011d"),
            PathBuf::from("/tmp/a b/c\td")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount_path(r"/odd\x"), PathBuf::from(r"/odd\x"));
    }

    #[test]
    fn configs_keep_the_gotchas_fixed() {
        let containerd = containerd_config(Path::new("/state/node"), &["nvidia".to_owned()]);
        assert!(containerd.contains("restrict_oom_score_adj = true"));
        // The default runtime and the extra handler, both runc.
        for name in ["runc", "nvidia"] {
            let table = format!(
                "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{name}]\n      runtime_type = \"io.containerd.runc.v2\""
            );
            assert!(containerd.contains(&table), "{name}:\n{containerd}");
        }
        assert!(containerd.contains(r#"address = "/state/node/containerd/containerd.sock""#));
        assert!(containerd.contains(PAUSE_IMAGE));
        let cni: serde_json::Value =
            serde_json::from_str(&cni_config(Path::new("/state/ipam"))).expect("JSON");
        assert_eq!(cni["plugins"][0]["isGateway"], false);
        assert_eq!(cni["plugins"][0]["ipMasq"], false);
        assert_eq!(cni["plugins"][0]["bridge"], BRIDGE);
        // Service ClusterIPs go to the host, where the `kubernetes` Service's rule is.
        assert_eq!(
            cni["plugins"][0]["ipam"]["routes"][0],
            serde_json::json!({ "dst": SERVICE_SUBNET, "gw": HOST_ADDRESS })
        );
        let kubelet: serde_yaml::Value =
            serde_yaml::from_str(&kubelet_config(Path::new("/v"))).expect("YAML");
        assert_eq!(kubelet["makeIPTablesUtilChains"], false);
        assert_eq!(kubelet["cgroupDriver"], "cgroupfs");
        assert_eq!(kubelet["authorization"]["mode"], "AlwaysAllow");
        assert_eq!(kubelet["kubeAPIQPS"], 50);
    }

    #[test]
    fn a_node_is_schedulable_once_ready_and_untainted() {
        let node = |ready: &str, taint: bool| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": NODE_NAME },
                "spec": { "taints": if taint {
                    serde_json::json!([{ "key": "node.kubernetes.io/not-ready", "effect": "NoSchedule" }])
                } else { serde_json::json!([]) } },
                "status": { "conditions": [{ "type": "Ready", "status": ready }] }
            }))
            .expect("node")
        };
        assert!(is_schedulable(&node("True", false)));
        assert!(!is_schedulable(&node("True", true)));
        assert!(!is_schedulable(&node("False", false)));
    }
}
