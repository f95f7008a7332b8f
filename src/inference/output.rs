//! Results of one model on one image.
//!
//! These types are stored with each image's result and sent in webhooks, so they derive
//! `JsonSchema` and use camelCase on the wire. Values are rounded (confidences to 4
//! decimals, box coordinates to 0.1 px) so stored results stay small and stable.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::quality::{PhotoQuality, QualityFlag};

/// What a model found in an image. Detection models fill `detections`, classification
/// models fill `classes`, ordinal models fill `grade`; the others are empty and omitted
/// from the serialised form.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelOutput {
    /// Objects found, highest confidence first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detections: Vec<Detection>,
    /// Most likely classes of the whole image, highest confidence first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassScore>,
    /// Ordinal models: the grade of the image on the model's ordered scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<OrdinalGrade>,
    /// The `photo_quality` analyser: scores and flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<PhotoQuality>,
    /// Content flags a classification model raised: its catalog `flags` whose class
    /// probability is above their threshold (e.g. `nsfw`). Sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// One object found by a detection model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Detection {
    pub label: String,
    /// In `[0, 1]`, rounded to 4 decimals.
    pub confidence: f32,
    pub bbox: BoundingBox,
}

/// An axis-aligned box in pixels of the original image (after EXIF orientation),
/// clamped to the image and rounded to 0.1 px.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BoundingBox {
    pub x_min: f32,
    pub y_min: f32,
    pub x_max: f32,
    pub y_max: f32,
}

/// One class of a classification model with its probability.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassScore {
    pub label: String,
    /// In `[0, 1]`, rounded to 4 decimals.
    pub confidence: f32,
}

/// The result of an ordinal model: a classifier whose labels are ordered grades
/// (e.g. poor < fair < good < excellent).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrdinalGrade {
    /// The most likely grade.
    pub label: String,
    /// Confidence-weighted position on the scale, in `[0, 1]` (0 = lowest grade, 1 = highest):
    /// the expected grade index `sum(p_i * i)` divided by the highest index. Rounded to 4
    /// decimals.
    pub score: f32,
    /// Probability of `label`, in `[0, 1]`, rounded to 4 decimals.
    pub confidence: f32,
}

/// Rounds a confidence to 4 decimals.
pub(crate) fn round_confidence(value: f32) -> f32 {
    (value * 10_000.0).round() / 10_000.0
}

/// Rounds a pixel coordinate to 1 decimal.
pub(crate) fn round_coordinate(value: f32) -> f32 {
    (value * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(round_confidence(0.522_349), 0.5223);
        assert_eq!(round_confidence(0.957_06), 0.9571);
        assert_eq!(round_coordinate(117.149), 117.1);
        assert_eq!(round_coordinate(-4.96), -5.0);
    }

    #[test]
    fn serialises_camel_case_and_skips_empty_lists() {
        let output = ModelOutput {
            detections: vec![Detection {
                label: "cup".into(),
                confidence: 0.5223,
                bbox: BoundingBox {
                    x_min: 1.0,
                    y_min: 2.0,
                    x_max: 3.0,
                    y_max: 4.0,
                },
            }],
            classes: vec![],
            ..ModelOutput::default()
        };
        let json = serde_json::to_value(&output).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"detections": [{"label": "cup", "confidence": 0.5223_f32,
                "bbox": {"xMin": 1.0, "yMin": 2.0, "xMax": 3.0, "yMax": 4.0}}]})
        );
        let back: ModelOutput = serde_json::from_value(json).unwrap();
        assert_eq!(back, output);
        let empty: ModelOutput = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, ModelOutput::default());
    }

    #[test]
    fn serialises_grade_only_when_present() {
        let output = ModelOutput {
            grade: Some(OrdinalGrade {
                label: "good".into(),
                score: 0.6667,
                confidence: 0.81,
            }),
            ..ModelOutput::default()
        };
        let json = serde_json::to_value(&output).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"grade": {"label": "good", "score": 0.6667_f32, "confidence": 0.81_f32}})
        );
        let back: ModelOutput = serde_json::from_value(json).unwrap();
        assert_eq!(back, output);
        // Results stored before grades existed still read.
        let old: ModelOutput = serde_json::from_str(r#"{"classes": []}"#).unwrap();
        assert_eq!(old.grade, None);
    }
}
