//! A cluster for tests, following the envtest conventions.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::control_plane::{ControlPlane, ControlPlaneOptions};
use super::postgres::Postgres;
use super::{TestbedError, install_crypto_provider};

/// The database an existing cluster's tests use, instead of a local PostgreSQL.
pub const DATABASE_URL_ENV: &str = "KINSIGHT_DATABASE_URL";

/// A cluster to test against: the ambient one when `USE_EXISTING_CLUSTER=true` (no Kubernetes
/// is started), otherwise a local [`ControlPlane`] that is stopped when this is dropped. Either
/// way it has a database ([`TestCluster::database_url`]).
pub struct TestCluster {
    client: kube::Client,
    server_url: String,
    control_plane: Option<ControlPlane>,
    /// The kubeconfig a shared cluster was reached with ([`TestCluster::connect_shared`]).
    kubeconfig: Option<PathBuf>,
    /// `KINSIGHT_DATABASE_URL`, for an existing cluster.
    external_database_url: Option<String>,
    /// A local PostgreSQL for an existing cluster without `KINSIGHT_DATABASE_URL`.
    postgres: Option<Postgres>,
    // After `postgres`, so that the server is stopped before its folder goes.
    _postgres_dir: Option<TempDir>,
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
    /// `opts.postgres` says whether the cluster gets a database.
    pub async fn start_with(opts: ControlPlaneOptions) -> Result<TestCluster, TestbedError> {
        if use_existing_cluster() {
            let mut cluster = TestCluster::connect_existing_without_database().await?;
            if opts.postgres {
                cluster.attach_database().await?;
            }
            return Ok(cluster);
        }
        let control_plane = ControlPlane::start(opts).await?;
        Ok(TestCluster {
            client: control_plane.client().await?,
            server_url: control_plane.server_url().to_string(),
            control_plane: Some(control_plane),
            kubeconfig: None,
            external_database_url: None,
            postgres: None,
            _postgres_dir: None,
        })
    }

    /// The ambient cluster (`KUBECONFIG`, `~/.kube/config` or in-cluster); starts no
    /// Kubernetes. The database is `KINSIGHT_DATABASE_URL`, else a local PostgreSQL in a
    /// temporary folder.
    pub async fn connect_existing() -> Result<TestCluster, TestbedError> {
        let mut cluster = TestCluster::connect_existing_without_database().await?;
        cluster.attach_database().await?;
        Ok(cluster)
    }

    /// A control plane another part of the test process started and keeps running (the
    /// real-node stack a test binary's tests share), reached through its admin `kubeconfig`,
    /// with `database_url` as the database. Dropping this stops nothing.
    pub async fn connect_shared(
        kubeconfig: &Path,
        database_url: String,
    ) -> Result<TestCluster, TestbedError> {
        let err = |detail: String| TestbedError::Kubeconfig {
            path: kubeconfig.to_path_buf(),
            detail,
        };
        let file =
            kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| err(e.to_string()))?;
        let server_url = file
            .clusters
            .iter()
            .find_map(|c| c.cluster.as_ref()?.server.clone())
            .ok_or_else(|| err("names no server".into()))?;
        let client = super::client_from_kubeconfig(kubeconfig).await?;
        Ok(TestCluster {
            client,
            server_url,
            control_plane: None,
            kubeconfig: Some(kubeconfig.to_path_buf()),
            external_database_url: Some(database_url),
            postgres: None,
            _postgres_dir: None,
        })
    }

    /// [`TestCluster::connect_shared`] with a PostgreSQL of its own in a temporary folder
    /// (see [`TestCluster::postgres_mut`]), for a test that restarts its database.
    pub async fn connect_shared_with_own_database(
        kubeconfig: &Path,
    ) -> Result<TestCluster, TestbedError> {
        let mut cluster = Self::connect_shared(kubeconfig, String::new()).await?;
        cluster.external_database_url = None;
        cluster.attach_database().await?;
        Ok(cluster)
    }

    async fn attach_database(&mut self) -> Result<(), TestbedError> {
        if let Some(url) = std::env::var(DATABASE_URL_ENV)
            .ok()
            .filter(|u| !u.trim().is_empty())
        {
            self.external_database_url = Some(url);
            return Ok(());
        }
        let dir = tempfile::Builder::new()
            .prefix("kinsight-postgres-")
            .tempdir()
            .map_err(|e| TestbedError::io("creating a temporary database folder", e))?;
        self.postgres = Some(Postgres::start(dir.path()).await?);
        self._postgres_dir = Some(dir);
        Ok(())
    }

    async fn connect_existing_without_database() -> Result<TestCluster, TestbedError> {
        install_crypto_provider();
        let config = kube::Config::infer()
            .await
            .map_err(|e| TestbedError::Config(format!("no usable kubeconfig: {e}")))?;
        let server_url = config.cluster_url.to_string();
        let client = kube::Client::try_from(config)
            .map_err(|e| TestbedError::kube("building a client for the ambient cluster", e))?;
        Ok(TestCluster {
            client,
            server_url,
            control_plane: None,
            kubeconfig: None,
            external_database_url: None,
            postgres: None,
            _postgres_dir: None,
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

    /// The admin kubeconfig of a local or shared control plane; `None` for an existing cluster.
    pub fn kubeconfig_path(&self) -> Option<&Path> {
        self.kubeconfig.as_deref().or_else(|| {
            self.control_plane
                .as_ref()
                .map(ControlPlane::kubeconfig_path)
        })
    }

    /// The database's URL. Empty only for a cluster started with `postgres: false`.
    pub fn database_url(&self) -> String {
        if let Some(url) = &self.external_database_url {
            return url.clone();
        }
        self.postgres
            .as_ref()
            .map(Postgres::url)
            .or_else(|| {
                self.control_plane
                    .as_ref()
                    .and_then(ControlPlane::database_url)
            })
            .unwrap_or_default()
    }

    /// The local PostgreSQL, to restart it in chaos tests; `None` for `KINSIGHT_DATABASE_URL`
    /// or `postgres: false`.
    pub fn postgres_mut(&mut self) -> Option<&mut Postgres> {
        match &mut self.postgres {
            Some(pg) => Some(pg),
            None => self
                .control_plane
                .as_mut()
                .and_then(ControlPlane::postgres_mut),
        }
    }
}
