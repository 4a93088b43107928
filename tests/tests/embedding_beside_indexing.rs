//! Embedding runs beside indexing: while one library's long embedding backlog runs, a file copied
//! into another, watched library is indexed, searchable and embedded, through a real corald with
//! the real model, real inotify and real PostgreSQL.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use coral_proto::{CoralApiClient, ScanPhase, ScanProgress, ScanTrigger};
use coral_tests::daemon::{Daemon, add_and_scan, eventually, traversable_tempdir, wait_scan};
use coral_tests::fixtures::{self, FixtureTrack};

const WAIT: Duration = Duration::from_secs(120);
/// Tracks in the backlog: at ≈3 tracks/s (a debug build on two cores), many seconds of embedding,
/// and far more than the pipeline's decode queue holds (2 × decode threads + 2).
const BACKLOG: usize = 60;

fn track(rel: &str, title: &str) -> FixtureTrack {
    FixtureTrack {
        duration_s: 8.0,
        ..FixtureTrack::simple(rel, "flac", title)
    }
}

/// corald with a fast watcher, and embeddings for tracks of 5 s and more.
async fn start(cfg_dir: &Path) -> Result<Daemon> {
    let p = cfg_dir.join("corald.toml");
    std::fs::write(
        &p,
        "[watch]\ndebounce_ms = 300\nroot_check_s = 1\n\n[embed]\nmin_duration_s = 5\n",
    )?;
    Daemon::start_with(&["--config", &p.to_string_lossy()]).await
}

async fn progress(c: &jsonrpsee::async_client::Client, id: uuid::Uuid) -> Result<ScanProgress> {
    Ok(c.scan_get(id).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_copied_in_is_searchable_and_embedded_while_another_library_embeds_a_backlog()
-> Result<()> {
    // The backlog: one encoded track, hard-linked under many names (each is its own track).
    let backlog = traversable_tempdir()?;
    let first = fixtures::make_track(backlog.path(), &track("Backlog/000.flac", "Backlog"))?;
    for i in 1..BACKLOG {
        std::fs::hard_link(&first, backlog.path().join(format!("Backlog/{i:03}.flac")))?;
    }
    let fresh = traversable_tempdir()?;
    fixtures::make_track(fresh.path(), &track("Old/old.flac", "Already There"))?;
    let scratch = traversable_tempdir()?;
    fixtures::make_track(scratch.path(), &track("new.flac", "Freshly Copied"))?;

    let cfg = traversable_tempdir()?;
    let d = start(cfg.path()).await?;
    let c = d.client().await?;
    if !c.daemon_status().await?.embedding.enabled {
        eprintln!("embeddings are not enabled in this build: nothing to run beside");
        return Ok(());
    }
    let (fresh_id, p) = add_and_scan(&c, fresh.path()).await?;
    ensure!(p.phase == ScanPhase::Completed, "{p:?}");

    let lib = c
        .library_add(backlog.path().to_string_lossy().into_owned())
        .await?;
    let backlog_scan = lib
        .last_scan
        .context("library.add queued no scan")?
        .scan
        .request_id;
    eventually(
        WAIT,
        "the backlog scan to index and start embedding",
        || async {
            progress(&c, backlog_scan)
                .await
                .ok()
                .filter(|p| p.phase == ScanPhase::Embedding)
        },
    )
    .await?;

    // Copy a file into the watched library (written elsewhere, renamed in).
    std::fs::rename(
        scratch.path().join("new.flac"),
        fresh.path().join("new.flac"),
    )?;
    let copied = Instant::now();
    let found = eventually(WAIT, "the copied file to be searchable", || async {
        c.track_search("Freshly Copied".into(), None, None)
            .await
            .ok()
            .filter(|t| !t.is_empty())
    })
    .await?;
    let searchable_after = copied.elapsed();
    let backlog_then = progress(&c, backlog_scan).await?;
    eprintln!(
        "searchable {:.2} s after the copy (quiet period 0.3 s), with {} of {} backlog tracks embedded",
        searchable_after.as_secs_f64(),
        backlog_then.counts.embeddings_done,
        BACKLOG
    );
    ensure!(found.len() == 1, "{found:?}");
    ensure!(
        backlog_then.phase == ScanPhase::Embedding
            && backlog_then.counts.embeddings_done < BACKLOG as u64,
        "the copy became searchable only after the backlog: {backlog_then:?}"
    );

    // The watcher scan's one track is embedded (and its scan completed) before the backlog ends.
    let watcher_scan = eventually(WAIT, "the watcher scan to end", || async {
        c.scan_list(Some(100)).await.ok().and_then(|v| {
            v.into_iter().find(|p| {
                p.scan.library_id == fresh_id
                    && p.scan.trigger == ScanTrigger::FileSystemEvent
                    && p.phase.is_terminal()
            })
        })
    })
    .await?;
    let backlog_then = progress(&c, backlog_scan).await?;
    ensure!(
        watcher_scan.phase == ScanPhase::Completed,
        "{watcher_scan:?}"
    );
    ensure!(
        (
            watcher_scan.counts.tracks_indexed,
            watcher_scan.counts.embeddings_done
        ) == (1, 1),
        "{watcher_scan:?}"
    );
    ensure!(
        backlog_then.phase == ScanPhase::Embedding,
        "the watcher scan waited for the whole backlog: {backlog_then:?}"
    );
    ensure!(
        c.track_get(found[0].id).await?.has_embedding,
        "{:?}",
        found[0]
    );

    // The backlog still ends with exact counts.
    let done = wait_scan(&c, backlog_scan).await?;
    ensure!(done.phase == ScanPhase::Completed, "{done:?}");
    ensure!(
        (
            done.counts.tracks_indexed,
            done.counts.embeddings_expected,
            done.counts.embeddings_done
        ) == (BACKLOG as u64, Some(BACKLOG as u64), BACKLOG as u64),
        "{done:?}"
    );
    let mut db = d.db().await?;
    let (vectors, tracks): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM track_embeddings), (SELECT count(*) FROM tracks)",
    )
    .fetch_one(&mut db)
    .await?;
    ensure!(
        (vectors, tracks) == (BACKLOG as i64 + 2, BACKLOG as i64 + 2),
        "one vector per track: {vectors} vectors, {tracks} tracks"
    );
    Ok(())
}
