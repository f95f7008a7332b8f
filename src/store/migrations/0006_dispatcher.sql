-- Deliveries are claimed by dispatchers (any controller replica, FOR UPDATE SKIP LOCKED): a
-- claimed delivery is 'Sending', held by `lease_owner` until `next_attempt_at`, when it is
-- due again should its dispatcher have died. A pending one is due at `next_attempt_at`.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
    CHECK (state IN ('Pending', 'Sending', 'Delivered', 'Failed'));
ALTER TABLE deliveries ADD COLUMN lease_owner text;
UPDATE deliveries SET next_attempt_at = created_at
    WHERE state = 'Pending' AND next_attempt_at IS NULL;
CREATE INDEX deliveries_due ON deliveries (next_attempt_at)
    WHERE state IN ('Pending', 'Sending');
-- "Has this endpoint of the group anything left to send?" (its group event waits for that).
CREATE INDEX deliveries_open_by_endpoint ON deliveries (group_uid, endpoint)
    WHERE state IN ('Pending', 'Sending');

-- An event's body is written once and read once per attempt: in a table of its own, the
-- claims and outcomes that rewrite a delivery's row (twice per attempt) copy a small row.
CREATE TABLE delivery_bodies (
    delivery_id text PRIMARY KEY REFERENCES deliveries (id) ON DELETE CASCADE,
    payload     jsonb NOT NULL
);
INSERT INTO delivery_bodies (delivery_id, payload)
    SELECT id, payload FROM deliveries WHERE payload IS NOT NULL;
ALTER TABLE deliveries DROP COLUMN payload;

-- Where a group's events go, as its last reconcile saw them (URLs, signing secrets, retry
-- schedules), so that any replica's dispatcher can send them; the version tells a
-- dispatcher's cache that they changed. Endpoints that answered 410 Gone, by "<key> <url>".
ALTER TABLE groups
    ADD COLUMN endpoints jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN endpoints_version bigint NOT NULL DEFAULT 0,
    ADD COLUMN stopped_endpoints text[] NOT NULL DEFAULT '{}';
