-- A group's event sequence numbers are handed out here, under the group's row lock, by
-- whoever records events: the result ingest (a batch's image events, in the transaction
-- that stores its results) and the controller's plan (which checks that nobody handed out
-- numbers since it read). One event never gets two numbers, two events never one.
ALTER TABLE groups ADD COLUMN last_sequence bigint NOT NULL DEFAULT 0;
UPDATE groups g SET last_sequence = s.last
    FROM (SELECT group_uid, max(sequence) AS last FROM deliveries GROUP BY group_uid) s
    WHERE s.group_uid = g.uid;
