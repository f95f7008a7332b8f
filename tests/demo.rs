//! `kinsight demo`, the README's first command, as a user runs it (the real binary, its own
//! local control plane in a fresh state folder), then that control plane started again from
//! its state to see what the demo left behind.

use std::process::Command;
use std::time::Duration;

use kinsight::crd::ImageGroup;
use kinsight::delivery::DeliveryState;
use kinsight::testbed::ControlPlane;
use kube::Api;
use kube::api::ListParams;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_completes_and_leaves_no_delivery_to_send_again() {
    kinsight::install_crypto_provider();
    let state = tempfile::tempdir().expect("state folder");
    let output = Command::new(env!("CARGO_BIN_EXE_kinsight"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["demo", "--listen", "127.0.0.1:0", "--timeout", "120s"])
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .expect("run kinsight demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("group completed in"), "{stdout}");
    assert_eq!(stdout.matches("(image.completed)").count(), 4, "{stdout}");
    // It says where the start's time went, and when the first webhook came.
    for phase in [
        "kinsight dev is running (ready ",
        " s  control plane and PostgreSQL started",
        " s  worker image built, node Ready",
        " s  controller running, API keys listed",
        " s  standby worker up, models loaded",
        " s  CRDs in the API server's OpenAPI document",
        "first webhook ",
    ] {
        assert!(stdout.contains(phase), "no {phase:?} in:\n{stdout}");
    }
    // The worker ran as a container on the node, which goes with the demo: its log is kept,
    // and the namespace's events say what happened to each pod.
    let events = std::fs::read_to_string(state.path().join("pod-logs/events.txt"))
        .unwrap_or_else(|e| panic!("no events kept ({e}):\n{stdout}\n{stderr}"));
    assert!(
        events
            .lines()
            .any(|l| l.contains(" Started Pod/kinsight-standby-") && l.contains("(by kubelet)")),
        "{events}"
    );
    let logs: Vec<String> = std::fs::read_dir(state.path().join("pod-logs"))
        .expect("the worker pods' logs kept")
        .flatten()
        .filter(|file| file.path().extension().is_some_and(|e| e == "log"))
        .filter_map(|log| std::fs::read_to_string(log.path()).ok())
        .collect();
    assert!(
        logs.iter().any(|log| log.contains("worker finished")),
        "no worker log with its end among {} kept:\n{stdout}\n{stderr}\n{events}",
        logs.len()
    );
    assert!(stdout.contains("kept the logs of "), "{stdout}\n{stderr}");
    // A healthy run, start to stop, warns of nothing.
    for level in [" WARN ", " ERROR "] {
        for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            let flagged: Vec<&str> = text.lines().filter(|l| l.contains(level)).collect();
            assert!(flagged.is_empty(), "{level} lines on {name}: {flagged:#?}");
        }
    }

    // The demo stopped its control plane on exit; its state says what a next
    // `kinsight dev` would still send.
    let cp = tokio::time::timeout(
        Duration::from_secs(120),
        ControlPlane::start_or_reuse(state.path()),
    )
    .await
    .expect("in time")
    .expect("control plane from the demo's state");
    let groups: Api<ImageGroup> = Api::all(cp.client().await.expect("client"));
    let groups = groups.list(&ListParams::default()).await.expect("groups");
    assert_eq!(groups.items.len(), 1);
    let database = cp.database_url().expect("the demo's PostgreSQL");
    let store = kinsight::store::Store::connect(&database, Duration::from_secs(60))
        .await
        .expect("the demo's database");
    let uid = groups.items[0].metadata.uid.clone().expect("uid");
    let deliveries = store.group_deliveries(&uid).await.expect("deliveries");
    assert_eq!(deliveries.len(), 5, "{deliveries:#?}");
    assert!(
        deliveries
            .iter()
            .all(|d| d.state == DeliveryState::Delivered),
        "nothing left to send again: {deliveries:#?}"
    );
}
