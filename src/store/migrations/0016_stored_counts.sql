-- How many of a group's images have a stored result, counted by each write of results under
-- the group's row lock. A write learns whether it stored the group's last image from it, where
-- it counted the group's results before: O(n) a write, O(n^2) a group (a 10,000-image group
-- written 4 images at a time read about 12 million index entries for it).
ALTER TABLE groups ADD COLUMN results_stored bigint NOT NULL DEFAULT 0;
UPDATE groups g SET results_stored = (SELECT count(*) FROM image_results r WHERE r.group_uid = g.uid);
