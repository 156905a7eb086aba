-- Standbys whose WAL replay a backup paused (job.standby = "pause"). The
-- row lives while the pause does; one left behind (the process died during
-- the dump) is resumed at the next start, so replay is never left paused.
CREATE TABLE replay_pauses (
    job        TEXT PRIMARY KEY,
    paused_at  TEXT NOT NULL
);
