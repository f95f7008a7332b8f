-- Each image's perceptual hash (base64 of image_hasher's 64-bit DCT hash), for the group's
-- near-duplicate sets.
ALTER TABLE image_results ADD COLUMN perceptual_hash text;
