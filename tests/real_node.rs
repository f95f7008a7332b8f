//! A real node (containerd + runc + kubelet + kube-scheduler, see `kinsight::testbed::RealNode`)
//! running kinsight's container image, checked the way a user would, through the API server:
//!
//! - a Pod with the worker Jobs' restricted security context (uid 65532, non-root, read-only
//!   root filesystem, every capability dropped, no privilege escalation, seccomp
//!   `RuntimeDefault`) runs the image's entrypoint (`kinsight --version`) and a probe that
//!   prints what the kernel says of it (`/proc/self/status`, `/proc/self/mountinfo`), reads a
//!   ConfigMap volume and tries to write to the root filesystem; it must reach Succeeded and
//!   its log (`GET pods/NAME/log`) must show uid 65532, no capabilities, the seccomp filter,
//!   a read-only root and the ConfigMap's file on a mount of its own;
//! - a Pod whose memory limit is exceeded is reported `OOMKilled`;
//! - the node turns Ready as its kubelet registers it (the testbed gives it its pod range),
//!   and the kubelet writes its status when it changes, not every few seconds;
//! - afterwards no process, mount or bridge of the node is left on the host.
//!
//! The image has no shell: the probe is a small static program mounted from the host (as
//! tests/container_image.rs does). Needs root and what scripts/build-node.sh and
//! scripts/install-node-packages.sh provide (scripts/test.sh runs both); fails, with what is
//! missing, otherwise.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, LogParams, PostParams};

mod common;

use common::real_node::{Stack, run_bounded};
use common::{processes_naming, run};
use kinsight::testbed::container_started;

/// The whole test, image build included.
const TEST_LIMIT: Duration = Duration::from_secs(300);
const POD_LIMIT: Duration = Duration::from_secs(60);
/// How long after Ready the node's status writes are counted. A kubelet that reports every
/// 5 s skips a tick that comes a hair under 5 s after its last report, so it may write only
/// every 10 s: 21 s holds two writes at least.
const STATUS_WINDOW: Duration = Duration::from_secs(21);

/// Prints the lines of /proc/self/status about ids, capabilities and seccomp, the mountinfo
/// lines of `/` and `/config`, whether a file can be made in the image's (non-root user's)
/// home, and the files named as arguments. With `oom`: allocates until killed; with `sleep`:
/// sleeps until killed.
const PROBE_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void cat(const char *path) {
    FILE *f = fopen(path, "r");
    char line[1024];
    if (!f) { printf("cannot read %s: %s\n", path, strerror(errno)); return; }
    while (fgets(line, sizeof line, f)) fputs(line, stdout);
    fclose(f);
}

int main(int argc, char **argv) {
    char line[1024];
    if (argc > 1 && strcmp(argv[1], "sleep") == 0) {
        puts("sleeping until killed");
        fflush(stdout);
        for (;;) pause();
    }
    if (argc > 1 && strcmp(argv[1], "oom") == 0) {
        puts("allocating");
        fflush(stdout);
        for (;;) {
            char *p = malloc(1 << 20);
            if (!p) return 3;
            memset(p, 1, 1 << 20);
        }
    }
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Uid:", 4) || !strncmp(line, "Gid:", 4) || !strncmp(line, "Cap", 3)
            || !strncmp(line, "NoNewPrivs:", 11) || !strncmp(line, "Seccomp:", 8))
            fputs(line, stdout);
    f = fopen("/proc/self/mountinfo", "r");
    while (f && fgets(line, sizeof line, f)) {
        char point[512];
        if (sscanf(line, "%*s %*s %*s %*s %511s", point) == 1
            && (!strcmp(point, "/") || !strcmp(point, "/config")))
            printf("mount: %s", line);
    }
    int fd = open("/home/nonroot/probe-write", O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) puts("rootfs: writable");
    else printf("rootfs: %s\n", errno == EROFS ? "read-only" : strerror(errno));
    for (int i = 1; i < argc; i++) { printf("file %s:\n", argv[i]); cat(argv[i]); }
    return 0;
}
"#;

/// The probe, built static into `dir` (readable by the pods' uid 65532).
fn build_probe(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(dir.join("probe.c"), PROBE_C).expect("write probe.c");
    run(
        Command::new("cc")
            .args(["-static", "-Os", "-o"])
            .arg(dir.join("probe"))
            .arg(dir.join("probe.c")),
        "cc -static probe.c",
    );
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The worker Jobs' security context (src/controller/job.rs), on `container`.
fn restricted(container: serde_json::Value) -> serde_json::Value {
    let mut container = container;
    container["imagePullPolicy"] = "Never".into();
    container["securityContext"] = serde_json::json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] }
    });
    container
}

fn pod(name: &str, containers: Vec<serde_json::Value>, volumes: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "seccompProfile": { "type": "RuntimeDefault" }
            },
            "containers": containers,
            "volumes": volumes,
        }
    }))
    .expect("pod")
}

/// Waits until the pod has finished (Succeeded or Failed); returns it and when its first
/// container was seen running or done, counted from `created`.
async fn wait_finished(pods: &Api<Pod>, name: &str, created: Instant) -> (Pod, Duration) {
    let mut started = None;
    let deadline = Instant::now() + POD_LIMIT;
    loop {
        let pod = pods.get(name).await.expect("get pod");
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if container_started(&pod) && started.is_none() {
            started = Some(created.elapsed());
        }
        if phase == "Succeeded" || phase == "Failed" {
            return (pod, started.unwrap_or_else(|| created.elapsed()));
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} not finished after {POD_LIMIT:?}: {:#?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a pod that sleeps until killed and waits until it runs.
async fn start_sleeper(pods: &Api<Pod>, name: &str, image: &str, volumes: &serde_json::Value) {
    let mounts =
        serde_json::json!([{ "name": "probe", "mountPath": "/kinsight-test", "readOnly": true }]);
    let sleeper = restricted(serde_json::json!({
        "name": "sleeper", "image": image,
        "command": ["/kinsight-test/probe", "sleep"],
        "volumeMounts": mounts,
    }));
    pods.create(
        &PostParams::default(),
        &pod(name, vec![sleeper], volumes.clone()),
    )
    .await
    .expect("create a sleeper");
    let deadline = Instant::now() + POD_LIMIT;
    loop {
        let pod = pods.get(name).await.expect("get pod");
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Running") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not running after {POD_LIMIT:?}: {:#?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node status writes (the kubelet's PATCHes of `nodes/status`) the API server has
/// served so far, from its request counters.
async fn node_status_writes(client: &kube::Client) -> f64 {
    kinsight::testbed::api_metrics(client)
        .await
        .expect("the API server's /metrics")
        .iter()
        .filter(|((verb, resource), _)| verb == "PATCH" && resource.starts_with("nodes/status "))
        .map(|(_, (requests, _, _))| requests)
        .sum()
}

async fn log_of(pods: &Api<Pod>, pod: &str, container: &str) -> String {
    pods.logs(
        pod,
        &LogParams {
            container: Some(container.into()),
            ..LogParams::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("log of {pod}/{container}: {e}"))
}

#[test]
fn a_real_node_runs_the_image_restricted_with_config_maps_and_reports_oom() {
    run_bounded(TEST_LIMIT, the_test());
}

/// Values by name: sysctls, or iptables tables' rules (`iptables -t TABLE -S`).
type Settings = Vec<(&'static str, String)>;

/// What the node changes on the host while it runs and must put back: the sysctls the
/// kubelet and kube-proxy set, and every iptables rule and chain (kube-proxy's Services).
fn host_state() -> (Settings, Settings) {
    let sysctls = [
        "net/ipv4/ip_forward",
        "net/ipv4/conf/all/route_localnet",
        "vm/overcommit_memory",
        "kernel/panic",
        "kernel/panic_on_oops",
    ]
    .map(|key| {
        let value = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
        (key, value.trim().to_owned())
    })
    .to_vec();
    let rules = ["nat", "filter", "mangle"]
        .map(|table| {
            (
                table,
                run(
                    Command::new("iptables").args(["-t", table, "-S"]),
                    "iptables -S",
                ),
            )
        })
        .to_vec();
    (sysctls, rules)
}

/// The pinned pod network namespaces (CNI's `/run/netns/cni-*` mounts).
fn netns_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .filter(|l| l.contains("/run/netns/cni-"))
        .map(str::to_owned)
        .collect()
}

async fn the_test() {
    kinsight::install_crypto_provider();
    let test_started = Instant::now();
    let scratch = tempfile::tempdir().expect("temp dir");
    build_probe(scratch.path());
    let host_before = host_state();
    // Pod network namespaces already pinned (by an earlier run killed without its
    // teardown) are not this node's to remove.
    let netns_before = netns_mounts();

    let Stack {
        node,
        plane,
        image,
        image_cleanup: _image_cleanup,
    } = Stack::start(
        &format!("real-node-{}", std::process::id()),
        false,
        scratch.path(),
    )
    .await;
    let node_dir = plane.state_dir().join("node");
    // While it runs the node has changed the host (so the check after its drop can fail).
    let host_during = host_state();
    assert_ne!(host_during.1, host_before.1, "kube-proxy's rules are in");
    assert!(
        host_during
            .0
            .contains(&("net/ipv4/ip_forward", "1".to_owned())),
        "{:?}",
        host_during.0
    );

    let client = plane.client().await.expect("client");
    // From here on the node is Ready: its status changes only with what runs on it.
    let (ready_at, writes_at_ready) = (Instant::now(), node_status_writes(&client).await);
    // It turned Ready as its kubelet registered it, not at the kubelet's next status update
    // 5 s later: the testbed gave it its pod range, and the kubelet reported at once.
    let registered = Api::<Node>::all(client.clone())
        .get(kinsight::testbed::node::NODE_NAME)
        .await
        .expect("the node");
    assert_eq!(
        registered.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()),
        Some(kinsight::testbed::node::POD_SUBNET)
    );
    let created = registered.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let turned_ready = registered
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    let (Some(created), Some(turned_ready)) = (created, turned_ready) else {
        panic!("no creation or Ready time: {registered:#?}");
    };
    // Both to the second. Without the pod range it takes 4-5 s (the next status update).
    let to_ready = turned_ready.duration_since(created);
    assert!(
        to_ready <= jiff::SignedDuration::from_secs(3),
        "the node turned Ready {to_ready:#} after it registered"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": "probe-config" },
                "data": { "app.conf": "key=value-from-configmap\n" }
            }))
            .expect("config map"),
        )
        .await
        .expect("create config map");
    let probe_dir = scratch.path().display().to_string();
    let volumes = serde_json::json!([
        { "name": "probe", "hostPath": { "path": probe_dir, "type": "Directory" } },
        { "name": "config", "configMap": { "name": "probe-config" } }
    ]);
    let mounts = serde_json::json!([
        { "name": "probe", "mountPath": "/kinsight-test", "readOnly": true },
        { "name": "config", "mountPath": "/config", "readOnly": true }
    ]);

    // (a) + (c): the restricted pod, with the ConfigMap mounted.
    let created = Instant::now();
    pods.create(
        &PostParams::default(),
        &pod(
            "restricted",
            vec![
                restricted(serde_json::json!({
                    "name": "kinsight", "image": image, "args": ["--version"]
                })),
                restricted(serde_json::json!({
                    "name": "probe", "image": image,
                    "command": ["/kinsight-test/probe", "/config/app.conf"],
                    "volumeMounts": mounts,
                })),
            ],
            volumes.clone(),
        ),
    )
    .await
    .expect("create the restricted pod");
    let (done, running_after) = wait_finished(&pods, "restricted", created).await;
    eprintln!(
        "restricted pod: containers running {running_after:.1?} after creation, finished after {:.1?}",
        created.elapsed()
    );
    let phase = done.status.as_ref().and_then(|s| s.phase.clone());
    let version = log_of(&pods, "restricted", "kinsight").await;
    let probe = log_of(&pods, "restricted", "probe").await;
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "{:#?}\nkinsight: {version}\nprobe: {probe}",
        done.status
    );
    assert_eq!(
        version.trim(),
        format!("kinsight {}", env!("CARGO_PKG_VERSION"))
    );
    let line = |prefix: &str| {
        probe
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in the probe's log:\n{probe}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("Uid:"), ["65532"; 4], "{probe}");
    assert_eq!(line("Gid:"), ["65532"; 4], "{probe}");
    for caps in ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(line(caps), ["0000000000000000"], "{caps}\n{probe}");
    }
    assert_eq!(line("NoNewPrivs:"), ["1"], "{probe}");
    assert_eq!(line("Seccomp:"), ["2"], "seccomp filter mode\n{probe}");
    assert!(probe.contains("rootfs: read-only"), "{probe}");
    let mount_options = |point: &str| {
        probe
            .lines()
            .filter_map(|l| l.strip_prefix("mount: "))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&point))
            .and_then(|f| f.get(5).map(|o| o.to_string()))
            .unwrap_or_else(|| panic!("no mount at {point} in the probe's log:\n{probe}"))
    };
    assert!(
        mount_options("/").split(',').any(|o| o == "ro"),
        "/ is not mounted read-only:\n{probe}"
    );
    assert!(
        mount_options("/config").split(',').any(|o| o == "ro"),
        "/config is not a read-only mount:\n{probe}"
    );
    assert!(
        probe.contains("file /config/app.conf:\nkey=value-from-configmap\n"),
        "{probe}"
    );

    // (b): over its memory limit. The kernel kills it (exit 137) and containerd reports
    // the OOM kill; containerd 1.6 may see the task's exit before the cgroup's OOM event on
    // a busy machine and report "Error" instead, so a second hog gets its chance: every
    // hog must die with 137, and one must be reported OOMKilled.
    const HOGS: usize = 3;
    let mut reported = Vec::new();
    for attempt in 1..=HOGS {
        let name = format!("memory-hog-{attempt}");
        let created = Instant::now();
        let mut hog = restricted(serde_json::json!({
            "name": "hog", "image": image,
            "command": ["/kinsight-test/probe", "oom"],
            "volumeMounts": mounts,
            "resources": { "limits": { "memory": "16Mi", "cpu": "500m" } },
        }));
        hog["resources"]["requests"] = hog["resources"]["limits"].clone();
        pods.create(
            &PostParams::default(),
            &pod(&name, vec![hog], volumes.clone()),
        )
        .await
        .expect("create the memory hog");
        let (done, _) = wait_finished(&pods, &name, created).await;
        let terminated = done
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.clone())
            .unwrap_or_else(|| panic!("memory hog not terminated: {:#?}", done.status));
        assert_eq!(terminated.exit_code, 137, "{terminated:#?}");
        reported.push(terminated.reason.clone());
        if terminated.reason.as_deref() == Some("OOMKilled") {
            eprintln!(
                "memory hog {attempt} OOMKilled {:.1?} after creation",
                created.elapsed()
            );
            break;
        }
    }
    assert!(
        reported.iter().any(|r| r.as_deref() == Some("OOMKilled")),
        "no memory hog of {HOGS} reported OOMKilled: {reported:?}"
    );

    // (d): the kubelet writes the node's status when it changes, not every 5 s (its
    // update frequency, which set alone would also be its report frequency); its lease
    // says it is alive. Over the window a write every 5 s (or 10 s) makes two at least;
    // the pods above may have changed the status once.
    tokio::time::sleep(STATUS_WINDOW.saturating_sub(ready_at.elapsed())).await;
    let writes = node_status_writes(&client).await - writes_at_ready;
    eprintln!(
        "node status writes: {writes} in {:.1?} after Ready",
        ready_at.elapsed()
    );
    assert!(
        writes <= 1.0,
        "{writes} node status writes in {STATUS_WINDOW:?}: the kubelet writes an unchanged status"
    );

    // Teardown, both ways: a running pod removed by the kubelet (remove_pods), then one
    // still running when the node is dropped (killed and removed through containerd).
    // `kinsight dev`'s copy of the pods' logs (followed from each container's start)
    // outlives the removed pod, whose log goes with it.
    let kept = scratch.path().join("pod-logs");
    std::fs::create_dir_all(&kept).expect("pod-logs folder");
    let following = tokio::spawn(kinsight::dev::follow_pod_logs(
        client.clone(),
        "default".to_owned(),
        kept.clone(),
    ));
    start_sleeper(&pods, "sleeper-removed", &image, &volumes).await;
    // The copy is the kubelet's log, line for line (both with the kubelet's timestamps).
    let followed = kept.join("sleeper-removed.log");
    let served = pods
        .logs(
            "sleeper-removed",
            &LogParams {
                timestamps: true,
                ..LogParams::default()
            },
        )
        .await
        .expect("the sleeper's log");
    assert!(served.contains("sleeping until killed"), "{served:?}");
    let deadline = Instant::now() + POD_LIMIT;
    while std::fs::read_to_string(&followed).ok().as_deref() != Some(served.as_str()) {
        assert!(
            Instant::now() < deadline,
            "the sleeper's log is not followed: {:?} against {served:?}",
            std::fs::read_to_string(&followed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let removing = Instant::now();
    let all_gone = node
        .remove_pods(Duration::from_secs(60))
        .await
        .expect("remove pods");
    assert!(
        all_gone,
        "the kubelet did not stop the pods' containers in 60 s"
    );
    following.abort();
    // The pod and the kubelet's log are gone; the copy stays.
    assert!(
        pods.get_opt("sleeper-removed")
            .await
            .expect("get the removed pod")
            .is_none(),
        "the pod is gone"
    );
    assert!(
        pods.logs("sleeper-removed", &LogParams::default())
            .await
            .is_err(),
        "the kubelet's log went with the pod"
    );
    assert_eq!(
        std::fs::read_to_string(&followed).ok().as_deref(),
        Some(served.as_str())
    );
    eprintln!(
        "running pod removed by the kubelet in {:.1?}",
        removing.elapsed()
    );
    start_sleeper(&pods, "sleeper-dropped", &image, &volumes).await;
    let teardown = Instant::now();
    let node_pids = node.pids();
    drop(node);
    eprintln!(
        "node stopped, with a pod running, in {:.1?}",
        teardown.elapsed()
    );
    let needle = node_dir.display().to_string();
    let left = processes_naming(&needle);
    assert!(left.is_empty(), "processes left: {left:#?}");
    for pid in node_pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still there"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&needle)).collect();
    assert!(left.is_empty(), "mounts left: {left:#?}");
    let netns_left: Vec<String> = netns_mounts()
        .into_iter()
        .filter(|m| !netns_before.contains(m))
        .collect();
    assert!(
        netns_left.is_empty(),
        "pod network namespaces left: {netns_left:#?}"
    );
    let bridge = Command::new("ip")
        .args(["link", "show", kinsight::testbed::node::BRIDGE])
        .output()
        .expect("ip link");
    assert!(!bridge.status.success(), "the bridge is still there");
    let host_after = host_state();
    assert_eq!(host_after.0, host_before.0, "the sysctls are put back");
    assert_eq!(
        host_after.1, host_before.1,
        "every iptables rule and chain is put back"
    );
    drop(plane);
    eprintln!("whole test: {:.1?}", test_started.elapsed());
}
