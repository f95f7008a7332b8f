//! Golden tests of the built-in `photo_quality` analyser, run the way the worker runs it
//! (the project catalog, the inference pipeline, image bytes in): the bundled photos and
//! copies made here (blurred, darkened, brightened, shrunk) get the expected flags; and
//! the perceptual hash every image gets finds a crop-and-rescale copy among them.

use std::path::PathBuf;
use std::sync::Arc;

use image::{DynamicImage, ImageFormat, RgbImage};
use kinsight::inference::similarity::{duplicate_sets, hamming_distance, perceptual_hash};
use kinsight::inference::{
    Catalog, Engine, EngineOptions, PhotoQuality, Pipeline, PipelineOptions, QualityFlag,
};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn photo(name: &str) -> RgbImage {
    image::open(repo("tests/fixtures/images").join(name))
        .expect("bundled photo")
        .to_rgb8()
}

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).expect("png");
    out.into_inner()
}

/// Every level `c` becomes `c * factor + offset`, clipped to 0..255.
fn scaled(image: &RgbImage, factor: f32, offset: f32) -> RgbImage {
    let mut out = image.clone();
    out.pixels_mut().for_each(|p| {
        p.0 =
            p.0.map(|c| (f32::from(c) * factor + offset).clamp(0.0, 255.0) as u8)
    });
    out
}

fn shrunk(image: &RgbImage, short_side: u32) -> RgbImage {
    let scale = short_side as f32 / image.width().min(image.height()) as f32;
    let (w, h) = (
        (image.width() as f32 * scale) as u32,
        (image.height() as f32 * scale) as u32,
    );
    DynamicImage::ImageRgb8(image.clone())
        .resize_exact(w, h, image::imageops::FilterType::Lanczos3)
        .to_rgb8()
}

/// `photo_quality` of each image, through the pipeline, in order.
fn analyse(images: &[(&str, Vec<u8>)]) -> Vec<(String, PhotoQuality)> {
    run(images)
        .into_iter()
        .map(|(name, quality, _)| (name, quality))
        .collect()
}

/// `photo_quality` and the perceptual hash of each image, through the pipeline, in order.
fn run(images: &[(&str, Vec<u8>)]) -> Vec<(String, PhotoQuality, String)> {
    let catalog = Catalog::load(repo("models/catalog.yaml")).expect("project catalog");
    let models = vec!["photo_quality".to_owned()];
    let engine = Engine::load(&catalog, &models, &EngineOptions::default()).expect("engine");
    let (submitter, mut results) =
        Pipeline::start::<usize>(Arc::new(engine), &models, &PipelineOptions::default())
            .expect("pipeline");
    for (i, (_, bytes)) in images.iter().enumerate() {
        submitter.blocking_submit(i, bytes.clone()).expect("submit");
    }
    drop(submitter);
    let mut out: Vec<Option<(PhotoQuality, String)>> = vec![None; images.len()];
    while let Some((i, outcome)) = results.blocking_next() {
        let mut analysis = outcome.expect("decoded");
        let run = analysis
            .models
            .remove("photo_quality")
            .expect("a photo_quality run");
        eprintln!(
            "{}: {}x{}, decode {:.1} ms, photo_quality {:.2} ms",
            images[i].0, analysis.width, analysis.height, analysis.decode_ms, run.inference_ms
        );
        let quality = run.result.expect("analysed").quality.expect("quality");
        out[i] = Some((
            quality,
            analysis.perceptual_hash.expect("a perceptual hash"),
        ));
    }
    images
        .iter()
        .zip(out)
        .map(|((name, _), q)| {
            let (quality, hash) = q.expect("a result per image");
            (name.to_string(), quality, hash)
        })
        .collect()
}

#[test]
fn bundled_photos_and_made_copies_get_the_expected_flags() {
    use QualityFlag::*;
    let rocket = photo("rocket.jpg");
    let coffee = photo("coffee.png");
    let astronaut = photo("astronaut.png");
    let blurred = image::imageops::blur(&coffee, 4.0);
    // The bundled photos are sharp and well exposed; rocket (427 px) and coffee (400 px)
    // are narrower than the catalog's minShortSide (480), astronaut (512) is not.
    let cases: Vec<(&str, RgbImage, Vec<QualityFlag>)> = vec![
        ("rocket.jpg", rocket.clone(), vec![LowResolution]),
        ("coffee.png", coffee.clone(), vec![LowResolution]),
        ("astronaut.png", astronaut.clone(), vec![]),
        (
            "astronaut blurred",
            image::imageops::blur(&astronaut, 3.0),
            vec![Blurry],
        ),
        ("coffee blurred", blurred, vec![Blurry, LowResolution]),
        ("astronaut dark", scaled(&astronaut, 0.15, 0.0), vec![Dark]),
        (
            "astronaut overexposed",
            scaled(&astronaut, 1.0, 150.0),
            vec![Overexposed],
        ),
        (
            "astronaut small",
            shrunk(&astronaut, 240),
            vec![LowResolution],
        ),
        // A 12-megapixel copy: measured at the same normalised size, still sharp enough.
        ("astronaut 12 MP", shrunk(&astronaut, 3000), vec![]),
    ];
    let images: Vec<(&str, Vec<u8>)> = cases.iter().map(|(n, i, _)| (*n, png(i))).collect();
    let measured = analyse(&images);
    for (name, quality) in &measured {
        eprintln!("{name}: {quality:?}");
    }
    let mut wrong = Vec::new();
    for ((name, quality), (_, _, expected)) in measured.iter().zip(&cases) {
        if &quality.flags != expected {
            wrong.push(format!("{name}: expected {expected:?}, got {quality:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The README's default: at most this many of the 64 bits differ in a near-duplicate.
const MAX_DISTANCE: u32 = 12;

#[test]
fn a_crop_and_rescale_copy_is_a_near_duplicate_and_other_photos_are_not() {
    let astronaut = photo("astronaut.png");
    let (w, h) = astronaut.dimensions();
    // 6 % cut off each side, then scaled to 70 % and saved as JPEG: what a re-upload does.
    let cropped = image::imageops::crop_imm(
        &astronaut,
        w * 6 / 100,
        h * 6 / 100,
        w * 88 / 100,
        h * 88 / 100,
    )
    .to_image();
    let copy = shrunk(&cropped, h * 70 / 100);
    let mut jpeg = std::io::Cursor::new(Vec::new());
    copy.write_to(&mut jpeg, ImageFormat::Jpeg).expect("jpeg");
    let images = vec![
        ("astronaut", png(&astronaut)),
        ("astronaut-copy", jpeg.into_inner()),
        ("coffee", png(&photo("coffee.png"))),
        ("chelsea", png(&photo("chelsea.png"))),
        ("rocket", png(&photo("rocket.jpg"))),
    ];
    let hashed = run(&images);
    let hash = |name: &str| {
        hashed
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, h)| h.as_str())
            .expect(name)
    };
    for (name, _, _) in &hashed {
        eprintln!(
            "{name}: distance to astronaut {:?}",
            hamming_distance(hash("astronaut"), hash(name))
        );
    }
    let near = hamming_distance(hash("astronaut"), hash("astronaut-copy")).expect("comparable");
    assert!(near <= MAX_DISTANCE, "the copy is {near} bits away");
    // The hash's cost on a 9-megapixel photo (reported, not asserted: machines differ).
    let large = shrunk(&astronaut, 3000);
    let started = std::time::Instant::now();
    let large_hash = perceptual_hash(&large).expect("hash");
    eprintln!(
        "perceptual hash of 3000x3000: {:.2} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert!(hamming_distance(&large_hash, hash("astronaut")).expect("comparable") <= MAX_DISTANCE);
    let sets = duplicate_sets(
        hashed.iter().map(|(n, _, h)| (n.as_str(), h.as_str())),
        MAX_DISTANCE,
    );
    assert_eq!(
        sets,
        [vec!["astronaut".to_owned(), "astronaut-copy".to_owned()]]
    );
}
