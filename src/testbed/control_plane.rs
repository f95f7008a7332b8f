//! etcd + kube-apiserver + kube-controller-manager as local processes (`shared/TESTBED.md` §1),
//! with a PostgreSQL beside them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use super::postgres::Postgres;
use super::{ServerTrust, TestbedError, tail_file, write_private_file, write_token_kubeconfig};

/// The binaries a control plane needs, as named in a `KUBEBUILDER_ASSETS` folder.
pub const ETCD: &str = "etcd";
pub const KUBE_APISERVER: &str = "kube-apiserver";
pub const KUBE_CONTROLLER_MANAGER: &str = "kube-controller-manager";
/// Started only for a real node ([`ControlPlaneOptions::real_node`]).
pub const KUBE_SCHEDULER: &str = "kube-scheduler";

/// Where `scripts/build-kubernetes.sh` puts the binaries, below the cache folder.
const CACHE_SUBDIR: &str = "k8s-1.20.2/bin";
/// Controllers that matter to kinsight: Jobs make Pods, owner references cascade.
const CONTROLLERS: &str = "job,garbagecollector,ttl-after-finished";
/// With a real node: `nodelifecycle` too, the only controller that lifts the
/// `node.kubernetes.io/not-ready` taint the API server puts on a new Node, and
/// `root-ca-cert-publisher`, which puts the cluster's CA into every namespace
/// (`kube-root-ca.crt`), as real clusters do: pods project it beside their ServiceAccount
/// token (the worker Jobs do), and `deployment` and `replicaset`, which make the pods of
/// Deployments (the Helm chart's controller and API), and `endpoint` and `endpointslice`,
/// which list a Service's ready pods (kube-proxy 1.20 reads the EndpointSlices).
const CONTROLLERS_WITH_REAL_NODE: &str = "job,garbagecollector,ttl-after-finished,nodelifecycle,\
     root-ca-cert-publisher,deployment,replicaset,endpoint,endpointslice";
/// The kubelet's user in the static token file, and the group RBAC's `system:node` role is
/// bound to (the API server here authorizes with RBAC only, no Node authorizer).
pub(crate) const NODE_USER: &str = "system:node:127.0.0.1";
/// The API server here authenticates by token only, so it publishes no
/// `kube-system/extension-apiserver-authentication` ConfigMap (that needs a client CA): without
/// this flag the controller manager and the scheduler look it up again and again, each miss an
/// error in their logs and a watch restarted.
const SKIP_AUTHENTICATION_LOOKUP: &str = "--authentication-skip-lookup=true";
const NODES_GROUP: &str = "system:nodes";
const LOG_TAIL_LINES: usize = 40;

/// How to start a [`ControlPlane`].
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Folder with `etcd`, `kube-apiserver`, `kube-controller-manager`. `None`: the
    /// `KUBEBUILDER_ASSETS` folder if set, else `~/.cache/kinsight/k8s-1.20.2/bin`
    /// (`$KINSIGHT_CACHE/k8s-1.20.2/bin` when `KINSIGHT_CACHE` is set).
    pub bin_dir: Option<PathBuf>,
    /// Where etcd data, certificates, keys, the kubeconfig and logs go. `None`: a temporary
    /// folder removed when the [`ControlPlane`] is dropped.
    pub state_dir: Option<PathBuf>,
    /// How long to wait for each component to become ready.
    pub start_timeout: Duration,
    /// Start kube-controller-manager (the Job controller and garbage collector).
    pub controller_manager: bool,
    /// Appended to kube-apiserver's flags.
    pub extra_apiserver_args: Vec<String>,
    /// Start a PostgreSQL in the state folder ([`ControlPlane::database_url`]); a test that
    /// only needs the API server can turn it off.
    pub postgres: bool,
    /// Prepare for a real node ([`super::RealNode`]): also start kube-scheduler, run the
    /// `nodelifecycle` controller, and give the kubelet a token of its own
    /// ([`ControlPlane::node_kubeconfig_path`]) in the `system:nodes` group.
    pub real_node: bool,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            bin_dir: None,
            state_dir: None,
            start_timeout: Duration::from_secs(60),
            controller_manager: true,
            extra_apiserver_args: Vec::new(),
            postgres: true,
            real_node: false,
        }
    }
}

/// A running local control plane. Dropping it stops the processes it started (and removes
/// its state folder if that was temporary).
pub struct ControlPlane {
    /// In start order; stopped in reverse.
    components: Vec<Component>,
    state_dir: PathBuf,
    kubeconfig_path: PathBuf,
    server_url: String,
    // Dropped (so stopped) after the Kubernetes components, which `Drop` stops first.
    postgres: Option<Postgres>,
    // Declared last so that it is removed after the processes are gone.
    _temp_dir: Option<TempDir>,
}

struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// Ports, remembered in the state folder so that a restarted dev control plane keeps its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
}

struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: Option<PathBuf>,
    scheduler: Option<PathBuf>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and (unless disabled) kube-controller-manager, and waits
    /// until the API server answers `/readyz`.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane, TestbedError> {
        let binaries = find_binaries(&opts)?;
        // Free ports are picked, released, then bound by the components: another process
        // (a parallel test's server) can take one in between. Then start again, on others.
        let mut tries = PORT_RACE_TRIES;
        loop {
            match ControlPlane::start_once(&binaries, &opts).await {
                Err(e) if tries > 1 && lost_a_port(&e) => {
                    tries -= 1;
                    tracing::warn!(error = %e, "a control-plane port was taken meanwhile; starting again");
                }
                done => return done,
            }
        }
    }

    async fn start_once(
        binaries: &Binaries,
        opts: &ControlPlaneOptions,
    ) -> Result<ControlPlane, TestbedError> {
        let (state_dir, temp_dir) = match &opts.state_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("kinsight-testbed-")
                    .tempdir()
                    .map_err(|e| TestbedError::io("creating a temporary state folder", e))?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let mut plane = ControlPlane {
            components: Vec::new(),
            kubeconfig_path: state_dir.join("kubeconfig"),
            state_dir,
            server_url: String::new(),
            postgres: None,
            _temp_dir: temp_dir,
        };
        // On any error below, dropping `plane` stops what was started.
        plane.boot(binaries, opts).await?;
        Ok(plane)
    }

    /// For `kinsight dev`: if `state_dir/kubeconfig` exists and its API server is ready, returns
    /// a handle that owns no processes (dropping it stops nothing) and reuses the database the
    /// same way; otherwise starts a control plane that keeps its etcd data, keys, ports and
    /// database in `state_dir`, so objects and rows survive restarts.
    pub async fn start_or_reuse(state_dir: impl AsRef<Path>) -> Result<ControlPlane, TestbedError> {
        ControlPlane::start_or_reuse_with(ControlPlaneOptions {
            state_dir: Some(state_dir.as_ref().to_path_buf()),
            ..ControlPlaneOptions::default()
        })
        .await
    }

    /// [`ControlPlane::start_or_reuse`] with options; `opts.state_dir` is required.
    pub async fn start_or_reuse_with(
        opts: ControlPlaneOptions,
    ) -> Result<ControlPlane, TestbedError> {
        let Some(state_dir) = opts.state_dir.clone() else {
            return Err(TestbedError::Config(
                "start_or_reuse needs a state folder".into(),
            ));
        };
        let kubeconfig_path = state_dir.join("kubeconfig");
        if kubeconfig_path.is_file()
            && let Ok(server_url) = server_of_kubeconfig(&kubeconfig_path)
            && let Ok(pem) = std::fs::read(state_dir.join("certs").join("apiserver.crt"))
            && let Ok(probe) = readyz_probe(&pem)
            && is_ready(&probe, &server_url).await
        {
            tracing::info!(%server_url, "reusing the running control plane");
            // Owns no process unless the database was down and had to be started.
            let postgres = if opts.postgres {
                Some(Postgres::start_or_reuse_with_timeout(&state_dir, opts.start_timeout).await?)
            } else {
                None
            };
            return Ok(ControlPlane {
                components: Vec::new(),
                state_dir,
                kubeconfig_path,
                server_url,
                postgres,
                _temp_dir: None,
            });
        }
        ControlPlane::start(opts).await
    }

    /// Whether this is a control plane another process started (found running in the
    /// state folder), rather than one this started.
    pub fn reused(&self) -> bool {
        self.components.is_empty()
    }

    /// A kubeconfig with an admin (`system:masters`) token for this control plane.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The API server's URL, such as `https://127.0.0.1:41234`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The folder holding etcd data, keys, the kubeconfig and `logs/`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Where each component logs (`etcd.log`, `kube-apiserver.log`, ...).
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }

    /// Whether this handle started (and so stops) the processes; `false` for a reused one.
    pub fn owns_processes(&self) -> bool {
        !self.components.is_empty() || self.postgres.as_ref().is_some_and(Postgres::owns_process)
    }

    /// Process ids of the Kubernetes components this handle started, in start order (the
    /// database's is [`Postgres::pid`]).
    pub fn pids(&self) -> Vec<u32> {
        self.components.iter().map(|c| c.child.id()).collect()
    }

    /// The database's URL (`postgres://kinsight:...@127.0.0.1:PORT/kinsight`); `None` when
    /// started with `postgres: false`.
    pub fn database_url(&self) -> Option<String> {
        self.postgres.as_ref().map(Postgres::url)
    }

    /// The database server, `None` when started with `postgres: false`.
    pub fn postgres(&self) -> Option<&Postgres> {
        self.postgres.as_ref()
    }

    /// The database server, to restart it in chaos tests.
    pub fn postgres_mut(&mut self) -> Option<&mut Postgres> {
        self.postgres.as_mut()
    }

    /// The kubelet's kubeconfig (user [`NODE_USER`], group `system:nodes`); written only when
    /// started with [`ControlPlaneOptions::real_node`].
    pub fn node_kubeconfig_path(&self) -> PathBuf {
        self.state_dir.join("node.kubeconfig")
    }

    /// An admin client, built from [`ControlPlane::kubeconfig_path`].
    pub async fn client(&self) -> Result<kube::Client, TestbedError> {
        super::client_from_kubeconfig(&self.kubeconfig_path).await
    }

    async fn boot(
        &mut self,
        bins: &Binaries,
        opts: &ControlPlaneOptions,
    ) -> Result<(), TestbedError> {
        let started = Instant::now();
        let dir = self.state_dir.clone();
        let logs = dir.join("logs");
        for sub in [&dir, &logs, &dir.join("certs")] {
            std::fs::create_dir_all(sub)
                .map_err(|e| TestbedError::io(format!("creating {}", sub.display()), e))?;
        }
        let ports = choose_ports(&dir.join("ports.json"))?;
        let (sa_key, sa_pub) = ensure_service_account_keys(&dir).await?;
        let token = ensure_admin_token(&dir.join("tokens.csv"))?;
        let node_token = if opts.real_node {
            Some(ensure_node_token(&dir.join("tokens.csv"))?)
        } else {
            None
        };

        let etcd_url = format!("http://127.0.0.1:{}", ports.etcd_client);
        let peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
        let mut etcd = Command::new(&bins.etcd);
        etcd.arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"));
        self.spawn(ETCD, etcd, &logs)?;
        self.wait_for_port(ETCD, ports.etcd_client, opts.start_timeout)
            .await?;

        let mut apiserver = Command::new(&bins.apiserver);
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!("--secure-port={}", ports.apiserver))
            .arg("--bind-address=127.0.0.1")
            // With a real node, the `kubernetes` Service's endpoint is the host's bridge
            // address, the one pods reach (the node forwards it to the loopback listener);
            // the self-signed certificate then names it too (127.0.0.1 as the bind address).
            .arg(format!(
                "--advertise-address={}",
                if opts.real_node {
                    super::node::HOST_ADDRESS
                } else {
                    std::net::Ipv4Addr::LOCALHOST
                }
            ))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--allow-privileged=true")
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .args(&opts.extra_apiserver_args);
        self.spawn(KUBE_APISERVER, apiserver, &logs)?;
        self.server_url = format!("https://127.0.0.1:{}", ports.apiserver);
        // initdb and the database start take seconds: overlap them with the API server's.
        if opts.postgres {
            let (postgres, ready) = tokio::join!(
                Postgres::start_with_timeout(&dir, opts.start_timeout),
                self.wait_for_readyz(ports.apiserver, &token, opts.start_timeout)
            );
            ready?;
            self.postgres = Some(postgres?);
        } else {
            self.wait_for_readyz(ports.apiserver, &token, opts.start_timeout)
                .await?;
        }
        if let Some(node_token) = &node_token {
            write_token_kubeconfig(
                &self.node_kubeconfig_path(),
                &self.server_url,
                &ServerTrust::Insecure,
                node_token,
                "default",
            )?;
            bind_node_role(&self.client().await?).await?;
        }
        tracing::info!(
            server = %self.server_url,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "kube-apiserver ready"
        );

        if let Some(kcm_bin) = &bins.controller_manager {
            let kubeconfig = self.kubeconfig_path.display().to_string();
            let mut kcm = Command::new(kcm_bin);
            kcm.arg(format!("--kubeconfig={kubeconfig}"))
                .arg(format!("--authentication-kubeconfig={kubeconfig}"))
                .arg(format!("--authorization-kubeconfig={kubeconfig}"))
                .arg(SKIP_AUTHENTICATION_LOOKUP)
                .arg("--leader-elect=false")
                .arg(format!(
                    "--controllers={}",
                    if opts.real_node {
                        CONTROLLERS_WITH_REAL_NODE
                    } else {
                        CONTROLLERS
                    }
                ))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    sa_key.display()
                ))
                .args(opts.real_node.then(|| {
                    // What `kube-root-ca.crt` holds: the API server's self-signed
                    // certificate (it wrote it before answering /readyz).
                    format!(
                        "--root-ca-file={}",
                        dir.join("certs/apiserver.crt").display()
                    )
                }))
                .arg("--bind-address=127.0.0.1")
                // 1.20 also serves an insecure port (10252) by default; several control
                // planes side by side need it off.
                .arg("--port=0")
                .arg(format!("--secure-port={}", ports.controller_manager));
            self.spawn(KUBE_CONTROLLER_MANAGER, kcm, &logs)?;
            self.wait_for_port(
                KUBE_CONTROLLER_MANAGER,
                ports.controller_manager,
                opts.start_timeout,
            )
            .await?;
        }
        if let Some(scheduler_bin) = &bins.scheduler {
            let kubeconfig = self.kubeconfig_path.display().to_string();
            let [port] = free_ports::<1>()?;
            let mut scheduler = Command::new(scheduler_bin);
            scheduler
                .arg(format!("--kubeconfig={kubeconfig}"))
                .arg(format!("--authentication-kubeconfig={kubeconfig}"))
                .arg(format!("--authorization-kubeconfig={kubeconfig}"))
                .arg(SKIP_AUTHENTICATION_LOOKUP)
                .arg("--leader-elect=false")
                .arg("--bind-address=127.0.0.1")
                // No insecure port (10251 by default in 1.20), as for the controller manager.
                .arg("--port=0")
                .arg(format!("--secure-port={port}"));
            self.spawn(KUBE_SCHEDULER, scheduler, &logs)?;
            self.wait_for_port(KUBE_SCHEDULER, port, opts.start_timeout)
                .await?;
        }
        tracing::info!(
            state_dir = %dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "control plane started"
        );
        Ok(())
    }

    fn spawn(
        &mut self,
        name: &'static str,
        mut cmd: Command,
        logs: &Path,
    ) -> Result<(), TestbedError> {
        let log = logs.join(format!("{name}.log"));
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| TestbedError::io(format!("opening {}", log.display()), e))
        };
        let stdout = open()?;
        let stderr = open()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                TestbedError::io(format!("starting {name} ({:?})", cmd.get_program()), e)
            })?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
        self.components.push(Component { name, child, log });
        Ok(())
    }

    /// Fails if any component has exited.
    fn check_alive(&mut self) -> Result<(), TestbedError> {
        for c in &mut self.components {
            match c.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return Err(TestbedError::ProcessExited {
                        component: c.name.to_string(),
                        status: status.to_string(),
                        log: c.log.clone(),
                        log_tail: tail_file(&c.log, LOG_TAIL_LINES),
                    });
                }
                Err(e) => return Err(TestbedError::io(format!("checking on {}", c.name), e)),
            }
        }
        Ok(())
    }

    fn timeout_error(&self, name: &str, timeout: Duration) -> TestbedError {
        let log = self.log_dir().join(format!("{name}.log"));
        TestbedError::StartTimeout {
            component: name.to_string(),
            seconds: timeout.as_secs(),
            log_tail: tail_file(&log, LOG_TAIL_LINES),
            log,
        }
    }

    async fn wait_for_port(
        &mut self,
        name: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(name, timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the API server to listen, writes the admin kubeconfig trusting the
    /// certificate it made for itself (so clients verify it: no "cert bypassed"), then
    /// waits for `/readyz`. The probe is a plain HTTPS GET: while the API server boots it
    /// answers 500, which kube's client would log as errors.
    async fn wait_for_readyz(
        &mut self,
        port: u16,
        token: &str,
        timeout: Duration,
    ) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        // It writes its self-signed certificate (and the CA that signed it) before it
        // listens, or keeps the one a reused state folder holds.
        self.wait_for_port(KUBE_APISERVER, port, timeout).await?;
        let cert_path = self.state_dir.join("certs").join("apiserver.crt");
        let pem = std::fs::read(&cert_path)
            .map_err(|e| TestbedError::io(format!("reading {}", cert_path.display()), e))?;
        write_token_kubeconfig(
            &self.kubeconfig_path,
            &self.server_url,
            &ServerTrust::CaPem(pem.clone()),
            token,
            "default",
        )?;
        let probe = readyz_probe(&pem)?;
        loop {
            self.check_alive()?;
            if is_ready(&probe, &self.server_url).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(KUBE_APISERVER, timeout));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Stateless components first and at once; etcd gets a moment to stop cleanly so a
        // persisted dev state folder stays healthy.
        for c in self.components.iter_mut().rev() {
            if c.name == ETCD {
                let signalled = super::signal(c.child.id(), "TERM");
                let deadline = Instant::now() + Duration::from_secs(5);
                while signalled
                    && matches!(c.child.try_wait(), Ok(None))
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("state_dir", &self.state_dir)
            .field("pids", &self.pids())
            .field("postgres", &self.postgres)
            .finish()
    }
}

/// The folder binaries are looked up in when the options name none.
pub fn default_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(cache) = std::env::var_os("KINSIGHT_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(cache).join(CACHE_SUBDIR));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|home| {
            PathBuf::from(home)
                .join(".cache/kinsight")
                .join(CACHE_SUBDIR)
        })
}

fn find_binaries(opts: &ControlPlaneOptions) -> Result<Binaries, TestbedError> {
    let dir = match opts.bin_dir.clone().or_else(default_bin_dir) {
        Some(dir) => dir,
        None => {
            return Err(TestbedError::Config(
                "no binary folder: set KUBEBUILDER_ASSETS or HOME, or run \
                 scripts/build-kubernetes.sh"
                    .into(),
            ));
        }
    };
    let mut missing = Vec::new();
    let mut find = |name: &str| {
        let path = dir.join(name);
        if is_executable(&path) {
            Some(path)
        } else {
            missing.push(name.to_string());
            None
        }
    };
    let etcd = find(ETCD);
    let apiserver = find(KUBE_APISERVER);
    let controller_manager = if opts.controller_manager || opts.real_node {
        find(KUBE_CONTROLLER_MANAGER)
    } else {
        None
    };
    let scheduler = if opts.real_node {
        find(KUBE_SCHEDULER)
    } else {
        None
    };
    match (etcd, apiserver) {
        (Some(etcd), Some(apiserver)) if missing.is_empty() => Ok(Binaries {
            etcd,
            apiserver,
            controller_manager,
            scheduler,
        }),
        _ => Err(TestbedError::MissingBinaries { dir, missing }),
    }
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Starts of a control plane tried when a port it picked was taken before it was bound.
const PORT_RACE_TRIES: u32 = 3;

/// Whether a component could not start because its port was taken.
fn lost_a_port(error: &TestbedError) -> bool {
    match error {
        TestbedError::ProcessExited { log_tail, .. }
        | TestbedError::StartTimeout { log_tail, .. } => {
            log_tail.contains("address already in use")
        }
        _ => false,
    }
}

/// Reuses the ports remembered in `file` when they are all free, else picks new free ones.
fn choose_ports(file: &Path) -> Result<Ports, TestbedError> {
    if let Ok(text) = std::fs::read_to_string(file)
        && let Ok(old) = serde_json::from_str::<Ports>(&text)
    {
        let all = [
            old.etcd_client,
            old.etcd_peer,
            old.apiserver,
            old.controller_manager,
        ];
        // Hold all four at once so a half-free set is not taken.
        let held: Vec<_> = all
            .iter()
            .filter_map(|p| TcpListener::bind(("127.0.0.1", *p)).ok())
            .collect();
        if held.len() == all.len() {
            return Ok(old);
        }
    }
    let [etcd_client, etcd_peer, apiserver, controller_manager] = free_ports::<4>()?;
    let ports = Ports {
        etcd_client,
        etcd_peer,
        apiserver,
        controller_manager,
    };
    let text = serde_json::to_string(&ports)
        .map_err(|e| TestbedError::Config(format!("serialising ports: {e}")))?;
    std::fs::write(file, text)
        .map_err(|e| TestbedError::io(format!("writing {}", file.display()), e))?;
    Ok(ports)
}

/// `N` distinct free loopback ports (bound together, then released).
pub(crate) fn free_ports<const N: usize>() -> Result<[u16; N], TestbedError> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let l = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| TestbedError::io("binding a free loopback port", e))?;
        *port = l
            .local_addr()
            .map_err(|e| TestbedError::io("reading a bound port", e))?
            .port();
        listeners.push(l);
    }
    Ok(ports)
}

/// The service-account signing key pair (made once per state folder with the `openssl` CLI).
async fn ensure_service_account_keys(dir: &Path) -> Result<(PathBuf, PathBuf), TestbedError> {
    let key = dir.join("sa.key");
    let public = dir.join("sa.pub");
    if key.is_file() && public.is_file() {
        return Ok((key, public));
    }
    let key_arg = key.display().to_string();
    let pub_arg = public.display().to_string();
    openssl(&["genrsa", "-out", &key_arg, "2048"]).await?;
    openssl(&["rsa", "-in", &key_arg, "-pubout", "-out", &pub_arg]).await?;
    Ok((key, public))
}

async fn openssl(args: &[&str]) -> Result<(), TestbedError> {
    let command = format!("openssl {}", args.join(" "));
    let output = tokio::process::Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| TestbedError::io(format!("running `{command}` (is openssl installed?)"), e))?;
    super::succeeded(command, &output)
}

/// The admin token from the static token file, creating the file with a random one.
fn ensure_admin_token(file: &Path) -> Result<String, TestbedError> {
    if let Ok(text) = std::fs::read_to_string(file)
        && let Some(token) = text
            .lines()
            .find(|l| l.ends_with(",admin,admin,system:masters"))
            .and_then(|l| l.split(',').next())
            .filter(|t| !t.is_empty())
    {
        return Ok(token.to_string());
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_private_file(
        file,
        format!("{token},admin,admin,system:masters\n").as_bytes(),
    )?;
    Ok(token)
}

/// The kubelet's token from the static token file, appending a line with a random one when
/// there is none (read by the API server when it starts, so written before).
fn ensure_node_token(file: &Path) -> Result<String, TestbedError> {
    let suffix = format!(",{NODE_USER},{NODE_USER},{NODES_GROUP}");
    let text = std::fs::read_to_string(file)
        .map_err(|e| TestbedError::io(format!("reading {}", file.display()), e))?;
    if let Some(token) = text
        .lines()
        .find(|l| l.ends_with(&suffix))
        .and_then(|l| l.split(',').next())
        .filter(|t| !t.is_empty())
    {
        return Ok(token.to_string());
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_private_file(file, format!("{text}{token}{suffix}\n").as_bytes())?;
    Ok(token)
}

/// Binds RBAC's `system:node` role to the `system:nodes` group, as the Node authorizer would
/// allow (this API server runs RBAC alone).
async fn bind_node_role(client: &kube::Client) -> Result<(), TestbedError> {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    use kube::api::{Api, Patch, PatchParams};
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": { "name": "kinsight-testbed-nodes" },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"
        },
        "subjects": [{
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": NODES_GROUP
        }],
    });
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            "kinsight-testbed-nodes",
            &PatchParams::apply("kinsight-testbed").force(),
            &Patch::Apply(&binding),
        )
        .await
        .map_err(|e| TestbedError::kube("binding system:node to system:nodes", e))?;
    Ok(())
}

fn server_of_kubeconfig(path: &Path) -> Result<String, TestbedError> {
    let err = |detail: String| TestbedError::Kubeconfig {
        path: path.to_path_buf(),
        detail,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    kc.clusters
        .iter()
        .find_map(|c| c.cluster.as_ref().and_then(|c| c.server.clone()))
        .ok_or_else(|| err("no cluster server".into()))
}

/// An HTTPS client trusting the certificates of `pem` (the API server's own), for its
/// `/readyz` (anonymous: no token needed).
fn readyz_probe(pem: &[u8]) -> Result<reqwest::Client, TestbedError> {
    super::install_crypto_provider();
    let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
        TestbedError::io(
            "reading the API server's certificate",
            std::io::Error::other(e),
        )
    })?;
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(2));
    for certificate in certificates {
        builder = builder.add_root_certificate(certificate);
    }
    builder
        .build()
        .map_err(|e| TestbedError::io("making the /readyz probe", std::io::Error::other(e)))
}

/// Whether the API server at `server_url` answers `/readyz` with success.
async fn is_ready(probe: &reqwest::Client, server_url: &str) -> bool {
    probe
        .get(format!("{server_url}/readyz"))
        .send()
        .await
        .is_ok_and(|a| a.status().is_success())
}

/// Serialises the unit tests that bind and release loopback ports: a port one of them just
/// released can be handed to another's `bind(0)`, failing the "remembered while free" checks.
#[cfg(test)]
pub(crate) fn port_test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_name_the_build_script() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = ControlPlaneOptions {
            bin_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let Err(err) = find_binaries(&opts) else {
            panic!("expected an error")
        };
        assert_eq!(err.category(), "missing_binaries");
        let text = err.to_string();
        assert!(text.contains("scripts/build-kubernetes.sh"), "{text}");
        assert!(text.contains("kube-apiserver") && text.contains("kube-controller-manager"));
    }

    #[test]
    fn controller_manager_is_optional() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [ETCD, KUBE_APISERVER] {
            let path = dir.path().join(name);
            std::fs::write(&path, "#!/bin/sh\n").expect("write");
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let mut opts = ControlPlaneOptions {
            bin_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        assert!(find_binaries(&opts).is_err());
        opts.controller_manager = false;
        let bins = find_binaries(&opts).expect("found");
        assert!(bins.controller_manager.is_none());
    }

    #[test]
    fn a_port_taken_before_it_was_bound_is_told_apart() {
        let exited = |tail: &str| TestbedError::ProcessExited {
            component: "kube-apiserver".into(),
            status: "exit status: 1".into(),
            log: PathBuf::from("kube-apiserver.log"),
            log_tail: tail.into(),
        };
        assert!(lost_a_port(&exited(
            "Error: failed to create listener: failed to listen on 127.0.0.1:46079: \
             listen tcp 127.0.0.1:46079: bind: address already in use"
        )));
        assert!(!lost_a_port(&exited("Error: unknown flag: --nope")));
        assert!(!lost_a_port(&TestbedError::Config("no binaries".into())));
    }

    #[test]
    fn free_ports_are_distinct() {
        let _lock = port_test_lock();
        let ports = free_ports::<4>().expect("ports");
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4);
        assert!(ports.iter().all(|p| *p != 0));
    }

    #[test]
    fn ports_are_remembered_when_free() {
        let _lock = port_test_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ports.json");
        let first = choose_ports(&file).expect("ports");
        let second = choose_ports(&file).expect("ports");
        assert_eq!(first, second);
        let _busy = TcpListener::bind(("127.0.0.1", first.apiserver)).expect("bind");
        let third = choose_ports(&file).expect("ports");
        assert_ne!(third.apiserver, first.apiserver);
    }

    #[test]
    fn admin_token_is_stable_per_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tokens.csv");
        let a = ensure_admin_token(&file).expect("token");
        let b = ensure_admin_token(&file).expect("token");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let node = ensure_node_token(&file).expect("node token");
        assert_eq!(node, ensure_node_token(&file).expect("node token"));
        assert_ne!(node, a);
        assert_eq!(a, ensure_admin_token(&file).expect("token"));
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(text.contains(&format!("{node},{NODE_USER},{NODE_USER},system:nodes")));
    }

    #[tokio::test]
    async fn service_account_keys_are_made_with_openssl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, public) = ensure_service_account_keys(dir.path()).await.expect("keys");
        let pem = std::fs::read_to_string(public).expect("read");
        assert!(pem.contains("BEGIN PUBLIC KEY"), "{pem}");
        assert!(key.is_file());
    }
}
