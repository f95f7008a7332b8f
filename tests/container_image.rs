//! The container image: `Dockerfile`, built by `scripts/build-image.sh` with buildah on the
//! local base (`scripts/make-base-image.sh`) from this build's binary, then checked the way a
//! user would: its configuration (user 65532, the entrypoint, where ONNX Runtime and the
//! catalog are), what it holds (no shell, exactly the bundled models, ONNX Runtime), its OCI
//! archive (what `ctr images import` takes), and the binary running inside its root
//! filesystem as uid 65532: `--version` through the entrypoint, and `kinsight bench` on one
//! photo, which loads ONNX Runtime and every bundled model.
//!
//! Skipped only where buildah is missing and cannot be installed (scripts/buildah.sh exits 77).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use common::stdout_of;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// `scripts/buildah.sh`: buildah on the project's image store.
fn buildah(args: &[&str]) -> Output {
    Command::new(format!("{REPO}/scripts/buildah.sh"))
        .args(args)
        .output()
        .expect("run scripts/buildah.sh")
}

/// Runs `command` in the working container (chroot isolation, as the image's user unless
/// `options` say otherwise) and returns its stdout.
fn run_in(container: &str, options: &[&str], command: &[&str]) -> String {
    let mut args = vec!["run"];
    args.extend_from_slice(options);
    args.push(container);
    args.push("--");
    args.extend_from_slice(command);
    stdout_of(buildah(&args), &format!("buildah run {command:?}"))
}

/// Removes what the test made from the image store, even when it fails.
struct Cleanup {
    image: String,
    container: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(container) = &self.container {
            let _ = buildah(&["rm", container]);
        }
        let _ = buildah(&["rmi", &self.image]);
    }
}

/// Names of the files directly in `dir`.
fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry"))
        .filter(|entry| entry.file_type().expect("file type").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A static program printing the ids it runs with (the image has no `id`, nor a shell).
fn build_id_probe(dir: &Path) -> String {
    let source = dir.join("id.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n#include <unistd.h>\n\
         int main(void) { printf(\"uid=%d gid=%d\\n\", (int)getuid(), (int)getgid()); return 0; }\n",
    )
    .expect("write id.c");
    let probe = dir.join("id");
    let output = Command::new("cc")
        .args(["-static", "-Os", "-o"])
        .arg(&probe)
        .arg(&source)
        .output()
        .expect("run cc");
    stdout_of(output, "cc -static id.c");
    probe.to_str().expect("UTF-8 path").to_owned()
}

#[test]
fn image_runs_kinsight_as_nonroot_with_onnx_runtime_and_the_bundled_models() {
    let available = buildah(&["--version"]);
    if available.status.code() == Some(77) {
        eprintln!(
            "skipped: buildah is not installed and cannot be installed here: {}",
            String::from_utf8_lossy(&available.stderr).trim()
        );
        return;
    }
    stdout_of(available, "buildah --version");

    let pid = std::process::id();
    let tag = format!("test-{pid}");
    let image = format!("localhost/kinsight:{tag}");
    let mut cleanup = Cleanup {
        image: image.clone(),
        container: None,
    };
    let scratch = tempfile::tempdir().expect("temp dir");
    let archive = scratch.path().join("kinsight.tar");
    let archive = archive.to_str().expect("UTF-8 path");

    // The debug binary of this build; the script strips its debug info into the context.
    let started = Instant::now();
    let built = stdout_of(
        Command::new(format!("{REPO}/scripts/build-image.sh"))
            .args(["--binary", env!("CARGO_BIN_EXE_kinsight")])
            .args(["--tag", &tag, "--base", "local", "--oci-archive", archive])
            .output()
            .expect("run scripts/build-image.sh"),
        "scripts/build-image.sh",
    );
    eprintln!("built in {:.1?}:\n{built}", started.elapsed());

    // The configuration a runtime reads.
    let inspect: serde_json::Value = serde_json::from_str(&stdout_of(
        buildah(&["inspect", "--type", "image", &image]),
        "buildah inspect",
    ))
    .expect("JSON from buildah inspect");
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config:#}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/kinsight"]),
        "{config:#}"
    );
    let env: BTreeSet<&str> = config["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for wanted in [
        "ORT_DYLIB_PATH=/opt/kinsight/lib/libonnxruntime.so",
        "KINSIGHT_CATALOG=/opt/kinsight/models/catalog.yaml",
        "KINSIGHT_MODELS_DIR=/opt/kinsight/models",
    ] {
        assert!(env.contains(wanted), "{wanted} not in {env:?}");
    }

    // The OCI archive holds the image under its name.
    let listing = stdout_of(
        Command::new("tar")
            .args(["-tf", archive])
            .output()
            .expect("run tar"),
        "tar -tf",
    );
    for wanted in ["oci-layout", "index.json"] {
        assert!(listing.lines().any(|l| l == wanted), "{wanted}: {listing}");
    }
    let index = stdout_of(
        Command::new("tar")
            .args(["-xOf", archive, "index.json"])
            .output()
            .expect("run tar"),
        "tar -xOf index.json",
    );
    assert!(index.contains(&image), "{index}");

    // What the image holds: no shell, the bundled models (not models/test), ONNX Runtime.
    let container_name = format!("kinsight-test-{pid}");
    let container = stdout_of(
        buildah(&["from", "--pull-never", "--name", &container_name, &image]),
        "buildah from",
    )
    .trim()
    .to_owned();
    cleanup.container = Some(container.clone());
    let root = stdout_of(buildah(&["mount", &container]), "buildah mount")
        .trim()
        .to_owned();
    let root = Path::new(&root);
    for shell in ["bin/sh", "usr/bin/sh", "bin/bash"] {
        assert!(!root.join(shell).exists(), "the image has /{shell}");
    }
    let bundled: BTreeSet<String> = file_names(&Path::new(REPO).join("models"))
        .into_iter()
        .filter(|name| {
            name == "catalog.yaml"
                || name == "README.md"
                || name.ends_with(".onnx")
                || name.ends_with(".labels")
                // The fetched content_safety model's licence notice (models/open-nsfw.LICENSE).
                || name.ends_with(".LICENSE")
        })
        .collect();
    assert!(bundled.contains("open-nsfw.LICENSE"), "{bundled:?}");
    assert_eq!(file_names(&root.join("opt/kinsight/models")), bundled);
    assert!(
        !root.join("opt/kinsight/models/test").exists(),
        "models/test is in the image"
    );
    let lib = file_names(&root.join("opt/kinsight/lib"));
    assert!(lib.contains("libonnxruntime.so"), "{lib:?}");
    stdout_of(buildah(&["umount", &container]), "buildah umount");

    // The entrypoint runs inside the image's root filesystem (`buildah run` does not apply
    // it, so the test does).
    let started = Instant::now();
    let entrypoint = config["Entrypoint"][0].as_str().expect("entrypoint");
    let version = run_in(&container, &[], &[entrypoint, "--version"]);
    assert_eq!(
        version.trim(),
        format!("kinsight {}", env!("CARGO_PKG_VERSION"))
    );

    // As the image's user.
    let probe = build_id_probe(scratch.path());
    let ids = run_in(
        &container,
        &["--volume", &format!("{probe}:/kinsight-test/id:ro")],
        &["/kinsight-test/id"],
    );
    assert_eq!(ids.trim(), "uid=65532 gid=65532");

    // ONNX Runtime and every bundled model, from the image's environment alone.
    let photos = scratch.path().join("photos");
    std::fs::create_dir(&photos).expect("mkdir photos");
    std::fs::copy(
        Path::new(REPO).join("tests/fixtures/images/rocket.jpg"),
        photos.join("rocket.jpg"),
    )
    .expect("copy a photo");
    let photos_mount = format!("{}:/kinsight-test/photos:ro", photos.display());
    let bench = run_in(
        &container,
        &["--volume", &photos_mount],
        &[
            entrypoint,
            "bench",
            "--images",
            "/kinsight-test/photos",
            "--warmup",
            "0",
            "--threads",
            "1",
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(bench.trim()).unwrap_or_else(|e| panic!("{e}: {bench}"));
    assert_eq!(report["images"], 1, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let catalog = kinsight::inference::Catalog::load(Path::new(REPO).join("models/catalog.yaml"))
        .expect("bundled catalog");
    let ran: BTreeSet<&str> = report["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert_eq!(ran, catalog.names().collect::<BTreeSet<_>>(), "{report}");
    eprintln!("ran in the image in {:.1?}", started.elapsed());
}
