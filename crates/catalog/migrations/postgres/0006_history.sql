-- The catalog keeps daemon.catalog_history of runs (default 90 days) and
-- answers status from indexes, however long the history.
-- Job names compare byte by byte, as in a SQLite catalog: a cluster job's
-- series (`job/segment`) are then one range of an index, whatever the
-- database's collation.
ALTER TABLE runs ALTER COLUMN job SET DATA TYPE TEXT COLLATE "C";
-- A job's newest runs (status, the run window).
CREATE INDEX runs_job_id ON runs (job, id);
-- A job's newest run of a kind and outcome (last success, last failure,
-- last drill), and the history pass's "is there a newer one".
CREATE INDEX runs_job_kind_outcome ON runs (job, kind, outcome, id);
-- The history pass walks the oldest runs first.
CREATE INDEX runs_started ON runs (started_at);
