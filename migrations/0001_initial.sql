-- Coral indexer schema: libraries, tracks, per-file scan errors, and the persisted state of
-- every scan (the ScanReporter's counters), so progress survives a restart.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE libraries (
    id          BIGSERIAL PRIMARY KEY,
    path        TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- rel_path holds the raw bytes of the path below the library root (file names need not be
-- UTF-8); rel_path_text is its lossy UTF-8 rendering for people.
CREATE TABLE tracks (
    id              BIGSERIAL PRIMARY KEY,
    library_id      BIGINT NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    rel_path        BYTEA NOT NULL,
    rel_path_text   TEXT NOT NULL,
    size            BIGINT NOT NULL,
    mtime_ns        BIGINT NOT NULL,
    format          TEXT NOT NULL,
    codec           TEXT,
    duration_ms     BIGINT NOT NULL,
    sample_rate     INTEGER,
    channels        INTEGER,
    bit_depth       INTEGER,
    bitrate_kbps    INTEGER,
    title           TEXT,
    artist          TEXT,
    album           TEXT,
    album_artist    TEXT,
    track_number    INTEGER,
    disc_number     INTEGER,
    year            INTEGER,
    genre           TEXT,
    -- accent- and case-folded words of the searchable tags, computed by corald
    search_text     TEXT NOT NULL DEFAULT '',
    search          TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple', search_text)) STORED,
    indexed_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the scan that last wrote this row: lets a resumed scan count its own earlier work
    last_scan_id    UUID,
    UNIQUE (library_id, rel_path)
);
CREATE INDEX tracks_search_idx ON tracks USING gin (search);

-- Files that could not be indexed, with the reason; one row per file, replaced on each try.
CREATE TABLE scan_errors (
    id              BIGSERIAL PRIMARY KEY,
    library_id      BIGINT NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    rel_path        BYTEA NOT NULL,
    rel_path_text   TEXT NOT NULL,
    size            BIGINT NOT NULL,
    mtime_ns        BIGINT NOT NULL,
    stage           TEXT NOT NULL,
    message         TEXT NOT NULL,
    request_id      UUID,
    occurred_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (library_id, rel_path)
);

-- The persisted ScanReporter state of every scan, active and finished.
CREATE TABLE scans (
    request_id          UUID PRIMARY KEY,
    library_id          BIGINT NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    subdir              TEXT,
    trigger             TEXT NOT NULL,
    mode                TEXT NOT NULL,
    phase               TEXT NOT NULL,
    started_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    finished_at         TIMESTAMPTZ,
    files_discovered    BIGINT NOT NULL DEFAULT 0,
    tracks_expected     BIGINT,
    tracks_indexed      BIGINT NOT NULL DEFAULT 0,
    tracks_unchanged    BIGINT NOT NULL DEFAULT 0,
    tracks_removed      BIGINT NOT NULL DEFAULT 0,
    tracks_failed       BIGINT NOT NULL DEFAULT 0,
    embeddings_expected BIGINT,
    embeddings_done     BIGINT NOT NULL DEFAULT 0,
    embeddings_skipped  BIGINT NOT NULL DEFAULT 0,
    embeddings_failed   BIGINT NOT NULL DEFAULT 0,
    resumed             BOOLEAN NOT NULL DEFAULT false,
    error               TEXT
);
CREATE INDEX scans_active_idx ON scans (started_at) WHERE finished_at IS NULL;
CREATE INDEX scans_library_idx ON scans (library_id, started_at DESC);
