//! The tasks and paths the bundled models do not cover, end to end through ONNX Runtime,
//! with the tiny hand-made models of `models/test/` (see `make_test_models.py` there;
//! their outputs are known): `ordinal` grading, the `yolov8` decoder with letterbox
//! preprocessing, batches, the pipeline, and execution provider choice.
//!
//! Needs the ONNX Runtime library like `inference_golden.rs`.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use kinsight::inference::pipeline::{Pipeline, PipelineOptions};
use kinsight::inference::{
    Catalog, Engine, EngineOptions, ExecutionProvider, InferenceError, ModelOutput, OrdinalGrade,
    default_runtime_path, init_runtime,
};

const GRADE: &str = "quality_grade";
const QUADRANTS: &str = "colour_quadrants";

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn catalog_path() -> PathBuf {
    crate_root().join("models/test/catalog.yaml")
}

fn runtime() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let path = default_runtime_path().unwrap_or_else(|| {
            panic!(
                "ONNX Runtime library not found: set ORT_DYLIB_PATH, or run \
                 `scripts/setup-onnxruntime.sh` in {}",
                crate_root().display()
            )
        });
        if let Err(e) = init_runtime(Some(&path)) {
            panic!("cannot load ONNX Runtime from {}: {e}", path.display());
        }
    });
}

fn engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        runtime();
        let catalog = Catalog::load(catalog_path()).expect("test catalog");
        Arc::new(Engine::load(&catalog, &[], &EngineOptions::default()).expect("engine"))
    })
}

fn grey(level: u8) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 30, Rgb([level; 3])))
}

fn grade(level: u8) -> OrdinalGrade {
    let output = engine().run(GRADE, &grey(level)).expect("ordinal run");
    assert!(output.detections.is_empty() && output.classes.is_empty());
    output.grade.expect("a grade")
}

#[test]
fn ordinal_grades_follow_brightness() {
    // logit_i = 10 * (3m i - i^2 / 2) with m the mean brightness: a peak at grade 3m.
    let black = grade(0);
    assert_eq!(black.label, "poor");
    assert!(black.confidence > 0.99, "{black:?}");
    assert!(black.score < 0.01, "{black:?}");

    let white = grade(255);
    assert_eq!(white.label, "excellent");
    assert!(white.score > 0.99, "{white:?}");

    // m = 2/3: "good", and fair / excellent equally likely around it: the score is 2/3.
    let light = grade(170);
    assert_eq!(light.label, "good");
    assert!((light.score - 2.0 / 3.0).abs() < 0.001, "{light:?}");
    assert!((light.confidence - 0.9867).abs() < 0.002, "{light:?}");
}

#[test]
fn ordinal_score_is_confidence_weighted() {
    // m = 128/255 sits between fair and good: the top grade is barely more likely than
    // the next, and the score lands in the middle of the scale, not on "good".
    let middle = grade(128);
    assert_eq!(middle.label, "good");
    assert!(middle.confidence < 0.55, "{middle:?}");
    assert!((middle.score - 0.5).abs() < 0.02, "{middle:?}");
    // Monotonic in brightness.
    let scores: Vec<f32> = [0, 60, 100, 128, 150, 200, 255]
        .into_iter()
        .map(|level| grade(level).score)
        .collect();
    assert!(scores.windows(2).all(|w| w[0] < w[1]), "{scores:?}");
}

#[test]
fn ordinal_output_serialises_as_a_grade() {
    let output = engine().run(GRADE, &grey(0)).unwrap();
    let json = serde_json::to_value(&output).unwrap();
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["grade"]);
    assert_eq!(json["grade"]["label"], "poor");
}

#[test]
fn batches_give_the_same_results_as_single_runs() {
    assert_eq!(
        engine().max_batch(GRADE),
        Some(4),
        "maxBatch of the catalog"
    );
    assert_eq!(
        engine().max_batch(QUADRANTS),
        Some(8),
        "the default for a dynamic batch"
    );
    // Six images: one batch of four and one of two.
    let images: Vec<DynamicImage> = [0, 40, 128, 170, 220, 255].map(grey).to_vec();
    let refs: Vec<&DynamicImage> = images.iter().collect();
    let batched = engine().run_batch(GRADE, &refs);
    assert_eq!(batched.len(), 6);
    for (image, result) in images.iter().zip(batched) {
        assert_eq!(result.unwrap(), engine().run(GRADE, image).unwrap());
    }
    let scenes = [halves(200, 100), halves(100, 300), grey(114)];
    let refs: Vec<&DynamicImage> = scenes.iter().collect();
    for (scene, result) in scenes.iter().zip(engine().run_batch(QUADRANTS, &refs)) {
        assert_eq!(result.unwrap(), engine().run(QUADRANTS, scene).unwrap());
    }
    // A bad image in a batch fails alone.
    let empty = DynamicImage::new_rgb8(0, 0);
    let results = engine().run_batch(GRADE, &[&images[0], &empty, &images[5]]);
    assert_eq!(
        results[0].as_ref().unwrap().grade.as_ref().unwrap().label,
        "poor"
    );
    assert_eq!(results[1].as_ref().unwrap_err().category(), "invalid_image");
    assert_eq!(
        results[2].as_ref().unwrap().grade.as_ref().unwrap().label,
        "excellent"
    );
    assert!(engine().run_batch(GRADE, &[]).is_empty());
}

/// `width` x `height`, the left half pure red, the right half pure blue.
fn halves(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, _| {
        if x < width / 2 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    }))
}

fn boxes(output: &ModelOutput) -> Vec<(String, [f32; 4])> {
    let mut found: Vec<(String, [f32; 4])> = output
        .detections
        .iter()
        .map(|d| {
            let b = &d.bbox;
            (d.label.clone(), [b.x_min, b.y_min, b.x_max, b.y_max])
        })
        .collect();
    found.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1[0].total_cmp(&b.1[0]))
            .then(a.1[1].total_cmp(&b.1[1]))
    });
    found
}

#[test]
fn yolov8_letterbox_boxes_land_on_the_image() {
    // 200x100 -> 64x32 (gain 0.32) with 16 rows of grey padding above and below. Every
    // 32x32 quadrant of the input is half padding, half one colour: mean colour
    // (0.72, 0.22, 0.22) for red -> sigmoid(3.0) = 0.953; its box maps back to a quarter
    // of the image, clamped where it covers padding.
    let output = engine().run(QUADRANTS, &halves(200, 100)).unwrap();
    assert_eq!(
        boxes(&output),
        [
            ("blue".to_string(), [100.0, 0.0, 200.0, 50.0]),
            ("blue".to_string(), [100.0, 50.0, 200.0, 100.0]),
            ("red".to_string(), [0.0, 0.0, 100.0, 50.0]),
            ("red".to_string(), [0.0, 50.0, 100.0, 100.0]),
        ]
    );
    for detection in &output.detections {
        assert!(
            (detection.confidence - 0.9526).abs() < 0.02,
            "{detection:?}"
        );
    }
    assert!(output.classes.is_empty() && output.grade.is_none());

    // Portrait: 100x300 -> 21x64 (gain 64/300, 21 = round(21.33)) with 21 columns of
    // padding on the left: the axes scale differently (21/100 and 64/300) and the boxes
    // still come out on the image, clamped to it.
    let output = engine().run(QUADRANTS, &halves(100, 300)).unwrap();
    assert_eq!(
        boxes(&output),
        [
            ("blue".to_string(), [52.4, 0.0, 100.0, 150.0]),
            ("blue".to_string(), [52.4, 150.0, 100.0, 300.0]),
            ("red".to_string(), [0.0, 0.0, 52.4, 150.0]),
            ("red".to_string(), [0.0, 150.0, 52.4, 300.0]),
        ]
    );
    // Grey everywhere (the padding colour): nothing.
    assert_eq!(boxes(&engine().run(QUADRANTS, &grey(114)).unwrap()), []);
}

#[test]
fn yolov8_square_image_fills_the_input() {
    // 128x128 -> 64x64, no padding: left quadrants pure red (sigmoid(8) = 0.9997).
    let output = engine().run(QUADRANTS, &halves(128, 128)).unwrap();
    assert_eq!(
        boxes(&output),
        [
            ("blue".to_string(), [64.0, 0.0, 128.0, 64.0]),
            ("blue".to_string(), [64.0, 64.0, 128.0, 128.0]),
            ("red".to_string(), [0.0, 0.0, 64.0, 64.0]),
            ("red".to_string(), [0.0, 64.0, 64.0, 128.0]),
        ]
    );
    assert!(output.detections.iter().all(|d| d.confidence > 0.99));
}

fn png(image: &DynamicImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .unwrap();
    bytes
}

#[test]
fn pipeline_runs_every_model_on_every_image() {
    let models = vec![GRADE.to_string(), QUADRANTS.to_string()];
    let options = PipelineOptions {
        decoders: 2,
        ..PipelineOptions::default()
    };
    let (submitter, mut results) =
        Pipeline::start::<usize>(engine().clone(), &models, &options).unwrap();
    // Some not RGB (the pipeline converts once per image, not per model).
    let images: Vec<DynamicImage> = (0..12)
        .map(|i| match i % 4 {
            0 => grey(i * 20),
            1 => halves(200, 100),
            2 => DynamicImage::ImageRgba8(grey(i * 20).to_rgba8()),
            _ => DynamicImage::ImageLumaA8(halves(200, 100).to_luma_alpha8()),
        })
        .collect();
    let feeder = {
        let bytes: Vec<Vec<u8>> = images.iter().map(png).collect();
        std::thread::spawn(move || {
            for (i, bytes) in bytes.into_iter().enumerate() {
                submitter.blocking_submit(i, bytes).unwrap();
            }
            submitter
                .blocking_submit(99, b"not an image".to_vec())
                .unwrap();
            // Dropping the submitter ends the pipeline once everything is out.
        })
    };
    let mut seen = Vec::new();
    while let Some((key, outcome)) = results.blocking_next() {
        seen.push(key);
        if key == 99 {
            let err = outcome.unwrap_err();
            assert_eq!(err.category(), "unsupported_format", "{err}");
            continue;
        }
        let analysis = outcome.unwrap();
        let image = &images[key];
        assert_eq!(
            (analysis.width, analysis.height),
            (image.width(), image.height())
        );
        assert_eq!(analysis.models.len(), 2);
        for model in &models {
            let run = &analysis.models[model];
            assert_eq!(
                run.result.as_ref().unwrap(),
                &engine().run(model, image).unwrap(),
                "{model} on image {key}"
            );
            assert!(run.inference_ms >= 0.0);
        }
    }
    feeder.join().unwrap();
    seen.sort_unstable();
    let mut expected: Vec<usize> = (0..12).collect();
    expected.push(99);
    assert_eq!(seen, expected);
}

#[test]
fn pipeline_works_from_async_code_and_refuses_unknown_models() {
    let err = Pipeline::start::<u8>(
        engine().clone(),
        &["nope".to_string()],
        &PipelineOptions::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, InferenceError::UnknownModel(ref m) if m == "nope"),
        "{err}"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async {
        let (submitter, mut results) = Pipeline::start::<&'static str>(
            engine().clone(),
            &[GRADE.to_string()],
            &PipelineOptions::default(),
        )
        .unwrap();
        submitter.submit("white", png(&grey(255))).await.unwrap();
        submitter.submit("black", png(&grey(0))).await.unwrap();
        drop(submitter);
        let mut labels = Vec::new();
        while let Some((key, outcome)) = results.next().await {
            let grade = outcome.unwrap().models[GRADE]
                .result
                .as_ref()
                .unwrap()
                .grade
                .clone()
                .unwrap();
            labels.push((key, grade.label));
        }
        labels.sort();
        assert_eq!(
            labels,
            [
                ("black", "poor".to_string()),
                ("white", "excellent".to_string())
            ]
        );
    });
}

#[test]
fn catalog_mistakes_are_reported_at_load() {
    runtime();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("three.labels"), "a\nb\nc\n").unwrap();
    let test_models = crate_root().join("models/test");
    let entry = |file: &str, task: &str, extra: &str, size: u32| {
        format!(
            "models:\n  - name: wrong\n    file: {}\n    {task}\n    labels: three.labels\n    input: {{width: {size}, height: {size}, \
             resize: stretch, channelOrder: rgb, mean: [0, 0, 0], std: [1, 1, 1]}}\n{extra}",
            test_models.join(file).display(),
        )
    };
    let load = |yaml: String| {
        let catalog = Catalog::from_yaml_str(&yaml, dir.path(), Path::new("test.yaml")).unwrap();
        Engine::load(&catalog, &[], &EngineOptions::default()).unwrap_err()
    };
    // Three labels for a model with 2 classes (6 = 4 + 2 rows) or 4 grades.
    let err = load(entry(
        "yolov8-quadrants.onnx",
        "task: detection\n    decoder: yolov8",
        "",
        64,
    ));
    assert!(
        matches!(err, InferenceError::LabelCountMismatch { labels: 3, .. }),
        "{err}"
    );
    let err = load(entry("ordinal-brightness.onnx", "task: ordinal", "", 8));
    assert!(
        matches!(err, InferenceError::LabelCountMismatch { labels: 3, .. }),
        "{err}"
    );
    // A batch on NanoDet, whose batch dimension is fixed at 1.
    let yaml = format!(
        "models:\n  - name: wrong\n    file: {}\n    task: detection\n    decoder: nanodet\n    labels: {}\n    \
         input: {{width: 416, height: 416, resize: stretch, channelOrder: bgr, mean: [0, 0, 0], std: [1, 1, 1]}}\n    maxBatch: 4\n",
        crate_root().join("models/nanodet-coco-416.onnx").display(),
        crate_root().join("models/coco80.labels").display(),
    );
    let err = load(yaml);
    assert_eq!(err.category(), "model_load_failed", "{err}");
    assert!(err.to_string().contains("fixed at 1"), "{err}");
}

/// Protocol buffer encoding, enough to write a tiny ONNX model by hand.
fn pb_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn pb_int(field: u64, value: u64, out: &mut Vec<u8>) {
    pb_varint(field << 3, out);
    pb_varint(value, out);
}

fn pb_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    pb_varint((field << 3) | 2, out);
    pb_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A float tensor's `ValueInfoProto` with fixed dimensions.
fn pb_value_info(name: &str, dims: &[u64]) -> Vec<u8> {
    let mut shape = Vec::new();
    for &dim in dims {
        let mut dimension = Vec::new();
        pb_int(1, dim, &mut dimension); // dim_value
        pb_bytes(1, &dimension, &mut shape); // dim
    }
    let mut tensor = Vec::new();
    pb_int(1, 1, &mut tensor); // elem_type: FLOAT
    pb_bytes(2, &shape, &mut tensor);
    let mut type_proto = Vec::new();
    pb_bytes(1, &tensor, &mut type_proto); // tensor_type
    let mut info = Vec::new();
    pb_bytes(1, name.as_bytes(), &mut info);
    pb_bytes(2, &type_proto, &mut info);
    info
}

/// An ONNX model (opset 13) taking `[1, 3, 8, 8]` and giving the mean of each channel as
/// a rank-1 `[3]` output: three "classes" without the batch dimension.
fn rank_one_output_model() -> Vec<u8> {
    let mut axes = Vec::new();
    pb_bytes(1, b"axes", &mut axes);
    for axis in [0, 2, 3] {
        pb_int(8, axis, &mut axes); // ints
    }
    pb_int(20, 7, &mut axes); // type: INTS
    let mut keepdims = Vec::new();
    pb_bytes(1, b"keepdims", &mut keepdims);
    pb_int(3, 0, &mut keepdims); // i
    pb_int(20, 2, &mut keepdims); // type: INT
    let mut node = Vec::new();
    pb_bytes(1, b"x", &mut node);
    pb_bytes(2, b"y", &mut node);
    pb_bytes(4, b"ReduceMean", &mut node);
    pb_bytes(5, &axes, &mut node);
    pb_bytes(5, &keepdims, &mut node);
    let mut graph = Vec::new();
    pb_bytes(1, &node, &mut graph);
    pb_bytes(2, b"rank_one", &mut graph);
    pb_bytes(11, &pb_value_info("x", &[1, 3, 8, 8]), &mut graph);
    pb_bytes(12, &pb_value_info("y", &[3]), &mut graph);
    let mut opset = Vec::new();
    pb_bytes(1, b"", &mut opset);
    pb_int(2, 13, &mut opset);
    let mut model = Vec::new();
    pb_int(1, 7, &mut model); // ir_version
    pb_bytes(7, &graph, &mut model);
    pb_bytes(8, &opset, &mut model);
    model
}

/// A classifier or ordinal model whose output lacks the batch dimension would fail on
/// every image (each output's first dimension is the batch): it is refused at load.
#[test]
fn a_rank_one_logits_output_is_refused_at_load() {
    runtime();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("three.labels"), "a\nb\nc\n").unwrap();
    std::fs::write(dir.path().join("rank-one.onnx"), rank_one_output_model()).unwrap();
    for task in ["task: classification", "task: ordinal"] {
        let yaml = format!(
            "models:\n  - name: flat\n    file: rank-one.onnx\n    {task}\n    labels: three.labels\n    \
             input: {{width: 8, height: 8, resize: stretch, channelOrder: rgb, mean: [0, 0, 0], std: [1, 1, 1]}}\n"
        );
        let catalog = Catalog::from_yaml_str(&yaml, dir.path(), Path::new("test.yaml")).unwrap();
        let err = Engine::load(&catalog, &[], &EngineOptions::default()).unwrap_err();
        assert_eq!(err.category(), "model_load_failed", "{task}: {err}");
        assert!(
            err.to_string()
                .contains("output is [batch, classes], this one is [3]"),
            "{task}: {err}"
        );
    }
}

#[test]
fn execution_provider_choice() {
    runtime();
    let catalog = Catalog::load(catalog_path()).unwrap();
    let models = [GRADE.to_string()];
    let cuda = EngineOptions {
        execution_provider: ExecutionProvider::Cuda { device_id: 0 },
        ..EngineOptions::default()
    };
    match Engine::load(&catalog, &models, &cuda) {
        // A CUDA build of ONNX Runtime on a machine with a GPU.
        Ok(engine) => assert_eq!(
            engine.execution_provider(GRADE),
            Some(ExecutionProvider::Cuda { device_id: 0 })
        ),
        Err(err) => {
            assert_eq!(err.category(), "model_load_failed");
            assert!(err.to_string().contains("no CUDA support"), "{err}");
        }
    }
    // `auto` always loads: on the GPU when it can, else on the CPU.
    let auto = EngineOptions {
        execution_provider: ExecutionProvider::Auto,
        ..EngineOptions::default()
    };
    let engine = Engine::load(&catalog, &models, &auto).unwrap();
    let provider = engine.execution_provider(GRADE).unwrap();
    assert_ne!(provider, ExecutionProvider::Auto);
    assert_eq!(
        engine.run(GRADE, &grey(0)).unwrap().grade.unwrap().label,
        "poor"
    );
    let cpu = Engine::load(&catalog, &models, &EngineOptions::default()).unwrap();
    assert_eq!(cpu.execution_provider(GRADE), Some(ExecutionProvider::Cpu));
}
