-- Images a tenant posted that have no stored result yet, per group the REST API created: what
-- the API counts against a tenant's in-flight cap. A row is made (under a per-namespace lock)
-- before the ImageGroup, its uid set once the group exists, its count lowered as results are
-- first stored, and the row deleted at 0 or when the group goes away. A row still without a uid
-- after a minute is a create that failed midway: not counted.
CREATE TABLE admissions (
    namespace   text NOT NULL,
    name        text NOT NULL,
    uid         text,
    images_open integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);
-- The count of a tenant reads only its open groups, however many finished groups it has.
CREATE INDEX admissions_open ON admissions (namespace) WHERE images_open > 0;
CREATE UNIQUE INDEX admissions_by_uid ON admissions (uid);
