//! `kinsight dev` stopped (SIGTERM, as Ctrl-C or `kill` would) while it is still starting:
//! what it started so far (control plane, PostgreSQL, the node's containerd and kubelet,
//! their mounts) goes with it, and the next start on this machine finds nothing in its way.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::processes_naming;

/// The node's kubelet appears within this (image build and control plane first).
const START_LIMIT: Duration = Duration::from_secs(120);
/// A stopped start is gone within this.
const STOP_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_dev_stopped_while_starting_leaves_nothing_running() {
    let state = tempfile::tempdir().expect("state folder");
    let output = state.path().join("dev.log");
    let file = std::fs::File::create(&output).expect("log file");
    let mut dev = Command::new(env!("CARGO_BIN_EXE_kinsight"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state.path())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .expect("start kinsight dev");
    let needle = state.path().display().to_string();
    let log = || std::fs::read_to_string(&output).unwrap_or_default();

    // Stopped once its node's kubelet runs: the control plane and PostgreSQL are up, the
    // node is not Ready yet.
    let deadline = Instant::now() + START_LIMIT;
    while !processes_naming(&needle)
        .iter()
        .any(|p| p.contains("/kubelet "))
    {
        if Instant::now() >= deadline || dev.try_wait().expect("dev's state").is_some() {
            let _ = Command::new("kill")
                .args(["-TERM", &dev.id().to_string()])
                .status();
            let _ = dev.wait();
            panic!(
                "no kubelet of dev's node within {START_LIMIT:?}:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let running = processes_naming(&needle);
    let status = Command::new("kill")
        .args(["-TERM", &dev.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());

    let deadline = Instant::now() + STOP_LIMIT;
    let exit = loop {
        if let Some(exit) = dev.try_wait().expect("dev's state") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "dev still running {STOP_LIMIT:?} after SIGTERM:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = log();
    assert!(exit.success(), "{exit}:\n{log}");
    assert!(log.contains("stopped while starting"), "{log}");
    // It had started etcd, kube-apiserver, PostgreSQL, containerd and the kubelet, all
    // named by their state folder; none is left, and nothing stays mounted below it.
    assert!(running.len() >= 5, "{running:#?}");
    let left = processes_naming(&needle);
    assert!(left.is_empty(), "still running: {left:#?}\n{log}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mounted: Vec<&str> = mounts.lines().filter(|l| l.contains(&needle)).collect();
    assert!(mounted.is_empty(), "still mounted: {mounted:#?}");
}
