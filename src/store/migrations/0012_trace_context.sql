-- The trace context of a group (its ImageGroup's `kinsight.io/traceparent`, as its last
-- reconcile saw it), and of each event, copied from the group's when the event is recorded:
-- every attempt, retry and replay of an event sends a `traceparent` of that trace.
ALTER TABLE groups ADD COLUMN traceparent text;
ALTER TABLE event_bodies ADD COLUMN traceparent text;
