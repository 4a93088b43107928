-- Which model answers similarity for each library across a model change. A row says the
-- library was complete under the model at `complete_at`: every track within the duration
-- limits had a vector or a recorded issue of it, or a request that covered every track lacking
-- a vector of it (its re-embed job, its first scan, the start-up sweep) had completed. `track.similar`, `track.path`, `track.mix`
-- and `track.lookup`'s `has_embedding` use the library's newest complete model (the active
-- model when the library has no row yet), so a new model's partial vectors never answer while
-- the library's previous ones still can. When the library becomes complete under the active
-- model, its row for that model is written and, in the same transaction, its tracks' vectors
-- and issues of every other model and its other rows are deleted (`embed/serving.rs`).
CREATE TABLE library_models (
    library_id  BIGINT NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    model_id    BIGINT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    complete_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (library_id, model_id)
);
CREATE INDEX library_models_model_idx ON library_models (model_id);

-- A database from a release without this table: per library, the model of its newest vector
-- (the model that release answered with) serves it. The next completion check retires the rest.
INSERT INTO library_models (library_id, model_id, complete_at)
SELECT DISTINCT ON (t.library_id) t.library_id, e.model_id, max(e.created_at)
FROM track_embeddings e JOIN tracks t ON t.id = e.track_id
GROUP BY t.library_id, e.model_id
ORDER BY t.library_id, max(e.created_at) DESC, e.model_id DESC;
