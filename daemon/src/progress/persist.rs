//! The only writer of `scans` rows: a scan's published state goes to the database here, so a
//! restart resumes interrupted scans and finished scans stay queryable.
//!
//! Three ways in, one rule each:
//! - [`save_waiting`]: the scan worker's phase changes and final states. Goes through
//!   [`health::retry`]: an outage delays the write (until `cancel`), it does not lose it.
//! - [`save_once`]: states decided outside the worker (a scan queued, a queued scan cancelled,
//!   scans interrupted at shutdown). One attempt, because its caller must not wait for an
//!   outage; a failed attempt is caught up by the periodic pass.
//! - [`run_periodic`]: every persist interval, each scan whose published version was not yet
//!   written (running scans' counts, and any state a `save_once` could not write).
//!
//! Each handle remembers the version last written ([`ScanHandle::saved_version`]), and the
//! SQL never turns a finished row back into a running one, so writes that race (the periodic
//! pass and the worker's final state) cannot leave an older state behind.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use coral_proto::{ScanCounts, ScanInfo, ScanProgress};

use super::reporter::{Figures, ScanHandle, ScanReporter, phase_percents, scan_progress};
use crate::db::health::{self, DbHealth, RetryError};
use crate::db::scans::{self, ScanRow};
use crate::liveness::Heartbeat;

/// Write the scan's latest state, waiting while the database is unavailable (until `cancel`).
pub async fn save_waiting(
    pool: &PgPool,
    db: &DbHealth,
    h: &ScanHandle,
    cancel: &CancellationToken,
    heartbeat: Option<&Heartbeat>,
) {
    let (version, latest) = h.latest_versioned();
    let r = health::retry(db, "persist scan", cancel, heartbeat, || {
        scans::upsert(pool, &latest)
    })
    .await;
    match r {
        Ok(()) => h.mark_saved(version),
        Err(RetryError::Cancelled) => {
            tracing::debug!(request_id = %h.request_id(), "scan state not persisted: the database is unavailable")
        }
        Err(e) => {
            tracing::warn!(request_id = %h.request_id(), error = %e, "could not persist scan state")
        }
    }
}

/// Write the scan's latest state once, without waiting for an unavailable database; the
/// periodic pass writes it later if this attempt fails. `what` names the state for the log.
pub async fn save_once(pool: &PgPool, h: &ScanHandle, what: &str) {
    let (version, latest) = h.latest_versioned();
    match scans::upsert(pool, &latest).await {
        Ok(()) => h.mark_saved(version),
        Err(e) => {
            tracing::warn!(request_id = %h.request_id(), error = %e, "could not persist {what} scan now; it is retried at the next persist interval")
        }
    }
}

/// Every `interval` until `stop`, write each scan whose latest published state is not yet in
/// the database. Does not wait for an unavailable database: the next pass tries again.
pub async fn run_periodic(
    reporter: std::sync::Arc<ScanReporter>,
    pool: PgPool,
    db: std::sync::Arc<DbHealth>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        for h in reporter.handles() {
            let (version, latest) = h.latest_versioned();
            if version == 0 || h.saved_version() >= version {
                continue;
            }
            match scans::upsert(&pool, &latest).await {
                Ok(()) => {
                    db.succeeded();
                    h.mark_saved(version);
                }
                Err(e) if health::is_transient(&e) => {
                    db.failed(&e.to_string());
                    break; // the other scans would fail the same way
                }
                Err(e) => {
                    tracing::warn!(request_id = %h.request_id(), error = %e, "could not persist scan state")
                }
            }
        }
    }
}

/// At shutdown: publish and write the state of every scan that has not ended, so it resumes
/// at the next start.
pub async fn save_interrupted(reporter: &ScanReporter, pool: &PgPool) {
    for h in reporter.handles() {
        if !h.phase().is_terminal() {
            reporter.publish(&h);
            save_once(pool, &h, "interrupted").await;
        }
    }
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The counters a `scans` row holds.
pub fn row_counters(row: &ScanRow) -> ScanCounts {
    ScanCounts {
        files_discovered: count(row.files_discovered),
        tracks_expected: row.tracks_expected.map(count),
        tracks_indexed: count(row.tracks_indexed),
        tracks_unchanged: count(row.tracks_unchanged),
        tracks_removed: count(row.tracks_removed),
        tracks_failed: count(row.tracks_failed),
        embeddings_expected: row.embeddings_expected.map(count),
        embeddings_done: count(row.embeddings_done),
        embeddings_skipped: count(row.embeddings_skipped),
        embeddings_failed: count(row.embeddings_failed),
    }
}

/// The progress object of a scan read back from the database: its counts and percentages, no
/// live rates.
pub fn read_back(row: ScanRow) -> ScanProgress {
    let v = row_counters(&row);
    let phase = row.phase();
    let (indexing_percent, embedding_percent) = phase_percents(phase, &v);
    let info = ScanInfo {
        request_id: row.request_id,
        library_id: row.library_id,
        trigger: row.trigger(),
        mode: row.mode(),
        started_at: row.started_at,
        resumed: row.resumed,
        library_path: row.library_path,
        path: row.subdir,
    };
    let figures = Figures {
        indexing_percent,
        embedding_percent,
        ..Figures::default()
    };
    let mut p = scan_progress(
        &info,
        info.mode,
        phase,
        row.finished_at,
        &v,
        figures,
        row.error,
    );
    p.updated_at = row.updated_at;
    p
}
