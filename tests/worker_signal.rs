//! A worker told to stop (SIGTERM, as the kubelet does when its pod is deleted) stops at
//! once and says so, instead of working on through the pod's grace period; in its container
//! it is PID 1, which the kernel spares signals it has no handler for.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_worker_stops_at_once_on_sigterm() {
    let folder = tempfile::tempdir().expect("temp folder");
    // A photo host that accepts and never answers: the worker waits on its download.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let host = silent.local_addr().expect("address");
    let kubeconfig = folder.path().join("kubeconfig");
    std::fs::File::create(&kubeconfig)
        .and_then(|mut f| {
            f.write_all(
                b"apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n\
                  users: [{name: u, user: {token: worker-token}}]\n\
                  contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
            )
        })
        .expect("kubeconfig");
    let order = serde_json::json!({
        "group": { "namespace": "tenant-a", "name": "grp-sig", "uid": "u-sig" },
        "models": ["image_classification"],
        "images": [{ "id": "a", "url": format!("http://{host}/a.jpg") }],
    });
    let mut worker = Command::new(env!("CARGO_BIN_EXE_kinsight"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["worker", "--allow-egress", "127.0.0.1/32"])
        .args(["--results-url", "http://127.0.0.1:1/internal/v1/results"])
        .env("KUBECONFIG", &kubeconfig)
        .env("KINSIGHT_WORK_ORDER", order.to_string())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start kinsight worker");
    // Until its download hangs: the silent host sees the connection.
    silent.set_nonblocking(false).expect("blocking accept");
    let (_connection, _) = silent.accept().expect("the worker connects");
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = signalled + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = worker.try_wait().expect("wait") {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the worker did not stop within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stopped_in = signalled.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut worker.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!exit.success(), "{stderr}");
    assert!(stderr.contains("stopped by a signal"), "{stderr}");
    assert!(
        stopped_in < Duration::from_secs(5),
        "{stopped_in:?}\n{stderr}"
    );
}
