//! `photo_quality`: a built-in analyser (no ONNX file) that scores a decoded photo's
//! sharpness, exposure, resolution and aspect and flags it `blurry`, `dark`, `overexposed`
//! or `low_resolution`. Thresholds come from its catalog entry.
//!
//! It works on the image the pipeline already decoded, shrunk to [`ANALYSIS_SIDE`] on its
//! longest side and turned grey, so its cost hardly depends on the photo's size and the
//! sharpness of a 4000 px photo and of its 1000 px copy are comparable.
//!
//! Sharpness is the variance of the Laplacian with the contrast normalised (the grey levels
//! as if stretched so their 1st..99th percentiles span 0..255): darkening a photo does not
//! make it blurry.
//!
//! Every score is in `0..=1`, higher is better, and a score that has a flag is 0.5 exactly
//! at that flag's threshold.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::InferenceError;
use super::output::round_confidence;

/// Longest side of the grey image the measures are taken on (smaller photos are not enlarged).
pub const ANALYSIS_SIDE: u32 = 512;

/// Grey levels (of 255) at or below which a pixel counts as a clipped shadow...
const SHADOW_LEVEL: u8 = 8;
/// ...and at or above which as a clipped highlight.
const HIGHLIGHT_LEVEL: u8 = 247;

/// Level ranges narrower than this are not stretched further (a flat image stays flat).
const MIN_CONTRAST_RANGE: u8 = 32;

/// The lowest grey level at or below which at least `share` of the pixels lie.
fn percentile(histogram: &[u64; 256], count: f64, share: f64) -> u8 {
    let wanted = (count * share).ceil() as u64;
    let mut seen = 0;
    for (level, n) in histogram.iter().enumerate() {
        seen += n;
        if seen >= wanted.max(1) {
            return level as u8;
        }
    }
    255
}

/// The thresholds of the flags, from the catalog entry (`thresholds:`); every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct QualityThresholds {
    /// `blurry` when the variance of the Laplacian is below this.
    pub blurry_below: f32,
    /// `dark` when the mean luminance (0..1) is below this...
    pub dark_mean_below: f32,
    /// ...or when more than this share of the pixels are clipped shadows.
    pub dark_clipped_above: f32,
    /// `overexposed` when the mean luminance is above this...
    pub overexposed_mean_above: f32,
    /// ...or when more than this share of the pixels are clipped highlights.
    pub overexposed_clipped_above: f32,
    /// `low_resolution` when the shorter side has fewer pixels than this.
    pub min_short_side: u32,
    /// Longest / shortest side above which the aspect score drops below 1.
    pub max_aspect: f32,
}

impl Default for QualityThresholds {
    fn default() -> Self {
        Self {
            blurry_below: 100.0,
            dark_mean_below: 0.2,
            dark_clipped_above: 0.5,
            overexposed_mean_above: 0.85,
            overexposed_clipped_above: 0.25,
            min_short_side: 480,
            max_aspect: 2.0,
        }
    }
}

impl QualityThresholds {
    /// Why these thresholds cannot work, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        let shares = [
            ("darkMeanBelow", self.dark_mean_below),
            ("darkClippedAbove", self.dark_clipped_above),
            ("overexposedMeanAbove", self.overexposed_mean_above),
            ("overexposedClippedAbove", self.overexposed_clipped_above),
        ];
        if let Some((name, value)) = shares.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
            return Err(format!("thresholds.{name} must be in 0..1, not {value}"));
        }
        if !(self.blurry_below > 0.0 && self.blurry_below.is_finite()) {
            return Err("thresholds.blurryBelow must be a positive number".into());
        }
        if self.min_short_side == 0 {
            return Err("thresholds.minShortSide must be at least 1".into());
        }
        if !(self.max_aspect >= 1.0 && self.max_aspect.is_finite()) {
            return Err("thresholds.maxAspect must be at least 1".into());
        }
        Ok(())
    }
}

/// A flag raised by [`analyse`].
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum QualityFlag {
    Blurry,
    Dark,
    Overexposed,
    LowResolution,
}

/// What `photo_quality` reports for one image. Scores in `0..=1`, higher is better,
/// rounded to 4 decimals.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhotoQuality {
    /// Mean of the four scores below: what a cover photo is chosen by.
    pub score: f32,
    /// `v / (v + blurryBelow)`, `v` the variance of the Laplacian.
    pub sharpness: f32,
    /// `(1 - |2 * meanLuminance - 1|) * (1 - clippedShadows - clippedHighlights)`.
    pub exposure: f32,
    /// `min(1, shortSide / (2 * minShortSide))`.
    pub resolution: f32,
    /// `min(1, maxAspect / (longSide / shortSide))`.
    pub aspect: f32,
    /// Variance of the 4-neighbour Laplacian of the grey image (levels 0..255, contrast
    /// stretched so the 1st..99th percentiles span them).
    pub laplacian_variance: f32,
    /// Mean luminance, 0 (black) to 1 (white).
    pub mean_luminance: f32,
    /// Share of pixels at grey level 8 or below.
    pub clipped_shadows: f32,
    /// Share of pixels at grey level 247 or above.
    pub clipped_highlights: f32,
    /// Sorted; empty when none applies.
    #[serde(default)]
    pub flags: Vec<QualityFlag>,
}

/// Measures `image` (the pipeline's decoded RGB image) against `thresholds`.
pub fn analyse(
    image: &RgbImage,
    thresholds: &QualityThresholds,
) -> Result<PhotoQuality, InferenceError> {
    let (width, height) = image.dimensions();
    let (grey, w, h) = analysis_grey(image)?;
    let pixels = grey.as_slice();

    let mut histogram = [0_u64; 256];
    for &p in pixels {
        histogram[usize::from(p)] += 1;
    }
    let count = pixels.len().max(1) as f64;
    let sum: u64 = histogram
        .iter()
        .enumerate()
        .map(|(v, n)| v as u64 * n)
        .sum();
    let mean_luminance = (sum as f64 / count / 255.0) as f32;
    let share = |levels: std::ops::RangeInclusive<u8>| {
        (levels.map(|v| histogram[usize::from(v)]).sum::<u64>() as f64 / count) as f32
    };
    let clipped_shadows = share(0..=SHADOW_LEVEL);
    let clipped_highlights = share(HIGHLIGHT_LEVEL..=255);
    // Contrast-normalised: as if the levels were stretched so the 1st and 99th percentiles
    // span 0..255, so a dark or hazy photo is not called blurry for its low contrast alone.
    let range = percentile(&histogram, count, 0.99) - percentile(&histogram, count, 0.01);
    let stretch = 255.0 / f64::from(range.max(MIN_CONTRAST_RANGE));
    let laplacian_variance = (laplacian_variance(pixels, w, h) * stretch * stretch) as f32;

    let short_side = width.min(height);
    let long_side = width.max(height);
    let sharpness = laplacian_variance / (laplacian_variance + thresholds.blurry_below);
    let exposure = ((1.0 - (2.0 * mean_luminance - 1.0).abs())
        * (1.0 - clipped_shadows - clipped_highlights))
        .clamp(0.0, 1.0);
    let resolution = (short_side as f32 / (2.0 * thresholds.min_short_side as f32)).min(1.0);
    let aspect = (thresholds.max_aspect * short_side as f32 / long_side.max(1) as f32).min(1.0);

    let mut flags = Vec::new();
    if laplacian_variance < thresholds.blurry_below {
        flags.push(QualityFlag::Blurry);
    }
    if mean_luminance < thresholds.dark_mean_below
        || clipped_shadows > thresholds.dark_clipped_above
    {
        flags.push(QualityFlag::Dark);
    }
    if mean_luminance > thresholds.overexposed_mean_above
        || clipped_highlights > thresholds.overexposed_clipped_above
    {
        flags.push(QualityFlag::Overexposed);
    }
    if short_side < thresholds.min_short_side {
        flags.push(QualityFlag::LowResolution);
    }
    let round = round_confidence;
    Ok(PhotoQuality {
        score: round((sharpness + exposure + resolution + aspect) / 4.0),
        sharpness: round(sharpness),
        exposure: round(exposure),
        resolution: round(resolution),
        aspect: round(aspect),
        laplacian_variance: (laplacian_variance * 10.0).round() / 10.0,
        mean_luminance: round(mean_luminance),
        clipped_shadows: round(clipped_shadows),
        clipped_highlights: round(clipped_highlights),
        flags,
    })
}

/// `image` shrunk (antialiased) to at most `side` pixels on its longest side; smaller
/// images are copied as they are.
pub(crate) fn shrink(image: &RgbImage, side: u32) -> Result<RgbImage, InferenceError> {
    let (width, height) = image.dimensions();
    let scale = (side as f32 / width.max(height).max(1) as f32).min(1.0);
    let target = |side: u32| ((side as f32 * scale).round() as u32).max(1);
    let (tw, th) = (target(width), target(height));
    if (tw, th) == (width, height) {
        return Ok(image.clone());
    }
    let source = ImageRef::new(width, height, image.as_raw(), PixelType::U8x3)
        .map_err(|e| InferenceError::InvalidImage(format!("shrinking the image: {e}")))?;
    let mut small = Image::new(tw, th, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&source, &mut small, &options)
        .map_err(|e| InferenceError::Internal(format!("shrinking the image: {e}")))?;
    RgbImage::from_raw(tw, th, small.into_vec())
        .ok_or_else(|| InferenceError::Internal("shrinking the image: buffer size".into()))
}

/// `image` shrunk to [`ANALYSIS_SIDE`] as grey levels (BT.601 luma), with its width and height.
fn analysis_grey(image: &RgbImage) -> Result<(Vec<u8>, usize, usize), InferenceError> {
    let small = shrink(image, ANALYSIS_SIDE)?;
    let grey = small
        .as_raw()
        .chunks_exact(3)
        .map(|p| ((77 * u32::from(p[0]) + 150 * u32::from(p[1]) + 29 * u32::from(p[2])) >> 8) as u8)
        .collect();
    Ok((grey, small.width() as usize, small.height() as usize))
}

/// Variance of `4 * p - (up + down + left + right)` over the inner pixels; 0 when there are none.
fn laplacian_variance(pixels: &[u8], width: usize, height: usize) -> f64 {
    if width < 3 || height < 3 {
        return 0.0;
    }
    let (mut sum, mut squares, mut n) = (0_i64, 0_i64, 0_i64);
    for y in 1..height - 1 {
        let (up, row, down) = (
            &pixels[(y - 1) * width..y * width],
            &pixels[y * width..(y + 1) * width],
            &pixels[(y + 1) * width..(y + 2) * width],
        );
        for x in 1..width - 1 {
            let value = 4 * i64::from(row[x])
                - i64::from(up[x])
                - i64::from(down[x])
                - i64::from(row[x - 1])
                - i64::from(row[x + 1]);
            sum += value;
            squares += value * value;
            n += 1;
        }
    }
    let mean = sum as f64 / n as f64;
    squares as f64 / n as f64 - mean * mean
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn flags(image: &RgbImage) -> Vec<QualityFlag> {
        analyse(image, &QualityThresholds::default()).unwrap().flags
    }

    #[test]
    fn flat_grey_is_blurry_and_black_is_dark_and_white_overexposed() {
        let grey = RgbImage::from_pixel(800, 600, Rgb([128, 128, 128]));
        assert_eq!(flags(&grey), [QualityFlag::Blurry]);
        let black = RgbImage::from_pixel(800, 600, Rgb([0, 0, 0]));
        assert_eq!(flags(&black), [QualityFlag::Blurry, QualityFlag::Dark]);
        let white = RgbImage::from_pixel(800, 600, Rgb([255, 255, 255]));
        assert_eq!(
            flags(&white),
            [QualityFlag::Blurry, QualityFlag::Overexposed]
        );
    }

    #[test]
    fn scores_are_one_half_at_their_thresholds() {
        let thresholds = QualityThresholds::default();
        // A checkerboard is as sharp as can be; its short side is exactly the threshold.
        let side = thresholds.min_short_side;
        let board = RgbImage::from_fn(side, side, |x, y| {
            if (x + y) % 2 == 0 {
                Rgb([255, 255, 255])
            } else {
                Rgb([0, 0, 0])
            }
        });
        let quality = analyse(&board, &thresholds).unwrap();
        assert_eq!(quality.resolution, 0.5);
        assert_eq!(quality.aspect, 1.0);
        assert!(!quality.flags.contains(&QualityFlag::LowResolution));
        let narrow = RgbImage::from_pixel(side * 4, side, Rgb([128, 128, 128]));
        assert_eq!(analyse(&narrow, &thresholds).unwrap().aspect, 0.5);
    }

    #[test]
    fn tiny_images_do_not_panic() {
        for (w, h) in [(1, 1), (2, 5), (3, 3)] {
            let image = RgbImage::from_pixel(w, h, Rgb([10, 200, 30]));
            let quality = analyse(&image, &QualityThresholds::default()).unwrap();
            assert!(quality.flags.contains(&QualityFlag::LowResolution));
        }
    }

    #[test]
    fn thresholds_out_of_range_are_refused() {
        let bad = QualityThresholds {
            dark_mean_below: 1.5,
            ..QualityThresholds::default()
        };
        assert!(bad.validate().unwrap_err().contains("darkMeanBelow"));
        assert!(QualityThresholds::default().validate().is_ok());
    }
}
