-- The catalog of a fleet: several backstop processes sharing one PostgreSQL
-- database. Timestamps of runs are RFC 3339 text in UTC (as in a SQLite
-- catalog, so the queries both share read them the same way; they sort as
-- text); leases and heartbeats are timestamptz from the database's clock,
-- the one clock every node agrees on.

-- Every process that claims runs: a daemon, a `run-due --once` invocation or
-- a one-shot command. Its id is random per process start.
CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    hostname      TEXT NOT NULL,
    pid           BIGINT NOT NULL,
    version       TEXT NOT NULL,
    config_hash   TEXT NOT NULL,
    mode          TEXT NOT NULL,               -- daemon | run-due | cli
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until   TIMESTAMPTZ NOT NULL
);

-- One row per scheduled tick (job, kind, scheduled_for) or on-demand run.
CREATE TABLE runs (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job           TEXT NOT NULL,
    kind          TEXT NOT NULL,               -- backup | verify | prune
    scheduled_for TEXT,                        -- the tick; NULL when asked for on demand
    backup_id     TEXT,
    started_at    TEXT NOT NULL,               -- the tick until claimed, then the claim
    finished_at   TEXT,
    -- pending | running | success | suspect | failed | interrupted | skipped
    outcome       TEXT NOT NULL,
    error         TEXT,
    dump_bytes    BIGINT,
    stored_bytes  BIGINT,
    level         TEXT,
    store         TEXT,
    pid           BIGINT,
    node          TEXT,                        -- the holder while running
    attempt       INTEGER NOT NULL DEFAULT 0,  -- attempts started so far (0: a record, never claimed)
    max_attempts  INTEGER NOT NULL DEFAULT 1,  -- the job's retries + 1, for failed attempts
    interruptions INTEGER NOT NULL DEFAULT 0,  -- attempts cut off by a dead or stale node
    not_before    TIMESTAMPTZ NOT NULL DEFAULT now(),  -- a retry's backoff
    -- Each tick is one row, whichever node inserts it first.
    CONSTRAINT runs_one_per_tick UNIQUE (job, kind, scheduled_for)
);
-- At most one running run per job and kind, across the fleet.
-- (Records a run keeps of its own work, such as each store a verify checked,
-- have attempt 0 and are not claims.)
CREATE UNIQUE INDEX runs_one_running ON runs (job, kind) WHERE outcome = 'running' AND attempt > 0;
CREATE INDEX runs_pending ON runs (job, kind, id) WHERE outcome = 'pending';
CREATE INDEX runs_job_started ON runs (job, started_at);
CREATE INDEX runs_verify ON runs (job, kind, backup_id);
CREATE INDEX runs_node ON runs (node) WHERE outcome = 'running';

-- Each attempt of a run: which node ran it and how it ended.
CREATE TABLE attempts (
    run           BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    attempt       INTEGER NOT NULL,
    node          TEXT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at   TIMESTAMPTZ,
    outcome       TEXT NOT NULL,               -- running | success | … | interrupted
    error         TEXT,
    PRIMARY KEY (run, attempt)
);

-- Multipart uploads in flight (see the SQLite catalog's 0002).
CREATE TABLE multipart_uploads (
    store       TEXT NOT NULL,
    key         TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    PRIMARY KEY (store, upload_id)
);
