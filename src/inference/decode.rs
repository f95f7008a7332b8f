//! Untrusted bytes -> image.
//!
//! Only JPEG, PNG and WebP are accepted (detected from the magic bytes, never from a
//! file name or content type). The dimensions are read from the header and checked
//! against [`DecodeLimits::max_pixels`] *before* any pixel buffer is allocated, so a
//! small file announcing a huge image (a decompression bomb) costs nothing.
//!
//! The decoders fill what is missing from a file cut short with grey and report success
//! (a partial download would be analysed as if whole), so the container structure is
//! walked first: a JPEG must reach its EOI marker, a PNG its IEND chunk, a WebP must hold
//! the bytes its RIFF header announces. Anything cut short fails as
//! [`InferenceError::TruncatedImage`]; data that is all there but does not decode is
//! [`InferenceError::CorruptImage`].

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

use image::error::ImageError;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::InferenceError;

/// Limits applied to every decoded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// 50 megapixels: photos from current phone cameras pass, bombs do not.
    fn default() -> Self {
        Self {
            max_pixels: 50_000_000,
        }
    }
}

/// What the PNG decoder may allocate besides the pixels: chunks it buffers and the colour
/// profile it inflates (real profiles are a few KiB, rarely 1 MiB).
const PNG_METADATA_BYTES: u64 = 16 << 20;

/// Decodes a JPEG, PNG or WebP image, applying its EXIF orientation (so the result, and
/// boxes found in it, are upright as viewers display it).
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, InferenceError> {
    // The decoders are written not to panic, but they parse hostile input: make sure a
    // bug there fails one image instead of the worker.
    catch_unwind(AssertUnwindSafe(|| decode_unchecked(bytes, limits))).unwrap_or_else(|_| {
        Err(InferenceError::CorruptImage(
            "the image decoder failed on malformed data".into(),
        ))
    })
}

fn decode_unchecked(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, InferenceError> {
    if bytes.is_empty() {
        return Err(InferenceError::CorruptImage("no data (0 bytes)".into()));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| InferenceError::UnsupportedFormat { detected: None })?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
    ) {
        return Err(InferenceError::UnsupportedFormat {
            detected: Some(format!("{format:?}").to_lowercase()),
        });
    }

    check_complete(bytes, format)?;

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // Some decoders check their allocation limit while reading the header, which would
    // hide the dimensions; our own pixel check below runs first, then the limits are set.
    reader.no_limits();
    if format == ImageFormat::Png {
        // ...except PNG's, which takes its limit when it is made, never later, and spends
        // it on what it inflates and buffers besides the pixels (a colour profile, text)
        // while reading the header: a 1 MiB profile chunk can inflate to gigabytes.
        let mut metadata = Limits::no_limits();
        metadata.max_alloc = Some(PNG_METADATA_BYTES);
        reader.limits(metadata);
    }
    let mut decoder = reader.into_decoder().map_err(|e| map_error(e, None))?;

    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(InferenceError::CorruptImage(format!(
            "the header announces {width}x{height} pixels"
        )));
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(InferenceError::ImageTooLarge {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    // Bound what the decoder may allocate too: the image itself at up to 8 bytes per pixel
    // (16-bit RGBA) plus working buffers.
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder
        .set_limits(decoder_limits)
        .map_err(|e| map_error(e, Some((width, height, limits))))?;

    // A broken EXIF block must not reject an otherwise good image.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| map_error(e, Some((width, height, limits))))?;
    image.apply_orientation(orientation);
    Ok(image)
}

fn map_error(error: ImageError, size: Option<(u32, u32, &DecodeLimits)>) -> InferenceError {
    match error {
        ImageError::Limits(e) => match size {
            Some((width, height, limits)) => InferenceError::ImageTooLarge {
                width,
                height,
                max_pixels: limits.max_pixels,
            },
            None => InferenceError::CorruptImage(format!("limits exceeded: {e}")),
        },
        ImageError::Unsupported(e) => InferenceError::UnsupportedFormat {
            detected: Some(e.to_string()),
        },
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            InferenceError::TruncatedImage("the decoder ran out of data".into())
        }
        other => InferenceError::CorruptImage(other.to_string()),
    }
}

/// Fails with [`InferenceError::TruncatedImage`] unless the file's structure is complete.
/// Bytes after the end (some cameras append data) are allowed.
fn check_complete(bytes: &[u8], format: ImageFormat) -> Result<(), InferenceError> {
    let missing = match format {
        ImageFormat::Jpeg => jpeg_missing(bytes),
        ImageFormat::Png => png_missing(bytes),
        ImageFormat::WebP => webp_missing(bytes),
        _ => None,
    };
    match missing {
        None => Ok(()),
        Some(what) => Err(InferenceError::TruncatedImage(format!(
            "{what} after {} bytes",
            bytes.len()
        ))),
    }
}

/// What a cut-short JPEG lacks, walking its markers to EOI: segments by their length (so an
/// EXIF thumbnail's own EOI is skipped), entropy-coded data up to the next marker.
fn jpeg_missing(bytes: &[u8]) -> Option<&'static str> {
    const MISSING: Option<&str> = Some("the JPEG ends before its end-of-image marker");
    let mut at = 2; // past SOI
    loop {
        // Any number of 0xFF fill bytes may precede a marker.
        while bytes.get(at) == Some(&0xFF) && bytes.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(0xFF), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) else {
            return MISSING;
        };
        at += 2;
        match marker {
            0xD9 => return None,            // EOI
            0x01 | 0xD0..=0xD7 => continue, // TEM, RSTn: no length
            _ => {}
        }
        let Some(&[hi, lo]) = bytes.get(at..at + 2) else {
            return MISSING;
        };
        at += usize::from(u16::from_be_bytes([hi, lo]));
        if at > bytes.len() {
            return MISSING;
        }
        if marker == 0xDA {
            // SOS: entropy-coded data up to a marker that is not stuffing (FF00) or RSTn.
            loop {
                let Some(ff) = bytes[at..].iter().position(|&b| b == 0xFF) else {
                    return MISSING;
                };
                at += ff;
                match bytes.get(at + 1) {
                    None => return MISSING,
                    Some(0x00 | 0xD0..=0xD7) => at += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// What a cut-short PNG lacks, walking its chunks to IEND.
fn png_missing(bytes: &[u8]) -> Option<&'static str> {
    let mut at = 8; // past the signature
    loop {
        let Some(&[l0, l1, l2, l3, t0, t1, t2, t3]) = bytes.get(at..at + 8) else {
            return Some("the PNG ends before its IEND chunk");
        };
        let length = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        // Length, type, data, CRC.
        let end = at.saturating_add(12).saturating_add(length);
        if end > bytes.len() {
            return Some(if &[t0, t1, t2, t3] == b"IDAT" {
                "the PNG's image data (IDAT) is cut short"
            } else {
                "the PNG ends inside a chunk"
            });
        }
        if &[t0, t1, t2, t3] == b"IEND" {
            return None;
        }
        at = end;
    }
}

/// What a cut-short WebP lacks: the RIFF header announces the file's size.
fn webp_missing(bytes: &[u8]) -> Option<&'static str> {
    let Some(&[s0, s1, s2, s3]) = bytes.get(4..8) else {
        return Some("the WebP ends inside its RIFF header");
    };
    let announced = u64::from(u32::from_le_bytes([s0, s1, s2, s3])) + 8;
    (announced > bytes.len() as u64).then_some("the WebP is shorter than its RIFF header announces")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| Rgb([x as u8, y as u8, (x + y) as u8]))
    }

    fn encoded(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn png(image: &RgbImage) -> Vec<u8> {
        encoded(image, ImageFormat::Png)
    }

    fn jpeg(image: &RgbImage) -> Vec<u8> {
        encoded(image, ImageFormat::Jpeg)
    }

    /// CRC-32 (IEEE) as PNG chunks use it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A PNG whose (valid, CRC-correct) IHDR announces `width` x `height`.
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = png(&gradient(4, 4));
        // Signature (8) + chunk length (4) + "IHDR" (4), then width and height.
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<DynamicImage, InferenceError> {
        decode_image(bytes, &DecodeLimits::default())
    }

    #[test]
    fn decodes_png_jpeg_and_webp() {
        let image = gradient(20, 10);
        let decoded = decode(&png(&image)).unwrap();
        assert_eq!(decoded.to_rgb8(), image);

        let decoded = decode(&jpeg(&image)).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (20, 10));

        let rgba = RgbaImage::from_pixel(7, 3, Rgba([1, 2, 3, 128]));
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(rgba.as_raw(), 7, 3, image::ExtendedColorType::Rgba8)
            .unwrap();
        assert_eq!(decode(&webp).unwrap().to_rgba8(), rgba);
    }

    #[test]
    fn png_pixels_are_not_counted_against_its_metadata_budget() {
        // 2400 x 2400 RGB is 16.5 MiB of pixels, more than PNG_METADATA_BYTES.
        let image = gradient(2400, 2400);
        assert!(image.as_raw().len() as u64 > PNG_METADATA_BYTES);
        let decoded = decode(&png(&image)).expect("a large PNG decodes");
        assert_eq!((decoded.width(), decoded.height()), (2400, 2400));
    }

    #[test]
    fn rejects_bomb_from_the_header_alone() {
        let bomb = png_claiming(30_000, 30_000);
        assert!(bomb.len() < 200);
        let started = std::time::Instant::now();
        let err = decode(&bomb).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            matches!(
                err,
                InferenceError::ImageTooLarge {
                    width: 30_000,
                    height: 30_000,
                    max_pixels: 50_000_000
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.category(), "image_too_large");
        assert!(err.is_input_error());
    }

    #[test]
    fn pixel_limit_is_configurable() {
        let bytes = png(&gradient(10, 10));
        let err = decode_image(&bytes, &DecodeLimits { max_pixels: 99 }).unwrap_err();
        assert_eq!(err.category(), "image_too_large");
        assert!(decode_image(&bytes, &DecodeLimits { max_pixels: 100 }).is_ok());
    }

    #[test]
    fn rejects_empty_and_unknown_data() {
        let err = decode(&[]).unwrap_err();
        assert_eq!(err.category(), "corrupt_image");
        let err = decode(b"definitely not an image").unwrap_err();
        assert!(
            matches!(err, InferenceError::UnsupportedFormat { detected: None }),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_other_formats_by_magic() {
        let err = decode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap_err();
        assert!(
            matches!(&err, InferenceError::UnsupportedFormat { detected: Some(f) } if f == "gif"),
            "{err:?}"
        );
        let err = decode(b"BM\x00\x00\x00\x00\x00\x00\x00\x00").unwrap_err();
        assert_eq!(err.category(), "unsupported_format");
    }

    #[test]
    fn rejects_truncated_and_corrupt_png() {
        let bytes = png(&gradient(64, 64));
        for cut in [8, 20, 40, bytes.len() / 2, bytes.len() - 1] {
            let err = decode(&bytes[..cut]).unwrap_err();
            assert_eq!(err.category(), "image_truncated", "cut at {cut}: {err:?}");
            assert!(err.is_input_error());
        }
        // Valid structure, garbage compressed data.
        let mut corrupt = bytes.clone();
        let len = corrupt.len();
        corrupt[60..len - 20].iter_mut().for_each(|b| *b = 0xA5);
        assert_eq!(decode(&corrupt).unwrap_err().category(), "corrupt_image");
        // Announcing zero pixels.
        assert_eq!(
            decode(&png_claiming(0, 10)).unwrap_err().category(),
            "corrupt_image"
        );
    }

    #[test]
    fn truncated_jpeg_fails_instead_of_being_filled_in() {
        let jpeg = jpeg(&gradient(64, 64));
        assert!(decode(&jpeg).is_ok());
        for cut in [3, 10, 100, jpeg.len() / 3, jpeg.len() - 1] {
            let err = decode(&jpeg[..cut]).unwrap_err();
            assert_eq!(err.category(), "image_truncated", "cut at {cut}: {err:?}");
        }
        // Data appended after the end-of-image marker is not a truncation.
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"camera maker notes");
        assert!(decode(&trailing).is_ok());
        let mut garbage = jpeg.clone();
        garbage[30..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 31) as u8);
        // Whatever it is, it is not a panic.
        let _ = decode(&garbage);
    }

    #[test]
    fn an_embedded_thumbnail_end_marker_does_not_complete_a_cut_jpeg() {
        let thumbnail = jpeg(&gradient(8, 8));
        let photo = jpeg(&gradient(64, 64));
        // An APP1 segment holding a whole JPEG (as EXIF thumbnails are), right after SOI.
        let mut bytes = photo[..2].to_vec();
        bytes.extend_from_slice(&[0xFF, 0xE1]);
        bytes.extend_from_slice(&((thumbnail.len() + 2) as u16).to_be_bytes());
        bytes.extend_from_slice(&thumbnail);
        bytes.extend_from_slice(&photo[2..]);
        assert!(decode(&bytes).is_ok());
        let cut = 2 + 4 + thumbnail.len() + 50;
        assert_eq!(
            decode(&bytes[..cut]).unwrap_err().category(),
            "image_truncated"
        );
    }

    #[test]
    fn webp_shorter_than_its_riff_size_is_truncated() {
        let rgba = RgbaImage::from_fn(32, 32, |x, y| Rgba([x as u8 * 8, y as u8 * 8, 0, 255]));
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .write_image(rgba.as_raw(), 32, 32, image::ExtendedColorType::Rgba8)
            .unwrap();
        for cut in [12, 20, webp.len() / 2, webp.len() - 1] {
            let err = decode(&webp[..cut]).unwrap_err();
            assert_eq!(err.category(), "image_truncated", "cut at {cut}: {err:?}");
        }
    }
}
