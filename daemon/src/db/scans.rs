//! The `scans` table: the persisted ScanReporter state of every scan, written at phase changes
//! and every persist interval while running, so progress survives a restart and finished scans
//! stay queryable.

use chrono::{DateTime, Utc};
use coral_proto::{ScanMode, ScanPhase, ScanProgress, ScanTrigger};
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Insert or update a scan's persisted state. A finished scan's row is final: a state written
/// late (an older snapshot racing the final one) leaves it as it is.
pub async fn upsert<'e>(db: impl PgExecutor<'e>, p: &ScanProgress) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO scans (request_id, library_id, subdir, trigger, mode, phase, started_at,
            updated_at, finished_at, files_discovered, tracks_expected, tracks_indexed,
            tracks_unchanged, tracks_removed, tracks_failed, embeddings_expected, embeddings_done,
            embeddings_skipped, embeddings_failed, resumed, error)
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21)
         ON CONFLICT (request_id) DO UPDATE SET mode = EXCLUDED.mode, phase = EXCLUDED.phase,
            updated_at = EXCLUDED.updated_at, finished_at = EXCLUDED.finished_at,
            files_discovered = EXCLUDED.files_discovered,
            tracks_expected = EXCLUDED.tracks_expected, tracks_indexed = EXCLUDED.tracks_indexed,
            tracks_unchanged = EXCLUDED.tracks_unchanged,
            tracks_removed = EXCLUDED.tracks_removed, tracks_failed = EXCLUDED.tracks_failed,
            embeddings_expected = EXCLUDED.embeddings_expected,
            embeddings_done = EXCLUDED.embeddings_done,
            embeddings_skipped = EXCLUDED.embeddings_skipped,
            embeddings_failed = EXCLUDED.embeddings_failed, resumed = EXCLUDED.resumed,
            error = EXCLUDED.error
         WHERE scans.phase NOT IN ('completed', 'failed', 'cancelled')",
    )
    .bind(p.scan.request_id)
    .bind(p.scan.library_id)
    .bind(&p.scan.path)
    .bind(p.scan.trigger.as_str())
    .bind(p.scan.mode.as_str())
    .bind(p.phase.as_str())
    .bind(p.scan.started_at)
    .bind(p.updated_at)
    .bind(p.finished_at)
    .bind(to_i64(p.counts.files_discovered))
    .bind(p.counts.tracks_expected.map(to_i64))
    .bind(to_i64(p.counts.tracks_indexed))
    .bind(to_i64(p.counts.tracks_unchanged))
    .bind(to_i64(p.counts.tracks_removed))
    .bind(to_i64(p.counts.tracks_failed))
    .bind(p.counts.embeddings_expected.map(to_i64))
    .bind(to_i64(p.counts.embeddings_done))
    .bind(to_i64(p.counts.embeddings_skipped))
    .bind(to_i64(p.counts.embeddings_failed))
    .bind(p.scan.resumed)
    .bind(&p.error)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, FromRow)]
pub struct ScanRow {
    pub request_id: Uuid,
    pub library_id: i64,
    pub library_path: String,
    pub subdir: Option<String>,
    pub trigger: String,
    pub mode: String,
    pub phase: String,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub files_discovered: i64,
    pub tracks_expected: Option<i64>,
    pub tracks_indexed: i64,
    pub tracks_unchanged: i64,
    pub tracks_removed: i64,
    pub tracks_failed: i64,
    pub embeddings_expected: Option<i64>,
    pub embeddings_done: i64,
    pub embeddings_skipped: i64,
    pub embeddings_failed: i64,
    pub resumed: bool,
    pub error: Option<String>,
}

impl ScanRow {
    pub fn trigger(&self) -> ScanTrigger {
        ScanTrigger::parse(&self.trigger).unwrap_or(ScanTrigger::Manual)
    }

    pub fn mode(&self) -> ScanMode {
        ScanMode::parse(&self.mode).unwrap_or(ScanMode::Incremental)
    }

    pub fn phase(&self) -> ScanPhase {
        ScanPhase::parse(&self.phase).unwrap_or(ScanPhase::Failed)
    }
}

macro_rules! scan_select {
    () => {
        "SELECT s.request_id, s.library_id, l.path AS library_path, s.subdir,
    s.trigger, s.mode, s.phase, s.started_at, s.updated_at, s.finished_at, s.files_discovered,
    s.tracks_expected, s.tracks_indexed, s.tracks_unchanged, s.tracks_removed, s.tracks_failed,
    s.embeddings_expected, s.embeddings_done, s.embeddings_skipped, s.embeddings_failed,
    s.resumed, s.error
    FROM scans s JOIN libraries l ON l.id = s.library_id"
    };
}

pub async fn get<'e>(db: impl PgExecutor<'e>, request_id: Uuid) -> sqlx::Result<Option<ScanRow>> {
    sqlx::query_as(concat!(scan_select!(), " WHERE s.request_id = $1"))
        .bind(request_id)
        .fetch_optional(db)
        .await
}

/// Scans that were queued or running when corald last stopped, oldest first.
pub async fn unfinished<'e>(db: impl PgExecutor<'e>) -> sqlx::Result<Vec<ScanRow>> {
    sqlx::query_as(concat!(
        scan_select!(),
        " WHERE s.finished_at IS NULL ORDER BY s.started_at"
    ))
    .fetch_all(db)
    .await
}

/// The most recent scans, newest first.
pub async fn recent<'e>(db: impl PgExecutor<'e>, limit: i64) -> sqlx::Result<Vec<ScanRow>> {
    sqlx::query_as(concat!(
        scan_select!(),
        " ORDER BY s.started_at DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The latest scan of each library.
pub async fn latest_per_library<'e>(db: impl PgExecutor<'e>) -> sqlx::Result<Vec<ScanRow>> {
    sqlx::query_as(concat!(
        "SELECT DISTINCT ON (s.library_id) * FROM (",
        scan_select!(),
        ") s ORDER BY s.library_id, s.started_at DESC"
    ))
    .fetch_all(db)
    .await
}
