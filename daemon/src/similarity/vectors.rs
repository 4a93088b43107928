//! The SQL of similarity: a model's mean vector (`model_centroids`, kept by triggers, see
//! migration 0005), a track's vector, and candidate neighbours scored by centred cosine.
//!
//! Two ways to find candidates, chosen by the model's vector count:
//! - exact: every vector of the model that passes the library and duration filters is scored
//!   by centred cosine (`(v - mean) <=> (q - mean)`) and the best are kept; a sequential scan,
//!   fast while the collection is small;
//! - index: the model's HNSW index (raw cosine) yields an over-fetched candidate set, with
//!   pgvector's iterative scan so the filters cannot empty it, and those are re-scored by
//!   centred cosine. The raw and centred orders differ only by the tracks' alignment with the
//!   mean, so a few times the asked count of raw candidates holds the centred best.
//!
//! SQL naming a model id or dimension is built from our own integers (the partial index's
//! predicate must be a constant).

use pgvector::Vector;
use sqlx::{AssertSqlSafe, PgPool};

use crate::embed::phase_5_store::RegisteredModel;

/// A model's mean vector and how many vectors it averages.
#[derive(Debug, Clone, PartialEq)]
pub struct Centroid {
    pub mean: Vec<f32>,
    pub count: i64,
}

/// The mean of a model's stored vectors (zeros when it has none).
pub async fn centroid(pool: &PgPool, model: RegisteredModel) -> sqlx::Result<Centroid> {
    let row: Option<(Vector, i64)> =
        sqlx::query_as("SELECT sum, count FROM model_centroids WHERE model_id = $1")
            .bind(model.id)
            .fetch_optional(pool)
            .await?;
    Ok(match row {
        Some((sum, count)) if count > 0 && sum.as_slice().len() == model.dim => Centroid {
            mean: sum.as_slice().iter().map(|x| x / count as f32).collect(),
            count,
        },
        _ => Centroid {
            mean: vec![0.0; model.dim],
            count: 0,
        },
    })
}

/// Which tracks may be candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    /// Never candidates (the track asked about).
    pub exclude: Vec<i64>,
    /// Only these libraries (`None`: all).
    pub library_ids: Option<Vec<i64>>,
    pub min_ms: i64,
    pub max_ms: i64,
}

/// The candidate filters: `$3` ids left out, `$4` libraries (or NULL), `$5`..`$6` duration.
const FILTERS: &str = "e.track_id <> ALL($3) AND ($4::bigint[] IS NULL OR t.library_id = ANY($4))
                       AND t.duration_ms BETWEEN $5 AND $6";

/// The exact scan: `$1` the mean, `$2` the centred query, `$7` how many.
pub fn exact_sql(model: RegisteredModel) -> String {
    let id = model.id;
    format!(
        "SELECT e.track_id, 1 - ((e.embedding - $1::vector) <=> $2::vector) AS score
         FROM track_embeddings e JOIN tracks t ON t.id = e.track_id
         WHERE e.model_id = {id} AND {FILTERS}
         ORDER BY (e.embedding - $1::vector) <=> $2::vector
         LIMIT $7"
    )
}

/// The index search: `$7` the raw query, `$8` how many raw-cosine candidates (from the model's
/// partial HNSW index), re-scored by centred cosine (`$1` the mean, `$2` the centred query).
pub fn index_sql(model: RegisteredModel) -> String {
    let (dim, id) = (model.dim, model.id);
    format!(
        "WITH c AS MATERIALIZED (
             SELECT e.track_id, e.embedding
             FROM track_embeddings e JOIN tracks t ON t.id = e.track_id
             WHERE e.model_id = {id} AND {FILTERS}
             ORDER BY e.embedding::vector({dim}) <=> $7::vector({dim})
             LIMIT $8)
         SELECT track_id, 1 - ((embedding - $1::vector) <=> $2::vector) AS score
         FROM c ORDER BY score DESC NULLS LAST"
    )
}

/// Up to `k` candidates `(track_id, centred cosine)`, best first.
pub async fn candidates(
    pool: &PgPool,
    model: RegisteredModel,
    query: &[f32],
    mean: &[f32],
    scope: &Scope,
    k: u32,
    exact: bool,
) -> sqlx::Result<Vec<(i64, f64)>> {
    let centred: Vec<f32> = query.iter().zip(mean).map(|(q, m)| q - m).collect();
    let mut tx = pool.begin().await?;
    let sql = if exact {
        exact_sql(model)
    } else {
        // ef_search is at most 1000; the iterative scan goes on past it while filtered rows
        // leave the LIMIT unmet.
        let ef = k.clamp(40, 1000);
        sqlx::query(AssertSqlSafe(format!("SET LOCAL hnsw.ef_search = {ef}")))
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL hnsw.iterative_scan = relaxed_order")
            .execute(&mut *tx)
            .await?;
        index_sql(model)
    };
    // `$1`..`$6` are the same in both statements: the mean, the centred query, the filters.
    let shared = sqlx::query_as(AssertSqlSafe(sql))
        .bind(Vector::from(mean.to_vec()))
        .bind(Vector::from(centred))
        .bind(&scope.exclude)
        .bind(&scope.library_ids)
        .bind(scope.min_ms)
        .bind(scope.max_ms);
    // Then the exact scan's `$7` count, or the index search's `$7` raw query and `$8` count.
    let statement = if exact {
        shared
    } else {
        shared.bind(Vector::from(query.to_vec()))
    };
    let rows: Vec<(i64, Option<f64>)> = statement.bind(i64::from(k)).fetch_all(&mut *tx).await?;
    tx.commit().await?;
    // A vector equal to the mean has no direction: pgvector answers NaN; it is unrelated (0).
    Ok(rows
        .into_iter()
        .map(|(id, s)| (id, s.filter(|s| s.is_finite()).unwrap_or(0.0)))
        .collect())
}

/// The stored vectors of `ids` for a model (tracks without one are left out).
pub async fn embeddings(
    pool: &PgPool,
    model: RegisteredModel,
    ids: &[i64],
) -> sqlx::Result<std::collections::HashMap<i64, Vec<f32>>> {
    if ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let rows: Vec<(i64, Vector)> = sqlx::query_as(
        "SELECT track_id, embedding FROM track_embeddings WHERE model_id = $1 AND track_id = ANY($2)",
    )
    .bind(model.id)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, v)| (id, v.to_vec())).collect())
}
