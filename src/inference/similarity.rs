//! Near-duplicate photos: a perceptual hash per image (DCT mean hash of `image_hasher`,
//! 64 bits, what "pHash" usually means), compared by Hamming distance. A crop of a few
//! percent and a rescale move it by a few bits; different photos differ in about half.

use image::{DynamicImage, RgbImage};
use image_hasher::{HashAlg, HasherConfig, ImageHash};

use super::InferenceError;
use super::quality::shrink;

/// The hash is taken from a copy this size (longest side): the hasher's own resize
/// to 8x8 is then cheap whatever the photo's size, and the hash does not change.
const HASH_SOURCE_SIDE: u32 = 256;

/// The image's perceptual hash, base64 as stored with its result.
pub fn perceptual_hash(image: &RgbImage) -> Result<String, InferenceError> {
    let small = DynamicImage::ImageRgb8(shrink(image, HASH_SOURCE_SIDE)?);
    let hasher = HasherConfig::new()
        .hash_size(8, 8)
        .hash_alg(HashAlg::Mean)
        .preproc_dct()
        .to_hasher();
    Ok(hasher.hash_image(&small).to_base64())
}

/// Bits that differ between two stored hashes; `None` when either is not a hash of the
/// same size (results written by another version).
pub fn hamming_distance(a: &str, b: &str) -> Option<u32> {
    let a = ImageHash::<Box<[u8]>>::from_base64(a).ok()?;
    let b = ImageHash::<Box<[u8]>>::from_base64(b).ok()?;
    (a.as_bytes().len() == b.as_bytes().len()).then(|| a.dist(&b))
}

/// Sets of near-duplicates among `(id, hash)`: ids linked, directly or through others, by a
/// Hamming distance of at most `max_distance`. Each set is sorted, with two ids or more;
/// sets are sorted by their first id. Quadratic, which a group of 10,000 images affords
/// (50 million 64-bit comparisons).
pub fn duplicate_sets<'a>(
    hashes: impl IntoIterator<Item = (&'a str, &'a str)>,
    max_distance: u32,
) -> Vec<Vec<String>> {
    let parsed: Vec<(&str, ImageHash<Box<[u8]>>)> = hashes
        .into_iter()
        .filter_map(|(id, hash)| Some((id, ImageHash::from_base64(hash).ok()?)))
        .collect();
    // Union-find over the images' positions.
    let mut parent: Vec<usize> = (0..parsed.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for i in 0..parsed.len() {
        for j in i + 1..parsed.len() {
            let (a, b) = (&parsed[i].1, &parsed[j].1);
            if a.as_bytes().len() == b.as_bytes().len() && a.dist(b) <= max_distance {
                let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                parent[ri.max(rj)] = ri.min(rj);
            }
        }
    }
    let mut sets: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    for (i, (id, _)) in parsed.iter().enumerate() {
        let r = root(&mut parent, i);
        sets.entry(r).or_default().push((*id).to_owned());
    }
    let mut sets: Vec<Vec<String>> = sets
        .into_values()
        .filter(|set| set.len() > 1)
        .map(|mut set| {
            set.sort();
            set
        })
        .collect();
    sets.sort();
    sets
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn pattern(seed: u32) -> RgbImage {
        RgbImage::from_fn(300, 200, |x, y| {
            let v = ((x * seed / 7 + y * (seed + 3) / 5) % 256) as u8;
            Rgb([v, v / 2, 255 - v])
        })
    }

    #[test]
    fn sets_link_transitively_and_ignore_unreadable_hashes() {
        let a = perceptual_hash(&pattern(1)).unwrap();
        let b = perceptual_hash(&pattern(9)).unwrap();
        assert_eq!(hamming_distance(&a, &a), Some(0));
        assert_eq!(hamming_distance(&a, "not a hash!"), None);
        let far = hamming_distance(&a, &b).unwrap();
        assert!(far > 0);
        let items = [
            ("x", a.as_str()),
            ("y", b.as_str()),
            ("z", a.as_str()),
            ("w", "??"),
        ];
        assert_eq!(
            duplicate_sets(items, 0),
            [vec!["x".to_owned(), "z".to_owned()]]
        );
        let all = duplicate_sets(items, far);
        assert_eq!(all, [vec!["x".to_owned(), "y".to_owned(), "z".to_owned()]]);
    }
}
