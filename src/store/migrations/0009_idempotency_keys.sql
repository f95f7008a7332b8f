-- The REST API's Idempotency-Key: one row per tenant namespace and key. A row whose status is
-- NULL is claimed by a request still running (until claimed_until, after which a retry of the
-- same request may take it over); otherwise it holds the answer replayed to every retry.
-- Rows are kept 24 h from created_at, then deleted in batches by the controller's retention.
CREATE TABLE idempotency_keys (
    namespace text NOT NULL,
    key text NOT NULL,
    -- SHA-256 (hex) of the method, path and body of the request that claimed the key.
    request_hash text NOT NULL,
    -- Who holds the claim: the answer is recorded, or the key released, only by it.
    claim text NOT NULL,
    claimed_until timestamptz NOT NULL,
    status smallint,
    response_headers jsonb,
    response_body bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
