-- Workers that stay up: a worker Job's pod that has done its own order waits a few seconds for
-- another of its namespace and shape (`waiting_carriers`); the controller hands it the order of
-- a group it admits (`work_orders.carrier`) instead of starting a pod for it, so the group pays
-- no pod start. The carrier marks the order done; a Job whose pod dies carrying one takes it up
-- again in its next pod, and a carrier Job that ends or goes has its orders taken back by the
-- controller, whose own Jobs then run them.
ALTER TABLE work_orders ADD COLUMN carrier text;
ALTER TABLE work_orders ADD COLUMN carried_at timestamptz;
ALTER TABLE work_orders ADD COLUMN carrier_done_at timestamptz;
CREATE INDEX work_orders_by_carrier ON work_orders (namespace, carrier)
    WHERE carrier IS NOT NULL AND carrier_done_at IS NULL;
CREATE TABLE waiting_carriers (
    namespace text NOT NULL,
    job       text NOT NULL,
    shape     text NOT NULL,
    since     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, job)
);
CREATE INDEX waiting_carriers_by_shape ON waiting_carriers (namespace, shape, since);
