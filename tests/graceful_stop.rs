//! The real `kinsight api` binary stopped the way the kubelet stops a pod (SIGTERM): it
//! goes on serving for its `--shutdown-delay` (the Service drops the pod meanwhile), then
//! refuses new connections, finishes the request in hand and exits 0. The controller's clean
//! stop is checked in tests/controller_sigkill.rs (the binary) and tests/leader_election.rs
//! (the lease handed over).

mod common;

crate::real_node_tests!(a_sigtermed_api_finishes_the_request_in_hand_then_exits);

use std::process::Stdio;
use std::time::Duration;

use common::{Harness, eventually, repo_path};
use tokio::process::Command;

async fn a_sigtermed_api_finishes_the_request_in_hand_then_exits() {
    if kinsight::testbed::use_existing_cluster() {
        eprintln!("skipped: runs the API binary with the local control plane's kubeconfig");
        return;
    }
    let h = Harness::start("tenant-drain").await;
    let kubeconfig = h
        .cluster
        .kubeconfig_path()
        .expect("a local control plane's kubeconfig")
        .to_path_buf();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let logs = tempfile::tempdir().expect("log dir");
    let log = logs.path().join("api.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut api = Command::new(env!("CARGO_BIN_EXE_kinsight"))
        .arg("api")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--catalog")
        .arg(repo_path("models/catalog.yaml"))
        .args(["--shutdown-delay", "1s", "--drain-timeout", "20s"])
        .args(["--keys-namespace", &h.keys_namespace])
        .env("KUBECONFIG", &kubeconfig)
        .env("KINSIGHT_DATABASE_URL", h.cluster.database_url())
        .env("RUST_LOG", "info,kube=warn")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("the API binary starts");
    let base = format!("http://127.0.0.1:{port}");
    // A fresh connection per probe: a pooled one would hide a refused connect.
    let probe = |path: &str| {
        let url = format!("{base}{path}");
        async move {
            reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client")
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    eventually("the API is ready", Duration::from_secs(30), async || {
        probe("/readyz").await.ok().filter(|s| *s == 200)
    })
    .await;

    // A POST whose body arrives in two parts, the second one after the stop began.
    let body = serde_json::to_vec(&serde_json::json!({
        "url": h.photo_url("coffee.png"),
        "models": ["image_classification"],
        "webhookUrl": h.hook_url,
    }))
    .expect("json");
    let (first, second) = body.split_at(body.len() / 2);
    let (parts, stream) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    parts
        .unbounded_send(Ok(first.to_vec()))
        .expect("first part");
    let in_hand = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{base}/v1/images"))
            .bearer_auth(&h.api_key)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pid = api.id().expect("running");
    common::run(
        std::process::Command::new("kill").args(["-TERM", &pid.to_string()]),
        "kill -TERM",
    );
    let stopped_at = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        probe("/healthz").await.ok(),
        Some(200),
        "within its shutdown delay the API still serves new connections"
    );
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let refused = probe("/healthz").await;
    assert!(
        refused.is_err(),
        "after its delay the API refuses new connections, got {refused:?}"
    );
    assert!(
        api.try_wait().expect("wait").is_none(),
        "the API waits for the request in hand"
    );

    parts
        .unbounded_send(Ok(second.to_vec()))
        .expect("second part");
    drop(parts);
    let answer = in_hand
        .await
        .expect("no panic")
        .expect("the request in hand is answered");
    assert_eq!(answer.status().as_u16(), 202);
    let created: serde_json::Value = answer.json().await.expect("a JSON answer");
    let id = created["id"].as_str().expect("the image's id").to_owned();

    let status = tokio::time::timeout(Duration::from_secs(10), api.wait())
        .await
        .expect("the API exits once the request in hand is answered")
        .expect("wait");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "exit {status:?}; log:\n{log_text}");
    eprintln!(
        "stopped {:.1} s after SIGTERM",
        stopped_at.elapsed().as_secs_f64()
    );
    // What it accepted while stopping was created for real.
    let (status, body) = h.get(&format!("/v1/images/{id}")).await;
    assert_eq!(status, 200, "{body}");
}
