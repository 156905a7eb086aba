-- A standby's WAL replay is paused once per server, for every backup that
-- dumps from it (standby = "pause"): jobs, a cluster job's databases and,
-- on a shared catalog, the nodes of a fleet. Changes to both tables are
-- made under an advisory lock on the standby itself, so a backup ending
-- never resumes replay under another that is still dumping.

-- The pause of one server (host:port as the jobs' URLs name it).
-- `paused_by` is 'backstop' when backstop paused it (and resumes it when
-- the last hold goes), 'someone else' when replay was already paused
-- (backstop never lifts a pause it did not make). A row with no live hold
-- is an orphan: the next backup of that server, or the daemon, resumes it.
CREATE TABLE replay_servers (
    server     TEXT PRIMARY KEY,
    paused_by  TEXT NOT NULL,
    job        TEXT NOT NULL,   -- a job that dumps from it (whose URL resumes it)
    paused_at  TEXT NOT NULL
);

-- One row per backup dumping under the pause. Alive while its process is
-- (same host: its pid; a fleet node: its lease) and it has not ended.
CREATE TABLE replay_holds (
    id         TEXT PRIMARY KEY,
    server     TEXT NOT NULL,
    job        TEXT NOT NULL,   -- the job, or "job/database" of a cluster job
    host       TEXT NOT NULL,
    pid        BIGINT NOT NULL,
    node       TEXT,            -- the fleet node holding the run, if any
    since      TEXT NOT NULL
);
CREATE INDEX replay_holds_server ON replay_holds (server);
