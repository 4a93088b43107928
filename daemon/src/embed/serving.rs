//! Model changes without a gap in service: which model answers similarity for each library,
//! and the switch from a library's previous model to the active one.
//!
//! A library is *complete* under a model when every track of it within the duration limits
//! has a vector or a recorded issue of that model, or when a request that covered all of the
//! library's tracks lacking a vector of it has ended ([`covers_library`]: its re-embed job,
//! its first scan, the start-up sweep): a track such a request could not read (a file gone or
//! unreadable, which is not recorded as an issue) does not hold the library on an older model
//! for ever. `library_models` (migration 0006) remembers when a library became complete under
//! a model; the model that *serves* a library ([`serving`]) is the one it became complete under
//! last, or the active model while it has none. So after a model change a library keeps
//! answering from its previous model's vectors while its re-embed job (a scan with trigger
//! `model_change`, started at start-up: see `app/startup.rs`) embeds it under the new one, at
//! the queue's background priority.
//!
//! After every embedding request of a library (a scan's embedding phase, a re-embed job, the
//! start-up sweep) that completed, [`after_embedding`] checks whether the library is complete
//! under the active model. The first time it is, one transaction records it and deletes the
//! library's vectors and issues of every other model (and its other `library_models` rows);
//! then models that are not active, hold no vector and serve no library are deleted with their
//! HNSW indexes.
//!
//! A query reads one model: the serving model of the query track's library (for a path, the
//! first track's; for a mix, the first seed's), or the active model when the query track has
//! no vector of the serving one (a file added or changed during the change is embedded under
//! the new model only). Candidates are the tracks that have a vector of that model, in any
//! library asked for; a library already switched to another model has none of them left, so
//! it drops out of such a query until the query's library switches too.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::phase_5_store::{self, RegisteredModel};
use super::{EmbedError, Inner};
use crate::db::health::retry;

/// A model a library became complete under, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub model: RegisteredModel,
    pub complete_at: DateTime<Utc>,
}

/// The model that answers for a library: the one it became complete under last (ties: the
/// newer model), else the active model.
pub fn serving(active: RegisteredModel, complete: &[Completion]) -> RegisteredModel {
    complete
        .iter()
        .max_by_key(|c| (c.complete_at, c.model.id))
        .map_or(active, |c| c.model)
}

/// Whether a completed scan with this trigger covered every track of its library that lacked a
/// vector of the active model: a re-embed job (all such tracks) and a library's first scan
/// (all its tracks). Other scans cover the files they wrote.
pub fn covers_library(trigger: coral_proto::ScanTrigger) -> bool {
    use coral_proto::ScanTrigger::*;
    match trigger {
        ModelChange | LibraryAdded => true,
        Manual | FileSystemEvent | Startup => false,
    }
}

/// Whether a library needs a re-embed job: it is served by a model other than the active one.
/// A library complete under no model needs none (the start-up sweep and its scans embed it,
/// and nothing older could answer meanwhile).
pub fn needs_reembed(active: RegisteredModel, complete: &[Completion]) -> bool {
    !complete.is_empty() && serving(active, complete).id != active.id
}

#[derive(sqlx::FromRow)]
struct CompletionRow {
    library_id: i64,
    model_id: i64,
    dim: i32,
    complete_at: DateTime<Utc>,
}

impl CompletionRow {
    fn completion(&self) -> Completion {
        Completion {
            model: RegisteredModel {
                id: self.model_id,
                dim: usize::try_from(self.dim).unwrap_or(0),
            },
            complete_at: self.complete_at,
        }
    }
}

/// The models a library is complete under.
pub async fn completions(pool: &PgPool, library_id: i64) -> sqlx::Result<Vec<Completion>> {
    let rows: Vec<CompletionRow> = sqlx::query_as(
        "SELECT lm.library_id, lm.model_id, m.dim, lm.complete_at
         FROM library_models lm JOIN models m ON m.id = lm.model_id
         WHERE lm.library_id = $1",
    )
    .bind(library_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(CompletionRow::completion).collect())
}

/// Every library (id, root) with the models it is complete under.
pub async fn libraries(pool: &PgPool) -> sqlx::Result<Vec<(i64, String, Vec<Completion>)>> {
    let libs: Vec<(i64, String)> = sqlx::query_as("SELECT id, path FROM libraries ORDER BY id")
        .fetch_all(pool)
        .await?;
    let rows: Vec<CompletionRow> = sqlx::query_as(
        "SELECT lm.library_id, lm.model_id, m.dim, lm.complete_at
         FROM library_models lm JOIN models m ON m.id = lm.model_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(libs
        .into_iter()
        .map(|(id, path)| {
            let done = rows
                .iter()
                .filter(|r| r.library_id == id)
                .map(CompletionRow::completion)
                .collect();
            (id, path, done)
        })
        .collect())
}

/// Whether the library is served by the active model and no other model exists (so no vector
/// of another model is left to retire).
async fn settled(pool: &PgPool, library_id: i64, active: i64) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM library_models WHERE library_id = $1 AND model_id = $2)
            AND NOT EXISTS (SELECT 1 FROM models WHERE id <> $2)",
    )
    .bind(library_id)
    .bind(active)
    .fetch_one(pool)
    .await
}

/// Whether every track of the library within `min_ms..=max_ms` has a vector or an issue of the
/// model.
async fn is_complete(
    pool: &PgPool,
    library_id: i64,
    model_id: i64,
    min_ms: i64,
    max_ms: i64,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (
             SELECT 1 FROM tracks t
             WHERE t.library_id = $1 AND t.duration_ms BETWEEN $3 AND $4
               AND NOT EXISTS (SELECT 1 FROM track_embeddings e
                               WHERE e.track_id = t.id AND e.model_id = $2)
               AND NOT EXISTS (SELECT 1 FROM track_embedding_issues i
                               WHERE i.track_id = t.id AND i.model_id = $2))",
    )
    .bind(library_id)
    .bind(model_id)
    .bind(min_ms)
    .bind(max_ms)
    .fetch_one(pool)
    .await
}

/// Record that the library is complete under `model` and drop its vectors and issues of every
/// other model, in one transaction. Returns the vectors dropped, or `None` when the library
/// was already recorded complete under `model` alone (nothing to do).
async fn switch(pool: &PgPool, library_id: i64, model: i64) -> sqlx::Result<Option<u64>> {
    let mut tx = pool.begin().await?;
    let added = sqlx::query(
        "INSERT INTO library_models (library_id, model_id) VALUES ($1, $2)
         ON CONFLICT (library_id, model_id) DO NOTHING",
    )
    .bind(library_id)
    .bind(model)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let others = sqlx::query("DELETE FROM library_models WHERE library_id = $1 AND model_id <> $2")
        .bind(library_id)
        .bind(model)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let dropped = phase_5_store::drop_other_models(&mut tx, library_id, model).await?;
    tx.commit().await?;
    Ok((added + others + dropped > 0).then_some(dropped))
}

/// After an embedding request of `library_id` completed (`covered_all`: one that covered every
/// track of the library lacking a vector of the active model): when the library is complete
/// under the active model, make that model serve it and retire the others (module docs).
pub(super) async fn after_embedding(
    inner: &Inner,
    library_id: i64,
    covered_all: bool,
) -> Result<(), EmbedError> {
    let (pool, db, stop) = (&inner.pool, &inner.db, &inner.stop);
    let active = inner.model.id;
    // The usual case, after a scan with no model change pending: nothing to switch or retire,
    // and no need to read the whole library.
    let settled = retry(db, "read a library's serving model", stop, None, || {
        settled(pool, library_id, active)
    })
    .await?;
    if settled {
        return Ok(());
    }
    let complete = covered_all
        || retry(db, "check a library's embeddings", stop, None, || {
            is_complete(pool, library_id, active, inner.min_ms, inner.max_ms)
        })
        .await?;
    if !complete {
        return Ok(());
    }
    let switched = retry(
        db,
        "switch a library to the active model",
        stop,
        None,
        || switch(pool, library_id, active),
    )
    .await?;
    if let Some(dropped) = switched {
        tracing::info!(
            library_id,
            model_id = active,
            dropped,
            "library complete under the active model: it answers from it now, and its vectors \
             of earlier models were dropped"
        );
    }
    let deleted = retry(db, "delete unused models", stop, None, || {
        phase_5_store::delete_unused_models(pool, active)
    })
    .await?;
    if !deleted.is_empty() {
        tracing::info!(models = ?deleted, "models without vectors deleted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: i64) -> RegisteredModel {
        RegisteredModel { id, dim: 200 }
    }

    fn done(id: i64, secs: i64) -> Completion {
        Completion {
            model: model(id),
            complete_at: DateTime::<Utc>::from_timestamp(1_700_000_000 + secs, 0)
                .unwrap_or_default(),
        }
    }

    #[test]
    fn a_library_complete_under_no_model_is_served_by_the_active_one() {
        assert_eq!(serving(model(7), &[]), model(7));
        assert!(!needs_reembed(model(7), &[]));
    }

    #[test]
    fn the_previous_model_serves_until_the_active_one_is_complete() {
        let previous = [done(3, 0)];
        assert_eq!(serving(model(7), &previous), model(3));
        assert!(needs_reembed(model(7), &previous));
        // Complete under the active model too (before the old rows go): the active one serves.
        let both = [done(3, 0), done(7, 60)];
        assert_eq!(serving(model(7), &both), model(7));
        assert!(!needs_reembed(model(7), &both));
    }

    #[test]
    fn re_embed_jobs_and_first_scans_cover_their_whole_library() {
        use coral_proto::ScanTrigger::*;
        assert!(covers_library(ModelChange));
        assert!(covers_library(LibraryAdded));
        for t in [Manual, FileSystemEvent, Startup] {
            assert!(!covers_library(t), "{t:?} covers only what it wrote");
        }
    }

    #[test]
    fn the_model_completed_last_serves_and_a_tie_goes_to_the_newer_model() {
        // A → B complete, then C active: B serves, even though A is older and also complete.
        let list = [done(1, 0), done(2, 30)];
        assert_eq!(serving(model(3), &list), model(2));
        let tie = [done(5, 10), done(4, 10)];
        assert_eq!(serving(model(9), &tie), model(5));
    }
}
