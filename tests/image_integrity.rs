//! Golden tests: the bundled photos, whole, decode; cut short (a partial download) or with
//! damaged data they fail with the reason the worker records in the image's `image.failed`
//! event, never analysed on the decoder's grey fill.

use std::path::PathBuf;

use image::ImageEncoder;
use kinsight::inference::{DecodeLimits, decode_image};
use kinsight::worker::failure_reason;

fn photos() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let mut photos: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("png" | "jpg")
            )
        })
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("read photo"))
        })
        .collect();
    photos.sort();
    assert!(
        photos.len() >= 4,
        "bundled photos missing in {}",
        dir.display()
    );
    // A lossless WebP of one photo (the encoder image has).
    let image = image::load_from_memory(&photos[0].1)
        .expect("photo")
        .to_rgba8();
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgba8,
        )
        .expect("webp");
    photos.push(("made.webp".into(), webp));
    photos
}

/// The worker's reason for these bytes, or `Ok` with the decoded size.
fn outcome(bytes: &[u8]) -> Result<(u32, u32), &'static str> {
    decode_image(bytes, &DecodeLimits::default())
        .map(|image| (image.width(), image.height()))
        .map_err(|e| failure_reason(&e))
}

#[test]
fn whole_photos_decode_and_cut_ones_fail_as_truncated() {
    let mut wrong = Vec::new();
    for (name, bytes) in photos() {
        let whole = outcome(&bytes);
        if whole.is_err() {
            wrong.push(format!("{name} whole: {whole:?}"));
        }
        // The partial download (first third), half, and all but the last byte.
        for cut in [bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
            let got = outcome(&bytes[..cut]);
            if got != Err("ImageTruncated") {
                wrong.push(format!(
                    "{name} cut to {cut} of {} bytes: {got:?}",
                    bytes.len()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn damaged_data_of_full_length_fails_as_corrupt() {
    let photos = photos();
    for (name, bytes) in photos.iter().filter(|(name, _)| name.ends_with(".png")) {
        // Overwrite the middle of the compressed pixel data: every byte is there, the
        // chunk checksums no longer match.
        let mut damaged = bytes.clone();
        let middle = damaged.len() / 2;
        damaged[middle..middle + 64].fill(0x5A);
        assert_eq!(outcome(&damaged), Err("CorruptImage"), "{name}");
    }
    // A JPEG whose first Huffman table announces more codes than can exist (its 16
    // code-length counts, right after the segment length and table class).
    let (name, jpeg) = photos
        .iter()
        .find(|(name, _)| name.ends_with(".jpg"))
        .expect("a JPEG");
    let dht = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC4])
        .expect("DHT marker");
    let mut damaged = jpeg.clone();
    damaged[dht + 5..dht + 21].fill(0x7F);
    let got = outcome(&damaged);
    assert_eq!(got, Err("CorruptImage"), "{name}");
}
