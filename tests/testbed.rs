//! The testbed against a real control plane (etcd + kube-apiserver + kube-controller-manager
//! 1.20, built by scripts/build-kubernetes.sh): the real Job controller sees pods run by the
//! node agent succeed and fail, workers get real ServiceAccount tokens, and nothing leaks.
//!
//! `/bin/sh` stands in for the kinsight binary: a container command `kinsight -c SCRIPT`
//! runs `/bin/sh -c SCRIPT`.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::eventually;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kinsight::testbed::{ControlPlane, ControlPlaneOptions, Postgres, TestCluster, node_agent};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
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

/// Runs a node agent until dropped.
struct Agent(tokio::task::JoinHandle<()>);

impl Agent {
    fn spawn(client: kube::Client, opts: node_agent::NodeAgentOptions) -> Agent {
        Agent(tokio::spawn(async move {
            if let Err(e) = node_agent::run(client, opts).await {
                panic!("node agent failed: {e}");
            }
        }))
    }

    /// Stops the agent and waits until its task (and so its processes) are dropped.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn agent_options(cp: &ControlPlane, node: &str, log_dir: &Path) -> node_agent::NodeAgentOptions {
    cp.node_agent_options(node, "/bin/sh", log_dir)
}

/// A local control plane, or the ambient cluster with `USE_EXISTING_CLUSTER=true`.
async fn test_cluster() -> TestCluster {
    let started = Instant::now();
    let cluster = TestCluster::start_with(ControlPlaneOptions {
        start_timeout: Duration::from_secs(120),
        ..ControlPlaneOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("no test cluster: {e}"));
    eprintln!(
        "cluster at {} ready in {:.1} s",
        cluster.server_url(),
        started.elapsed().as_secs_f64()
    );
    cluster
}

/// A fresh namespace (unique, so an existing cluster can be reused).
async fn unique_namespace(client: &kube::Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    create_namespace(client, &name).await;
    name
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let ns: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": name } })).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

async fn create_job(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    script: &str,
    backoff_limit: i32,
    service_account: Option<&str>,
) {
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "containers": [{
            "name": "worker",
            "image": "kinsight:test",
            "command": ["kinsight", "-c", script],
            "env": [
                { "name": "GREETING", "value": "hello" },
                { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }
            ]
        }]
    });
    if let Some(sa) = service_account {
        pod_spec["serviceAccountName"] = sa.into();
    }
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "backoffLimit": backoff_limit, "template": { "spec": pod_spec } }
    }))
    .expect("job");
    Api::<Job>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &job)
        .await
        .expect("create job");
}

/// Waits for a Job to finish (succeeded or failed).
async fn finished_job(client: &kube::Client, namespace: &str, name: &str) -> Job {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    eventually(
        &format!("job {namespace}/{name}"),
        Duration::from_secs(150),
        || {
            let jobs = jobs.clone();
            async move {
                let job = jobs.get(name).await.ok()?;
                let status = job.status.as_ref()?;
                let finished =
                    status.conditions.iter().flatten().any(|c| {
                        (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                    });
                finished.then_some(job)
            }
        },
    )
    .await
}

async fn job_pods(client: &kube::Client, namespace: &str, job: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .expect("list pods")
        .items
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn exit_code(pod: &Pod) -> Option<i32> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    Some(status.state.as_ref()?.terminated.as_ref()?.exit_code)
}

/// The worker's pid, from the containerID the agent reports while it runs.
fn running_pid(pod: &Pod) -> Option<u32> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    status.state.as_ref()?.running.as_ref()?;
    status
        .container_id
        .as_deref()?
        .strip_prefix("kinsight://")?
        .parse()
        .ok()
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

async fn wait_dead(pid: u32) {
    eventually(
        &format!("process {pid} to end"),
        Duration::from_secs(10),
        || async move { (!alive(pid)).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_succeed_and_fail_through_the_real_job_controller() {
    init_tracing();
    bounded(async {
        let cluster = test_cluster().await;
        let client = cluster.client();
        let logs = tempfile::tempdir().expect("tempdir");
        let node = format!("node-a-{:08x}", rand::random::<u32>());
        let ns = unique_namespace(&client, "jobs").await;
        let mut opts = cluster.node_agent_options(node.as_str(), "/bin/sh", logs.path());
        // Only this test's pods, should the cluster be shared.
        opts.namespace = Some(ns.clone());
        let _agent = Agent::spawn(client.clone(), opts);
        let ns = ns.as_str();
        create_job(
            &client,
            ns,
            "ok",
            r#"echo "$GREETING from $POD_NAME" && exit 0"#,
            0,
            None,
        )
        .await;
        create_job(&client, ns, "bad", "echo failing >&2; exit 3", 0, None).await;

        let (ok, bad) = tokio::join!(
            finished_job(&client, ns, "ok"),
            finished_job(&client, ns, "bad")
        );
        let ok_status = ok.status.expect("ok status");
        assert_eq!(ok_status.succeeded, Some(1), "{ok_status:?}");
        let bad_status = bad.status.expect("bad status");
        assert_eq!(bad_status.succeeded.unwrap_or(0), 0, "{bad_status:?}");
        assert_eq!(bad_status.failed, Some(1), "{bad_status:?}");
        let failed = bad_status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed")
            .expect("Failed condition");
        assert_eq!(failed.reason.as_deref(), Some("BackoffLimitExceeded"));

        let ok_pods = job_pods(&client, ns, "ok").await;
        assert_eq!(ok_pods.len(), 1);
        let ok_pod = &ok_pods[0];
        assert_eq!(phase(ok_pod), "Succeeded");
        assert_eq!(exit_code(ok_pod), Some(0));
        assert_eq!(
            ok_pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(node.as_str())
        );
        let bad_pods = job_pods(&client, ns, "bad").await;
        assert_eq!(bad_pods.len(), 1);
        assert_eq!(phase(&bad_pods[0]), "Failed");
        assert_eq!(exit_code(&bad_pods[0]), Some(3));

        // stdout and stderr land in {log_dir}/{namespace}_{pod}.log, with the pod's env.
        let ok_name = ok_pod.metadata.name.clone().expect("name");
        let log = std::fs::read_to_string(logs.path().join(format!("{ns}_{ok_name}.log")))
            .expect("ok log");
        assert_eq!(log.trim(), format!("hello from {ok_name}"));
        let bad_name = bad_pods[0].metadata.name.clone().expect("name");
        let log = std::fs::read_to_string(logs.path().join(format!("{ns}_{bad_name}.log")))
            .expect("bad log");
        assert_eq!(log.trim(), "failing");

        // The agent registered a Ready node.
        let node = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .get(&node)
            .await
            .expect("node");
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready);
    })
    .await;
}

/// Checks `$KUBECONFIG` holds a token, then prints its server and token for the test.
const WORKER_PRINTS_ITS_KUBECONFIG: &str = r#"test -n "$KUBECONFIG" &&
grep -q token "$KUBECONFIG" &&
sed -n 's/^ *server: *//p' "$KUBECONFIG" &&
sed -n 's/^ *token: *//p' "$KUBECONFIG""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_get_a_real_service_account_token() {
    init_tracing();
    bounded(async {
        let cluster = test_cluster().await;
        let client = cluster.client();
        let logs = tempfile::tempdir().expect("tempdir");
        let node = format!("node-b-{:08x}", rand::random::<u32>());
        // No server URL given: the agent finds the API server's own (loopback) endpoint.
        let ns = unique_namespace(&client, "tenant").await;
        let mut opts = node_agent::NodeAgentOptions::new(node.as_str(), "/bin/sh", logs.path());
        opts.namespace = Some(ns.clone());
        let _agent = Agent::spawn(client.clone(), opts);
        let ns = ns.as_str();
        let sa: ServiceAccount =
            serde_json::from_value(json!({ "metadata": { "name": "worker" } })).expect("sa");
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .expect("create sa");
        // The worker checks its kubeconfig and prints the token so the test can use it.
        create_job(
            &client,
            ns,
            "token",
            WORKER_PRINTS_ITS_KUBECONFIG,
            0,
            Some("worker"),
        )
        .await;
        let job = finished_job(&client, ns, "token").await;
        assert_eq!(job.status.as_ref().and_then(|s| s.succeeded), Some(1));
        let pods = job_pods(&client, ns, "token").await;
        let pod_name = pods[0].metadata.name.clone().expect("name");
        let log = std::fs::read_to_string(logs.path().join(format!("{ns}_{pod_name}.log")))
            .expect("log");
        let (server, token) = log.trim().split_once('\n').expect("server and token");
        assert!(token.starts_with("ey"), "not a JWT: {token:?}");
        if cluster.control_plane().is_some() {
            assert_eq!(server, cluster.server_url());
        }

        // The token authenticates as the pod's ServiceAccount, with exactly its RBAC:
        // forbidden until a RoleBinding allows it.
        let mut config = kube::Config::new(server.parse().expect("url"));
        config.accept_invalid_certs = true;
        config.auth_info.token = Some(token.to_string().into());
        let as_worker = kube::Client::try_from(config).expect("worker client");
        let worker_pods: Api<Pod> = Api::namespaced(as_worker, ns);
        match worker_pods.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 403, "{s:?}");
                assert!(
                    s.message.contains(&format!("system:serviceaccount:{ns}:worker")),
                    "{}",
                    s.message
                );
            }
            other => panic!("expected 403, got {other:?}"),
        }
        let role: Role = serde_json::from_value(json!({
            "metadata": { "name": "read-pods" },
            "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] }]
        }))
        .expect("role");
        Api::<Role>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &role)
            .await
            .expect("create role");
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": { "name": "worker-reads-pods" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods" },
            "subjects": [{ "kind": "ServiceAccount", "name": "worker", "namespace": ns }]
        }))
        .expect("binding");
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("create binding");
        eventually("the RoleBinding to apply", Duration::from_secs(20), || {
            let worker_pods = worker_pods.clone();
            async move { worker_pods.list(&ListParams::default()).await.ok() }
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pods_and_agent_restarts_are_handled() {
    init_tracing();
    bounded(async {
        let cp = start_control_plane(None).await;
        let client = cp.client().await.expect("client");
        let logs = tempfile::tempdir().expect("tempdir");
        create_namespace(&client, "life").await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "life");
        let agent = Agent::spawn(client.clone(), agent_options(&cp, "node-c", logs.path()));
        create_job(&client, "life", "sleeper", "exec sleep 300", 1, None).await;

        let running = |exclude: Option<String>| {
            let client = client.clone();
            async move {
                let pods = job_pods(&client, "life", "sleeper").await;
                pods.into_iter().find_map(|p| {
                    let name = p.metadata.name.clone()?;
                    if Some(&name) == exclude.as_ref() {
                        return None;
                    }
                    Some((name, running_pid(&p)?))
                })
            }
        };
        let (first, first_pid) =
            eventually("the first pod to run", Duration::from_secs(60), || {
                running(None)
            })
            .await;
        assert!(alive(first_pid));

        // The agent goes away: its worker dies with it. A new agent on the same node fails
        // the orphaned pod, and the real Job controller replaces it.
        agent.stop().await;
        wait_dead(first_pid).await;
        let _agent = Agent::spawn(client.clone(), agent_options(&cp, "node-c", logs.path()));
        let orphan = eventually("the orphan to fail", Duration::from_secs(30), || {
            let pods = pods.clone();
            let first = first.clone();
            async move {
                let pod = pods.get(&first).await.ok()?;
                (phase(&pod) == "Failed").then_some(pod)
            }
        })
        .await;
        let reason = orphan.status.as_ref().and_then(|s| s.reason.as_deref());
        assert_eq!(reason, Some(node_agent::REASON_AGENT_RESTARTED));
        let (second, second_pid) =
            eventually("a replacement pod to run", Duration::from_secs(60), || {
                running(Some(first.clone()))
            })
            .await;
        assert!(alive(second_pid));

        // Deleting a running pod kills its process and completes the deletion.
        pods.delete(&second, &DeleteParams::default())
            .await
            .expect("delete pod");
        wait_dead(second_pid).await;
        eventually("the deleted pod to go", Duration::from_secs(20), || {
            let pods = pods.clone();
            let second = second.clone();
            async move { pods.get_opt(&second).await.ok()?.is_none().then_some(()) }
        })
        .await;
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_map_volumes_and_extended_resources() {
    use k8s_openapi::api::core::v1::{ConfigMap, Node};
    init_tracing();
    bounded(async {
        let cluster = test_cluster().await;
        let client = cluster.client();
        let logs = tempfile::tempdir().expect("tempdir");
        let node = format!("node-gpu-{:08x}", rand::random::<u32>());
        let ns = unique_namespace(&client, "volumes").await;
        let mut opts = cluster.node_agent_options(node.as_str(), "/bin/sh", logs.path());
        opts.namespace = Some(ns.clone());
        opts.extended_resources = [("nvidia.com/gpu".to_owned(), "1".to_owned())].into();
        let _agent = Agent::spawn(client.clone(), opts);
        let ns = ns.as_str();
        let config_map: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": "settings" },
            "data": { "greeting.txt": "hello from a configmap", "unused": "x" }
        }))
        .expect("configmap");
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &config_map)
            .await
            .expect("create configmap");
        let pod = |name: &str, gpus: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": { "name": name },
                "spec": {
                    "restartPolicy": "Never",
                    "volumes": [{ "name": "conf", "configMap": {
                        "name": "settings", "items": [{ "key": "greeting.txt", "path": "sub/greeting.txt" }]
                    }}],
                    "containers": [{
                        "name": "worker",
                        "image": "kinsight:test",
                        // The file named by an env value and by an argument ($0 of `sh -c`).
                        "command": ["kinsight", "-c", r#"cat "$GREETING_FILE" && echo && cat "$0" && echo && ls "$(dirname "$0")""#],
                        "args": ["/etc/app/sub/greeting.txt"],
                        "env": [{ "name": "GREETING_FILE", "value": "/etc/app/sub/greeting.txt" }],
                        "volumeMounts": [{ "name": "conf", "mountPath": "/etc/app" }],
                        "resources": {
                            "requests": { "nvidia.com/gpu": gpus },
                            "limits": { "nvidia.com/gpu": gpus }
                        }
                    }]
                }
            }))
            .expect("pod")
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(&PostParams::default(), &pod("one-gpu", "1"))
            .await
            .expect("create pod");
        pods.create(&PostParams::default(), &pod("two-gpus", "2"))
            .await
            .expect("create pod");

        let done = eventually("the one-GPU pod to finish", Duration::from_secs(60), || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("one-gpu").await.ok()?;
                matches!(phase(&pod), "Succeeded" | "Failed").then_some(pod)
            }
        })
        .await;
        let log = std::fs::read_to_string(logs.path().join(format!("{ns}_one-gpu.log")))
            .unwrap_or_default();
        assert_eq!(phase(&done), "Succeeded", "{log}");
        // Only the item asked for, under its path, read through both rewritten paths.
        assert_eq!(
            log.trim(),
            "hello from a configmap\nhello from a configmap\ngreeting.txt"
        );

        // More GPUs than the node has: never bound, and the pod says why.
        let unschedulable = eventually("the two-GPU pod to be unschedulable", Duration::from_secs(30), || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("two-gpus").await.ok()?;
                pod.status
                    .as_ref()?
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable"))
                    .cloned()
            }
        })
        .await;
        assert!(
            unschedulable
                .message
                .as_deref()
                .is_some_and(|m| m.contains("Insufficient nvidia.com/gpu")),
            "{unschedulable:?}"
        );
        let pod = pods.get("two-gpus").await.expect("pod");
        assert_eq!(phase(&pod), "Pending");
        assert_eq!(pod.spec.and_then(|s| s.node_name), None);

        // The node advertises what it was given.
        let node = Api::<Node>::all(client.clone()).get(&node).await.expect("node");
        let capacity = node.status.and_then(|s| s.capacity).unwrap_or_default();
        assert_eq!(capacity.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("1"));
    })
    .await;
}
