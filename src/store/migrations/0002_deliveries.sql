-- One row per webhook event and endpoint: its `webhook-id` and where its delivery stands.
CREATE TABLE deliveries (
    id               text PRIMARY KEY,
    group_uid        text NOT NULL REFERENCES groups (uid) ON DELETE CASCADE,
    event            text NOT NULL,
    image_id         text,
    endpoint         text NOT NULL,
    sequence         bigint NOT NULL,
    created_at       timestamptz NOT NULL,
    state            text NOT NULL CHECK (state IN ('Pending', 'Delivered', 'Failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_error       text,
    delivered_at     timestamptz
);
CREATE INDEX deliveries_by_group ON deliveries (group_uid, sequence);
-- "What failed since T" across a namespace's groups, newest first.
CREATE INDEX deliveries_failed ON deliveries (created_at) WHERE state = 'Failed';

-- One row per attempt, kept with its delivery: when, the answer, how long it took.
CREATE TABLE delivery_attempts (
    delivery_id  text NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL,
    status_code  integer,
    duration_ms  double precision NOT NULL,
    outcome      text NOT NULL,
    error        text
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, attempted_at);
