-- Runs rebuilt from the stores' manifests and verification records
-- (`backstop catalog rebuild`, or the daemon on an empty catalog) rather
-- than recorded as they ran.
ALTER TABLE runs ADD COLUMN imported INTEGER NOT NULL DEFAULT 0;
