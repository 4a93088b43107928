//! The `libraries` table: registered library roots with their track and failure counts.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

#[derive(Debug, Clone, FromRow)]
pub struct LibraryRow {
    pub id: i64,
    pub path: String,
    pub created_at: DateTime<Utc>,
    pub track_count: i64,
    pub failed_count: i64,
}

macro_rules! library_select {
    () => {
        "SELECT l.id, l.path, l.created_at,
        (SELECT count(*) FROM tracks t WHERE t.library_id = l.id) AS track_count,
        (SELECT count(*) FROM scan_errors e WHERE e.library_id = l.id) AS failed_count
    FROM libraries l"
    };
}

/// Insert a library; `None` if the path is already registered.
pub async fn insert(pool: &PgPool, path: &str) -> sqlx::Result<Option<LibraryRow>> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO libraries (path) VALUES ($1) ON CONFLICT (path) DO NOTHING RETURNING id",
    )
    .bind(path)
    .fetch_optional(pool)
    .await?;
    match id {
        Some(id) => get(pool, id).await,
        None => Ok(None),
    }
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<LibraryRow>> {
    sqlx::query_as(concat!(library_select!(), " ORDER BY l.id"))
        .fetch_all(pool)
        .await
}

/// How many libraries are registered.
pub async fn count(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM libraries")
        .fetch_one(pool)
        .await
}

pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<LibraryRow>> {
    sqlx::query_as(concat!(library_select!(), " WHERE l.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn get_by_path(pool: &PgPool, path: &str) -> sqlx::Result<Option<LibraryRow>> {
    sqlx::query_as(concat!(library_select!(), " WHERE l.path = $1"))
        .bind(path)
        .fetch_optional(pool)
        .await
}

/// Libraries that no scan was ever recorded for (`(id, path)`, oldest first): added just before
/// corald stopped, between the library's row and its first scan's.
pub async fn never_scanned(pool: &PgPool) -> sqlx::Result<Vec<(i64, String)>> {
    sqlx::query_as(
        "SELECT l.id, l.path FROM libraries l
         WHERE NOT EXISTS (SELECT 1 FROM scans s WHERE s.library_id = l.id)
         ORDER BY l.id",
    )
    .fetch_all(pool)
    .await
}

/// Delete a library and (by cascade) its tracks, errors and scans.
pub async fn delete(pool: &PgPool, id: i64) -> sqlx::Result<bool> {
    let done = sqlx::query("DELETE FROM libraries WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Every library's id and root path.
pub async fn roots(pool: &PgPool) -> sqlx::Result<Vec<(i64, String)>> {
    sqlx::query_as("SELECT id, path FROM libraries ORDER BY id")
        .fetch_all(pool)
        .await
}
