-- Similarity: each model's mean vector, kept up to date as vectors come and go, and the
-- indexes `track.lookup` uses to find a track by the identifiers a media server holds.

-- Sum and count of every stored vector of a model: the mean is sum / count. Maintained by the
-- statement triggers below, so every writer of `track_embeddings` (corald, `corald worker`
-- processes, and the cascades from deleted tracks and models) keeps it right without knowing
-- of it. `track.similar` subtracts the mean before comparing vectors.
CREATE TABLE model_centroids (
    model_id    BIGINT PRIMARY KEY REFERENCES models(id) ON DELETE CASCADE,
    sum         vector NOT NULL,
    count       BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Add (sign 1) or remove (sign -1) a set of vectors per model. Rows of models already
-- deleted (a model's cascade) are ignored.
CREATE FUNCTION coral_centroid_apply(sign INTEGER, model BIGINT, total vector, n BIGINT)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF sign > 0 THEN
        INSERT INTO model_centroids AS c (model_id, sum, count)
        SELECT model, total, n WHERE EXISTS (SELECT 1 FROM models WHERE id = model)
        ON CONFLICT (model_id) DO UPDATE
        SET sum = c.sum + EXCLUDED.sum, count = c.count + EXCLUDED.count, updated_at = now();
    ELSE
        UPDATE model_centroids
        SET sum = sum - total, count = count - n, updated_at = now()
        WHERE model_id = model;
    END IF;
END $$;

CREATE FUNCTION coral_centroid_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM coral_centroid_apply(1, model_id, sum(embedding), count(*))
    FROM new_rows GROUP BY model_id;
    RETURN NULL;
END $$;

CREATE FUNCTION coral_centroid_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM coral_centroid_apply(-1, model_id, sum(embedding), count(*))
    FROM old_rows GROUP BY model_id;
    RETURN NULL;
END $$;

CREATE FUNCTION coral_centroid_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM coral_centroid_apply(-1, model_id, sum(embedding), count(*))
    FROM old_rows GROUP BY model_id;
    PERFORM coral_centroid_apply(1, model_id, sum(embedding), count(*))
    FROM new_rows GROUP BY model_id;
    RETURN NULL;
END $$;

CREATE TRIGGER track_embeddings_centroid_insert AFTER INSERT ON track_embeddings
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION coral_centroid_inserted();
CREATE TRIGGER track_embeddings_centroid_delete AFTER DELETE ON track_embeddings
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION coral_centroid_deleted();
CREATE TRIGGER track_embeddings_centroid_update AFTER UPDATE ON track_embeddings
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION coral_centroid_updated();

-- The vectors already stored.
INSERT INTO model_centroids (model_id, sum, count)
SELECT model_id, sum(embedding), count(*) FROM track_embeddings GROUP BY model_id;

-- `track.lookup` by MusicBrainz recording id and by ISRC (compared without case and hyphens).
CREATE INDEX tracks_recording_mbid_idx ON tracks (lower(musicbrainz_recording_id))
    WHERE musicbrainz_recording_id IS NOT NULL;
CREATE INDEX tracks_isrc_idx ON tracks (upper(replace(isrc, '-', '')))
    WHERE isrc IS NOT NULL;
