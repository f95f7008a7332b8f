-- An event's body is fixed when the event happens: every attempt, retry and replay sends
-- the same bytes under the same webhook-id. (NULL for deliveries recorded before this.)
ALTER TABLE deliveries ADD COLUMN payload jsonb;
