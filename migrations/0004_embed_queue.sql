-- The embedding queue: the tracks each scan (or start-up sweep) wants embedded, under its
-- request id, from the end of its indexing to its end. Consumers (corald's own pipeline, and
-- `corald worker` processes on other machines) claim queued rows with FOR UPDATE SKIP LOCKED and
-- a lease; a consumer that dies leaves its leases to expire, and another one takes the rows
-- over. A row settles as unchanged (already embedded from the same file), done, skipped or
-- failed; the scan's counts are the counts of its rows, and its rows are deleted when it ends.
CREATE TABLE embed_queue (
    request_id      UUID NOT NULL,
    -- no foreign key: a track deleted while queued is settled as skipped by its consumer
    track_id        BIGINT NOT NULL,
    model_id        BIGINT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    -- lower first: the number of tracks the request queued, so a watcher scan's few tracks
    -- pass a big backlog
    priority        BIGINT NOT NULL,
    state           TEXT NOT NULL
                    CHECK (state IN ('queued', 'unchanged', 'done', 'skipped', 'failed')),
    -- the track's file when it was queued: a consumer embeds only that file
    file_size       BIGINT NOT NULL,
    file_mtime_ns   BIGINT NOT NULL,
    leased_by       TEXT,
    lease_until     TIMESTAMPTZ,
    enqueued_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, track_id)
);
CREATE INDEX embed_queue_ready_idx ON embed_queue (model_id, priority, enqueued_at)
    WHERE state = 'queued';

-- The consumers: each reports itself while it runs, for `coralctl status`.
CREATE TABLE embed_workers (
    id              TEXT PRIMARY KEY,
    host            TEXT NOT NULL,
    device          TEXT NOT NULL,
    model_id        BIGINT REFERENCES models(id) ON DELETE CASCADE,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    tracks_done     BIGINT NOT NULL DEFAULT 0,
    tracks_per_second DOUBLE PRECISION NOT NULL DEFAULT 0
);
