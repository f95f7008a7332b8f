//! A cluster for tests, following the envtest conventions.

use std::path::PathBuf;

use super::control_plane::{ControlPlane, ControlPlaneOptions};
use super::node_agent::NodeAgentOptions;
use super::{TestbedError, install_crypto_provider};

/// A cluster to test against: the ambient one when `USE_EXISTING_CLUSTER=true` (nothing is
/// started), otherwise a local [`ControlPlane`] that is stopped when this is dropped.
pub struct TestCluster {
    client: kube::Client,
    server_url: String,
    server_ca_pem: Option<Vec<u8>>,
    control_plane: Option<ControlPlane>,
}

/// `USE_EXISTING_CLUSTER` is `true` (or `1`/`yes`, any case).
pub fn use_existing_cluster() -> bool {
    std::env::var("USE_EXISTING_CLUSTER")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
        .unwrap_or(false)
}

impl TestCluster {
    /// [`TestCluster::start_with`] with default control-plane options.
    pub async fn start() -> Result<TestCluster, TestbedError> {
        TestCluster::start_with(ControlPlaneOptions::default()).await
    }

    /// Connects to the ambient cluster (`USE_EXISTING_CLUSTER=true`) or starts a control plane.
    pub async fn start_with(opts: ControlPlaneOptions) -> Result<TestCluster, TestbedError> {
        if use_existing_cluster() {
            return TestCluster::connect_existing().await;
        }
        let control_plane = ControlPlane::start(opts).await?;
        Ok(TestCluster {
            client: control_plane.client().await?,
            server_url: control_plane.server_url().to_string(),
            server_ca_pem: None,
            control_plane: Some(control_plane),
        })
    }

    /// The ambient cluster (`KUBECONFIG`, `~/.kube/config` or in-cluster); starts nothing.
    pub async fn connect_existing() -> Result<TestCluster, TestbedError> {
        install_crypto_provider();
        let config = kube::Config::infer()
            .await
            .map_err(|e| TestbedError::Config(format!("no usable kubeconfig: {e}")))?;
        let server_url = config.cluster_url.to_string();
        let server_ca_pem = match (&config.root_cert, &config.root_cert_file) {
            (Some(ders), _) if !ders.is_empty() => Some(ders_to_pem(ders)),
            (_, Some(file)) => Some(
                std::fs::read(file)
                    .map_err(|e| TestbedError::io(format!("reading {}", file.display()), e))?,
            ),
            _ => None,
        };
        let client = kube::Client::try_from(config)
            .map_err(|e| TestbedError::kube("building a client for the ambient cluster", e))?;
        Ok(TestCluster {
            client,
            server_url,
            server_ca_pem,
            control_plane: None,
        })
    }

    /// A client with the credentials the cluster was reached with (admin for a local one).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The API server's URL.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The local control plane, `None` for an existing cluster.
    pub fn control_plane(&self) -> Option<&ControlPlane> {
        self.control_plane.as_ref()
    }

    /// Node-agent options whose workers reach this cluster.
    pub fn node_agent_options(
        &self,
        node_name: impl Into<String>,
        binary: impl Into<PathBuf>,
        log_dir: impl Into<PathBuf>,
    ) -> NodeAgentOptions {
        let mut opts = NodeAgentOptions::new(node_name, binary, log_dir);
        opts.server_url = Some(self.server_url.clone());
        opts.server_ca_pem = self.server_ca_pem.clone();
        opts
    }
}

/// DER certificates as one PEM bundle.
pub(crate) fn ders_to_pem(ders: &[Vec<u8>]) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_lines_are_wrapped() {
        let pem = String::from_utf8(ders_to_pem(&[vec![7u8; 100]])).expect("utf8");
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().copied(), Some("-----END CERTIFICATE-----"));
    }
}
