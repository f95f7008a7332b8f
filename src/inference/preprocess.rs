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
use ndarray::Array4;

use super::InferenceError;
use super::catalog::{ChannelOrder, Preprocessing, Resize};

/// A window of an RGB buffer (in pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    left: usize,
    top: usize,
    width: usize,
    height: usize,
}

/// Turns an image into the `[1, 3, height, width]` tensor described by `spec`.
pub(crate) fn preprocess(
    image: &DynamicImage,
    spec: &Preprocessing,
) -> Result<Array4<f32>, InferenceError> {
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
    let (width, height) = (spec.width as usize, spec.height as usize);
    let plan = plan_resize(rgb.width(), rgb.height(), spec);

    if (plan.resized_width, plan.resized_height)
        == (u64::from(rgb.width()), u64::from(rgb.height()))
    {
        // Already the right size: only crop.
        let window = Window {
            left: plan.left as usize,
            top: plan.top as usize,
            width,
            height,
        };
        return normalize_nchw(rgb.as_raw(), rgb.width() as usize, window, spec);
    }

    // Resizing the whole image and then cropping would allocate the full resized image
    // (huge for extreme aspect ratios). Resizing just the source region that becomes the
    // crop gives the same pixels: the filter keeps the full-image scale and its kernel
    // may still read source pixels outside the region, exactly as in the full resize.
    let scale_x = f64::from(rgb.width()) / plan.resized_width as f64;
    let scale_y = f64::from(rgb.height()) / plan.resized_height as f64;
    let src_box = CropBox {
        left: plan.left as f64 * scale_x,
        top: plan.top as f64 * scale_y,
        width: f64::from(spec.width) * scale_x,
        height: f64::from(spec.height) * scale_y,
    };
    let resized = resize_bilinear(&rgb, src_box, spec.width, spec.height)?;
    let window = Window {
        left: 0,
        top: 0,
        width,
        height,
    };
    normalize_nchw(resized.buffer(), width, window, spec)
}

/// The whole image is (conceptually) resized to `resized_*`, then the input-sized window
/// at (`left`, `top`) is cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResizePlan {
    resized_width: u64,
    resized_height: u64,
    left: u64,
    top: u64,
}

fn plan_resize(width: u32, height: u32, spec: &Preprocessing) -> ResizePlan {
    let (resized_width, resized_height) = match spec.resize {
        Resize::Stretch => (u64::from(spec.width), u64::from(spec.height)),
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
            (w.max(u64::from(spec.width)), h.max(u64::from(spec.height)))
        }
    };
    ResizePlan {
        resized_width,
        resized_height,
        left: (resized_width - u64::from(spec.width)) / 2,
        top: (resized_height - u64::from(spec.height)) / 2,
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

/// Writes `window` of a packed RGB buffer (`row_width` pixels per row) into a
/// `[1, 3, h, w]` tensor in the spec's channel order, computing `(x - mean[c]) / std[c]`
/// (`mean`/`std` are in the model's channel order).
fn normalize_nchw(
    rgb: &[u8],
    row_width: usize,
    window: Window,
    spec: &Preprocessing,
) -> Result<Array4<f32>, InferenceError> {
    let Window {
        left,
        top,
        width,
        height,
    } = window;
    let (mean, std) = (spec.mean, spec.std);
    let row_bytes = row_width * 3;
    let rows_available = rgb.len().checked_div(row_bytes).unwrap_or(0);
    if width == 0 || height == 0 || left + width > row_width || top + height > rows_available {
        return Err(InferenceError::Internal(format!(
            "crop window {window:?} outside a {row_width}x{rows_available} image"
        )));
    }

    let plane = width * height;
    let mut data = vec![0.0_f32; 3 * plane];
    let (first, rest) = data.split_at_mut(plane);
    let (second, third) = rest.split_at_mut(plane);
    // Pick the destination plane and constants of each source channel once, so the
    // per-pixel loop has no branches.
    let (r_plane, g_plane, b_plane, r_norm, g_norm, b_norm) = match spec.channel_order {
        ChannelOrder::Rgb => (
            first,
            second,
            third,
            (mean[0], std[0]),
            (mean[1], std[1]),
            (mean[2], std[2]),
        ),
        ChannelOrder::Bgr => (
            third,
            second,
            first,
            (mean[2], std[2]),
            (mean[1], std[1]),
            (mean[0], std[0]),
        ),
    };

    let rows = rgb.chunks_exact(row_bytes).skip(top).take(height);
    let dst_rows = r_plane
        .chunks_exact_mut(width)
        .zip(g_plane.chunks_exact_mut(width))
        .zip(b_plane.chunks_exact_mut(width));
    for (row, ((r_row, g_row), b_row)) in rows.zip(dst_rows) {
        let row = row
            .get(left * 3..(left + width) * 3)
            .ok_or_else(|| InferenceError::Internal("crop window outside the row".into()))?;
        let (pixels, _) = row.as_chunks::<3>();
        for (&[r, g, b], ((dr, dg), db)) in pixels
            .iter()
            .zip(r_row.iter_mut().zip(g_row.iter_mut()).zip(b_row.iter_mut()))
        {
            *dr = (f32::from(r) - r_norm.0) / r_norm.1;
            *dg = (f32::from(g) - g_norm.0) / g_norm.1;
            *db = (f32::from(b) - b_norm.0) / b_norm.1;
        }
    }

    Array4::from_shape_vec((1, 3, height, width), data)
        .map_err(|e| InferenceError::Internal(format!("input tensor shape: {e}")))
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
        }
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
        let tensor = normalize_nchw(&buffer, 6, window, &s).unwrap();
        assert_eq!(tensor.shape(), &[1, 3, 2, 4]);
        assert_eq!(tensor[[0, 0, 0, 0]], 7.0);
        assert_eq!(tensor[[0, 0, 1, 3]], 16.0);
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
        assert!(normalize_nchw(&buffer, 4, window, &s).is_err());
        let window = Window {
            left: 0,
            top: 1,
            width: 4,
            height: 2,
        };
        assert!(normalize_nchw(&buffer, 4, window, &s).is_err());
        assert!(normalize_nchw(&[], 0, window, &s).is_err());
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
            (p.resized_width, p.resized_height, p.left, p.top)
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
                left: 0,
                top: 0
            }
        );
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
            left: plan.left as usize,
            top: plan.top as usize,
            width: 20,
            height: 20,
        };
        let slow = normalize_nchw(full.buffer(), 37, window, &s).unwrap();
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
