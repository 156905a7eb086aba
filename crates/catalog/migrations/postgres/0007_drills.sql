-- A job's latest successful drill (status, the metrics) from a small
-- index of its own: the (job, kind, outcome, id) index leaves the level
-- to each row, so a job that verifies daily but never drills walked
-- every verification it had.
CREATE INDEX runs_drills ON runs (job, id) WHERE kind = 'verify' AND level = 'drill' AND outcome = 'success';
