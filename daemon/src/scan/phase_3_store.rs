//! Phase 3 of a scan: turn probe results into rows and write them in bulk — one transaction per
//! batch (tracks upserted, their old errors cleared, new errors recorded) — and, at the end,
//! delete the rows of files that are gone.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use sqlx::PgPool;
use uuid::Uuid;

use super::phase_1_walk::FoundFile;
use super::phase_2_probe::{ProbeError, ProbedTrack};
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

/// The row for a probed file.
pub fn track_row(found: &FoundFile, p: ProbedTrack) -> TrackRow {
    let search_text = text_fold::search_document([
        p.title.as_deref(),
        p.artist.as_deref(),
        p.album.as_deref(),
        p.album_artist.as_deref(),
        p.genre.as_deref(),
    ]);
    TrackRow {
        rel_path_text: display_path(&found.rel_path),
        rel_path: found.rel_path.clone(),
        size: clamp_i64(found.size),
        mtime_ns: found.mtime_ns,
        format: p.format.as_str().to_owned(),
        codec: p.codec,
        duration_ms: p.duration_ms,
        sample_rate: p.sample_rate,
        channels: p.channels,
        bit_depth: p.bit_depth,
        bitrate_kbps: p.bitrate_kbps,
        title: p.title,
        artist: p.artist,
        album: p.album,
        album_artist: p.album_artist,
        track_number: p.track_number,
        disc_number: p.disc_number,
        year: p.year,
        genre: p.genre,
        search_text,
    }
}

/// The error row for a file that could not be probed.
pub fn probe_error_row(found: &FoundFile, e: &ProbeError) -> ErrorRow {
    ErrorRow {
        rel_path: found.rel_path.clone(),
        rel_path_text: display_path(&found.rel_path),
        size: clamp_i64(found.size),
        mtime_ns: found.mtime_ns,
        stage: e.stage().to_owned(),
        message: e.to_string(),
    }
}

/// Write one batch in one transaction.
pub async fn write_batch(
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
