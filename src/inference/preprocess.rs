//! Image -> model input tensor: RGB, resize (SIMD, `fast_image_resize`), optional centre
//! crop, channel reordering and per-channel normalisation into NCHW `f32`.
//!
//! The reference outputs of the bundled models were produced with Pillow's bilinear
//! resize; `fast_image_resize`'s bilinear *convolution* uses the same kernel and support
//! scaling on downscale, so results match closely.

use std::borrow::Cow;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{CropBox, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, RgbImage};
#[cfg(test)]
use ndarray::Array4;

use super::InferenceError;
use super::catalog::{ChannelOrder, Layout, Preprocessing, Resize};

/// A window of an RGB buffer (in pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    left: usize,
    top: usize,
    width: usize,
    height: usize,
}

/// Where the image lands in the model input: `input = image * scale + offset` per axis
/// (in pixels). Detection decoders use the inverse to map boxes back onto the image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Placement {
    pub scale_x: f32,
    pub scale_y: f32,
    pub offset_x: f32,
    pub offset_y: f32,
}

impl Placement {
    /// Input-space x -> image-space x.
    pub fn image_x(&self, x: f32) -> f32 {
        (x - self.offset_x) / self.scale_x
    }

    /// Input-space y -> image-space y.
    pub fn image_y(&self, y: f32) -> f32 {
        (y - self.offset_y) / self.scale_y
    }
}

/// How an image of the given size is placed in the model input described by `spec`
/// ([`preprocess_into`] returns it too).
#[cfg(test)]
pub(crate) fn placement(width: u32, height: u32, spec: &Preprocessing) -> Placement {
    plan_resize(width, height, spec).placement(width, height)
}

/// Turns an image into the `[1, 3, height, width]` tensor described by `spec`.
#[cfg(test)]
pub(crate) fn preprocess(
    image: &DynamicImage,
    spec: &Preprocessing,
) -> Result<Array4<f32>, InferenceError> {
    let (width, height) = (spec.width as usize, spec.height as usize);
    let mut data = vec![0.0_f32; 3 * width * height];
    preprocess_into(image, spec, &mut data)?;
    Array4::from_shape_vec((1, 3, height, width), data)
        .map_err(|e| InferenceError::Internal(format!("input tensor shape: {e}")))
}

/// Writes the `3 x height x width` input of `image` into `out` (CHW, or HWC for an `nhwc`
/// model), which must hold exactly that many values (one image of a batch tensor); says
/// where the image landed.
pub(crate) fn preprocess_into(
    image: &DynamicImage,
    spec: &Preprocessing,
    out: &mut [f32],
) -> Result<Placement, InferenceError> {
    let placement = preprocess_chw(image, spec, out)?;
    if spec.layout == Layout::Nhwc {
        // Channels last: one more pass over a small input (224x224x3 for Open-NSFW).
        let chw = out.to_vec();
        let plane = chw.len() / 3;
        for (pixel, values) in out.chunks_exact_mut(3).enumerate() {
            for (channel, value) in values.iter_mut().enumerate() {
                *value = chw[channel * plane + pixel];
            }
        }
    }
    Ok(placement)
}

fn preprocess_chw(
    image: &DynamicImage,
    spec: &Preprocessing,
    out: &mut [f32],
) -> Result<Placement, InferenceError> {
    if image.width() == 0 || image.height() == 0 {
        return Err(InferenceError::InvalidImage(format!(
            "image has no pixels ({}x{})",
            image.width(),
            image.height()
        )));
    }
    // Alpha is dropped, not composited, like Pillow's convert("RGB").
    let rgb: Cow<'_, RgbImage> = match image {
        DynamicImage::ImageRgb8(buffer) => Cow::Borrowed(buffer),
        other => Cow::Owned(other.to_rgb8()),
    };
    let plan = plan_resize(rgb.width(), rgb.height(), spec);
    let placement = plan.placement(rgb.width(), rgb.height());
    let (copy_width, copy_height) = (plan.copy_width as usize, plan.copy_height as usize);
    let destination = Window {
        left: plan.dst_left as usize,
        top: plan.dst_top as usize,
        width: copy_width,
        height: copy_height,
    };

    if (plan.resized_width, plan.resized_height)
        == (u64::from(rgb.width()), u64::from(rgb.height()))
    {
        // Already the right size: only crop / pad.
        let source = Window {
            left: plan.src_left as usize,
            top: plan.src_top as usize,
            width: copy_width,
            height: copy_height,
        };
        normalize_nchw(
            rgb.as_raw(),
            rgb.width() as usize,
            source,
            destination,
            spec,
            out,
        )?;
        return Ok(placement);
    }

    // Resizing the whole image and then cropping would allocate the full resized image
    // (huge for extreme aspect ratios). Resizing just the source region that becomes the
    // crop gives the same pixels: the filter keeps the full-image scale and its kernel
    // may still read source pixels outside the region, exactly as in the full resize.
    let (image_width, image_height) = (f64::from(rgb.width()), f64::from(rgb.height()));
    let scale_x = image_width / plan.resized_width as f64;
    let scale_y = image_height / plan.resized_height as f64;
    // `n * (w / n)` can exceed `w` by a rounding error, which the resizer refuses: clamp.
    let left = (plan.src_left as f64 * scale_x).min(image_width);
    let top = (plan.src_top as f64 * scale_y).min(image_height);
    let src_box = CropBox {
        left,
        top,
        width: (plan.copy_width as f64 * scale_x).min(image_width - left),
        height: (plan.copy_height as f64 * scale_y).min(image_height - top),
    };
    let resized = resize_bilinear(&rgb, src_box, plan.copy_width, plan.copy_height)?;
    let source = Window {
        left: 0,
        top: 0,
        width: copy_width,
        height: copy_height,
    };
    normalize_nchw(resized.buffer(), copy_width, source, destination, spec, out)?;
    Ok(placement)
}

/// The whole image is (conceptually) resized to `resized_*`; then its `copy_*`-sized
/// window at (`src_left`, `src_top`) goes to (`dst_left`, `dst_top`) of the input, the
/// rest of which is padding (letterbox only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResizePlan {
    resized_width: u64,
    resized_height: u64,
    src_left: u64,
    src_top: u64,
    dst_left: u64,
    dst_top: u64,
    copy_width: u32,
    copy_height: u32,
}

impl ResizePlan {
    /// Where an image of `width x height` planned this way lands in the input.
    fn placement(&self, width: u32, height: u32) -> Placement {
        Placement {
            scale_x: (self.resized_width as f64 / f64::from(width.max(1))) as f32,
            scale_y: (self.resized_height as f64 / f64::from(height.max(1))) as f32,
            offset_x: self.dst_left as f32 - self.src_left as f32,
            offset_y: self.dst_top as f32 - self.src_top as f32,
        }
    }
}

fn plan_resize(width: u32, height: u32, spec: &Preprocessing) -> ResizePlan {
    let whole_input = |resized_width: u64, resized_height: u64| ResizePlan {
        resized_width,
        resized_height,
        src_left: (resized_width - u64::from(spec.width)) / 2,
        src_top: (resized_height - u64::from(spec.height)) / 2,
        dst_left: 0,
        dst_top: 0,
        copy_width: spec.width,
        copy_height: spec.height,
    };
    match spec.resize {
        Resize::Stretch => whole_input(u64::from(spec.width), u64::from(spec.height)),
        Resize::StretchCenterCrop { side } => {
            // Catalog validation guarantees side >= the input size; stay safe anyway.
            let side = u64::from(side);
            whole_input(
                side.max(u64::from(spec.width)),
                side.max(u64::from(spec.height)),
            )
        }
        Resize::ShorterSideCenterCrop { shorter_side } => {
            let short = u64::from(shorter_side);
            // Python's round() (ties to even), as in the reference pipeline; at least
            // the shorter side whatever the rounding.
            let long = |long: u32, short_side: u32| {
                let value = (f64::from(shorter_side) * f64::from(long) / f64::from(short_side))
                    .round_ties_even();
                (value as u64).max(short)
            };
            let (w, h) = if width <= height {
                (short, long(height, width))
            } else {
                (long(width, height), short)
            };
            // Catalog validation guarantees shorter_side >= the input size; stay safe anyway.
            whole_input(w.max(u64::from(spec.width)), h.max(u64::from(spec.height)))
        }
        Resize::Letterbox { .. } => {
            // Ultralytics: gain r = min(W / w, H / h), size round(w * r) x round(h * r),
            // centred with the odd pixel of padding at the right / bottom.
            let gain = (f64::from(spec.width) / f64::from(width.max(1)))
                .min(f64::from(spec.height) / f64::from(height.max(1)));
            let side =
                |value: u32, limit: u32| ((f64::from(value) * gain).round() as u32).clamp(1, limit);
            let copy_width = side(width, spec.width);
            let copy_height = side(height, spec.height);
            ResizePlan {
                resized_width: u64::from(copy_width),
                resized_height: u64::from(copy_height),
                src_left: 0,
                src_top: 0,
                dst_left: u64::from((spec.width - copy_width) / 2),
                dst_top: u64::from((spec.height - copy_height) / 2),
                copy_width,
                copy_height,
            }
        }
    }
}

fn resize_bilinear(
    src: &RgbImage,
    src_box: CropBox,
    width: u32,
    height: u32,
) -> Result<Image<'static>, InferenceError> {
    let src_view = ImageRef::new(src.width(), src.height(), src.as_raw(), PixelType::U8x3)
        .map_err(|e| InferenceError::Internal(format!("resize source: {e}")))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(src_box.left, src_box.top, src_box.width, src_box.height);
    Resizer::new()
        .resize(&src_view, &mut dst, &options)
        .map_err(|e| InferenceError::Internal(format!("resize: {e}")))?;
    Ok(dst)
}

/// `(v - mean) / std` for every byte value `v`: one table per channel, so the per-pixel
/// loop is three table reads (a `u8` index into 256 entries needs no bounds check).
fn lookup_table(mean: f32, std: f32) -> [f32; 256] {
    std::array::from_fn(|v| (v as f32 - mean) / std)
}

/// Writes `source` (a window of a packed RGB buffer of `row_width` pixels per row) at
/// `destination` of the `[3, h, w]` input in `out`, in the spec's channel order,
/// computing `(x - mean[c]) / std[c]` (`mean`/`std` are in the model's channel order).
/// Input pixels outside `destination` get the letterbox padding (0 for other resizes,
/// which always cover the whole input).
fn normalize_nchw(
    rgb: &[u8],
    row_width: usize,
    source: Window,
    destination: Window,
    spec: &Preprocessing,
    out: &mut [f32],
) -> Result<(), InferenceError> {
    let (width, height) = (spec.width as usize, spec.height as usize);
    let row_bytes = row_width * 3;
    let rows_available = rgb.len().checked_div(row_bytes).unwrap_or(0);
    let plane = width * height;
    if source.width == 0
        || source.height == 0
        || source.left + source.width > row_width
        || source.top + source.height > rows_available
        || (source.width, source.height) != (destination.width, destination.height)
        || destination.left + destination.width > width
        || destination.top + destination.height > height
        || out.len() != 3 * plane
    {
        return Err(InferenceError::Internal(format!(
            "window {source:?} of a {row_width}x{rows_available} image does not fit at \
             {destination:?} of a {width}x{height} input ({} values)",
            out.len()
        )));
    }

    let (mean, std) = (spec.mean, spec.std);
    let (first, rest) = out.split_at_mut(plane);
    let (second, third) = rest.split_at_mut(plane);
    // Model channel index of each source channel (R, G, B), so the per-pixel loop has
    // no branches.
    let (r_plane, g_plane, b_plane, r_index, b_index) = match spec.channel_order {
        ChannelOrder::Rgb => (first, second, third, 0, 2),
        ChannelOrder::Bgr => (third, second, first, 2, 0),
    };
    let r_lut = lookup_table(mean[r_index], std[r_index]);
    let g_lut = lookup_table(mean[1], std[1]);
    let b_lut = lookup_table(mean[b_index], std[b_index]);

    let covers_input = (destination.width, destination.height) == (width, height);
    if !covers_input {
        let pad = match spec.resize {
            Resize::Letterbox { pad } => usize::from(pad),
            Resize::Stretch
            | Resize::ShorterSideCenterCrop { .. }
            | Resize::StretchCenterCrop { .. } => 0,
        };
        r_plane.fill(r_lut[pad]);
        g_plane.fill(g_lut[pad]);
        b_plane.fill(b_lut[pad]);
    }

    let (left, right) = (destination.left, destination.left + destination.width);
    let src_rows = rgb
        .chunks_exact(row_bytes)
        .skip(source.top)
        .take(source.height);
    let dst_rows = r_plane
        .chunks_exact_mut(width)
        .zip(g_plane.chunks_exact_mut(width))
        .zip(b_plane.chunks_exact_mut(width))
        .skip(destination.top)
        .take(destination.height);
    for (row, ((r_row, g_row), b_row)) in src_rows.zip(dst_rows) {
        // Bounds are checked once per row (validated above, so these never fail).
        let (Some(row), Some(r_row), Some(g_row), Some(b_row)) = (
            row.get(source.left * 3..(source.left + source.width) * 3),
            r_row.get_mut(left..right),
            g_row.get_mut(left..right),
            b_row.get_mut(left..right),
        ) else {
            return Err(InferenceError::Internal("window outside the row".into()));
        };
        let (pixels, _) = row.as_chunks::<3>();
        for (&[r, g, b], ((dr, dg), db)) in pixels
            .iter()
            .zip(r_row.iter_mut().zip(g_row.iter_mut()).zip(b_row.iter_mut()))
        {
            *dr = r_lut[usize::from(r)];
            *dg = g_lut[usize::from(g)];
            *db = b_lut[usize::from(b)];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn spec(width: u32, height: u32, resize: Resize, order: ChannelOrder) -> Preprocessing {
        Preprocessing {
            width,
            height,
            resize,
            channel_order: order,
            mean: [0.0; 3],
            std: [1.0; 3],
            layout: Layout::Nchw,
        }
    }

    #[test]
    fn nhwc_holds_the_same_values_channels_last_and_stretch_center_crop_cuts_the_middle() {
        let image = DynamicImage::ImageRgb8(tiny());
        let chw = preprocess(&image, &spec(4, 2, Resize::Stretch, ChannelOrder::Bgr)).unwrap();
        let hwc_spec = Preprocessing {
            layout: Layout::Nhwc,
            ..spec(4, 2, Resize::Stretch, ChannelOrder::Bgr)
        };
        let mut hwc = vec![0.0; 24];
        preprocess_into(&image, &hwc_spec, &mut hwc).unwrap();
        for (y, x, c) in itertools_free_indices() {
            assert_eq!(hwc[(y * 4 + x) * 3 + c], chw[[0, c, y, x]]);
        }
        // Stretched to 4x4 (already 4 wide), then the centre 2x2: columns 1..3.
        let crop = spec(
            2,
            2,
            Resize::StretchCenterCrop { side: 4 },
            ChannelOrder::Rgb,
        );
        let cropped = preprocess(
            &DynamicImage::ImageRgb8(RgbImage::from_fn(4, 4, |x, _| Rgb([x as u8 * 10, 0, 0]))),
            &crop,
        )
        .unwrap();
        assert_eq!(cropped[[0, 0, 0, 0]], 10.0);
        assert_eq!(cropped[[0, 0, 1, 1]], 20.0);
    }

    fn itertools_free_indices() -> impl Iterator<Item = (usize, usize, usize)> {
        (0..2).flat_map(|y| (0..4).flat_map(move |x| (0..3).map(move |c| (y, x, c))))
    }

    /// 4x2 image where pixel (x, y) = (10x + y, 100 + x, 200 + y).
    fn tiny() -> RgbImage {
        RgbImage::from_fn(4, 2, |x, y| {
            Rgb([(10 * x + y) as u8, (100 + x) as u8, (200 + y) as u8])
        })
    }

    #[test]
    fn layout_is_nchw_rgb_without_resize() {
        let image = DynamicImage::ImageRgb8(tiny());
        let tensor = preprocess(&image, &spec(4, 2, Resize::Stretch, ChannelOrder::Rgb)).unwrap();
        assert_eq!(tensor.shape(), &[1, 3, 2, 4]);
        for y in 0..2 {
            for x in 0..4 {
                assert_eq!(tensor[[0, 0, y, x]], (10 * x + y) as f32);
                assert_eq!(tensor[[0, 1, y, x]], (100 + x) as f32);
                assert_eq!(tensor[[0, 2, y, x]], (200 + y) as f32);
            }
        }
    }

    #[test]
    fn bgr_order_and_normalisation_in_model_order() {
        let image = DynamicImage::ImageRgb8(tiny());
        let mut s = spec(4, 2, Resize::Stretch, ChannelOrder::Bgr);
        // Model order is B, G, R.
        s.mean = [200.0, 100.0, 0.0];
        s.std = [2.0, 4.0, 8.0];
        let tensor = preprocess(&image, &s).unwrap();
        // Plane 0 is blue: (200 + y - 200) / 2.
        assert_eq!(tensor[[0, 0, 1, 3]], 0.5);
        // Plane 1 is green: (100 + x - 100) / 4.
        assert_eq!(tensor[[0, 1, 0, 2]], 0.5);
        // Plane 2 is red: (10x + y) / 8.
        assert_eq!(tensor[[0, 2, 1, 3]], 31.0 / 8.0);
    }

    #[test]
    fn center_crop_takes_the_middle() {
        let buffer: Vec<u8> = (0..6 * 4).flat_map(|i| [i as u8, 0, 0]).collect();
        let window = Window {
            left: 1,
            top: 1,
            width: 4,
            height: 2,
        };
        let s = spec(4, 2, Resize::Stretch, ChannelOrder::Rgb);
        let tensor = normalize(&buffer, 6, window, &s).unwrap();
        assert_eq!(tensor.shape(), &[1, 3, 2, 4]);
        assert_eq!(tensor[[0, 0, 0, 0]], 7.0);
        assert_eq!(tensor[[0, 0, 1, 3]], 16.0);
    }

    /// Normalises `window` into a fresh input that it covers entirely.
    fn normalize(
        rgb: &[u8],
        row_width: usize,
        window: Window,
        s: &Preprocessing,
    ) -> Result<Array4<f32>, InferenceError> {
        let mut out = vec![0.0; 3 * (s.width * s.height) as usize];
        let destination = Window {
            left: 0,
            top: 0,
            ..window
        };
        normalize_nchw(rgb, row_width, window, destination, s, &mut out)?;
        Ok(Array4::from_shape_vec((1, 3, s.height as usize, s.width as usize), out).unwrap())
    }

    #[test]
    fn window_outside_buffer_is_an_error_not_a_panic() {
        let buffer = vec![0u8; 4 * 2 * 3];
        let s = spec(4, 2, Resize::Stretch, ChannelOrder::Rgb);
        let window = Window {
            left: 1,
            top: 0,
            width: 4,
            height: 2,
        };
        assert!(normalize(&buffer, 4, window, &s).is_err());
        let window = Window {
            left: 0,
            top: 1,
            width: 4,
            height: 2,
        };
        assert!(normalize(&buffer, 4, window, &s).is_err());
        assert!(normalize(&[], 0, window, &s).is_err());
        // Destination outside the input, or an output of the wrong size.
        let whole = Window {
            left: 0,
            top: 0,
            width: 4,
            height: 2,
        };
        let mut out = vec![0.0; 24];
        let shifted = Window { left: 1, ..whole };
        assert!(normalize_nchw(&buffer, 4, whole, shifted, &s, &mut out).is_err());
        assert!(normalize_nchw(&buffer, 4, whole, whole, &s, &mut out[..23]).is_err());
        assert!(normalize_nchw(&buffer, 4, whole, whole, &s, &mut out).is_ok());
    }

    #[test]
    fn plan_keeps_aspect_ratio_and_centres_the_crop() {
        let crop = spec(
            224,
            224,
            Resize::ShorterSideCenterCrop { shorter_side: 256 },
            ChannelOrder::Rgb,
        );
        let plan = |w, h| {
            let p = plan_resize(w, h, &crop);
            (p.resized_width, p.resized_height, p.src_left, p.src_top)
        };
        assert_eq!(plan(600, 400), (384, 256, 80, 16));
        assert_eq!(plan(451, 300), (385, 256, 80, 16)); // 384.85 rounds up
        assert_eq!(plan(300, 451), (256, 385, 16, 80));
        assert_eq!(plan(512, 512), (256, 256, 16, 16));
        // Extreme aspect ratios are only planned, never allocated.
        assert_eq!(plan(100_000, 1), (25_600_000, 256, 12_799_888, 16));
        let stretch = spec(416, 416, Resize::Stretch, ChannelOrder::Rgb);
        assert_eq!(
            plan_resize(640, 427, &stretch),
            ResizePlan {
                resized_width: 416,
                resized_height: 416,
                src_left: 0,
                src_top: 0,
                dst_left: 0,
                dst_top: 0,
                copy_width: 416,
                copy_height: 416,
            }
        );
    }

    #[test]
    fn letterbox_plan_fits_and_centres_like_ultralytics() {
        let letterbox = spec(640, 640, Resize::Letterbox { pad: 114 }, ChannelOrder::Rgb);
        let plan = |w, h| {
            let p = plan_resize(w, h, &letterbox);
            (p.copy_width, p.copy_height, p.dst_left, p.dst_top)
        };
        // 1280x720: gain 0.5 -> 640x360, 140 rows of padding above and below.
        assert_eq!(plan(1280, 720), (640, 360, 0, 140));
        // 427x640: gain 1 -> unchanged, (640 - 427) / 2 = 106.5 -> 106 columns on the left.
        assert_eq!(plan(427, 640), (427, 640, 106, 0));
        // Extreme ratios keep at least one pixel.
        assert_eq!(plan(100_000, 1), (640, 1, 0, 319));
        let placed = placement(1280, 720, &letterbox);
        assert_eq!(
            placed,
            Placement {
                scale_x: 0.5,
                scale_y: 0.5,
                offset_x: 0.0,
                offset_y: 140.0
            }
        );
        assert_eq!(placed.image_x(320.0), 640.0);
        assert_eq!(placed.image_y(140.0), 0.0);
        // Centre crop: the offset is the crop's top-left corner, negated.
        let crop = spec(
            224,
            224,
            Resize::ShorterSideCenterCrop { shorter_side: 256 },
            ChannelOrder::Rgb,
        );
        let placed = placement(600, 400, &crop);
        assert_eq!((placed.offset_x, placed.offset_y), (-80.0, -16.0));
        assert!((placed.image_x(0.0) - 125.0).abs() < 1e-4);
    }

    #[test]
    fn letterbox_pads_with_the_pad_value() {
        // A 4x2 white image into 4x4: rows 1 and 2 are the image, rows 0 and 3 padding.
        let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 2, Rgb([255, 255, 255])));
        let mut s = spec(4, 4, Resize::Letterbox { pad: 114 }, ChannelOrder::Bgr);
        s.std = [255.0; 3];
        let tensor = preprocess(&image, &s).unwrap();
        let pad = 114.0 / 255.0;
        for c in 0..3 {
            for x in 0..4 {
                assert_eq!(tensor[[0, c, 0, x]], pad);
                assert_eq!(tensor[[0, c, 1, x]], 1.0);
                assert_eq!(tensor[[0, c, 2, x]], 1.0);
                assert_eq!(tensor[[0, c, 3, x]], pad);
            }
        }
        // Resized too: 8x2 -> 4x1 at row 1 (the odd row of padding goes below).
        let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 2, Rgb([0, 0, 0])));
        s.std = [1.0; 3];
        let tensor = preprocess(&image, &s).unwrap();
        let column: Vec<f32> = (0..4).map(|y| tensor[[0, 1, y, 2]]).collect();
        assert_eq!(column, [114.0, 0.0, 114.0, 114.0]);
    }

    #[test]
    fn preprocess_into_writes_one_image_of_a_batch() {
        let image = DynamicImage::ImageRgb8(tiny());
        let s = spec(4, 2, Resize::Stretch, ChannelOrder::Rgb);
        let mut batch = [-1.0; 2 * 24];
        let (first, second) = batch.split_at_mut(24);
        preprocess_into(&image, &s, second).unwrap();
        assert!(first.iter().all(|v| *v == -1.0));
        assert_eq!(second, preprocess(&image, &s).unwrap().as_slice().unwrap());
        assert!(preprocess_into(&image, &s, first.get_mut(..10).unwrap()).is_err());
    }

    #[test]
    fn preprocess_into_says_where_the_image_landed() {
        // Letterbox with a resize (8x2 -> 4x1 at row 1), and a centre crop without one.
        let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 2, Rgb([0, 0, 0])));
        let s = spec(4, 4, Resize::Letterbox { pad: 114 }, ChannelOrder::Rgb);
        let mut out = [0.0; 3 * 4 * 4];
        let placed = preprocess_into(&image, &s, &mut out).unwrap();
        assert_eq!(placed, placement(8, 2, &s));
        assert_eq!((placed.scale_x, placed.offset_y), (0.5, 1.0));
        let image = DynamicImage::ImageRgb8(RgbImage::new(6, 4));
        let s = spec(
            2,
            2,
            Resize::ShorterSideCenterCrop { shorter_side: 4 },
            ChannelOrder::Rgb,
        );
        let mut out = [0.0; 3 * 2 * 2];
        let placed = preprocess_into(&image, &s, &mut out).unwrap();
        assert_eq!(placed, placement(6, 4, &s));
        assert_eq!((placed.offset_x, placed.offset_y), (-2.0, -1.0));
    }

    #[test]
    fn cropped_resize_equals_resize_then_crop() {
        // A textured image so that kernel support outside the crop region matters.
        let src = RgbImage::from_fn(61, 40, |x, y| {
            Rgb([
                (x * 37 % 251) as u8,
                (y * 53 % 241) as u8,
                ((x * y) % 256) as u8,
            ])
        });
        let s = spec(
            20,
            20,
            Resize::ShorterSideCenterCrop { shorter_side: 24 },
            ChannelOrder::Rgb,
        );
        let fast = preprocess(&DynamicImage::ImageRgb8(src.clone()), &s).unwrap();

        let plan = plan_resize(61, 40, &s);
        assert_eq!((plan.resized_width, plan.resized_height), (37, 24));
        let full = resize_bilinear(
            &src,
            CropBox {
                left: 0.0,
                top: 0.0,
                width: 61.0,
                height: 40.0,
            },
            37,
            24,
        )
        .unwrap();
        let window = Window {
            left: plan.src_left as usize,
            top: plan.src_top as usize,
            width: 20,
            height: 20,
        };
        let slow = normalize(full.buffer(), 37, window, &s).unwrap();
        let max_diff = fast
            .iter()
            .zip(slow.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // Fixed-point rounding may differ by one level at most.
        assert!(max_diff <= 1.0, "max diff {max_diff}");
    }

    #[test]
    fn huge_aspect_ratio_does_not_allocate_the_full_resize() {
        let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(20_000, 2, Rgb([1, 2, 3])));
        let s = spec(
            224,
            224,
            Resize::ShorterSideCenterCrop { shorter_side: 256 },
            ChannelOrder::Rgb,
        );
        let tensor = preprocess(&image, &s).unwrap();
        assert_eq!(tensor.shape(), &[1, 3, 224, 224]);
        assert!(
            tensor
                .slice(ndarray::s![0, 2, .., ..])
                .iter()
                .all(|v| *v == 3.0)
        );
    }

    #[test]
    fn uniform_image_stays_uniform_through_resize_and_crop() {
        let image = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            37,
            23,
            image::Rgba([10, 20, 30, 0]),
        ));
        let mut s = spec(
            8,
            8,
            Resize::ShorterSideCenterCrop { shorter_side: 10 },
            ChannelOrder::Rgb,
        );
        s.mean = [10.0, 20.0, 30.0];
        let tensor = preprocess(&image, &s).unwrap();
        assert_eq!(tensor.shape(), &[1, 3, 8, 8]);
        assert!(tensor.iter().all(|v| *v == 0.0), "{tensor:?}");
        // Upscaling too.
        let s = spec(64, 48, Resize::Stretch, ChannelOrder::Bgr);
        let tensor = preprocess(&image, &s).unwrap();
        assert_eq!(tensor.shape(), &[1, 3, 48, 64]);
        assert!(
            tensor
                .slice(ndarray::s![0, 0, .., ..])
                .iter()
                .all(|v| *v == 30.0)
        );
    }

    #[test]
    fn rounding_in_the_crop_box_does_not_fail_the_resize() {
        // 416 * (27 / 416) > 27 in floating point: the crop box of a stretch to 416 used to
        // exceed the image by a rounding error, and the resizer refused it.
        for (width, height) in [(27, 20), (1339, 121), (215, 2999), (1088, 524)] {
            let image = DynamicImage::ImageRgb8(RgbImage::new(width, height));
            for resize in [
                Resize::Stretch,
                Resize::Letterbox { pad: 114 },
                Resize::ShorterSideCenterCrop { shorter_side: 430 },
            ] {
                let s = spec(416, 416, resize, ChannelOrder::Rgb);
                preprocess(&image, &s)
                    .unwrap_or_else(|e| panic!("{width}x{height} {resize:?}: {e}"));
            }
        }
    }

    #[test]
    fn bilinear_downscale_averages() {
        // Halving a 2x1 black/white image with a bilinear kernel averages both pixels.
        let image = DynamicImage::ImageRgb8(RgbImage::from_fn(2, 1, |x, _| {
            Rgb([if x == 0 { 0 } else { 200 }; 3])
        }));
        let tensor = preprocess(&image, &spec(1, 1, Resize::Stretch, ChannelOrder::Rgb)).unwrap();
        assert_eq!(tensor[[0, 0, 0, 0]], 100.0);
    }

    #[test]
    fn empty_image_is_rejected() {
        let image = DynamicImage::ImageRgb8(RgbImage::new(0, 5));
        let err = preprocess(&image, &spec(4, 4, Resize::Stretch, ChannelOrder::Rgb)).unwrap_err();
        assert_eq!(err.category(), "invalid_image");
    }
}
