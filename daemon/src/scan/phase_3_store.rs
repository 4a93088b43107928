//! Phase 3 of a scan: turn probe results into rows and write them in bulk — one transaction per
//! batch (tracks upserted, their old errors cleared, new errors recorded) — and, at the end,
//! delete the rows of files that are gone. The watcher's cookie-paired moves are applied here
//! too (`move_in_place`), so this is the only module that writes `tracks`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use sqlx::PgPool;
use uuid::Uuid;

use super::phase_1_walk::FoundFile;
use super::phase_2_probe::{ProbeError, ProbedTrack};
use crate::db::health::is_data_error;
use crate::db::scan_errors::{self, ErrorRow};
use crate::db::tracks::{self, TrackRow};
use crate::text_fold;

/// Lossy UTF-8 of a raw relative path, for display.
pub fn display_path(rel: &[u8]) -> String {
    OsStr::from_bytes(rel).to_string_lossy().into_owned()
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The row for a probed file. The search document holds every value of every list, so a
/// track is found by each of its artists.
pub fn track_row(found: &FoundFile, p: ProbedTrack) -> TrackRow {
    let t = &p.tags;
    let mut fields: Vec<&str> = [
        &t.title,
        &t.artist,
        &t.album,
        &t.album_artist,
        &t.genre,
        &t.composer,
    ]
    .into_iter()
    .flatten()
    .map(String::as_str)
    .collect();
    // A list's values, unless a display string already holds them (one artist: the same word
    // twice would only make the document bigger).
    for v in [&t.artists, &t.album_artists, &t.genres, &t.composers]
        .into_iter()
        .flatten()
    {
        if !fields.contains(&v.as_str()) {
            fields.push(v);
        }
    }
    let search_text = text_fold::search_document(fields.into_iter().map(Some));
    TrackRow {
        rel_path_text: display_path(&found.rel_path),
        rel_path: found.rel_path.clone(),
        size: clamp_i64(found.size),
        mtime_ns: found.mtime_ns,
        probed: p,
        search_text,
    }
}

/// The error row for a file that could not be probed.
pub fn probe_error_row(found: &FoundFile, e: &ProbeError) -> ErrorRow {
    error_row(
        found.rel_path.clone(),
        found.size,
        found.mtime_ns,
        e.stage(),
        &e.to_string(),
    )
}

/// An error row; the message is made safe to store (a reader's message may quote the bytes
/// of a damaged file).
pub fn error_row(
    rel_path: Vec<u8>,
    size: u64,
    mtime_ns: i64,
    stage: &str,
    message: &str,
) -> ErrorRow {
    let message = crate::db::storable_text(message);
    ErrorRow {
        rel_path_text: display_path(&rel_path),
        rel_path,
        size: clamp_i64(size),
        mtime_ns,
        stage: stage.to_owned(),
        message,
    }
}

/// What a batch write did: rows the database refused become errors of their files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchWritten {
    pub indexed: u64,
    pub failed: u64,
}

/// Write one batch: tracks upserted, their old errors cleared, new errors recorded, in one
/// transaction. When the database refuses the batch because of the data in it (see
/// [`is_data_error`]), the tracks are written one by one instead and each refused one is
/// recorded as a failed file with the database's reason: one file never fails a scan. Errors
/// that mean the database is unavailable are returned (the caller retries the whole batch:
/// every write is an upsert, so repeating one is safe).
pub async fn write_batch(
    pool: &PgPool,
    library_id: i64,
    request_id: Uuid,
    tracks_rows: &[TrackRow],
    errors: &[ErrorRow],
) -> sqlx::Result<BatchWritten> {
    match write_together(pool, library_id, request_id, tracks_rows, errors).await {
        Ok(()) => {
            return Ok(BatchWritten {
                indexed: tracks_rows.len() as u64,
                failed: errors.len() as u64,
            });
        }
        Err(e) if !is_data_error(&e) => return Err(e),
        Err(e) => {
            tracing::warn!(error = %e, rows = tracks_rows.len(), "the database refused a batch; writing its rows one by one");
        }
    }
    let mut errors = errors.to_vec();
    let mut indexed = 0;
    for row in tracks_rows {
        match write_together(pool, library_id, request_id, std::slice::from_ref(row), &[]).await {
            Ok(()) => indexed += 1,
            Err(e) if is_data_error(&e) => {
                let reason = refusal_reason(&e);
                tracing::warn!(track_path = %row.rel_path_text, error = %reason, "track not stored");
                errors.push(error_row(
                    row.rel_path.clone(),
                    u64::try_from(row.size).unwrap_or(0),
                    row.mtime_ns,
                    "store",
                    &format!("the database refused its data: {reason}"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    let failed = errors.len() as u64;
    match write_together(pool, library_id, request_id, &[], &errors).await {
        Ok(()) => return Ok(BatchWritten { indexed, failed }),
        Err(e) if !is_data_error(&e) => return Err(e),
        Err(_) => {}
    }
    // One by one; a message the database refuses is replaced by a plain one.
    for err in &errors {
        match write_together(pool, library_id, request_id, &[], std::slice::from_ref(err)).await {
            Ok(()) => {}
            Err(e) if is_data_error(&e) => {
                let plain = ErrorRow {
                    message:
                        "the file could not be indexed, and its error message could not be stored"
                            .into(),
                    ..err.clone()
                };
                write_together(pool, library_id, request_id, &[], &[plain]).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(BatchWritten { indexed, failed })
}

/// The server's reason for refusing a row, for a person: "invalid byte sequence for encoding
/// \"UTF8\": 0x00".
fn refusal_reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

async fn write_together(
    pool: &PgPool,
    library_id: i64,
    request_id: Uuid,
    tracks_rows: &[TrackRow],
    errors: &[ErrorRow],
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    tracks::upsert_batch(&mut tx, library_id, request_id, tracks_rows).await?;
    let indexed: Vec<Vec<u8>> = tracks_rows.iter().map(|r| r.rel_path.clone()).collect();
    scan_errors::delete_paths(&mut tx, library_id, &indexed).await?;
    scan_errors::upsert_batch(&mut tx, library_id, request_id, errors).await?;
    tx.commit().await
}

/// Delete vanished tracks and forget errors of vanished files; records the scan's final removed
/// count in the same transaction, so a crash cannot lose it.
pub async fn delete_vanished(
    pool: &PgPool,
    library_id: i64,
    request_id: Uuid,
    track_ids: &[i64],
    error_paths: &[Vec<u8>],
    removed_total: u64,
) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let mut removed = 0;
    for chunk in track_ids.chunks(5_000) {
        removed += tracks::delete_ids(&mut tx, chunk).await?;
    }
    for chunk in error_paths.chunks(5_000) {
        scan_errors::delete_paths(&mut tx, library_id, chunk).await?;
    }
    sqlx::query("UPDATE scans SET tracks_removed = $2 WHERE request_id = $1")
        .bind(request_id)
        .bind(clamp_i64(removed_total + removed))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(removed)
}

/// Apply a rename or move inside one library in place: the file `from` (with `is_dir`, every
/// file below the directory `from`) is now at `to`. Track ids stay, and with them their
/// embeddings; scan-error rows move along. Rows already at the destination describe files the
/// move replaced (rename(2) replaces a file, and only an empty directory) and are deleted —
/// for a single file only when the source row exists, so an unknown file renamed over a known
/// one keeps the known row for the rescan to update. Returns the number of tracks moved.
/// One attempt, never waiting out an outage: the watcher rescans the directory when this fails.
pub async fn move_in_place(
    pool: &PgPool,
    library_id: i64,
    from: &[u8],
    to: &[u8],
    is_dir: bool,
) -> sqlx::Result<u64> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut tx = pool.begin().await?;
    let mut moved = 0;
    if is_dir {
        let (lo, hi) = tracks::subtree_range(from);
        let (to_lo, to_hi) = tracks::subtree_range(to);
        let from_text = format!("{}/", text(from));
        let to_text = format!("{}/", text(to));
        // 1-based positions just past the old prefix (bytes for rel_path, characters for text).
        let cut_bytes = i32::try_from(lo.len() + 1).unwrap_or(i32::MAX);
        let cut_chars = i32::try_from(from_text.chars().count() + 1).unwrap_or(i32::MAX);
        for table in ["tracks", "scan_errors"] {
            // `table` is one of two literals above: nothing outside reaches the SQL text.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE library_id = $1 AND rel_path >= $2 AND rel_path < $3"
            )))
            .bind(library_id)
            .bind(&to_lo)
            .bind(&to_hi)
            .execute(&mut *tx)
            .await?;
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE {table} SET
                    rel_path = $4::bytea || substring(rel_path FROM $5::int4),
                    rel_path_text = $6::text || substring(rel_path_text FROM $7::int4)
                 WHERE library_id = $1 AND rel_path >= $2 AND rel_path < $3"
            )))
            .bind(library_id)
            .bind(&lo)
            .bind(&hi)
            .bind(&to_lo)
            .bind(cut_bytes)
            .bind(&to_text)
            .bind(cut_chars)
            .execute(&mut *tx)
            .await?;
            if table == "tracks" {
                moved = done.rows_affected();
            }
        }
    } else {
        for table in ["tracks", "scan_errors"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE library_id = $1 AND rel_path = $2
                   AND EXISTS (SELECT 1 FROM {table} WHERE library_id = $1 AND rel_path = $3)"
            )))
            .bind(library_id)
            .bind(to)
            .bind(from)
            .execute(&mut *tx)
            .await?;
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE {table} SET rel_path = $3, rel_path_text = $4
                 WHERE library_id = $1 AND rel_path = $2"
            )))
            .bind(library_id)
            .bind(from)
            .bind(to)
            .bind(text(to))
            .execute(&mut *tx)
            .await?;
            if table == "tracks" {
                moved = done.rows_affected();
            }
        }
    }
    tx.commit().await?;
    Ok(moved)
}
