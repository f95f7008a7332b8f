//! Detection outputs -> boxes: NanoDet (GFL) and YOLOv8 decoding, per-class NMS, and
//! the mapping of boxes from the model input back onto the image.
//!
//! YOLOv8 (Ultralytics export) emits one tensor `[1, 4 + classes, anchors]`: for each
//! anchor the box centre x, y, width and height in input pixels, then one score per
//! class (sigmoid already applied).
//!
//! NanoDet emits, per feature level (stride 8, 16, 32, ...), class scores `[1, N, classes]`
//! (sigmoid already applied) and box side distributions `[1, N, 4 * bins]` (left, top,
//! right, bottom; softmax over the bins gives the distance in units of the stride).
//! Output names are meaningless after conversion, so tensors are told apart by shape:
//! the last dimension equal to the label count means scores, the rest are boxes; the
//! anchor count `N = ceil(W / s) * ceil(H / s)` identifies the level's stride `s`.

use super::catalog::DetectionParams;
use super::output::{BoundingBox, Detection, round_confidence, round_coordinate};
use super::preprocess::Placement;

/// One model output, borrowed from the runtime.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawTensor<'a> {
    pub name: &'a str,
    pub shape: &'a [i64],
    pub data: &'a [f32],
}

/// Sizes needed to map boxes from model input space back to the image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub input_width: u32,
    pub input_height: u32,
    pub image_width: u32,
    pub image_height: u32,
    /// Where the image sits in the input (resize, crop, letterbox padding).
    pub placement: Placement,
}

/// Strides NanoDet variants use; the first whose grid matches a level's anchor count wins.
const CANDIDATE_STRIDES: [u32; 6] = [8, 16, 32, 64, 128, 4];

/// A `[1, N, C]` tensor seen as N rows of C values.
#[derive(Debug, Clone, Copy)]
struct Rows<'a> {
    name: &'a str,
    anchors: usize,
    width: usize,
    data: &'a [f32],
}

struct Level<'a> {
    stride: u32,
    grid_width: usize,
    scores: Rows<'a>,
    boxes: Rows<'a>,
    bins: usize,
}

/// A detection in model input space, before scaling to the image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Candidate {
    pub class: usize,
    pub score: f32,
    /// x_min, y_min, x_max, y_max
    pub bbox: [f32; 4],
}

/// Decodes NanoDet outputs into detections on the original image, best first.
pub(crate) fn decode_nanodet(
    outputs: &[RawTensor<'_>],
    labels: &[String],
    params: &DetectionParams,
    geometry: Geometry,
) -> Result<Vec<Detection>, String> {
    let levels = split_levels(outputs, labels.len(), geometry)?;
    let mut candidates = Vec::new();
    for level in &levels {
        decode_level(level, params.score_threshold, &mut candidates);
    }
    finish(candidates, labels, params, geometry)
}

/// Decodes a YOLOv8 output (`[1, 4 + classes, anchors]`, or `[1, anchors, 4 + classes]`)
/// into detections on the original image, best first.
pub(crate) fn decode_yolov8(
    outputs: &[RawTensor<'_>],
    labels: &[String],
    params: &DetectionParams,
    geometry: Geometry,
) -> Result<Vec<Detection>, String> {
    let [output] = outputs else {
        return Err(format!(
            "a yolov8 model has one output, this one has {}",
            outputs.len()
        ));
    };
    let classes = labels.len();
    let values = classes + 4;
    let dims = match output.shape {
        [1, a, b] => usize::try_from(*a).ok().zip(usize::try_from(*b).ok()),
        _ => None,
    };
    // Channels first (the exporter's layout) wins when both sides match.
    let (anchors, channels_first) = match dims {
        Some((rows, anchors)) if rows == values => (anchors, true),
        Some((anchors, columns)) if columns == values => (anchors, false),
        _ => {
            return Err(format!(
                "output `{}` has shape {:?}, expected [1, {values}, anchors] (4 box values + {classes} classes)",
                output.name, output.shape
            ));
        }
    };
    if anchors.checked_mul(values) != Some(output.data.len()) {
        return Err(format!(
            "output `{}` has shape {:?} but {} values",
            output.name,
            output.shape,
            output.data.len()
        ));
    }

    let mut candidates = Vec::new();
    if anchors == 0 {
        return Ok(Vec::new());
    }
    if channels_first {
        // Row r holds value r of every anchor: scan the class rows once, keeping each
        // anchor's best class (the memory is read in order, no per-anchor gathering).
        let rows: Vec<&[f32]> = output.data.chunks_exact(anchors).collect();
        let (box_rows, class_rows) = rows.split_at(4);
        let mut best: Vec<(usize, f32)> = vec![(0, f32::NEG_INFINITY); anchors];
        for (class, row) in class_rows.iter().enumerate() {
            for (slot, &score) in best.iter_mut().zip(row.iter()) {
                // `>` keeps the lower class on ties and never picks NaN.
                if score > slot.1 {
                    *slot = (class, score);
                }
            }
        }
        if let [cx, cy, w, h] = box_rows {
            for (i, &(class, score)) in best.iter().enumerate() {
                if score > params.score_threshold
                    && let (Some(&cx), Some(&cy), Some(&w), Some(&h)) =
                        (cx.get(i), cy.get(i), w.get(i), h.get(i))
                {
                    push_centre_box(&mut candidates, class, score, [cx, cy, w, h]);
                }
            }
        }
    } else {
        for row in output.data.chunks_exact(values) {
            let (bbox, scores) = row.split_at(4);
            if let (Some((class, score)), [cx, cy, w, h]) = (best_class(scores), bbox)
                && score > params.score_threshold
            {
                push_centre_box(&mut candidates, class, score, [*cx, *cy, *w, *h]);
            }
        }
    }
    finish(candidates, labels, params, geometry)
}

/// Adds a candidate given as centre x, y, width, height (dropped when not finite).
fn push_centre_box(out: &mut Vec<Candidate>, class: usize, score: f32, [cx, cy, w, h]: [f32; 4]) {
    let bbox = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0];
    if bbox.iter().all(|v| v.is_finite()) && score.is_finite() {
        out.push(Candidate { class, score, bbox });
    }
}

/// NMS, the detection limit, then input space -> image pixels (clamped, rounded).
fn finish(
    candidates: Vec<Candidate>,
    labels: &[String],
    params: &DetectionParams,
    geometry: Geometry,
) -> Result<Vec<Detection>, String> {
    let mut kept = nms(candidates, params.nms_iou);
    kept.truncate(params.max_detections);

    let placement = geometry.placement;
    let (max_x, max_y) = (geometry.image_width as f32, geometry.image_height as f32);
    kept.into_iter()
        .map(|c| {
            let label = labels
                .get(c.class)
                .ok_or_else(|| format!("class index {} has no label", c.class))?;
            let [x0, y0, x1, y1] = c.bbox;
            let x = |v: f32| round_coordinate(placement.image_x(v).clamp(0.0, max_x));
            let y = |v: f32| round_coordinate(placement.image_y(v).clamp(0.0, max_y));
            Ok(Detection {
                label: label.clone(),
                confidence: round_confidence(c.score),
                bbox: BoundingBox {
                    x_min: x(x0),
                    y_min: y(y0),
                    x_max: x(x1),
                    y_max: y(y1),
                },
            })
        })
        .collect()
}

/// Groups the outputs into (scores, boxes) pairs per stride.
fn split_levels<'a>(
    outputs: &[RawTensor<'a>],
    classes: usize,
    geometry: Geometry,
) -> Result<Vec<Level<'a>>, String> {
    let mut scores = Vec::new();
    let mut boxes = Vec::new();
    for output in outputs {
        let rows = as_rows(output)?;
        if rows.width == classes {
            scores.push(rows);
        } else {
            boxes.push(rows);
        }
    }
    if scores.is_empty() {
        return Err(format!(
            "no output has {classes} class scores per anchor (the label count)"
        ));
    }
    if boxes.len() != scores.len() {
        return Err(format!(
            "expected one box output per class-score output, got {} box and {} score outputs \
             (they must differ in their last dimension)",
            boxes.len(),
            scores.len()
        ));
    }

    scores
        .into_iter()
        .map(|scores| {
            let mut matching = boxes.iter().filter(|b| b.anchors == scores.anchors);
            let (Some(boxes), None) = (matching.next(), matching.next()) else {
                return Err(format!(
                    "output `{}` ({} anchors) does not have exactly one box output with as many anchors",
                    scores.name, scores.anchors
                ));
            };
            if boxes.width % 4 != 0 || boxes.width < 8 {
                return Err(format!(
                    "box output `{}` has {} values per anchor, expected 4 sides x bins",
                    boxes.name, boxes.width
                ));
            }
            let (stride, grid_width) = stride_for(scores.anchors, geometry).ok_or_else(|| {
                format!(
                    "output `{}` has {} anchors, which matches no stride for a {}x{} input",
                    scores.name, scores.anchors, geometry.input_width, geometry.input_height
                )
            })?;
            Ok(Level { stride, grid_width, scores, boxes: *boxes, bins: boxes.width / 4 })
        })
        .collect()
}

fn as_rows<'a>(tensor: &RawTensor<'a>) -> Result<Rows<'a>, String> {
    let dims = match tensor.shape {
        [1, n, c] => usize::try_from(*n).ok().zip(usize::try_from(*c).ok()),
        _ => None,
    };
    match dims {
        Some((anchors, width))
            if anchors > 0
                && width > 0
                && anchors.checked_mul(width) == Some(tensor.data.len()) =>
        {
            Ok(Rows {
                name: tensor.name,
                anchors,
                width,
                data: tensor.data,
            })
        }
        _ => Err(format!(
            "output `{}` has shape {:?} with {} values, expected [1, anchors, values]",
            tensor.name,
            tensor.shape,
            tensor.data.len()
        )),
    }
}

/// The stride whose grid over the input has `anchors` cells, and that grid's width.
fn stride_for(anchors: usize, geometry: Geometry) -> Option<(u32, usize)> {
    CANDIDATE_STRIDES.into_iter().find_map(|stride| {
        let grid_width = geometry.input_width.div_ceil(stride) as usize;
        let grid_height = geometry.input_height.div_ceil(stride) as usize;
        (grid_width * grid_height == anchors).then_some((stride, grid_width))
    })
}

fn decode_level(level: &Level<'_>, threshold: f32, out: &mut Vec<Candidate>) {
    let stride = level.stride as f32;
    let anchors = level
        .scores
        .data
        .chunks_exact(level.scores.width)
        .zip(level.boxes.data.chunks_exact(level.boxes.width));
    for (i, (scores, distributions)) in anchors.enumerate() {
        let Some((class, score)) = best_class(scores) else {
            continue;
        };
        if score <= threshold {
            continue;
        }
        // Anchor points sit on the grid corners (no half-cell offset) in this export.
        let cx = (i % level.grid_width) as f32 * stride;
        let cy = (i / level.grid_width) as f32 * stride;
        let mut sides = [0.0_f32; 4];
        for (side, bins) in sides.iter_mut().zip(distributions.chunks_exact(level.bins)) {
            *side = expected_bin(bins) * stride;
        }
        let [left, top, right, bottom] = sides;
        let bbox = [cx - left, cy - top, cx + right, cy + bottom];
        if bbox.iter().all(|v| v.is_finite()) && score.is_finite() {
            out.push(Candidate { class, score, bbox });
        }
    }
}

/// The highest non-NaN score and its class.
fn best_class(scores: &[f32]) -> Option<(usize, f32)> {
    scores
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, s)| !s.is_nan())
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
}

/// Expected bin index under the softmax of `logits`: `sum_k k * softmax(logits)_k`.
/// NaN when the distribution is degenerate (empty, NaN or infinite logits), so the
/// anchor is dropped rather than given a made-up box.
pub(crate) fn expected_bin(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut total, mut weighted) = (0.0_f32, 0.0_f32);
    for (k, &logit) in logits.iter().enumerate() {
        let e = (logit - max).exp();
        total += e;
        weighted += k as f32 * e;
    }
    // The maximum contributes exp(0) = 1, so `total >= 1` unless the input is degenerate.
    weighted / total
}

pub(crate) fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let overlap_w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let overlap_h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let intersection = overlap_w * overlap_h;
    let union = area(a) + area(b) - intersection;
    if union > 0.0 {
        intersection / union
    } else {
        0.0
    }
}

/// Greedy NMS per class: best first, a box is dropped when it overlaps a kept box of the
/// same class by more than `iou_threshold`. Returns the kept boxes, best first.
pub(crate) fn nms(mut candidates: Vec<Candidate>, iou_threshold: f32) -> Vec<Candidate> {
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::new();
    for candidate in candidates {
        let suppressed = kept
            .iter()
            .any(|k| k.class == candidate.class && iou(&k.bbox, &candidate.bbox) > iou_threshold);
        if !suppressed {
            kept.push(candidate);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::catalog::DetectionDecoder;

    const BINS: usize = 11;

    fn params() -> DetectionParams {
        DetectionParams {
            decoder: DetectionDecoder::Nanodet,
            score_threshold: 0.35,
            nms_iou: 0.5,
            max_detections: 100,
        }
    }

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    /// Logits for one side whose softmax is (almost) one-hot at `bin`.
    fn side(bin: usize) -> [f32; BINS] {
        let mut logits = [-30.0; BINS];
        logits[bin] = 30.0;
        logits
    }

    /// Synthetic outputs for a 64x32 input (strides 8/16/32 -> grids 8x4, 4x2, 2x1) with
    /// `classes` classes; `hits` sets (level, anchor, class, score, [l, t, r, b] bins).
    fn synthetic(
        classes: usize,
        hits: &[(usize, usize, usize, f32, [usize; 4])],
    ) -> Vec<(Vec<i64>, Vec<f32>)> {
        let anchors = [32usize, 8, 2];
        let mut tensors = Vec::new();
        for (level, &n) in anchors.iter().enumerate() {
            let mut scores = vec![0.01_f32; n * classes];
            let mut boxes = vec![0.0_f32; n * 4 * BINS];
            for &(l, anchor, class, score, sides) in hits {
                if l != level {
                    continue;
                }
                scores[anchor * classes + class] = score;
                for (s, bin) in sides.iter().enumerate() {
                    let start = anchor * 4 * BINS + s * BINS;
                    boxes[start..start + BINS].copy_from_slice(&side(*bin));
                }
            }
            // Boxes first, to check outputs are told apart by shape, not order.
            tensors.push((vec![1, n as i64, (4 * BINS) as i64], boxes));
            tensors.push((vec![1, n as i64, classes as i64], scores));
        }
        tensors
    }

    fn raw(tensors: &[(Vec<i64>, Vec<f32>)]) -> Vec<RawTensor<'_>> {
        tensors
            .iter()
            .map(|(shape, data)| RawTensor {
                name: "t",
                shape,
                data,
            })
            .collect()
    }

    /// A 128x32 image stretched into the 64x32 input.
    const GEOMETRY: Geometry = Geometry {
        input_width: 64,
        input_height: 32,
        image_width: 128,
        image_height: 32,
        placement: Placement {
            scale_x: 0.5,
            scale_y: 1.0,
            offset_x: 0.0,
            offset_y: 0.0,
        },
    };

    #[test]
    fn expected_bin_is_softmax_weighted_mean() {
        assert!((expected_bin(&side(3)) - 3.0).abs() < 1e-4);
        assert!((expected_bin(&[0.0, 0.0]) - 0.5).abs() < 1e-6);
        assert!((expected_bin(&[1000.0, 1000.0, 1000.0]) - 1.0).abs() < 1e-6);
        assert!(expected_bin(&[]).is_nan());
        assert!(expected_bin(&[0.0, f32::NAN]).is_nan());
        assert!(expected_bin(&[f32::INFINITY, 0.0]).is_nan());
    }

    #[test]
    fn iou_of_boxes() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(iou(&a, &a), 1.0);
        assert_eq!(iou(&a, &[10.0, 10.0, 20.0, 20.0]), 0.0);
        assert!((iou(&a, &[5.0, 0.0, 15.0, 10.0]) - 50.0 / 150.0).abs() < 1e-6);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn nms_is_per_class_and_greedy() {
        let c = |class, score, x0: f32| Candidate {
            class,
            score,
            bbox: [x0, 0.0, x0 + 10.0, 10.0],
        };
        let kept = nms(
            vec![
                c(0, 0.6, 1.0),
                c(0, 0.9, 0.0),
                c(1, 0.8, 0.0),
                c(0, 0.5, 30.0),
                c(0, 0.4, 31.0),
            ],
            0.5,
        );
        // 0.6 overlaps 0.9 of its class; class 1 is kept despite overlapping; 0.4 overlaps 0.5.
        assert_eq!(kept, [c(0, 0.9, 0.0), c(1, 0.8, 0.0), c(0, 0.5, 30.0)]);
    }

    #[test]
    fn decodes_synthetic_nanodet_outputs() {
        // Level 0 (stride 8, grid 8 wide): anchor 10 = (x 2, y 1) -> centre (16, 8).
        // Sides 1, 1, 2, 3 bins -> box (8, 0, 32, 32) in input space.
        // Level 2 (stride 32, grid 2 wide): anchor 1 -> centre (32, 0); sides 0, 0, 1, 1 -> (32, 0, 64, 32).
        let tensors = synthetic(
            3,
            &[
                (0, 10, 2, 0.9, [1, 1, 2, 3]),
                (2, 1, 0, 0.5, [0, 0, 1, 1]),
                (1, 0, 1, 0.3, [1, 1, 1, 1]),
            ],
        );
        let out = decode_nanodet(&raw(&tensors), &labels(3), &params(), GEOMETRY).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].label, "c2");
        assert_eq!(out[0].confidence, 0.9);
        // Scaled by 2 horizontally, clamped to the 128x32 image.
        assert_eq!(
            out[0].bbox,
            BoundingBox {
                x_min: 16.0,
                y_min: 0.0,
                x_max: 64.0,
                y_max: 32.0
            }
        );
        assert_eq!(out[1].label, "c0");
        assert_eq!(
            out[1].bbox,
            BoundingBox {
                x_min: 64.0,
                y_min: 0.0,
                x_max: 128.0,
                y_max: 32.0
            }
        );
    }

    #[test]
    fn overlapping_same_class_anchors_are_merged() {
        let tensors = synthetic(
            3,
            &[(0, 10, 1, 0.9, [1, 1, 1, 1]), (0, 11, 1, 0.8, [2, 1, 0, 1])],
        );
        let out = decode_nanodet(&raw(&tensors), &labels(3), &params(), GEOMETRY).unwrap();
        assert_eq!(out.len(), 1);
        let mut p = params();
        p.max_detections = 1;
        let tensors = synthetic(
            3,
            &[(0, 0, 1, 0.9, [1, 1, 1, 1]), (0, 31, 1, 0.8, [1, 1, 1, 1])],
        );
        assert_eq!(
            decode_nanodet(&raw(&tensors), &labels(3), &p, GEOMETRY)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn unexpected_outputs_are_errors() {
        let tensors = synthetic(3, &[]);
        let all = raw(&tensors);
        let check = |outputs: &[RawTensor<'_>], labels_n: usize, expected: &str| {
            let err = decode_nanodet(outputs, &labels(labels_n), &params(), GEOMETRY).unwrap_err();
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        };
        // Label count not matching any output.
        check(&all, 4, "no output has 4 class scores");
        // A missing box tensor.
        check(&all[1..], 3, "one box output per class-score output");
        // Wrong rank / data length.
        let bad = [RawTensor {
            name: "x",
            shape: &[1, 32],
            data: &[0.0; 32],
        }];
        check(&bad, 3, "expected [1, anchors, values]");
        let bad = [RawTensor {
            name: "x",
            shape: &[1, 32, 3],
            data: &[0.0; 5],
        }];
        check(&bad, 3, "expected [1, anchors, values]");
        let bad = [RawTensor {
            name: "x",
            shape: &[1, -1, 3],
            data: &[],
        }];
        check(&bad, 3, "expected [1, anchors, values]");
        // Anchor count that fits no stride.
        let odd = [
            (vec![1, 7, 44], vec![0.0; 7 * 44]),
            (vec![1, 7, 3], vec![0.0; 21]),
        ];
        check(&raw(&odd), 3, "matches no stride");
        // Same last dimension for scores and boxes: cannot tell them apart.
        let tensors = synthetic(44, &[]);
        check(&raw(&tensors), 44, "one box output per class-score output");
    }

    #[test]
    fn nan_scores_and_boxes_are_skipped() {
        let mut tensors = synthetic(3, &[(0, 10, 2, 0.9, [1, 1, 2, 3])]);
        // Level 0 boxes are tensors[0]; poison anchor 10's first bin.
        tensors[0].1[10 * 4 * BINS] = f32::NAN;
        let out = decode_nanodet(&raw(&tensors), &labels(3), &params(), GEOMETRY).unwrap();
        assert!(out.is_empty());
        let mut tensors = synthetic(3, &[]);
        tensors[1].1.iter_mut().for_each(|v| *v = f32::NAN);
        assert!(
            decode_nanodet(&raw(&tensors), &labels(3), &params(), GEOMETRY)
                .unwrap()
                .is_empty()
        );
    }

    fn yolo_params() -> DetectionParams {
        DetectionParams {
            decoder: DetectionDecoder::Yolov8,
            ..params()
        }
    }

    /// A `[1, 4 + classes, anchors]` output; `boxes` sets (anchor, [cx, cy, w, h], class, score).
    fn yolo_output(
        classes: usize,
        anchors: usize,
        boxes: &[(usize, [f32; 4], usize, f32)],
    ) -> (Vec<i64>, Vec<f32>) {
        let mut data = vec![0.0_f32; (4 + classes) * anchors];
        for &(anchor, bbox, class, score) in boxes {
            for (row, value) in bbox.iter().enumerate() {
                data[row * anchors + anchor] = *value;
            }
            data[(4 + class) * anchors + anchor] = score;
        }
        (vec![1, (4 + classes) as i64, anchors as i64], data)
    }

    /// Transposes a `[1, values, anchors]` output into `[1, anchors, values]`.
    fn transposed((shape, data): &(Vec<i64>, Vec<f32>)) -> (Vec<i64>, Vec<f32>) {
        let (values, anchors) = (shape[1] as usize, shape[2] as usize);
        let mut out = vec![0.0; data.len()];
        for v in 0..values {
            for a in 0..anchors {
                out[a * values + v] = data[v * anchors + a];
            }
        }
        (vec![1, anchors as i64, values as i64], out)
    }

    /// A 1280x720 image letterboxed into a 640x640 input: gain 0.5, 140 rows of padding on top.
    const LETTERBOX: Geometry = Geometry {
        input_width: 640,
        input_height: 640,
        image_width: 1280,
        image_height: 720,
        placement: Placement {
            scale_x: 0.5,
            scale_y: 0.5,
            offset_x: 0.0,
            offset_y: 140.0,
        },
    };

    fn bbox(d: &Detection) -> [f32; 4] {
        [d.bbox.x_min, d.bbox.y_min, d.bbox.x_max, d.bbox.y_max]
    }

    #[test]
    fn decodes_yolov8_boxes_and_scales_them_back_through_the_letterbox() {
        let output = yolo_output(
            3,
            6,
            &[
                // Centre (320, 320), 100x50 in the input -> (540, 310, 740, 410) on the image.
                (1, [320.0, 320.0, 100.0, 50.0], 2, 0.9),
                // Below the threshold.
                (2, [100.0, 200.0, 10.0, 10.0], 0, 0.3),
                // Reaches into the padding and past the right edge: clamped to the image.
                (4, [630.0, 150.0, 40.0, 40.0], 1, 0.6),
            ],
        );
        let out = decode_yolov8(&raw(&[output]), &labels(3), &yolo_params(), LETTERBOX).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].label, "c2");
        assert_eq!(out[0].confidence, 0.9);
        assert_eq!(bbox(&out[0]), [540.0, 310.0, 740.0, 410.0]);
        assert_eq!(out[1].label, "c1");
        // x: (610 .. 650) / 0.5 = 1220 .. 1300 -> 1280; y: (130 .. 170 - 140) / 0.5 -> 0 .. 60.
        assert_eq!(bbox(&out[1]), [1220.0, 0.0, 1280.0, 60.0]);
    }

    #[test]
    fn yolov8_transposed_layout_gives_the_same_result() {
        let output = yolo_output(
            3,
            5,
            &[
                (0, [320.0, 320.0, 100.0, 50.0], 2, 0.9),
                (3, [50.0, 400.0, 20.0, 30.0], 0, 0.5),
            ],
        );
        let first = decode_yolov8(
            &raw(std::slice::from_ref(&output)),
            &labels(3),
            &yolo_params(),
            LETTERBOX,
        );
        let second = decode_yolov8(
            &raw(&[transposed(&output)]),
            &labels(3),
            &yolo_params(),
            LETTERBOX,
        );
        assert_eq!(first.unwrap(), second.unwrap());
    }

    #[test]
    fn yolov8_nms_is_per_class_and_limited() {
        let output = yolo_output(
            2,
            5,
            &[
                (0, [100.0, 300.0, 40.0, 40.0], 0, 0.9),
                // Same class, IoU 0.78 with the first: suppressed.
                (1, [105.0, 300.0, 40.0, 40.0], 0, 0.8),
                // Other class on the same spot: kept.
                (2, [100.0, 300.0, 40.0, 40.0], 1, 0.7),
                // Same class far away: kept.
                (3, [500.0, 300.0, 40.0, 40.0], 0, 0.6),
            ],
        );
        let out = decode_yolov8(
            &raw(std::slice::from_ref(&output)),
            &labels(2),
            &yolo_params(),
            LETTERBOX,
        )
        .unwrap();
        let found: Vec<(&str, f32)> = out
            .iter()
            .map(|d| (d.label.as_str(), d.confidence))
            .collect();
        assert_eq!(found, [("c0", 0.9), ("c1", 0.7), ("c0", 0.6)]);
        let mut limited = yolo_params();
        limited.max_detections = 2;
        limited.score_threshold = 0.65;
        let out = decode_yolov8(&raw(&[output]), &labels(2), &limited, LETTERBOX).unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn yolov8_best_class_ignores_nan_and_skips_non_finite_boxes() {
        let (shape, mut data) = yolo_output(
            2,
            3,
            &[
                (0, [100.0, 300.0, 40.0, 40.0], 1, 0.8),
                (1, [f32::INFINITY, 300.0, 40.0, 40.0], 0, 0.9),
            ],
        );
        // Anchor 0's class-0 score is NaN: class 1 still wins.
        data[4 * 3] = f32::NAN;
        // Anchor 2: every score NaN.
        data[4 * 3 + 2] = f32::NAN;
        data[5 * 3 + 2] = f32::NAN;
        let out = decode_yolov8(
            &raw(&[(shape, data)]),
            &labels(2),
            &yolo_params(),
            LETTERBOX,
        )
        .unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].label, "c1");
    }

    #[test]
    fn yolov8_unexpected_outputs_are_errors() {
        let check = |tensors: &[(Vec<i64>, Vec<f32>)], expected: &str| {
            let err =
                decode_yolov8(&raw(tensors), &labels(3), &yolo_params(), LETTERBOX).unwrap_err();
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        };
        check(&[], "has one output");
        let output = yolo_output(3, 4, &[]);
        check(&[output.clone(), output], "has one output");
        // 4 + 2 classes does not fit 3 labels.
        check(&[yolo_output(2, 4, &[])], "expected [1, 7, anchors]");
        check(&[(vec![7, 4], vec![0.0; 28])], "expected [1, 7, anchors]");
        check(&[(vec![1, 7, 4], vec![0.0; 27])], "but 27 values");
        check(&[(vec![1, 7, -1], vec![])], "expected [1, 7, anchors]");
        // No anchors at all is not an error: nothing found.
        let out = decode_yolov8(
            &raw(&[(vec![1, 7, 0], vec![])]),
            &labels(3),
            &yolo_params(),
            LETTERBOX,
        );
        assert_eq!(out.unwrap(), []);
    }

    #[test]
    fn stretched_boxes_scale_per_axis() {
        // A 64x32 input stretched from a 128x32 image: x doubles, y stays.
        let output = yolo_output(1, 2, &[(0, [32.0, 16.0, 20.0, 10.0], 0, 0.9)]);
        let out = decode_yolov8(&raw(&[output]), &labels(1), &yolo_params(), GEOMETRY).unwrap();
        assert_eq!(bbox(&out[0]), [44.0, 11.0, 84.0, 21.0]);
    }
}
