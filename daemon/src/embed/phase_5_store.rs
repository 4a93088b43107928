//! Stage 5, store: embeddings into `track_embeddings` (pgvector), batched, one statement per
//! batch; the `models` registry with one HNSW cosine index per model (partial on its id, on
//! `embedding::vector(dim)` — pgvector's way to index vectors of several sizes in one column);
//! the issues table that stops damaged or undecodable files from being retried while unchanged;
//! the queries behind "what is missing" and a track's vector (similarity itself is
//! `crate::similarity`); and, after a model change, the deletes of a library's vectors of
//! other models and of models nobody uses (`super::serving` decides when).
//!
//! SQL that names a model id or a dimension is built with `format!` from our own integers (an
//! index predicate must be a constant for the planner to use a partial index).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use pgvector::Vector;
use sqlx::{AssertSqlSafe, FromRow, PgPool};
use uuid::Uuid;

use super::model::ModelManifest;

/// The model as registered in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisteredModel {
    pub id: i64,
    pub dim: usize,
}

/// Name of a model's HNSW index.
pub fn index_name(model_id: i64) -> String {
    format!("track_embeddings_hnsw_{model_id}")
}

/// Register (or find) the model and make sure its HNSW index exists. `params` describes the
/// window choice; together with name and version it says what a stored vector means.
pub async fn register_model(
    pool: &PgPool,
    m: &ModelManifest,
    params: &str,
) -> Result<RegisteredModel, sqlx::Error> {
    let dim = i32::try_from(m.embedding_dim).unwrap_or(i32::MAX);
    let (id, stored_dim): (i64, i32) = sqlx::query_as(
        "INSERT INTO models (name, version, params, dim, sample_rate, window_samples, sha256)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (name, version, params)
         DO UPDATE SET sha256 = EXCLUDED.sha256, last_used_at = now()
         RETURNING id, dim",
    )
    .bind(&m.name)
    .bind(&m.version)
    .bind(params)
    .bind(dim)
    .bind(i32::try_from(m.sample_rate).unwrap_or(i32::MAX))
    .bind(i32::try_from(m.window_samples).unwrap_or(i32::MAX))
    .bind(&m.sha256)
    .fetch_one(pool)
    .await?;
    if stored_dim != dim {
        return Err(sqlx::Error::Protocol(format!(
            "model {} version {} was registered with dimension {stored_dim}, the manifest now \
             says {dim}: bump the manifest's version",
            m.name, m.version
        )));
    }
    let sql = format!(
        "CREATE INDEX IF NOT EXISTS {} ON track_embeddings \
         USING hnsw ((embedding::vector({dim})) vector_cosine_ops) WHERE model_id = {id}",
        index_name(id)
    );
    sqlx::query(AssertSqlSafe(sql)).execute(pool).await?;
    Ok(RegisteredModel {
        id,
        dim: m.embedding_dim,
    })
}

/// The name of the model registered (or re-registered) last: the one the server embeds with.
pub async fn latest_model_name(pool: &PgPool) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM models ORDER BY last_used_at DESC, id DESC LIMIT 1")
        .fetch_optional(pool)
        .await
}

/// Embeddings stored for a model.
pub async fn count_embedded(pool: &PgPool, model_id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM track_embeddings WHERE model_id = $1")
        .bind(model_id)
        .fetch_one(pool)
        .await
}

/// What the database knows of a track about to be embedded.
#[derive(Debug, Clone, FromRow)]
pub struct TargetState {
    pub id: i64,
    pub size: i64,
    pub mtime_ns: i64,
    /// An embedding of the current file exists.
    pub embedded: bool,
    /// An embedding of an older version of the file exists.
    pub stale_embedding: bool,
    /// `skipped` or `failed`, recorded for the current file.
    pub issue_outcome: Option<String>,
    pub issue_reason: Option<String>,
}

/// The state of each of `ids` that is still in `tracks`.
pub async fn target_states(
    pool: &PgPool,
    model_id: i64,
    ids: &[i64],
) -> Result<Vec<TargetState>, sqlx::Error> {
    sqlx::query_as(
        "SELECT t.id, t.size, t.mtime_ns,
                COALESCE(e.file_size = t.size AND e.file_mtime_ns = t.mtime_ns, false) AS embedded,
                COALESCE(NOT (e.file_size = t.size AND e.file_mtime_ns = t.mtime_ns), false)
                    AS stale_embedding,
                CASE WHEN i.file_size = t.size AND i.file_mtime_ns = t.mtime_ns
                     THEN i.outcome END AS issue_outcome,
                CASE WHEN i.file_size = t.size AND i.file_mtime_ns = t.mtime_ns
                     THEN i.reason END AS issue_reason
         FROM tracks t
         LEFT JOIN track_embeddings e ON e.track_id = t.id AND e.model_id = $2
         LEFT JOIN track_embedding_issues i ON i.track_id = t.id AND i.model_id = $2
         WHERE t.id = ANY($1)",
    )
    .bind(ids)
    .bind(model_id)
    .fetch_all(pool)
    .await
}

/// A vector to store.
#[derive(Debug, Clone)]
pub struct NewEmbedding {
    pub track_id: i64,
    pub embedding: Vec<f32>,
    pub file_size: i64,
    pub file_mtime_ns: i64,
    pub windows: i32,
}

/// Insert or replace vectors (one statement) and clear the tracks' issues. Tracks deleted
/// meanwhile are left out; returns the ids stored.
pub async fn store_embeddings(
    pool: &PgPool,
    model_id: i64,
    rows: &[NewEmbedding],
) -> Result<Vec<i64>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.track_id).collect();
    let vectors: Vec<Vector> = rows
        .iter()
        .map(|r| Vector::from(r.embedding.clone()))
        .collect();
    let sizes: Vec<i64> = rows.iter().map(|r| r.file_size).collect();
    let mtimes: Vec<i64> = rows.iter().map(|r| r.file_mtime_ns).collect();
    let windows: Vec<i32> = rows.iter().map(|r| r.windows).collect();
    let mut tx = pool.begin().await?;
    let stored: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO track_embeddings
             (track_id, model_id, embedding, file_size, file_mtime_ns, windows)
         SELECT u.track_id, $1, u.embedding, u.file_size, u.file_mtime_ns, u.windows
         FROM UNNEST($2::bigint[], $3::vector[], $4::bigint[], $5::bigint[], $6::int[])
              AS u(track_id, embedding, file_size, file_mtime_ns, windows)
         JOIN tracks t ON t.id = u.track_id
         ON CONFLICT (track_id, model_id) DO UPDATE
         SET embedding = EXCLUDED.embedding, file_size = EXCLUDED.file_size,
             file_mtime_ns = EXCLUDED.file_mtime_ns, windows = EXCLUDED.windows,
             created_at = now()
         RETURNING track_id",
    )
    .bind(model_id)
    .bind(&ids)
    .bind(&vectors)
    .bind(&sizes)
    .bind(&mtimes)
    .bind(&windows)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM track_embedding_issues WHERE model_id = $1 AND track_id = ANY($2)")
        .bind(model_id)
        .bind(&stored)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(stored)
}

/// A track that could not be embedded, as recorded.
#[derive(Debug, Clone)]
pub struct NewIssue {
    pub track_id: i64,
    pub file_size: i64,
    pub file_mtime_ns: i64,
    /// `skipped` or `failed`.
    pub outcome: &'static str,
    pub reason: String,
}

/// Record issues (replacing older ones) and drop the tracks' now outdated vectors.
pub async fn record_issues(
    pool: &PgPool,
    model_id: i64,
    request_id: Option<Uuid>,
    rows: &[NewIssue],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.track_id).collect();
    let sizes: Vec<i64> = rows.iter().map(|r| r.file_size).collect();
    let mtimes: Vec<i64> = rows.iter().map(|r| r.file_mtime_ns).collect();
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome).collect();
    let reasons: Vec<String> = rows
        .iter()
        .map(|r| crate::db::storable_text(&r.reason))
        .collect();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO track_embedding_issues
             (track_id, model_id, file_size, file_mtime_ns, outcome, reason, request_id)
         SELECT u.track_id, $1, u.file_size, u.file_mtime_ns, u.outcome, u.reason, $7
         FROM UNNEST($2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])
              AS u(track_id, file_size, file_mtime_ns, outcome, reason)
         JOIN tracks t ON t.id = u.track_id
         ON CONFLICT (track_id, model_id) DO UPDATE
         SET file_size = EXCLUDED.file_size, file_mtime_ns = EXCLUDED.file_mtime_ns,
             outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
             request_id = EXCLUDED.request_id, occurred_at = now()",
    )
    .bind(model_id)
    .bind(&ids)
    .bind(&sizes)
    .bind(&mtimes)
    .bind(&outcomes)
    .bind(&reasons)
    .bind(request_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM track_embeddings WHERE model_id = $1 AND track_id = ANY($2)")
        .bind(model_id)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Drop the vectors of `ids` (their files changed into something that is not embedded).
pub async fn delete_embeddings(
    pool: &PgPool,
    model_id: i64,
    ids: &[i64],
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(
        sqlx::query("DELETE FROM track_embeddings WHERE model_id = $1 AND track_id = ANY($2)")
            .bind(model_id)
            .bind(ids)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

#[derive(Debug, FromRow)]
struct MissingRow {
    id: i64,
    library_path: String,
    rel_path: Vec<u8>,
    duration_ms: i64,
}

/// A track that needs an embedding: id, absolute path, duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingTrack {
    pub id: i64,
    pub path: PathBuf,
    pub duration_ms: i64,
}

/// Which libraries a search for missing vectors covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibraryScope {
    /// Only this library (`None`: every library).
    pub only: Option<i64>,
    /// Never these libraries (those a re-embed job covers).
    pub except: Vec<i64>,
}

/// Tracks within the duration limits without a vector of their current file for the model,
/// and without a recorded issue for it, in path order, in the libraries of `scope`.
pub async fn missing(
    pool: &PgPool,
    model_id: i64,
    min_ms: i64,
    max_ms: i64,
    scope: &LibraryScope,
) -> Result<Vec<MissingTrack>, sqlx::Error> {
    let rows: Vec<MissingRow> = sqlx::query_as(
        "SELECT t.id, l.path AS library_path, t.rel_path, t.duration_ms
         FROM tracks t JOIN libraries l ON l.id = t.library_id
         WHERE t.duration_ms BETWEEN $2 AND $3
           AND ($4::bigint IS NULL OR t.library_id = $4)
           AND t.library_id <> ALL($5)
           AND NOT EXISTS (SELECT 1 FROM track_embeddings e
                           WHERE e.track_id = t.id AND e.model_id = $1
                             AND e.file_size = t.size AND e.file_mtime_ns = t.mtime_ns)
           AND NOT EXISTS (SELECT 1 FROM track_embedding_issues i
                           WHERE i.track_id = t.id AND i.model_id = $1
                             AND i.file_size = t.size AND i.file_mtime_ns = t.mtime_ns)
         ORDER BY t.library_id, t.rel_path",
    )
    .bind(model_id)
    .bind(min_ms)
    .bind(max_ms)
    .bind(scope.only)
    .bind(&scope.except)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| MissingTrack {
            id: r.id,
            path: PathBuf::from(&r.library_path).join(OsStr::from_bytes(&r.rel_path)),
            duration_ms: r.duration_ms,
        })
        .collect())
}

/// Delete the vectors and issues of every model but `keep` of a library's tracks (the library
/// became complete under `keep`), inside the caller's transaction. Returns the vectors deleted.
pub async fn drop_other_models(
    tx: &mut sqlx::PgConnection,
    library_id: i64,
    keep: i64,
) -> Result<u64, sqlx::Error> {
    let vectors = sqlx::query(
        "DELETE FROM track_embeddings e USING tracks t
         WHERE t.id = e.track_id AND t.library_id = $1 AND e.model_id <> $2",
    )
    .bind(library_id)
    .bind(keep)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "DELETE FROM track_embedding_issues i USING tracks t
         WHERE t.id = i.track_id AND t.library_id = $1 AND i.model_id <> $2",
    )
    .bind(library_id)
    .bind(keep)
    .execute(&mut *tx)
    .await?;
    Ok(vectors)
}

/// Delete the models other than `active` that hold no vector and serve no library, with their
/// HNSW indexes (one transaction per model; the cascade takes their issues, centroids, queue
/// and worker rows). Returns the ids deleted.
pub async fn delete_unused_models(pool: &PgPool, active: i64) -> Result<Vec<i64>, sqlx::Error> {
    let candidates: Vec<i64> = sqlx::query_scalar(
        "SELECT m.id FROM models m
         WHERE m.id <> $1
           AND NOT EXISTS (SELECT 1 FROM track_embeddings e WHERE e.model_id = m.id)
           AND NOT EXISTS (SELECT 1 FROM library_models lm WHERE lm.model_id = m.id)
         ORDER BY m.id",
    )
    .bind(active)
    .fetch_all(pool)
    .await?;
    let mut deleted = Vec::new();
    for id in candidates {
        let mut tx = pool.begin().await?;
        // Checked again under the delete: a vector written meanwhile keeps the model.
        let gone: Option<i64> = sqlx::query_scalar(
            "DELETE FROM models m WHERE m.id = $1
               AND NOT EXISTS (SELECT 1 FROM track_embeddings e WHERE e.model_id = m.id)
               AND NOT EXISTS (SELECT 1 FROM library_models lm WHERE lm.model_id = m.id)
             RETURNING m.id",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if gone.is_some() {
            let sql = format!("DROP INDEX IF EXISTS {}", index_name(id));
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
            deleted.push(id);
        }
        tx.commit().await?;
    }
    Ok(deleted)
}

/// The stored vector of a track for a model.
pub async fn embedding_of(
    pool: &PgPool,
    model_id: i64,
    track_id: i64,
) -> Result<Option<Vec<f32>>, sqlx::Error> {
    let v: Option<Vector> = sqlx::query_scalar(
        "SELECT embedding FROM track_embeddings WHERE track_id = $1 AND model_id = $2",
    )
    .bind(track_id)
    .bind(model_id)
    .fetch_optional(pool)
    .await?;
    Ok(v.map(|v| v.to_vec()))
}
