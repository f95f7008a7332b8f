//! Execution providers with an ONNX Runtime built with CUDA (the `onnxruntime-gpu` wheel,
//! fetched by `scripts/fetch-onnxruntime-cuda.sh`; `scripts/test.sh` sets
//! `KINSIGHT_CUDA_ORT_DYLIB`). `inference_tasks.rs` covers a runtime without CUDA; this is
//! the case of a GPU image on a node where CUDA cannot run (no GPU, or no CUDA libraries):
//! the library offers CUDA, registering it fails, and the worker must say so and carry on
//! on the CPU under `auto`, or refuse clearly under `cuda`. On a machine where CUDA does
//! run, the same test checks that both choose CUDA and say so.
//!
//! The runtime is process-wide, so each run is the `kinsight bench` command in its own
//! process, through the same engine the worker loads, on the bundled photos.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PHOTOS: [&str; 4] = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];

fn cuda_runtime() -> PathBuf {
    let path = std::env::var_os("KINSIGHT_CUDA_ORT_DYLIB").unwrap_or_else(|| {
        panic!(
            "set KINSIGHT_CUDA_ORT_DYLIB to the libonnxruntime.so that \
             `scripts/fetch-onnxruntime-cuda.sh` prints (scripts/test.sh does)"
        )
    });
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// The bundled photos alone in a folder (the fixtures folder also has its README).
fn photos() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    for name in PHOTOS {
        std::fs::copy(fixtures.join(name), dir.path().join(name)).expect("copy photo");
    }
    dir
}

fn bench(runtime: &Path, photos: &Path, provider: &str) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new(env!("CARGO_BIN_EXE_kinsight"))
        .current_dir(root)
        .args(["bench", "--warmup", "0", "--threads", "1", "--images"])
        .arg(photos)
        .args([
            "--catalog",
            "models/catalog.yaml",
            "--execution-provider",
            provider,
            // The two bundled models: whether content_safety was fetched must not matter.
            "--model",
            "object_detection",
            "--model",
            "image_classification",
        ])
        .arg("--ort-dylib")
        .arg(runtime)
        .env("RUST_LOG", "info")
        .output()
        .expect("run kinsight bench")
}

/// The `model loaded` lines: model name and what its `execution_provider` field says.
/// Each is one whole line, the reason inside it (people grep pod logs).
fn providers(stderr: &str) -> Vec<(String, String)> {
    stderr
        .lines()
        .filter(|line| line.contains("model loaded"))
        .map(|line| {
            assert!(line.contains(" file=models/"), "a whole line: {line}");
            let field = |name: &str| {
                let start = line
                    .find(name)
                    .map(|i| i + name.len())
                    .unwrap_or(line.len());
                line[start..].to_owned()
            };
            let model = field("model=");
            let model = model.split(' ').next().unwrap_or_default().to_owned();
            let provider = field("execution_provider=");
            let provider = provider
                .split(" file=")
                .next()
                .unwrap_or_default()
                .to_owned();
            (model, provider)
        })
        .collect()
}

fn summary(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("bench JSON: {e}: {stdout}"))
}

#[test]
fn a_cuda_runtime_without_a_usable_gpu_falls_back_under_auto_and_fails_clearly_under_cuda() {
    let runtime = cuda_runtime();
    let photos = photos();

    let cuda = bench(&runtime, photos.path(), "cuda");
    let cuda_stderr = String::from_utf8_lossy(&cuda.stderr);
    let auto = bench(&runtime, photos.path(), "auto");
    let auto_stderr = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "auto must always run: {auto_stderr}");
    let loaded = providers(&auto_stderr);
    let models: Vec<&str> = loaded.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        models,
        ["object_detection", "image_classification"],
        "{auto_stderr}"
    );
    let ran = summary(&auto);
    assert_eq!(ran["images"], 4, "{ran}");
    assert_eq!(ran["failed"], 0, "{ran}");

    if cuda.status.success() {
        // A machine where CUDA runs: both choose it, and say so.
        for (model, provider) in providers(&cuda_stderr) {
            assert_eq!(provider, "CUDA:0 (requested)", "{model}");
        }
        for (model, provider) in loaded {
            assert_eq!(provider, "CUDA:0 (CUDA available, via auto)", "{model}");
        }
        return;
    }
    // This library has CUDA, so the failure is not "no CUDA support" but CUDA itself not
    // loading (a missing CUDA library, or no device), and the message says which.
    assert!(
        cuda_stderr.contains("error: cannot load model `object_detection`"),
        "{cuda_stderr}"
    );
    assert!(!cuda_stderr.contains("no CUDA support"), "{cuda_stderr}");
    let reason = cuda_stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        reason.contains("libonnxruntime_providers_cuda") || reason.contains("CUDA"),
        "the error names what failed: {reason}"
    );
    for (model, provider) in loaded {
        assert!(
            provider.starts_with("CPU (CUDA requested via auto but CUDA failed in ")
                && provider.contains(&runtime.display().to_string()),
            "{model}: {provider}"
        );
    }
    assert!(
        auto_stderr.contains("CUDA is unusable; using the CPU"),
        "{auto_stderr}"
    );

    // `cpu` never touches CUDA, even in a CUDA build of the runtime.
    let cpu = bench(&runtime, photos.path(), "cpu");
    let cpu_stderr = String::from_utf8_lossy(&cpu.stderr);
    assert!(cpu.status.success(), "{cpu_stderr}");
    for (model, provider) in providers(&cpu_stderr) {
        assert_eq!(provider, "CPU (requested)", "{model}");
    }
    assert!(!cpu_stderr.contains("CUDA is unusable"), "{cpu_stderr}");
}
