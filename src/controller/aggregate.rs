//! The group's aggregate: objects found across its images (count, images, best confidence)
//! and the top-1 classes, and the listing summary ([`super::listing`]).

use std::collections::BTreeMap;

use super::listing::listing;
use crate::crd::{Aggregate, ClassCount, ObjectCount};
use crate::results::ImageResult;

/// The aggregate of a group's finished `results`, which asked for `models`; photos at most
/// `duplicate_distance` apart are near-duplicates.
pub fn aggregate<'a>(
    results: impl IntoIterator<Item = &'a ImageResult> + Clone,
    models: &[String],
    duplicate_distance: u32,
) -> Aggregate {
    let listing = listing(results.clone(), models, duplicate_distance);
    let mut objects: BTreeMap<String, ObjectCount> = BTreeMap::new();
    let mut classes: BTreeMap<(String, String), ClassCount> = BTreeMap::new();
    for result in results {
        let mut seen_in_image: Vec<&str> = Vec::new();
        for (model, output) in &result.outputs {
            for det in &output.output.detections {
                let entry = objects
                    .entry(det.label.clone())
                    .or_insert_with(|| ObjectCount {
                        label: det.label.clone(),
                        count: 0,
                        images: 0,
                        best_confidence: 0.0,
                    });
                entry.count += 1;
                entry.best_confidence = entry.best_confidence.max(det.confidence);
                if !seen_in_image.contains(&det.label.as_str()) {
                    seen_in_image.push(&det.label);
                    entry.images += 1;
                }
            }
            if let Some(top) = output.output.classes.first() {
                let entry = classes
                    .entry((model.clone(), top.label.clone()))
                    .or_insert_with(|| ClassCount {
                        model: model.clone(),
                        label: top.label.clone(),
                        images: 0,
                        best_confidence: 0.0,
                    });
                entry.images += 1;
                entry.best_confidence = entry.best_confidence.max(top.confidence);
            }
        }
    }
    let mut objects: Vec<_> = objects.into_values().collect();
    objects.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.label.cmp(&b.label)));
    let mut classes: Vec<_> = classes.into_values().collect();
    classes.sort_by(|a, b| b.images.cmp(&a.images).then_with(|| a.label.cmp(&b.label)));
    Aggregate {
        objects,
        classes,
        listing: Some(listing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::output::{BoundingBox, ClassScore, Detection, ModelOutput};
    use crate::results::{ModelResult, Timings};

    fn det(label: &str, confidence: f32) -> Detection {
        Detection {
            label: label.into(),
            confidence,
            bbox: BoundingBox {
                x_min: 0.0,
                y_min: 0.0,
                x_max: 1.0,
                y_max: 1.0,
            },
        }
    }

    fn result(id: &str, dets: Vec<Detection>, top: Option<(&str, f32)>) -> ImageResult {
        let mut outputs = BTreeMap::new();
        outputs.insert(
            "object_detection".to_owned(),
            ModelResult {
                output: ModelOutput {
                    detections: dets,
                    classes: vec![],
                    ..Default::default()
                },
                error: None,
                inference_ms: 1.0,
            },
        );
        if let Some((label, confidence)) = top {
            outputs.insert(
                "image_classification".to_owned(),
                ModelResult {
                    output: ModelOutput {
                        detections: vec![],
                        classes: vec![ClassScore {
                            label: label.into(),
                            confidence,
                        }],
                        ..Default::default()
                    },
                    error: None,
                    inference_ms: 1.0,
                },
            );
        }
        ImageResult {
            group: "g".into(),
            image_id: id.into(),
            failure: None,
            width: Some(10),
            height: Some(10),
            perceptual_hash: None,
            outputs,
            timings: Timings::default(),
        }
    }

    #[test]
    fn counts_objects_images_and_best_confidence() {
        let a = result(
            "0",
            vec![det("cup", 0.5), det("cup", 0.7), det("person", 0.4)],
            Some(("espresso", 0.9)),
        );
        let b = result("1", vec![det("cup", 0.6)], Some(("espresso", 0.8)));
        let agg = aggregate([&a, &b], &[], 12);
        assert_eq!(
            agg.objects[0],
            ObjectCount {
                label: "cup".into(),
                count: 3,
                images: 2,
                best_confidence: 0.7
            }
        );
        assert_eq!(agg.objects[1].label, "person");
        assert_eq!(agg.classes[0].images, 2);
        assert_eq!(agg.classes[0].best_confidence, 0.9);
    }
}
