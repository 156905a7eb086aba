-- What status shows of a job's backup runs, in one index: its newest runs
-- are then a page or two of this index (an index-only scan), not a table
-- row each, which on a catalog larger than memory is a read from disk each.
CREATE INDEX runs_backups ON runs (job, id)
    INCLUDE (outcome, started_at, finished_at, dump_bytes, stored_bytes, backup_id)
    WHERE kind = 'backup';
