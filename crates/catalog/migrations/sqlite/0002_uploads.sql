-- Multipart uploads in flight, so that one left behind by a crash (or by a
-- store that was down when the abort was sent) is aborted by the next run,
-- even on stores that cannot list pending uploads.
CREATE TABLE multipart_uploads (
    store       TEXT NOT NULL,
    key         TEXT NOT NULL,
    upload_id   TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    PRIMARY KEY (store, upload_id)
);
