//! The testbed's control plane (etcd + kube-apiserver + kube-controller-manager 1.20, built
//! by scripts/build-kubernetes.sh) and its PostgreSQL: a state folder keeps data across
//! starts, dropping stops every process, a failing component reports its log. Pods on the
//! real node: tests/real_node.rs and tests/real_node_e2e.rs.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::eventually;
use kinsight::testbed::{ControlPlane, ControlPlaneOptions, Postgres};
use kube::api::{Api, PostParams};
use serde_json::json;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kinsight=info".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

async fn start_control_plane(state_dir: Option<PathBuf>) -> ControlPlane {
    let started = Instant::now();
    let cp = ControlPlane::start(ControlPlaneOptions {
        state_dir,
        // Tests start several control planes side by side on few cores.
        start_timeout: Duration::from_secs(120),
        ..ControlPlaneOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("control plane did not start: {e}"));
    eprintln!(
        "control plane at {} started in {:.1} s",
        cp.server_url(),
        started.elapsed().as_secs_f64()
    );
    cp
}

/// A live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_stops_processes_and_a_state_dir_keeps_data() {
    init_tracing();
    bounded(async {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = state.path().join("cluster");

        let cp = ControlPlane::start_or_reuse(&dir).await.expect("start");
        assert!(cp.owns_processes());
        let pids = cp.pids();
        assert_eq!(
            pids.len(),
            3,
            "etcd, kube-apiserver, kube-controller-manager"
        );
        assert!(pids.iter().all(|p| alive(*p)));
        // The API server has no client CA to publish: the controller manager does not look
        // for one (it would log a miss every few seconds). Its lookup controllers start
        // before it serves; its log is flushed every 5 s.
        let kcm_log_path = cp.log_dir().join("kube-controller-manager.log");
        let kcm_log = eventually(
            "the controller manager's log to say it serves",
            Duration::from_secs(15),
            async || {
                std::fs::read_to_string(&kcm_log_path)
                    .ok()
                    .filter(|text| text.contains("Serving securely"))
            },
        )
        .await;
        assert!(
            !kcm_log.contains("extension-apiserver-authentication"),
            "{kcm_log}"
        );
        let url = cp.server_url().to_string();
        // The admin kubeconfig trusts the API server's own certificate: clients (kubectl,
        // kube) verify it instead of skipping verification.
        let kubeconfig =
            kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).expect("kubeconfig");
        let cluster = kubeconfig.clusters[0].cluster.as_ref().expect("cluster");
        assert_ne!(cluster.insecure_skip_tls_verify, Some(true));
        assert!(cluster.certificate_authority_data.is_some());

        // A second handle on the same folder reuses the running control plane.
        let reused = ControlPlane::start_or_reuse(&dir).await.expect("reuse");
        assert!(!reused.owns_processes());
        assert_eq!(reused.server_url(), url);
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(reused.client().await.expect("client"), "default");
        let cm = serde_json::from_value(json!({
            "metadata": { "name": "kept" }, "data": { "k": "v" }
        }))
        .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
        drop(reused);
        assert!(
            pids.iter().all(|p| alive(*p)),
            "a reused handle stops nothing"
        );

        drop(cp);
        for pid in &pids {
            assert!(!alive(*pid), "process {pid} survived the drop");
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "process {pid} not reaped"
            );
        }

        // Starting again in the folder brings the data (and the URL) back.
        let again = ControlPlane::start_or_reuse(&dir).await.expect("restart");
        assert!(again.owns_processes());
        assert_eq!(again.server_url(), url);
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(again.client().await.expect("client"), "default");
        let kept = cms.get("kept").await.expect("kept across restarts");
        assert_eq!(
            kept.data.and_then(|d| d.get("k").cloned()).as_deref(),
            Some("v")
        );
        let pids = again.pids();
        drop(again);
        assert!(pids.iter().all(|p| !alive(*p)));

        // A temporary control plane removes its folder.
        let temp = start_control_plane(None).await;
        let temp_dir = temp.state_dir().to_path_buf();
        assert!(temp_dir.join("kubeconfig").is_file());
        drop(temp);
        assert!(!temp_dir.exists());
    })
    .await;
}

/// `SELECT 1` on `url` (a fresh connection each time).
async fn select_one(url: &str) -> Result<i32, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.query_one("SELECT 1", &[]).await?.try_get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_runs_with_the_control_plane_and_survives_a_restart() {
    init_tracing();
    bounded(async {
        // The control plane's database.
        let cp = start_control_plane(None).await;
        let url = cp.database_url().expect("a database by default");
        assert!(url.starts_with("postgres://kinsight:"), "{url}");
        assert!(url.ends_with("/kinsight"), "{url}");
        assert_eq!(select_one(&url).await.expect("SELECT 1"), 1);
        let cp_pg = cp.postgres().expect("postgres").pid();
        assert!(alive(cp_pg));
        drop(cp);
        assert!(
            !alive(cp_pg),
            "the control plane's postgres survived the drop"
        );

        // A standalone server: restarted on the same URL with its data.
        let dir = tempfile::tempdir().expect("tempdir");
        // A private folder, as root: the server (run as `postgres`) may only traverse it.
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let mut pg = Postgres::start(dir.path()).await.expect("start postgres");
        assert!(pg.owns_process());
        let as_root = std::fs::metadata("/proc/self").expect("proc").uid() == 0;
        let mode = std::fs::metadata(dir.path()).expect("meta").mode() & 0o777;
        assert_eq!(mode, if as_root { 0o701 } else { 0o700 }, "{mode:o}");
        let password_mode = std::fs::metadata(dir.path().join("postgres-password"))
            .expect("password file")
            .mode();
        assert_eq!(password_mode & 0o777, 0o600);
        let url = pg.url();
        let first_pid = pg.pid();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
            .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
            .await
            .expect("write");

        // A second handle on the folder reuses the running server and owns nothing.
        let reused = Postgres::start_or_reuse(dir.path()).await.expect("reuse");
        assert!(!reused.owns_process());
        assert_eq!(reused.url(), url);
        assert_eq!(reused.pid(), first_pid);
        drop(reused);
        assert!(alive(first_pid), "a reused handle stops nothing");

        pg.restart().await.expect("restart");
        assert_eq!(pg.url(), url);
        assert_ne!(pg.pid(), first_pid);
        assert!(!alive(first_pid));
        assert!(
            client.query_one("SELECT 1", &[]).await.is_err(),
            "a restart ends open sessions"
        );
        assert_eq!(select_one(&url).await.expect("SELECT 1 after restart"), 1);

        let pid = pg.pid();
        drop(pg);
        eventually(
            &format!("postgres {pid} to end"),
            Duration::from_secs(15),
            || async move { (!alive(pid)).then_some(()) },
        )
        .await;
        assert!(
            select_one(&url).await.is_err(),
            "nothing answers after the drop"
        );

        // Started again in the folder: same URL, same rows.
        let again = Postgres::start(dir.path()).await.expect("start again");
        assert_eq!(again.url(), url);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        let v: i32 = client
            .query_one("SELECT v FROM kept", &[])
            .await
            .expect("kept across restarts")
            .get(0);
        assert_eq!(v, 7);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_apiserver_reports_its_log() {
    init_tracing();
    bounded(async {
        let err = ControlPlane::start(ControlPlaneOptions {
            extra_apiserver_args: vec!["--no-such-flag".into()],
            ..ControlPlaneOptions::default()
        })
        .await
        .expect_err("the API server cannot start");
        assert_eq!(err.category(), "process_exited", "{err}");
        let text = err.to_string();
        assert!(text.contains("kube-apiserver"), "{text}");
        assert!(text.contains("no-such-flag"), "{text}");
    })
    .await;
}
