//! A scan's state in the `scans` table, written only through `progress::persist`: a finished
//! scan's row stays finished whatever order its snapshots' writes arrive in, and a state that
//! could not be written at once is written by the next periodic pass.

use std::time::Duration;

use anyhow::{Context, Result};
use coral_proto::{ScanInfo, ScanMode, ScanPhase, ScanTrigger};
use coral_tests::daemon::traversable_tempdir;
use corald::config::DatabaseConfig;
use corald::db::{Database, libraries, scans};
use corald::progress::ScanReporter;
use corald::progress::persist;
use tokio_util::sync::CancellationToken;

/// A managed PostgreSQL with the schema, and one library to scan.
async fn database(dir: &std::path::Path) -> Result<(Database, i64)> {
    let db = Database::connect(&DatabaseConfig::default(), dir).await?;
    db.prepare().await?;
    let lib = libraries::insert(&db.pool, "/srv/music")
        .await?
        .context("library row")?;
    Ok((db, lib.id))
}

fn info(library_id: i64) -> ScanInfo {
    ScanInfo {
        request_id: uuid::Uuid::new_v4(),
        library_id,
        library_path: "/srv/music".into(),
        path: None,
        trigger: ScanTrigger::Manual,
        mode: ScanMode::Incremental,
        started_at: chrono::Utc::now(),
        resumed: false,
    }
}

#[tokio::test]
async fn a_late_running_snapshot_never_reopens_a_finished_scan() -> Result<()> {
    let dir = traversable_tempdir()?;
    let (db, library_id) = database(dir.path()).await?;
    let reporter = ScanReporter::new();
    let h = reporter.register(info(library_id), ScanPhase::Queued);
    reporter.set_phase(&h, ScanPhase::Indexing);
    // The periodic pass takes this snapshot, and its write is delayed...
    let running = h.latest();
    reporter.finish(&h, ScanPhase::Completed, None);
    persist::save_once(&db.pool, &h, "finished").await;
    assert_eq!(h.saved_version(), h.version(), "the final state is saved");
    // ...until after the final state's write.
    scans::upsert(&db.pool, &running).await?;
    let row = scans::get(&db.pool, h.request_id())
        .await?
        .context("the scan's row")?;
    assert_eq!(
        row.phase(),
        ScanPhase::Completed,
        "a finished scan must not be resumed at the next start"
    );
    assert!(row.finished_at.is_some());
    db.close().await;
    Ok(())
}

#[tokio::test]
async fn a_state_not_yet_written_is_written_by_the_next_periodic_pass() -> Result<()> {
    let dir = traversable_tempdir()?;
    let (db, library_id) = database(dir.path()).await?;
    let reporter = ScanReporter::new();
    // A queued scan cancelled while its one write could not be made (nothing was written).
    let h = reporter.register(info(library_id), ScanPhase::Queued);
    reporter.finish(
        &h,
        ScanPhase::Cancelled,
        Some("cancelled by request".into()),
    );
    assert!(scans::get(&db.pool, h.request_id()).await?.is_none());

    let stop = CancellationToken::new();
    let pass = tokio::spawn(persist::run_periodic(
        reporter.clone(),
        db.pool.clone(),
        db.health.clone(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let row = loop {
        if let Some(row) = scans::get(&db.pool, h.request_id()).await? {
            break row;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the periodic pass never wrote the cancelled scan"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    pass.await?;
    assert_eq!(row.phase(), ScanPhase::Cancelled);
    assert_eq!(row.error.as_deref(), Some("cancelled by request"));
    assert_eq!(h.saved_version(), h.version());
    db.close().await;
    Ok(())
}
