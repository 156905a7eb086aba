-- Two rebuilds at once (two nodes starting on an empty catalog) could both
-- find a backup missing and both import it: one imported row per backup,
-- and per verification record, enforced. Duplicates already made are
-- removed first (the oldest row of each stays).
DELETE FROM runs WHERE imported AND kind = 'backup' AND id NOT IN (
    SELECT min(id) FROM runs WHERE imported AND kind = 'backup' GROUP BY job, backup_id);
DELETE FROM runs WHERE imported AND kind = 'verify' AND id NOT IN (
    SELECT min(id) FROM runs WHERE imported AND kind = 'verify'
    GROUP BY job, backup_id, level, store, finished_at);
CREATE UNIQUE INDEX runs_imported_backup ON runs (job, backup_id)
    WHERE imported AND kind = 'backup';
CREATE UNIQUE INDEX runs_imported_verify ON runs (job, backup_id, level, store, finished_at)
    WHERE imported AND kind = 'verify';
