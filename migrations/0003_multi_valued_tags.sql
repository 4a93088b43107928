-- Multi-valued tags as lists (artist, album_artist, genre stay as display strings), the
-- composer, and the identifiers media servers map tracks by.
ALTER TABLE tracks
    ADD COLUMN artists                  TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN album_artists            TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN genres                   TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN composer                 TEXT,
    ADD COLUMN composers                TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN musicbrainz_recording_id TEXT,
    ADD COLUMN musicbrainz_track_id     TEXT,
    ADD COLUMN musicbrainz_release_id   TEXT,
    ADD COLUMN musicbrainz_artist_ids   TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN isrc                     TEXT;

-- Rows written before this migration hold their tags as display strings only, and files that
-- failed before may be readable now (more formats, damaged tags tolerated): the next scan
-- reads them all again, so their recorded modification time is made to look changed.
UPDATE tracks SET mtime_ns = -1;
UPDATE scan_errors SET mtime_ns = -1;
