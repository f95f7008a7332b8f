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
    // Equal hashes are linked at once, so only distinct ones are compared pairwise: every
    // reconcile of a running group builds its listing.
    let mut distinct: std::collections::HashMap<Box<[u64]>, usize> = Default::default();
    let mut ids: Vec<&str> = Vec::new();
    let mut of_image: Vec<usize> = Vec::new();
    for (id, hash) in hashes {
        let Ok(parsed) = ImageHash::<Box<[u8]>>::from_base64(hash) else {
            continue;
        };
        let next = distinct.len();
        let at = *distinct.entry(words(parsed.as_bytes())).or_insert(next);
        ids.push(id);
        of_image.push(at);
    }
    let mut keys: Vec<(&[u64], usize)> = distinct.iter().map(|(k, &i)| (&**k, i)).collect();
    keys.sort_unstable_by_key(|&(_, i)| i);
    // Union-find over the distinct hashes.
    let mut parent: Vec<usize> = (0..keys.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            let (a, b) = (keys[i].0, keys[j].0);
            if a.len() == b.len() && distance(a, b) <= max_distance {
                let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                parent[ri.max(rj)] = ri.min(rj);
            }
        }
    }
    let mut sets: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    for (id, &hash) in ids.iter().zip(&of_image) {
        let r = root(&mut parent, hash);
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

/// A hash's bytes as 64-bit words (the last padded with zeros), its length in the first
/// word so that hashes of other sizes never compare equal.
fn words(bytes: &[u8]) -> Box<[u64]> {
    std::iter::once(bytes.len() as u64)
        .chain(bytes.chunks(8).map(|chunk| {
            let mut word = [0_u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(word)
        }))
        .collect()
}

/// Bits that differ between two hashes of the same size (their lengths, the first words,
/// are equal).
fn distance(a: &[u64], b: &[u64]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
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

    #[test]
    fn duplicate_sets_link_what_pairwise_distances_link() {
        // Pseudo-random 64-bit hashes, some repeated, some a few bits apart: the sets are
        // those a plain comparison of every pair with image_hasher's own distance gives.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut hashes = Vec::new();
        for i in 0..300_u64 {
            let base = next();
            let bits = match i % 3 {
                0 => base,
                1 => base & 0xFFFF_FFFF_FFFF_0000,
                _ => 0x00FF_00FF_00FF_00FF ^ (1 << (i % 64)),
            };
            let hash = ImageHash::<Box<[u8]>>::from_bytes(&bits.to_le_bytes()).unwrap();
            hashes.push((format!("img-{i:03}"), hash.to_base64()));
        }
        for max_distance in [0, 3, 12] {
            let items = hashes.iter().map(|(id, h)| (id.as_str(), h.as_str()));
            let fast = duplicate_sets(items, max_distance);
            // The reference: union of every pair within the distance, by image position.
            let parsed: Vec<_> = hashes
                .iter()
                .map(|(_, h)| ImageHash::<Box<[u8]>>::from_base64(h).unwrap())
                .collect();
            let mut group: Vec<usize> = (0..parsed.len()).collect();
            for i in 0..parsed.len() {
                for j in i + 1..parsed.len() {
                    if parsed[i].dist(&parsed[j]) <= max_distance {
                        let (gi, gj) = (group[i], group[j]);
                        for g in group.iter_mut().filter(|g| **g == gj) {
                            *g = gi;
                        }
                    }
                }
            }
            let mut by_group: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
            for (i, g) in group.iter().enumerate() {
                by_group.entry(*g).or_default().push(hashes[i].0.clone());
            }
            let mut reference: Vec<Vec<String>> =
                by_group.into_values().filter(|s| s.len() > 1).collect();
            reference.iter_mut().for_each(|s| s.sort());
            reference.sort();
            assert_eq!(fast, reference, "max distance {max_distance}");
            assert!(
                !fast.is_empty(),
                "the test makes duplicates at {max_distance}"
            );
        }
    }
}
