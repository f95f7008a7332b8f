//! The `kinsight` binary (the one the image carries) holds the product only: the testbed's
//! commands (`dev`, `demo`: a local control plane, PostgreSQL set-up, the real node) live in
//! `kinsight-dev`, which `kinsight` runs when it sits beside it (issue 10).

use std::path::Path;
use std::process::Command;

const KINSIGHT: &str = env!("CARGO_BIN_EXE_kinsight");
const KINSIGHT_DEV: &str = env!("CARGO_BIN_EXE_kinsight-dev");

/// Text only the testbed's code has (string constants, not names: debug info may name
/// generic code the linker dropped): an argument it gives kube-apiserver, a line of the real
/// node's containerd configuration, an argument it gives PostgreSQL's initdb.
const TESTBED_MARKERS: [&str; 3] = [
    "--etcd-servers",
    "restrict_oom_score_adj",
    "--no-instructions",
];

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn the_product_binary_links_none_of_the_testbed() {
    let product = std::fs::read(KINSIGHT).expect("read kinsight");
    let dev = std::fs::read(KINSIGHT_DEV).expect("read kinsight-dev");
    for marker in TESTBED_MARKERS {
        assert!(contains(&dev, marker), "kinsight-dev lacks {marker:?}");
        assert!(!contains(&product, marker), "kinsight holds {marker:?}");
    }
}

#[test]
fn kinsight_lists_the_testbed_commands_and_passes_them_on() {
    let help = Command::new(KINSIGHT)
        .arg("--help")
        .output()
        .expect("kinsight --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for command in ["dev", "demo", "controller", "api", "worker"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "no {command} in:\n{help}"
        );
    }
    // `kinsight demo --help` is kinsight-dev's own help for demo, options and all.
    let demo = Command::new(KINSIGHT)
        .args(["demo", "--help"])
        .output()
        .expect("kinsight demo --help");
    let text = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "{text}");
    assert!(text.contains("Usage: kinsight-dev demo"), "{text}");
    assert!(text.contains("--photos"), "{text}");
}

#[test]
fn without_kinsight_dev_beside_it_kinsight_says_where_the_testbed_commands_are() {
    // The image's situation: kinsight alone.
    let folder = tempfile::tempdir().expect("temp folder");
    let alone = folder.path().join("kinsight");
    std::fs::copy(KINSIGHT, &alone).expect("copy kinsight");
    for command in ["dev", "demo"] {
        let out = Command::new(&alone)
            .arg(command)
            .output()
            .expect("run kinsight");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("kinsight-dev") && stderr.contains("source builds"),
            "{command}: {stderr}"
        );
        assert!(
            stderr.contains(
                &Path::new(folder.path())
                    .join("kinsight-dev")
                    .display()
                    .to_string()
            ),
            "{command}: {stderr}"
        );
    }
    // The product's own commands still run alone.
    let crd = Command::new(&alone)
        .arg("crd")
        .output()
        .expect("kinsight crd");
    assert!(crd.status.success());
    assert!(String::from_utf8_lossy(&crd.stdout).contains("kind: CustomResourceDefinition"));
}
