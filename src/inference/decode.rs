//! Untrusted bytes -> image.
//!
//! Only JPEG, PNG and WebP are accepted (detected from the magic bytes, never from a
//! file name or content type). The dimensions are read from the header and checked
//! against [`DecodeLimits::max_pixels`] *before* any pixel buffer is allocated, so a
//! small file announcing a huge image (a decompression bomb) costs nothing.

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
            InferenceError::CorruptImage("truncated data".into())
        }
        other => InferenceError::CorruptImage(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| Rgb([x as u8, y as u8, (x + y) as u8]))
    }

    fn png(image: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                image.as_raw(),
                image.width(),
                image.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        out
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

        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .write_image(image.as_raw(), 20, 10, image::ExtendedColorType::Rgb8)
            .unwrap();
        let decoded = decode(&jpeg).unwrap();
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
        for cut in [8, 20, 40, bytes.len() / 2, bytes.len() - 13] {
            let err = decode(&bytes[..cut]).unwrap_err();
            assert_eq!(err.category(), "corrupt_image", "cut at {cut}: {err:?}");
        }
        // Valid header, garbage compressed data.
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
    fn truncated_or_garbage_jpeg_does_not_panic() {
        let image = gradient(64, 64);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .write_image(image.as_raw(), 64, 64, image::ExtendedColorType::Rgb8)
            .unwrap();
        for cut in [3, 10, 100, jpeg.len() / 2] {
            // Decoders may fill missing data; what matters is a result, not a panic.
            let _ = decode(&jpeg[..cut]);
        }
        let mut garbage = jpeg.clone();
        garbage[30..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 31) as u8);
        let _ = decode(&garbage);
        assert_eq!(decode(&jpeg[..3]).unwrap_err().category(), "corrupt_image");
    }
}
