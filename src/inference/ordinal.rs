//! Ordinal outputs: a classifier whose labels are ordered grades (lowest first), read as
//! a position on the scale rather than as unrelated classes.
//!
//! With `p = softmax(logits)` over `n` grades, the score is the expected grade index
//! `sum_i p_i * i` divided by `n - 1`, in `[0, 1]`: an image the model hesitates about
//! between "good" and "excellent" lands between them, where a plain top-1 would jump.
//! The most likely grade and its probability come with it.

use super::classification::{check_logits, softmax, top_k};
use super::output::{OrdinalGrade, round_confidence};

/// Decodes a `[1, grades]` logits tensor into a grade.
pub(crate) fn decode_ordinal(
    shape: &[i64],
    logits: &[f32],
    labels: &[String],
) -> Result<OrdinalGrade, String> {
    check_logits(shape, logits, labels)?;
    if labels.len() < 2 {
        return Err(format!(
            "an ordinal model needs at least 2 grades, it has {}",
            labels.len()
        ));
    }
    let probabilities = softmax(logits);
    let highest = (probabilities.len() - 1) as f32;
    let expected: f32 = probabilities
        .iter()
        .enumerate()
        .map(|(i, p)| i as f32 * p)
        .sum();
    let top = top_k(&probabilities, 1);
    let (Some(&best), true) = (top.first(), expected.is_finite()) else {
        return Err(format!(
            "the grade probabilities are not finite numbers (logits {logits:?})"
        ));
    };
    let (Some(label), Some(&confidence)) = (labels.get(best), probabilities.get(best)) else {
        return Err(format!("grade index {best} has no label"));
    };
    Ok(OrdinalGrade {
        label: label.clone(),
        score: round_confidence((expected / highest).clamp(0.0, 1.0)),
        confidence: round_confidence(confidence),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grades() -> Vec<String> {
        ["poor", "fair", "good", "excellent"]
            .map(String::from)
            .to_vec()
    }

    /// Logits whose softmax is exactly `probabilities` (all > 0).
    fn logits_of(probabilities: &[f32]) -> Vec<f32> {
        probabilities.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn score_is_the_normalised_expected_grade() {
        // Certain "good": index 2 of 0..=3.
        let out = decode_ordinal(&[1, 4], &[-50.0, -50.0, 50.0, -50.0], &grades()).unwrap();
        assert_eq!(
            out,
            OrdinalGrade {
                label: "good".into(),
                score: 0.6667,
                confidence: 1.0
            }
        );
        // Split between fair and excellent: expected index 0.4 * 1 + 0.6 * 3 = 2.2.
        let out = decode_ordinal(&[1, 4], &logits_of(&[1e-9, 0.4, 1e-9, 0.6]), &grades()).unwrap();
        assert_eq!(out.label, "excellent");
        assert_eq!(out.confidence, 0.6);
        assert!((out.score - 2.2 / 3.0).abs() < 1e-3, "{out:?}");
        // Uniform: the middle of the scale, the lowest grade wins the tie.
        let out = decode_ordinal(&[1, 4], &[0.0; 4], &grades()).unwrap();
        assert_eq!(
            (out.label.as_str(), out.score, out.confidence),
            ("poor", 0.5, 0.25)
        );
    }

    #[test]
    fn extremes_map_to_zero_and_one() {
        let two = vec!["bad".to_string(), "good".to_string()];
        let low = decode_ordinal(&[1, 2], &[100.0, -100.0], &two).unwrap();
        assert_eq!((low.label.as_str(), low.score), ("bad", 0.0));
        let high = decode_ordinal(&[1, 2], &[-100.0, 100.0], &two).unwrap();
        assert_eq!((high.label.as_str(), high.score), ("good", 1.0));
    }

    #[test]
    fn rejects_bad_outputs() {
        assert!(decode_ordinal(&[1, 3], &[0.0; 3], &grades()).is_err());
        assert!(decode_ordinal(&[2, 4], &[0.0; 8], &grades()).is_err());
        assert!(decode_ordinal(&[4], &[0.0; 4], &grades()).is_err());
        let one = vec!["only".to_string()];
        assert!(decode_ordinal(&[1, 1], &[0.0], &one).is_err());
        let err = decode_ordinal(&[1, 4], &[f32::NAN; 4], &grades()).unwrap_err();
        assert!(err.contains("not finite"), "{err}");
    }
}
