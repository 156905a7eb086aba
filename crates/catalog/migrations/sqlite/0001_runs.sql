-- Every backup, verify or prune attempt, whatever its outcome.
CREATE TABLE runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job           TEXT    NOT NULL,
    kind          TEXT    NOT NULL,            -- backup | verify | prune
    backup_id     TEXT,
    started_at    TEXT    NOT NULL,            -- RFC 3339, UTC
    finished_at   TEXT,
    outcome       TEXT    NOT NULL,            -- running | success | failed | interrupted
    error         TEXT,
    dump_bytes    INTEGER,
    stored_bytes  INTEGER
);
CREATE INDEX runs_job_started ON runs (job, started_at);
