-- Event bodies once per event, and an index for a group's recent failures.
-- An event has one body whichever endpoints it goes to (one sequence number, one
-- `webhook-id` per endpoint): kept once per event, not once per delivery. A 10,000-image
-- group with 21 endpoints stores 10,000 bodies, not 210,000.
CREATE TABLE event_bodies (
    group_uid text NOT NULL REFERENCES groups (uid) ON DELETE CASCADE,
    sequence  bigint NOT NULL,
    payload   jsonb NOT NULL,
    PRIMARY KEY (group_uid, sequence)
);
INSERT INTO event_bodies (group_uid, sequence, payload)
    SELECT DISTINCT ON (d.group_uid, d.sequence) d.group_uid, d.sequence, b.payload
    FROM delivery_bodies b JOIN deliveries d ON d.id = b.delivery_id
    ORDER BY d.group_uid, d.sequence, d.created_at;
DROP TABLE delivery_bodies;

-- A group's last deliveries that failed for good (its status lists ten), without reading
-- the group's other deliveries.
CREATE INDEX deliveries_failed_by_group ON deliveries (group_uid, sequence DESC)
    WHERE state = 'Failed';
