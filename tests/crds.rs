//! The CRD YAML under crds/ must be exactly what `kinsight crd` prints, so the files that
//! Helm and kubectl users apply never drift from the types the code serves.

use std::process::Command;

#[test]
fn crd_files_equal_the_generated_crds() {
    let output = Command::new(env!("CARGO_BIN_EXE_kinsight"))
        .arg("crd")
        .output()
        .expect("run kinsight crd");
    assert!(
        output.status.success(),
        "kinsight crd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let generated = String::from_utf8(output.stdout).expect("utf-8 YAML");
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/kinsight.yaml"))
            .expect("read crds/kinsight.yaml");
    assert_eq!(
        committed, generated,
        "crds/kinsight.yaml is stale: run `cargo run -- crd > crds/kinsight.yaml`"
    );
    for kind in ["ImageGroup", "WebhookSubscription"] {
        assert!(
            generated.contains(&format!("kind: {kind}\n")),
            "{kind} missing"
        );
    }
    // Per-image results live in the database, not in etcd.
    assert!(!generated.contains("kind: ImageResult\n"));
}
