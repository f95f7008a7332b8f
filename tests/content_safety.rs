//! `content_safety` (Yahoo's Open-NSFW, fetched by scripts/fetch-open-nsfw.sh): golden scores
//! of the bundled safe photos stay below the catalog's `nsfw` threshold, and a missing model
//! file gives an error that names the fetch step instead of breaking the catalog.
//!
//! Needs ONNX Runtime (`$ORT_DYLIB_PATH` or ./.venv) and models/open-nsfw.onnx.

use std::path::Path;

use kinsight::inference::catalog::TaskSpec;
use kinsight::inference::{
    Catalog, DecodeLimits, Engine, EngineOptions, InferenceError, decode_image,
    default_runtime_path, init_runtime,
};

const MODEL: &str = "content_safety";

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn runtime() {
    static INIT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        let path =
            default_runtime_path().expect("ONNX Runtime: set ORT_DYLIB_PATH or make ./.venv");
        init_runtime(Some(&path)).expect("load ONNX Runtime");
    });
}

/// The `nsfw` threshold the catalog documents.
fn nsfw_threshold(catalog: &Catalog) -> f32 {
    match &catalog
        .get(MODEL)
        .expect("content_safety in the catalog")
        .task
    {
        TaskSpec::Classification(params) => params
            .flags
            .iter()
            .find(|(label, _, _)| label == "nsfw")
            .map(|(_, _, above)| *above)
            .expect("an nsfw flag"),
        other => panic!("content_safety is {other:?}"),
    }
}

#[test]
fn safe_photos_score_below_the_nsfw_threshold() {
    let model = crate_root().join("models/open-nsfw.onnx");
    assert!(
        model.is_file(),
        "{} is missing: run scripts/fetch-open-nsfw.sh",
        model.display()
    );
    runtime();
    let catalog = Catalog::load(crate_root().join("models/catalog.yaml")).expect("catalog");
    let threshold = nsfw_threshold(&catalog);
    assert_eq!(threshold, 0.8, "the README documents 0.8");
    let engine =
        Engine::load(&catalog, &[MODEL.to_owned()], &EngineOptions::default()).expect("engine");
    let mut folders = vec![crate_root().join("tests/fixtures/images")];
    let shared = Path::new("/work/shared/images");
    if shared.is_dir() {
        folders.push(shared.to_owned());
    }
    let mut scored = 0;
    for folder in folders {
        for entry in std::fs::read_dir(&folder).expect("images folder") {
            let path = entry.expect("entry").path();
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("jpg" | "png")
            ) {
                continue;
            }
            let bytes = std::fs::read(&path).expect("image");
            let image = decode_image(&bytes, &DecodeLimits::default()).expect("decode");
            let output = engine.run(MODEL, &image).expect("inference");
            let nsfw = output
                .classes
                .iter()
                .find(|c| c.label == "nsfw")
                .map(|c| c.confidence)
                .expect("both classes are reported (topK 2)");
            let sfw = output
                .classes
                .iter()
                .find(|c| c.label == "sfw")
                .map(|c| c.confidence);
            println!("{}: nsfw {nsfw}, sfw {sfw:?}", path.display());
            assert!(
                (nsfw + sfw.unwrap_or(0.0) - 1.0).abs() < 0.001,
                "probabilities, taken as they are"
            );
            assert!(nsfw < threshold, "{} scores {nsfw}", path.display());
            assert!(
                output.flags.is_empty(),
                "{}: {:?}",
                path.display(),
                output.flags
            );
            scored += 1;
        }
    }
    assert!(scored >= 4, "only {scored} photos");
}

#[test]
fn a_missing_model_file_names_the_fetch_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(crate_root().join("models/catalog.yaml")).expect("catalog");
    std::fs::write(dir.path().join("catalog.yaml"), &text).expect("write");
    for file in ["coco80.labels", "imagenet1k.labels", "open-nsfw.labels"] {
        std::fs::copy(
            crate_root().join("models").join(file),
            dir.path().join(file),
        )
        .expect("labels");
    }
    for file in ["nanodet-coco-416.onnx", "efficientnet-lite0-imagenet.onnx"] {
        std::fs::write(dir.path().join(file), b"").expect("placeholder");
    }
    // The catalog loads without the fetched file...
    let catalog = Catalog::load(dir.path().join("catalog.yaml")).expect("catalog loads");
    assert!(catalog.get(MODEL).is_some());
    // ...and asking for the model says what to run.
    runtime();
    match Engine::load(&catalog, &[MODEL.to_owned()], &EngineOptions::default()) {
        Err(InferenceError::ModelLoad { model, message }) => {
            assert_eq!(model, MODEL);
            assert!(message.contains("scripts/fetch-open-nsfw.sh"), "{message}");
            assert!(message.contains("open-nsfw.onnx is missing"), "{message}");
        }
        other => panic!("expected a ModelLoad error, got {other:?}"),
    }
}
