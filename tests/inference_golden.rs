//! Golden tests: the bundled models on the fixture photos must reproduce the reference
//! outputs of `models/README.md` (onnxruntime 1.32 + Pillow bilinear resize). "The same"
//! means the same labels above the threshold and confidences within 0.05 (resize
//! kernels differ slightly between implementations).
//!
//! Needs the ONNX Runtime library: `$ORT_DYLIB_PATH`, or the onnxruntime wheel in
//! `./.venv` (`python3 -m venv .venv && .venv/bin/pip install onnxruntime==1.32.0`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use kinsight::inference::{
    BoundingBox, Catalog, DecodeLimits, Engine, EngineOptions, InferenceError, ModelOutput,
    decode_image, default_runtime_path, init_runtime,
};

const DETECTION: &str = "object_detection";
const CLASSIFICATION: &str = "image_classification";
const TOLERANCE: f32 = 0.05;

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn runtime() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let path = default_runtime_path().unwrap_or_else(|| {
            panic!(
                "ONNX Runtime library not found: set ORT_DYLIB_PATH, or run `python3 -m venv .venv && \
                 .venv/bin/pip install onnxruntime==1.32.0` in {}",
                crate_root().display()
            )
        });
        if let Err(e) = init_runtime(Some(&path)) {
            panic!("cannot load ONNX Runtime from {}: {e}", path.display());
        }
    });
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        runtime();
        let catalog = Catalog::load(crate_root().join("models/catalog.yaml")).expect("catalog");
        Engine::load(&catalog, &[], &EngineOptions::default()).expect("engine")
    })
}

fn fixture(name: &str) -> PathBuf {
    crate_root().join("tests/fixtures/images").join(name)
}

fn run(model: &str, image: &str) -> ModelOutput {
    let bytes = std::fs::read(fixture(image)).expect("fixture image");
    let decoded = decode_image(&bytes, &DecodeLimits::default()).expect("decode");
    let output = engine().run(model, &decoded).expect("inference");
    println!(
        "{image} {model}: {}",
        serde_json::to_string(&output).unwrap_or_default()
    );
    output
}

/// Asserts the detections are exactly `expected` (label, confidence), in any order.
fn assert_detections(output: &ModelOutput, expected: &[(&str, f32)]) {
    let mut got: Vec<(&str, f32)> = output
        .detections
        .iter()
        .map(|d| (d.label.as_str(), d.confidence))
        .collect();
    got.sort_by(|a, b| a.0.cmp(b.0));
    let mut want = expected.to_vec();
    want.sort_by(|a, b| a.0.cmp(b.0));
    let labels = |v: &[(&str, f32)]| v.iter().map(|(l, _)| l.to_string()).collect::<Vec<_>>();
    assert_eq!(
        labels(&got),
        labels(&want),
        "labels differ: got {got:?}, want {want:?}"
    );
    for ((label, confidence), (_, reference)) in got.iter().zip(&want) {
        assert!(
            (confidence - reference).abs() <= TOLERANCE,
            "{label}: confidence {confidence} vs reference {reference}"
        );
    }
    assert!(
        output
            .detections
            .windows(2)
            .all(|w| w[0].confidence >= w[1].confidence),
        "detections not sorted by confidence"
    );
    assert!(output.classes.is_empty());
}

/// Asserts a box is within `tolerance` pixels of the reference (clamped to the image).
fn assert_box(actual: &BoundingBox, reference: [f32; 4], size: (f32, f32), tolerance: f32) {
    let clamp = |v: f32, max: f32| v.clamp(0.0, max);
    let want = [
        clamp(reference[0], size.0),
        clamp(reference[1], size.1),
        clamp(reference[2], size.0),
        clamp(reference[3], size.1),
    ];
    let got = [actual.x_min, actual.y_min, actual.x_max, actual.y_max];
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tolerance,
            "box {got:?} vs reference {want:?}"
        );
    }
    assert!(
        got[0] >= 0.0 && got[1] >= 0.0 && got[2] <= size.0 && got[3] <= size.1,
        "box {got:?} not clamped"
    );
}

fn assert_top1(output: &ModelOutput, label: &str, confidence: Option<f32>) {
    let top = output.classes.first().expect("at least one class");
    assert_eq!(top.label, label, "top-1 of {:?}", output.classes);
    if let Some(reference) = confidence {
        assert!(
            (top.confidence - reference).abs() <= TOLERANCE,
            "{label}: confidence {} vs reference {reference}",
            top.confidence
        );
    }
    assert_eq!(output.classes.len(), 5, "topK from the catalog");
    assert!(output.detections.is_empty());
}

#[test]
fn detects_person_on_astronaut() {
    let output = run(DETECTION, "astronaut.png");
    assert_detections(&output, &[("person", 0.734)]);
    assert_box(
        &output.detections[0].bbox,
        [-4.9, -5.4, 344.6, 487.8],
        (512.0, 512.0),
        8.0,
    );
}

#[test]
fn detects_cat_scene_on_chelsea() {
    let output = run(DETECTION, "chelsea.png");
    assert_detections(
        &output,
        &[
            ("person", 0.589),
            ("cat", 0.402),
            ("dog", 0.395),
            ("cell phone", 0.362),
        ],
    );
    let phone = output
        .detections
        .iter()
        .find(|d| d.label == "cell phone")
        .expect("cell phone");
    assert_box(
        &phone.bbox,
        [290.0, 108.0, 340.0, 161.0],
        (451.0, 300.0),
        6.0,
    );
}

#[test]
fn detects_cup_on_coffee() {
    let output = run(DETECTION, "coffee.png");
    assert_detections(&output, &[("cup", 0.522)]);
    assert_box(
        &output.detections[0].bbox,
        [117.1, -4.9, 403.6, 383.1],
        (600.0, 400.0),
        8.0,
    );
}

#[test]
fn detects_nothing_on_rocket() {
    let output = run(DETECTION, "rocket.jpg");
    assert_detections(&output, &[]);
    // Nothing found serialises to an empty object.
    assert_eq!(serde_json::to_string(&output).unwrap(), "{}");
}

#[test]
fn classifies_coffee_as_espresso() {
    assert_top1(&run(CLASSIFICATION, "coffee.png"), "espresso", Some(0.957));
}

#[test]
fn classifies_chelsea_as_tiger_cat() {
    assert_top1(&run(CLASSIFICATION, "chelsea.png"), "tiger cat", None);
}

#[test]
fn classifies_rocket_as_missile() {
    assert_top1(&run(CLASSIFICATION, "rocket.jpg"), "missile", Some(0.381));
}

#[test]
fn classifies_astronaut_as_bobsled_or_helmet() {
    // The reference top-2 are 0.131 vs 0.124: too close to require the order.
    let output = run(CLASSIFICATION, "astronaut.png");
    for (label, reference) in [("bobsled", 0.131), ("football helmet", 0.124)] {
        let class = output.classes.iter().take(2).find(|c| c.label == label);
        let class =
            class.unwrap_or_else(|| panic!("{label} not in the top 2 of {:?}", output.classes));
        assert!(
            (class.confidence - reference).abs() <= TOLERANCE,
            "{class:?} vs {reference}"
        );
    }
}

#[test]
fn results_do_not_depend_on_the_encoding() {
    // The coffee photo re-encoded as lossless WebP decodes to the same pixels.
    let bytes = std::fs::read(fixture("coffee.png")).unwrap();
    let image = decode_image(&bytes, &DecodeLimits::default()).unwrap();
    let mut webp = Vec::new();
    image
        .write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut webp))
        .unwrap();
    let from_webp = decode_image(&webp, &DecodeLimits::default()).unwrap();
    assert_eq!(
        engine().run(DETECTION, &from_webp).unwrap(),
        engine().run(DETECTION, &image).unwrap()
    );
}

#[test]
fn concurrent_runs_give_identical_results() {
    let bytes = std::fs::read(fixture("chelsea.png")).unwrap();
    let image = decode_image(&bytes, &DecodeLimits::default()).unwrap();
    let expected = (
        engine().run(DETECTION, &image).unwrap(),
        engine().run(CLASSIFICATION, &image).unwrap(),
    );
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    (
                        engine().run(DETECTION, &image).unwrap(),
                        engine().run(CLASSIFICATION, &image).unwrap(),
                    )
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), expected);
        }
    });
}

#[test]
fn unknown_model_is_an_error() {
    let image = image::DynamicImage::new_rgb8(8, 8);
    let err = engine().run("segmentation", &image).unwrap_err();
    assert!(
        matches!(err, InferenceError::UnknownModel(ref m) if m == "segmentation"),
        "{err:?}"
    );
    assert_eq!(err.category(), "unknown_model");
}

#[test]
fn tiny_and_odd_images_do_not_fail() {
    for (w, h) in [(1, 1), (3, 900), (900, 3)] {
        let image = image::DynamicImage::new_rgba8(w, h);
        engine().run(DETECTION, &image).unwrap();
        engine().run(CLASSIFICATION, &image).unwrap();
    }
}

#[test]
fn label_count_mismatch_is_reported_at_load() {
    runtime();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("three.labels"), "a\nb\nc\n").unwrap();
    let models = crate_root().join("models");
    for (file, task) in [
        (
            "nanodet-coco-416.onnx",
            "task: detection\n    decoder: nanodet",
        ),
        ("efficientnet-lite0-imagenet.onnx", "task: classification"),
    ] {
        let yaml = format!(
            "models:\n  - name: wrong\n    file: {}\n    {task}\n    labels: three.labels\n    input: {{width: {size}, height: {size}, \
             resize: stretch, channelOrder: rgb, mean: [0, 0, 0], std: [1, 1, 1]}}\n",
            models.join(file).display(),
            size = if file.starts_with("nanodet") {
                416
            } else {
                224
            },
        );
        let catalog = Catalog::from_yaml_str(&yaml, dir.path(), Path::new("test.yaml")).unwrap();
        let err = Engine::load(&catalog, &[], &EngineOptions::default()).unwrap_err();
        assert!(
            matches!(err, InferenceError::LabelCountMismatch { labels: 3, .. }),
            "{file}: {err}"
        );
        assert_eq!(err.category(), "invalid_catalog");
    }
}

#[test]
fn input_size_mismatch_is_reported_at_load() {
    runtime();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "models:\n  - name: wrong\n    file: {}\n    task: classification\n    labels: {}\n    input: {{width: 300, height: 300, \
         resize: stretch, channelOrder: rgb, mean: [0, 0, 0], std: [1, 1, 1]}}\n",
        crate_root()
            .join("models/efficientnet-lite0-imagenet.onnx")
            .display(),
        crate_root().join("models/imagenet1k.labels").display(),
    );
    let catalog = Catalog::from_yaml_str(&yaml, dir.path(), Path::new("test.yaml")).unwrap();
    let err = Engine::load(&catalog, &[], &EngineOptions::default()).unwrap_err();
    assert_eq!(err.category(), "model_load_failed", "{err}");
    assert!(err.to_string().contains("224"), "{err}");
    let err = Engine::load(&catalog, &["nope".to_string()], &EngineOptions::default()).unwrap_err();
    assert_eq!(err.category(), "unknown_model");
}

#[test]
fn reports_inference_time() {
    let bytes = std::fs::read(fixture("coffee.png")).unwrap();
    let image = decode_image(&bytes, &DecodeLimits::default()).unwrap();
    for model in [DETECTION, CLASSIFICATION] {
        engine().run(model, &image).unwrap(); // warm-up
        let runs = 10;
        let started = Instant::now();
        for _ in 0..runs {
            engine().run(model, &image).unwrap();
        }
        let per_image = started.elapsed().as_secs_f64() * 1000.0 / f64::from(runs);
        println!(
            "{model}: {per_image:.1} ms per 600x400 image (preprocess + inference + decoding)"
        );
    }
}

#[test]
fn classification_batches_match_single_runs() {
    // EfficientNet-Lite0 has a dynamic batch dimension: several images go in one run.
    assert_eq!(engine().max_batch(CLASSIFICATION), Some(8));
    assert_eq!(engine().max_batch(DETECTION), Some(1), "NanoDet is batch 1");
    let images: Vec<_> = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
        .iter()
        .map(|name| {
            decode_image(
                &std::fs::read(fixture(name)).unwrap(),
                &DecodeLimits::default(),
            )
            .unwrap()
        })
        .collect();
    let refs: Vec<_> = images.iter().collect();
    for model in [CLASSIFICATION, DETECTION] {
        let batched = engine().run_batch(model, &refs);
        for (image, result) in images.iter().zip(batched) {
            let batched = result.unwrap();
            let single = engine().run(model, image).unwrap();
            // A batch may round differently in the last digit.
            let confidences = |o: &ModelOutput| {
                o.classes
                    .iter()
                    .map(|c| (c.label.clone(), c.confidence))
                    .chain(o.detections.iter().map(|d| (d.label.clone(), d.confidence)))
                    .collect::<Vec<_>>()
            };
            let (a, b) = (confidences(&batched), confidences(&single));
            assert_eq!(a.len(), b.len(), "{model}: {a:?} vs {b:?}");
            for ((la, ca), (lb, cb)) in a.iter().zip(&b) {
                assert_eq!(la, lb, "{model}: {a:?} vs {b:?}");
                assert!((ca - cb).abs() <= 0.001, "{model}: {a:?} vs {b:?}");
            }
        }
    }
}

#[test]
fn pipeline_gives_the_engine_results() {
    use kinsight::inference::pipeline::{Pipeline, PipelineOptions};
    let models = vec![DETECTION.to_string(), CLASSIFICATION.to_string()];
    // The test's engine is shared, behind an Arc for the pipeline's threads.
    runtime();
    let catalog = Catalog::load(crate_root().join("models/catalog.yaml")).unwrap();
    let engine =
        std::sync::Arc::new(Engine::load(&catalog, &models, &EngineOptions::default()).unwrap());
    let (submitter, mut results) =
        Pipeline::start::<&str>(engine.clone(), &models, &PipelineOptions::default()).unwrap();
    let names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];
    let feeder = std::thread::spawn(move || {
        for name in names {
            submitter
                .blocking_submit(name, std::fs::read(fixture(name)).unwrap())
                .unwrap();
        }
    });
    let mut done = 0;
    while let Some((name, outcome)) = results.blocking_next() {
        let analysis = outcome.unwrap();
        let image = decode_image(
            &std::fs::read(fixture(name)).unwrap(),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(
            (analysis.width, analysis.height),
            (image.width(), image.height())
        );
        let detections = analysis.models[DETECTION].result.as_ref().unwrap();
        assert_eq!(
            detections,
            &engine.run(DETECTION, &image).unwrap(),
            "{name}"
        );
        let classes = analysis.models[CLASSIFICATION].result.as_ref().unwrap();
        let top = |o: &ModelOutput| o.classes.first().map(|c| c.label.clone());
        assert_eq!(
            top(classes),
            top(&engine.run(CLASSIFICATION, &image).unwrap()),
            "{name}"
        );
        done += 1;
    }
    feeder.join().unwrap();
    assert_eq!(done, names.len());
}

#[test]
fn a_detector_with_sessions_side_by_side_gives_the_results_of_one() {
    use kinsight::inference::pipeline::{Pipeline, PipelineOptions};
    runtime();
    let catalog = Catalog::load(crate_root().join("models/catalog.yaml")).unwrap();
    let models = vec![DETECTION.to_string()];
    let load = |instances| {
        let options = EngineOptions {
            instances,
            intra_threads: 1,
            ..EngineOptions::default()
        };
        std::sync::Arc::new(Engine::load(&catalog, &models, &options).unwrap())
    };
    let (one, three) = (load(1), load(3));
    assert_eq!(one.instances(DETECTION), Some(1));
    assert_eq!(three.instances(DETECTION), Some(3));
    // Each image several times, so that the three sessions all run some of them.
    let names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];
    let (submitter, mut results) =
        Pipeline::start::<(usize, &str)>(three, &models, &PipelineOptions::default()).unwrap();
    let feeder = std::thread::spawn(move || {
        for (i, name) in names.iter().cycle().take(12).enumerate() {
            submitter
                .blocking_submit((i, *name), std::fs::read(fixture(name)).unwrap())
                .unwrap();
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    while let Some(((i, name), outcome)) = results.blocking_next() {
        let image = decode_image(
            &std::fs::read(fixture(name)).unwrap(),
            &DecodeLimits::default(),
        )
        .unwrap();
        let detections = outcome.unwrap().models[DETECTION]
            .result
            .as_ref()
            .unwrap()
            .clone();
        assert_eq!(detections, one.run(DETECTION, &image).unwrap(), "{name}");
        assert!(seen.insert(i), "image {i} came out twice");
    }
    feeder.join().unwrap();
    assert_eq!(seen.len(), 12);
}
