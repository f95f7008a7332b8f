//! `kinsight models` and `kinsight models check` on the bundled models (real ONNX Runtime,
//! from ORT_DYLIB_PATH) and on entries with the mistakes people make when adding one.

use std::path::Path;
use std::process::{Command, Output};

fn kinsight(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kinsight"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kinsight")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A folder with the bundled models and labels linked in, as someone adding a model has.
fn models_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    for file in [
        "nanodet-coco-416.onnx",
        "efficientnet-lite0-imagenet.onnx",
        "coco80.labels",
        "imagenet1k.labels",
    ] {
        std::os::unix::fs::symlink(bundled.join(file), dir.path().join(file)).expect("link");
    }
    dir
}

const CLASSIFIER: &str = "
    file: efficientnet-lite0-imagenet.onnx
    task: classification
    labels: imagenet1k.labels
    input: {width: 224, height: 224, resize: shorter-side-center-crop, resizeSize: 256,
            channelOrder: rgb, mean: [127, 127, 127], std: [128, 128, 128]}
";

#[test]
fn lists_the_catalog_as_a_table_and_as_json() {
    let output = kinsight(&["models"]);
    assert!(output.status.success(), "{output:?}");
    let table = stdout(&output);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{table}");
    let row = |name: &str| {
        let line = lines.iter().find(|l| l.starts_with(name)).expect(name);
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("object_detection"),
        [
            "object_detection",
            "detection (nanodet)",
            "416x416",
            "stretch",
            "bgr",
            "80",
            "cpu"
        ]
    );
    assert_eq!(
        row("image_classification"),
        [
            "image_classification",
            "classification",
            "224x224",
            "shorter-side 256, center-crop",
            "rgb",
            "1000",
            "cpu"
        ]
    );
    assert_eq!(
        row("content_safety"),
        [
            "content_safety",
            "classification",
            "224x224 NHWC",
            "stretch 256, center-crop",
            "bgr",
            "2",
            "cpu"
        ]
    );
    assert_eq!(
        row("photo_quality"),
        [
            "photo_quality",
            "builtin photo-quality",
            "-",
            "-",
            "-",
            "-",
            "cpu"
        ]
    );

    let output = kinsight(&["models", "--output", "json"]);
    assert!(output.status.success(), "{output:?}");
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let names: Vec<&str> = rows
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "object_detection",
            "image_classification",
            "content_safety",
            "photo_quality"
        ]
    );
    assert_eq!(rows[1]["labels"], 1000);
    assert_eq!(rows[0]["runs_on"], "cpu");
}

#[test]
fn check_passes_the_bundled_models() {
    let output = kinsight(&["models", "check", "models/catalog.yaml"]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{output:?}");
    let lines: Vec<&str> = text.lines().collect();
    // content_safety is fetched by scripts/test.sh (scripts/fetch-open-nsfw.sh).
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("ok    object_detection: "), "{text}");
    assert!(
        lines[0].contains("fit detection (nanodet) with 80 labels"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("ok    image_classification: "),
        "{text}"
    );
    assert!(
        lines[1].contains("matches 224x224 (batch up to 8)"),
        "{text}"
    );
    assert!(lines[2].starts_with("ok    content_safety: "), "{text}");
    assert!(
        lines[2].contains("input float32 [batch, 224, 224, 3] matches 224x224"),
        "{text}"
    );

    // One entry on its own, its paths relative to its file.
    let dir = models_folder();
    let entry = dir.path().join("new-model.yaml");
    std::fs::write(
        &entry,
        format!("name: my_classifier{}", CLASSIFIER.replace("\n    ", "\n")),
    )
    .expect("write");
    let output = kinsight(&["models", "check", entry.to_str().expect("utf-8")]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).starts_with("ok    my_classifier: "));
}

#[test]
fn check_reports_every_broken_entry_and_fails() {
    let dir = models_folder();
    let catalog = format!(
        "models:
  - name: good{CLASSIFIER}
  - name: wrong_labels{}
  - name: wrong_size{}
  - name: missing_file{}
  - name: detector_on_classifier{}
    decoder: nanodet
",
        CLASSIFIER.replace("imagenet1k.labels", "coco80.labels"),
        CLASSIFIER.replace(
            "width: 224, height: 224, resize: shorter-side-center-crop, resizeSize: 256",
            "width: 300, height: 300, resize: stretch",
        ),
        CLASSIFIER.replace("efficientnet-lite0-imagenet.onnx", "efficientnet.onnx"),
        CLASSIFIER
            .replace("task: classification", "task: detection")
            .replace("imagenet1k.labels", "coco80.labels")
            .replace(
                "resize: shorter-side-center-crop, resizeSize: 256",
                "resize: stretch"
            ),
    );
    let path = dir.path().join("catalog.yaml");
    std::fs::write(&path, catalog).expect("write");

    let output = kinsight(&["models", "check", path.to_str().expect("utf-8")]);
    let text = stdout(&output);
    assert!(!output.status.success(), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.contains(&format!(" {name}: ")))
            .unwrap_or_else(|| panic!("no line for {name} in:\n{text}"))
            .to_owned()
    };
    assert!(line("good").starts_with("ok "), "{text}");
    let wrong_labels = line("wrong_labels");
    assert!(wrong_labels.starts_with("error "), "{text}");
    assert_eq!(
        wrong_labels,
        "error wrong_labels: its labels file has 80 labels but the model's outputs are [?, 1000]"
    );
    let wrong_size = line("wrong_size");
    assert!(
        wrong_size.ends_with(
            "input `input` is float32 [?, 3, 224, 224]; the catalog describes float32 [1, 3, 300, 300] (NCHW)"
        ),
        "{wrong_size}"
    );
    let missing = line("missing_file");
    let expected = dir.path().join("efficientnet.onnx");
    assert!(
        missing.contains(&format!("model file {} does not exist", expected.display())),
        "{missing}"
    );
    assert!(
        line("detector_on_classifier")
            .contains("a nanodet model has per-level outputs [1, N, classes] and [1, N, 4 * bins]"),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has 4 error(s)"), "{stderr}");
}

#[test]
fn check_explains_a_file_that_is_no_catalog() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notes.yaml");
    std::fs::write(&path, "just: text\n").expect("write");
    let output = kinsight(&["models", "check", path.to_str().expect("utf-8")]);
    assert!(!output.status.success());
    let text = stdout(&output);
    assert!(text.contains("is neither a catalog"), "{text}");
    assert!(text.contains("nor one model entry"), "{text}");
}
