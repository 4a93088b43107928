//! The `scan_errors` table: files that could not be indexed, with the stage and reason. One row
//! per file, replaced on each new attempt and removed once the file indexes or disappears.

use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct ExistingError {
    pub rel_path: Vec<u8>,
    pub size: i64,
    pub mtime_ns: i64,
    pub request_id: Option<Uuid>,
}

/// A failure to record.
#[derive(Debug, Clone)]
pub struct ErrorRow {
    pub rel_path: Vec<u8>,
    pub rel_path_text: String,
    pub size: i64,
    pub mtime_ns: i64,
    pub stage: String,
    pub message: String,
}

/// The recorded errors of a library, or of one subtree of it.
pub async fn existing(
    pool: &PgPool,
    library_id: i64,
    subdir: Option<&[u8]>,
) -> sqlx::Result<Vec<ExistingError>> {
    super::tracks::in_library(
        pool,
        "SELECT rel_path, size, mtime_ns, request_id FROM scan_errors",
        library_id,
        subdir,
    )
    .await
}

pub async fn upsert_batch(
    conn: &mut PgConnection,
    library_id: i64,
    request_id: Uuid,
    rows: &[ErrorRow],
) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&ErrorRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO scan_errors (library_id, request_id, rel_path, rel_path_text, size, mtime_ns,
            stage, message)
         SELECT $1, $2, * FROM UNNEST($3::bytea[], $4::text[], $5::int8[], $6::int8[],
            $7::text[], $8::text[])
         ON CONFLICT (library_id, rel_path) DO UPDATE SET request_id = EXCLUDED.request_id,
            rel_path_text = EXCLUDED.rel_path_text, size = EXCLUDED.size,
            mtime_ns = EXCLUDED.mtime_ns, stage = EXCLUDED.stage, message = EXCLUDED.message,
            occurred_at = now()",
    )
    .bind(library_id)
    .bind(request_id)
    .bind(rows.iter().map(|r| r.rel_path.clone()).collect::<Vec<_>>())
    .bind(col(|r| r.rel_path_text.clone()))
    .bind(rows.iter().map(|r| r.size).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.mtime_ns).collect::<Vec<_>>())
    .bind(col(|r| r.stage.clone()))
    .bind(col(|r| r.message.clone()))
    .execute(conn)
    .await?;
    Ok(())
}

/// Forget the errors of these files (they indexed, or they are gone).
pub async fn delete_paths(
    conn: &mut PgConnection,
    library_id: i64,
    rel_paths: &[Vec<u8>],
) -> sqlx::Result<()> {
    if rel_paths.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM scan_errors WHERE library_id = $1 AND rel_path = ANY($2)")
        .bind(library_id)
        .bind(rel_paths)
        .execute(conn)
        .await?;
    Ok(())
}

/// Errors of a library, newest first (for people and tests).
#[derive(Debug, Clone, FromRow)]
pub struct ErrorRecord {
    pub rel_path_text: String,
    pub stage: String,
    pub message: String,
}

pub async fn list(pool: &PgPool, library_id: i64) -> sqlx::Result<Vec<ErrorRecord>> {
    sqlx::query_as(
        "SELECT rel_path_text, stage, message FROM scan_errors WHERE library_id = $1
         ORDER BY occurred_at DESC, rel_path_text",
    )
    .bind(library_id)
    .fetch_all(pool)
    .await
}
