-- The work order of each worker Job (its group, generation, models and image URLs): the Job's
-- pod fetches it from the API's internal end with its ServiceAccount token when it starts.
-- Before, each was a ConfigMap of the Job's name, made and then handed to the Job: two API
-- server writes per Job, up to 768 KiB each into etcd, and a watch of it by the kubelet.
-- A row goes when its Job is deleted, and with its group.
CREATE TABLE work_orders (
    namespace  text NOT NULL,
    name       text NOT NULL,
    group_uid  text NOT NULL,
    generation bigint NOT NULL,
    body       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);
CREATE INDEX work_orders_by_group ON work_orders (group_uid);
