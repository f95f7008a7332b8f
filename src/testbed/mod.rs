//! A real, local Kubernetes to develop and test against (see `shared/TESTBED.md` §1).
//!
//! - [`ControlPlane`]: etcd + kube-apiserver + kube-controller-manager 1.20 as local
//!   processes (the real Job controller and garbage collector), torn down on drop.
//! - [`TestCluster`]: the envtest conventions: `USE_EXISTING_CLUSTER=true` uses the ambient
//!   kubeconfig, otherwise a [`ControlPlane`] is started.
//! - [`Postgres`]: a real PostgreSQL (Debian's package) in a state folder, started with the
//!   control plane (and for [`TestCluster`]s on an existing cluster).
//! - [`RealNode`]: a real node: containerd (CRI) + runc + a CNI bridge + kubelet,
//!   beside a [`ControlPlane`] started with [`ControlPlaneOptions::real_node`] (which adds
//!   kube-scheduler); one per machine.
//!
//! Nothing here is a mock: the binaries are the upstream ones, built by
//! `scripts/build-kubernetes.sh`.

mod api_metrics;
mod cluster;
pub mod control_plane;
pub mod node;
pub mod postgres;

use std::path::{Path, PathBuf};

pub use api_metrics::{ApiKey, ApiStats, api_metrics};
pub use cluster::{TestCluster, use_existing_cluster};
pub use control_plane::{ControlPlane, ControlPlaneOptions};
pub use node::{RealNode, RealNodeOptions, container_started};
pub use postgres::Postgres;

/// Everything that can go wrong while starting or driving the testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The control-plane binaries are not where they were looked for.
    #[error(
        "control-plane binaries missing in {}: {}; build them with scripts/build-kubernetes.sh \
         and, for a real node's kubelet and kube-scheduler, scripts/build-node.sh (or point \
         KUBEBUILDER_ASSETS at a folder holding etcd, kube-apiserver and \
         kube-controller-manager)",
        dir.display(),
        missing.join(", ")
    )]
    MissingBinaries { dir: PathBuf, missing: Vec<String> },

    /// A file-system or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A helper command (such as `openssl`) ran but failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },

    /// A control-plane process exited while it should be running.
    #[error("{component} exited early ({status}); last lines of {}:\n{log_tail}", log.display())]
    ProcessExited {
        component: String,
        status: String,
        log: PathBuf,
        log_tail: String,
    },

    /// A component did not become ready in time.
    #[error(
        "{component} not ready after {seconds} s; last lines of {}:\n{log_tail}",
        log.display()
    )]
    StartTimeout {
        component: String,
        seconds: u64,
        log: PathBuf,
        log_tail: String,
    },

    /// A kubeconfig could not be read, written or turned into a client.
    #[error("kubeconfig {}: {detail}", path.display())]
    Kubeconfig { path: PathBuf, detail: String },

    /// A call to the Kubernetes API failed.
    #[error("{context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },

    /// Options or environment are inconsistent.
    #[error("invalid testbed configuration: {0}")]
    Config(String),

    /// PostgreSQL's binaries (or, as root, its `postgres` system user) are missing.
    #[error(
        "PostgreSQL unavailable: {0}; install Debian's postgresql package (scripts/setup.sh \
         runs apt-get install postgresql) or point KINSIGHT_POSTGRES_BIN at a folder holding \
         initdb and postgres"
    )]
    MissingPostgres(String),

    /// The testbed's PostgreSQL answered with an error.
    #[error("{context}: {detail}")]
    Database { context: String, detail: String },
}

impl TestbedError {
    /// A stable, machine-readable name for the kind of error (for logs and metrics).
    pub fn category(&self) -> &'static str {
        match self {
            TestbedError::MissingBinaries { .. } => "missing_binaries",
            TestbedError::Io { .. } => "io",
            TestbedError::Command { .. } => "command_failed",
            TestbedError::ProcessExited { .. } => "process_exited",
            TestbedError::StartTimeout { .. } => "start_timeout",
            TestbedError::Kubeconfig { .. } => "kubeconfig",
            TestbedError::Kube { .. } => "kube_api",
            TestbedError::Config(_) => "config",
            TestbedError::MissingPostgres(_) => "missing_postgres",
            TestbedError::Database { .. } => "database",
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TestbedError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn database(context: impl Into<String>, detail: impl Into<String>) -> Self {
        TestbedError::Database {
            context: context.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        TestbedError::Kube {
            context: context.into(),
            source,
        }
    }
}

/// Sends signal `name` (e.g. `TERM`) to `pid`; whether it was delivered.
pub(crate) fn signal(pid: u32, name: &str) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A finished command's outcome: its failure becomes [`TestbedError::Command`] with its
/// exit status and stderr.
pub(crate) fn succeeded(
    command: impl Into<String>,
    output: &std::process::Output,
) -> Result<(), TestbedError> {
    if output.status.success() {
        return Ok(());
    }
    Err(TestbedError::Command {
        command: command.into(),
        detail: format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

/// kube's rustls needs a process-wide crypto provider; installing it twice is harmless.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How a kubeconfig written by the testbed trusts the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerTrust {
    /// `insecure-skip-tls-verify: true` (the local control plane's self-signed cert).
    Insecure,
    /// `certificate-authority-data` with these PEM bytes.
    CaPem(Vec<u8>),
}

/// Writes a single-context token kubeconfig, readable by the owner only.
pub(crate) fn write_token_kubeconfig(
    path: &Path,
    server: &str,
    trust: &ServerTrust,
    token: &str,
    namespace: &str,
) -> Result<(), TestbedError> {
    use base64::Engine as _;
    let mut cluster = serde_json::json!({ "server": server });
    match trust {
        ServerTrust::Insecure => cluster["insecure-skip-tls-verify"] = true.into(),
        ServerTrust::CaPem(pem) => {
            cluster["certificate-authority-data"] =
                base64::engine::general_purpose::STANDARD.encode(pem).into()
        }
    }
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "testbed", "cluster": cluster }],
        "users": [{ "name": "testbed", "user": { "token": token } }],
        "contexts": [{
            "name": "testbed",
            "context": { "cluster": "testbed", "user": "testbed", "namespace": namespace }
        }],
        "current-context": "testbed",
    });
    let text = serde_yaml::to_string(&doc).map_err(|e| TestbedError::Kubeconfig {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    write_private_file(path, text.as_bytes())
}

/// Writes `contents` to `path` (replacing it) with mode 0600.
pub(crate) fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), TestbedError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let context = || format!("writing {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TestbedError::io(context(), e))?;
    file.write_all(contents)
        .map_err(|e| TestbedError::io(context(), e))
}

/// Builds a client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, TestbedError> {
    install_crypto_provider();
    let err = |detail: String| TestbedError::Kubeconfig {
        path: path.to_path_buf(),
        detail,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// The last `lines` lines of a (log) file, for error messages.
pub(crate) fn tail_file(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_stable() {
        let e = TestbedError::MissingBinaries {
            dir: "/x".into(),
            missing: vec!["etcd".into()],
        };
        assert_eq!(e.category(), "missing_binaries");
        assert!(e.to_string().contains("scripts/build-kubernetes.sh"));
        assert!(e.to_string().contains("etcd"));
        assert_eq!(TestbedError::Config("x".into()).category(), "config");
        assert_eq!(
            TestbedError::MissingPostgres("x".into()).category(),
            "missing_postgres"
        );
        assert_eq!(TestbedError::database("a", "b").category(), "database");
        let e = TestbedError::io("doing", std::io::Error::other("boom"));
        assert_eq!(e.category(), "io");
        assert_eq!(e.to_string(), "doing: boom");
    }

    #[test]
    fn token_kubeconfig_round_trips_through_kube() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kc");
        write_token_kubeconfig(
            &path,
            "https://127.0.0.1:1234",
            &ServerTrust::Insecure,
            "tok",
            "ns1",
        )
        .expect("write");
        let kc = kube::config::Kubeconfig::read_from(&path).expect("parse");
        assert_eq!(kc.current_context.as_deref(), Some("testbed"));
        let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.insecure_skip_tls_verify, Some(true));
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:1234"));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("token: tok"), "{text}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\n").expect("write");
        assert_eq!(tail_file(&path, 2), "b\nc");
        assert!(tail_file(&dir.path().join("none"), 2).contains("cannot read"));
    }
}
