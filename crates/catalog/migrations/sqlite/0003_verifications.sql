-- What a verify run checked: its level (checksum | decrypt | restore) and the
-- store it read from. A verification never changes a backup; `list` shows the
-- latest one of each backup from here.
ALTER TABLE runs ADD COLUMN level TEXT;
ALTER TABLE runs ADD COLUMN store TEXT;
CREATE INDEX runs_verify ON runs (job, kind, backup_id);
