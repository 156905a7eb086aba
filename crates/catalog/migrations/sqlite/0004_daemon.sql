-- The process that started a run: a run left `running` by a process that is
-- gone was cut off (crash, SIGKILL, power loss) and is marked interrupted.
ALTER TABLE runs ADD COLUMN pid INTEGER;
-- One backup of a job at a time across processes (daemon and one-shot CLI).
CREATE TABLE job_locks (
    job          TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    acquired_at  TEXT NOT NULL
);
