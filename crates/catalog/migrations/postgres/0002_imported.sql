-- Runs rebuilt from the stores' manifests and verification records
-- (`backstop catalog rebuild`, or a node on an empty catalog) rather than
-- recorded as they ran.
ALTER TABLE runs ADD COLUMN imported BOOLEAN NOT NULL DEFAULT false;
