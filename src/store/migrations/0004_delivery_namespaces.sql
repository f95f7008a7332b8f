-- "What was not delivered in this namespace" reads a range of one index instead of every
-- failed delivery of every tenant: deliveries carry their group's namespace.
ALTER TABLE deliveries ADD COLUMN namespace text;
UPDATE deliveries d SET namespace = g.namespace FROM groups g WHERE g.uid = d.group_uid;
ALTER TABLE deliveries ALTER COLUMN namespace SET NOT NULL;
DROP INDEX deliveries_failed;
CREATE INDEX deliveries_undelivered ON deliveries (namespace, created_at, id)
    WHERE state <> 'Delivered';
