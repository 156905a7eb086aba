-- The catalog keeps daemon.catalog_history of runs (default 90 days) and
-- answers status from indexes, however long the history (see the
-- PostgreSQL catalog's migration 6).
CREATE INDEX runs_job_id ON runs (job, id);
CREATE INDEX runs_job_kind_outcome ON runs (job, kind, outcome, id);
CREATE INDEX runs_started ON runs (started_at);
