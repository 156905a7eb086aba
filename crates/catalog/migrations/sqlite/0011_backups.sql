-- What status shows of a job's backup runs, in one index: its newest runs
-- are then a page or two of this index, read without touching the table
-- (see the PostgreSQL catalog's migration 8).
CREATE INDEX runs_backups ON runs (job, id, outcome, started_at, finished_at, dump_bytes, stored_bytes, backup_id)
    WHERE kind = 'backup';
