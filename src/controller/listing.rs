//! The listing summary of a group (`aggregate.listing`): photos by quality flag, sets of
//! near-duplicates, content flags, detected objects per photo and a suggested cover photo.
//!
//! It is recomputed over every stored result of the group at each reconcile (which reads
//! them all anyway), not kept incrementally: an image added later is then compared with
//! all of the group's others, nothing can drift from the results, and the cost is small
//! (1000 images: half a million 64-bit comparisons, about a millisecond).
//!
//! Everything is bounded (counts, lists of at most [`MAX_LISTED`]): the group's status and
//! its event stay small for 10,000 images.

use std::collections::{BTreeMap, HashSet};

use crate::crd::{
    Cover, DuplicateSummary, FlaggedPhotos, LabelCount, Listing, MAX_LISTED, ObjectsPerPhoto,
    PhotoObjects,
};
use crate::inference::similarity::duplicate_sets;
use crate::results::ImageResult;

/// Default Hamming distance (of 64 bits) at or under which two photos are near-duplicates:
/// a crop-and-rescale copy is 11 bits from its original, different photos 22-26.
pub const DEFAULT_DUPLICATE_DISTANCE: u32 = 12;

/// The listing summary of `results` (the group's finished images, in any order).
///
/// The cover is chosen among photos that did not fail, raised no content flag and are not
/// a later member of a near-duplicate set (only the first of a set by image id may be it):
/// first those without a quality flag, then the highest `photo_quality` score, then the
/// smallest image id. Without `photo_quality` that is the first eligible photo by id.
pub fn listing<'a>(
    results: impl IntoIterator<Item = &'a ImageResult>,
    models: &[String],
    max_distance: u32,
) -> Listing {
    let mut results: Vec<&ImageResult> = results.into_iter().collect();
    results.sort_by(|a, b| a.image_id.cmp(&b.image_id));
    let (failed, photos): (Vec<&ImageResult>, Vec<&ImageResult>) =
        results.into_iter().partition(|r| r.is_failure(models));

    let mut quality_flags: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut content_flags: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut with_objects = Vec::new();
    for photo in &photos {
        let id = photo.image_id.as_str();
        let mut labels: BTreeMap<&str, u32> = BTreeMap::new();
        for output in photo.outputs.values().map(|o| &o.output) {
            if let Some(quality) = &output.quality {
                for flag in &quality.flags {
                    let name = serde_json::to_value(flag)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| format!("{flag:?}"));
                    quality_flags.entry(name).or_default().push(id);
                }
            }
            for flag in &output.flags {
                let ids = content_flags.entry(flag.clone()).or_default();
                if ids.last() != Some(&id) {
                    ids.push(id);
                }
            }
            for detection in &output.detections {
                *labels.entry(detection.label.as_str()).or_default() += 1;
            }
        }
        if !labels.is_empty() {
            with_objects.push((id, labels));
        }
    }

    let sets = duplicate_sets(
        photos
            .iter()
            .filter_map(|p| Some((p.image_id.as_str(), p.perceptual_hash.as_deref()?))),
        max_distance,
    );
    let later_duplicates: HashSet<&str> = sets
        .iter()
        .flat_map(|set| set.iter().skip(1).map(String::as_str))
        .collect();
    let flagged: HashSet<&str> = content_flags.values().flatten().copied().collect();
    let quality_of = |p: &ImageResult| {
        p.outputs
            .values()
            .find_map(|o| o.output.quality.as_ref())
            .map(|q| (q.flags.is_empty(), q.score))
    };
    let cover = photos
        .iter()
        .filter(|p| {
            let id = p.image_id.as_str();
            !later_duplicates.contains(id) && !flagged.contains(id)
        })
        // `photos` is sorted by id: on a tie the first one stays.
        .fold(None::<&ImageResult>, |best, p| match best {
            Some(b) if !better(quality_of(p), quality_of(b)) => Some(b),
            _ => Some(p),
        })
        .map(|p| Cover {
            image_id: p.image_id.clone(),
            quality_score: quality_of(p).map(|(_, score)| score),
        });

    Listing {
        photos: count(photos.len()),
        failed: count(failed.len()),
        quality_flags: flagged_photos(quality_flags),
        duplicates: DuplicateSummary {
            max_distance,
            set_count: count(sets.len()),
            photos: count(sets.iter().map(Vec::len).sum()),
            sets: sets
                .into_iter()
                .take(MAX_LISTED)
                .map(|set| set.into_iter().take(MAX_LISTED).collect())
                .collect(),
        },
        flagged_content: flagged_photos(content_flags),
        objects_per_photo: ObjectsPerPhoto {
            photos_with_objects: count(with_objects.len()),
            photos: with_objects
                .into_iter()
                .take(MAX_LISTED)
                .map(|(id, labels)| {
                    let mut objects: Vec<LabelCount> = labels
                        .into_iter()
                        .map(|(label, count)| LabelCount {
                            label: label.to_owned(),
                            count,
                        })
                        .collect();
                    objects.sort_by(|a, b| b.count.cmp(&a.count).then(a.label.cmp(&b.label)));
                    objects.truncate(MAX_LISTED);
                    PhotoObjects {
                        image_id: id.to_owned(),
                        objects,
                    }
                })
                .collect(),
        },
        cover,
    }
}

/// Whether a photo of quality `a` makes a better cover than one of `b` (each: no quality
/// flag, score; `None` when `photo_quality` did not run).
fn better(a: Option<(bool, f32)>, b: Option<(bool, f32)>) -> bool {
    match (a, b) {
        // Unflagged first, then the higher score.
        (Some((a_clean, a_score)), Some((b_clean, b_score))) => {
            (a_clean, a_score).partial_cmp(&(b_clean, b_score)) == Some(std::cmp::Ordering::Greater)
        }
        (Some(_), None) => true,
        _ => false,
    }
}

fn flagged_photos(flags: BTreeMap<String, Vec<&str>>) -> Vec<FlaggedPhotos> {
    flags
        .into_iter()
        .map(|(flag, ids)| FlaggedPhotos {
            flag,
            count: count(ids.len()),
            image_ids: ids
                .into_iter()
                .take(MAX_LISTED)
                .map(str::to_owned)
                .collect(),
        })
        .collect()
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::output::{
        BoundingBox, Detection, ModelOutput, PhotoQuality, QualityFlag,
    };
    use crate::results::{ModelResult, Timings};
    use image_hasher::ImageHash;

    /// A stored 64-bit hash of eight equal bytes: `0x00`, `0x0f`, `0x33`, `0xff` are 32 or
    /// 64 bits apart.
    fn hash(byte: u8) -> String {
        ImageHash::<Box<[u8]>>::from_bytes(&[byte; 8])
            .unwrap()
            .to_base64()
    }

    fn photo(id: &str, hash: &str, score: f32, flags: Vec<QualityFlag>) -> ImageResult {
        let quality = PhotoQuality {
            score,
            sharpness: score,
            exposure: score,
            resolution: score,
            aspect: score,
            laplacian_variance: 0.0,
            mean_luminance: 0.5,
            clipped_shadows: 0.0,
            clipped_highlights: 0.0,
            flags,
        };
        let mut outputs = BTreeMap::new();
        outputs.insert(
            "photo_quality".to_owned(),
            ModelResult {
                output: ModelOutput {
                    quality: Some(quality),
                    ..Default::default()
                },
                error: None,
                inference_ms: 1.0,
            },
        );
        ImageResult {
            group: "g".into(),
            image_id: id.into(),
            failure: None,
            width: Some(640),
            height: Some(480),
            perceptual_hash: Some(hash.to_owned()),
            outputs,
            timings: Timings::default(),
        }
    }

    fn with_output(mut result: ImageResult, model: &str, output: ModelOutput) -> ImageResult {
        result.outputs.insert(
            model.to_owned(),
            ModelResult {
                output,
                error: None,
                inference_ms: 1.0,
            },
        );
        result
    }

    const MODELS: &[String] = &[];

    #[test]
    fn cover_skips_blurred_later_duplicates_flagged_and_failed_photos() {
        let (a, b, c, d) = (hash(0x00), hash(0x0f), hash(0x33), hash(0xff));
        // "b-copy" is a near-duplicate of "b" (same hash) with the best score of all.
        let photos = vec![
            photo("a", &a, 0.95, vec![QualityFlag::Blurry]),
            photo("b", &b, 0.7, vec![]),
            photo("b-copy", &b, 0.99, vec![]),
            with_output(
                photo("c", &c, 0.98, vec![]),
                "content_safety",
                ModelOutput {
                    flags: vec!["nsfw".into()],
                    ..Default::default()
                },
            ),
            photo("d", &d, 0.6, vec![]),
            ImageResult::failed("g", "e", "ImageTruncated", "cut short".into()),
        ];
        let listing = listing(&photos, MODELS, DEFAULT_DUPLICATE_DISTANCE);
        assert_eq!((listing.photos, listing.failed), (5, 1));
        assert_eq!(listing.duplicates.set_count, 1);
        assert_eq!(listing.duplicates.photos, 2);
        assert_eq!(listing.duplicates.sets, [vec!["b", "b-copy"]]);
        assert_eq!(
            listing.quality_flags,
            [FlaggedPhotos {
                flag: "blurry".into(),
                count: 1,
                image_ids: vec!["a".into()]
            }]
        );
        assert_eq!(listing.flagged_content[0].flag, "nsfw");
        assert_eq!(listing.flagged_content[0].image_ids, ["c"]);
        // Not "a" (blurry), "b-copy" (a later duplicate) nor "c" (flagged): "b" beats "d".
        assert_eq!(
            listing.cover,
            Some(Cover {
                image_id: "b".into(),
                quality_score: Some(0.7)
            })
        );
    }

    #[test]
    fn a_photo_added_later_joins_the_set_of_its_original() {
        let (a, b) = (hash(0x00), hash(0x0f));
        let mut photos = vec![photo("1", &a, 0.8, vec![]), photo("2", &b, 0.8, vec![])];
        assert_eq!(listing(&photos, MODELS, 12).duplicates.set_count, 0);
        photos.push(photo("3", &a, 0.9, vec![]));
        let later = listing(&photos, MODELS, 12);
        assert_eq!(later.duplicates.sets, [vec!["1", "3"]]);
        assert_eq!(later.cover.map(|c| c.image_id), Some("1".into()));
        // The threshold is the configured one: at 64 bits every photo matches every other.
        assert_eq!(listing(&photos, MODELS, 64).duplicates.photos, 3);
    }

    #[test]
    fn stays_bounded_for_a_thousand_photos() {
        let same = hash(0x33);
        let detection = |label: &str| Detection {
            label: label.into(),
            confidence: 0.9,
            bbox: BoundingBox {
                x_min: 0.0,
                y_min: 0.0,
                x_max: 1.0,
                y_max: 1.0,
            },
        };
        let photos: Vec<ImageResult> = (0..1000)
            .map(|i| {
                let detections = (0..30).map(|j| detection(&format!("label-{j}"))).collect();
                with_output(
                    photo(
                        &format!("photo-with-a-long-customer-id-{i:04}"),
                        &same,
                        0.5,
                        vec![
                            QualityFlag::Dark,
                            QualityFlag::Blurry,
                            QualityFlag::LowResolution,
                        ],
                    ),
                    "object_detection",
                    ModelOutput {
                        detections,
                        flags: vec!["nsfw".into()],
                        ..Default::default()
                    },
                )
            })
            .collect();
        let listing = listing(&photos, MODELS, 12);
        assert_eq!(listing.duplicates.photos, 1000);
        assert_eq!(listing.duplicates.sets[0].len(), MAX_LISTED);
        assert_eq!(listing.objects_per_photo.photos_with_objects, 1000);
        assert_eq!(listing.objects_per_photo.photos.len(), MAX_LISTED);
        assert_eq!(listing.quality_flags[0].count, 1000);
        assert_eq!(listing.cover, None, "every photo is flagged nsfw");
        let size = serde_json::to_string(&listing).unwrap().len();
        eprintln!("listing of 1000 photos, every list full: {size} bytes");
        assert!(size < 12_000, "{size} bytes");
    }
}
