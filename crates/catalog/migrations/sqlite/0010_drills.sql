-- A job's latest successful drill (status, the metrics) from a small
-- index of its own, not a walk over every verification (see the
-- PostgreSQL catalog's migration 7).
CREATE INDEX runs_drills ON runs (job, id) WHERE kind = 'verify' AND level = 'drill' AND outcome = 'success';
