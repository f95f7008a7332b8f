-- Groups the store holds rows for: retention deletes by group, and a group that left the
-- cluster is found here even when nothing else remembers it.
CREATE TABLE groups (
    uid         text PRIMARY KEY,
    namespace   text NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Set when the ImageGroup is gone: its rows are then deleted in batches.
    deleted_at  timestamptz
);
CREATE INDEX groups_by_name ON groups (namespace, name);
CREATE INDEX groups_deleted ON groups (deleted_at) WHERE deleted_at IS NOT NULL;

-- One row per image of a group: the outputs of every model run on it so far (a group that
-- gains models later adds outputs next to the old ones), or why the image failed.
CREATE TABLE image_results (
    group_uid   text NOT NULL REFERENCES groups (uid) ON DELETE CASCADE,
    image_id    text NOT NULL,
    -- The generation of the Job that wrote it last (writes are idempotent per image and
    -- generation: the same batch sent twice leaves the same row).
    generation  bigint NOT NULL,
    failure     jsonb,
    width       integer,
    height      integer,
    outputs     jsonb NOT NULL DEFAULT '{}'::jsonb,
    timings     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_uid, image_id)
);
