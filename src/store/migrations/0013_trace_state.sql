-- The client's `tracestate` (W3C Trace Context), kept beside the traceparent of the group
-- and of each event (the ImageGroup's `kinsight.io/tracestate`): webhooks send it on with
-- their `traceparent`, as the spec asks of a participant that does not add its own entry.
ALTER TABLE groups ADD COLUMN tracestate text;
ALTER TABLE event_bodies ADD COLUMN tracestate text;
