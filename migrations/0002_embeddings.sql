-- Embeddings: the models corald has used, and one vector per (track, model). The HNSW index of
-- each model (cosine, on `embedding::vector(dim)`, partial on its model_id) is created by corald
-- when it registers the model, since the id is only known then.

CREATE TABLE models (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT NOT NULL,
    -- the manifest's version: stored vectors of another version are recomputed
    version         TEXT NOT NULL,
    -- how windows are chosen (count, length): part of what a vector means
    params          TEXT NOT NULL,
    dim             INTEGER NOT NULL CHECK (dim BETWEEN 1 AND 2000),
    sample_rate     INTEGER NOT NULL,
    window_samples  INTEGER NOT NULL,
    sha256          TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (name, version, params)
);

-- One vector per track and model. file_size/file_mtime_ns are the track's file as embedded:
-- when `tracks` says otherwise the file changed and the vector is recomputed (and replaced).
CREATE TABLE track_embeddings (
    track_id        BIGINT NOT NULL REFERENCES tracks(id) ON DELETE CASCADE,
    model_id        BIGINT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    embedding       vector NOT NULL,
    file_size       BIGINT NOT NULL,
    file_mtime_ns   BIGINT NOT NULL,
    windows         INTEGER NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (track_id, model_id)
);
CREATE INDEX track_embeddings_model_idx ON track_embeddings (model_id, track_id);

-- Tracks that could not be embedded for a model (damaged audio, no decoder), so an unchanged
-- file is not decoded again on every scan. Replaced when the file changes and is retried.
CREATE TABLE track_embedding_issues (
    track_id        BIGINT NOT NULL REFERENCES tracks(id) ON DELETE CASCADE,
    model_id        BIGINT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    file_size       BIGINT NOT NULL,
    file_mtime_ns   BIGINT NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('skipped', 'failed')),
    reason          TEXT NOT NULL,
    request_id      UUID,
    occurred_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (track_id, model_id)
);
