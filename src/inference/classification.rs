//! Classification outputs: logits -> softmax -> top-k labels.

use super::catalog::ClassificationParams;
use super::output::{ClassScore, round_confidence};

/// Numerically stable softmax (the maximum is subtracted before `exp`).
/// Returns an empty vector for empty input.
pub(crate) fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = out.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        out.iter_mut().for_each(|p| *p /= sum);
    }
    out
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
/// NaN values are never selected.
pub(crate) fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut items: Vec<(usize, f32)> = values
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .collect();
    let by_value_desc =
        |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < items.len() {
        // Partition first so only k elements are sorted.
        items.select_nth_unstable_by(k, by_value_desc);
        items.truncate(k);
    }
    items.sort_unstable_by(by_value_desc);
    items.into_iter().map(|(i, _)| i).collect()
}

/// Checks that a `[1, classes]` logits tensor (one image's slice of the model's
/// `[batch, classes]` output; a model with another rank is refused at load) has one value
/// per label.
pub(crate) fn check_logits(shape: &[i64], logits: &[f32], labels: &[String]) -> Result<(), String> {
    let classes = match shape {
        [1, n] => usize::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    if classes == 0 || classes != logits.len() {
        return Err(format!(
            "expected logits of shape [1, classes], got {shape:?} with {} values",
            logits.len()
        ));
    }
    if classes != labels.len() {
        return Err(format!(
            "the model outputs {classes} classes but has {} labels",
            labels.len()
        ));
    }
    Ok(())
}

/// Decodes a `[1, classes]` logits (or probabilities) tensor into the top classes and the
/// content flags raised (sorted).
pub(crate) fn decode_classification(
    shape: &[i64],
    logits: &[f32],
    labels: &[String],
    params: &ClassificationParams,
) -> Result<(Vec<ClassScore>, Vec<String>), String> {
    check_logits(shape, logits, labels)?;
    let probabilities = if params.probabilities {
        logits.to_vec()
    } else {
        softmax(logits)
    };
    let mut flags: Vec<String> = params
        .flags
        .iter()
        .filter(|(_, index, above)| probabilities.get(*index).is_some_and(|p| p > above))
        .map(|(label, _, _)| label.clone())
        .collect();
    flags.sort();
    let classes = top_k(&probabilities, params.top_k)
        .into_iter()
        .filter_map(|i| Some((labels.get(i)?, *probabilities.get(i)?)))
        .filter(|(_, p)| *p >= params.score_threshold)
        .map(|(label, p)| ClassScore {
            label: label.clone(),
            confidence: round_confidence(p),
        })
        .collect();
    Ok((classes, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("class{i}")).collect()
    }

    #[test]
    fn softmax_sums_to_one_and_is_stable() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.665_240_9).abs() < 1e-6);
        // Large logits do not overflow.
        let p = softmax(&[1000.0, 1000.0]);
        assert_eq!(p, [0.5, 0.5]);
        assert!(softmax(&[]).is_empty());
    }

    #[test]
    fn top_k_orders_and_handles_ties_and_nan() {
        let values = [0.1, 0.7, f32::NAN, 0.7, 0.05, 0.2];
        assert_eq!(top_k(&values, 3), [1, 3, 5]);
        assert_eq!(top_k(&values, 10), [1, 3, 5, 0, 4]);
        assert!(top_k(&values, 0).is_empty());
        assert!(top_k(&[], 3).is_empty());
    }

    #[test]
    fn decodes_top_classes() {
        let params = ClassificationParams {
            top_k: 2,
            score_threshold: 0.0,
            probabilities: false,
            flags: vec![],
        };
        let logits = [0.0, 3.0, 1.0, -2.0];
        let (out, _) = decode_classification(&[1, 4], &logits, &labels(4), &params).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].label, "class1");
        assert_eq!(out[0].confidence, 0.839);
        assert_eq!(out[1].label, "class2");
        // Score threshold drops unlikely classes.
        let params = ClassificationParams {
            top_k: 3,
            score_threshold: 0.5,
            probabilities: false,
            flags: vec![],
        };
        let out = decode_classification(&[1, 4], &logits, &labels(4), &params).unwrap();
        assert_eq!(out.0.len(), 1);
    }

    #[test]
    fn probabilities_are_taken_as_they_are_and_raise_flags_above_their_threshold() {
        let params = ClassificationParams {
            top_k: 2,
            score_threshold: 0.0,
            probabilities: true,
            flags: vec![("class1".into(), 1, 0.8)],
        };
        let (classes, flags) =
            decode_classification(&[1, 2], &[0.15, 0.85], &labels(2), &params).unwrap();
        assert_eq!(classes[0].label, "class1");
        assert_eq!(classes[0].confidence, 0.85);
        assert_eq!(flags, ["class1"]);
        let (_, flags) = decode_classification(&[1, 2], &[0.2, 0.8], &labels(2), &params).unwrap();
        assert!(
            flags.is_empty(),
            "at the threshold itself nothing is flagged"
        );
    }

    #[test]
    fn rejects_unexpected_shapes() {
        let params = ClassificationParams {
            top_k: 2,
            score_threshold: 0.0,
            probabilities: false,
            flags: vec![],
        };
        assert!(decode_classification(&[2, 4], &[0.0; 8], &labels(4), &params).is_err());
        assert!(decode_classification(&[1, 4], &[0.0; 3], &labels(4), &params).is_err());
        assert!(decode_classification(&[1, 5], &[0.0; 5], &labels(4), &params).is_err());
        assert!(decode_classification(&[1, -1], &[], &labels(4), &params).is_err());
        assert!(decode_classification(&[1, 4, 1], &[0.0; 4], &labels(4), &params).is_err());
        assert!(decode_classification(&[4], &[0.0; 4], &labels(4), &params).is_err());
    }
}
