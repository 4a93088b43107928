//! Live progress through the real socket: subscriptions (snapshot first, monotonic,
//! exact final counts), reconnect, a subscriber that never reads, cancel, and resume after
//! SIGKILL.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use coral_proto::{CoralApiClient, LibrarySelector, ScanFilter, ScanPhase, ScanProgress};
use coral_tests::daemon::{
    Daemon, eventually, rss_kib, stuck_subscriber, traversable_tempdir, wait_scan,
};
use coral_tests::fixtures;

/// A config that makes scans take many small transactions (so there is a "mid-scan" to hit).
fn slow_config(dir: &Path) -> Result<String> {
    let p = dir.join("corald.toml");
    std::fs::write(
        &p,
        "[scan]\nbatch_size = 10\nthreads = 1\n[progress]\nnotify_interval_ms = 100\n[watch]\nenabled = false\n",
    )?;
    Ok(p.to_string_lossy().into_owned())
}

fn assert_monotonic(updates: &[ScanProgress]) {
    for w in updates.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            b.phase >= a.phase,
            "phase went back: {:?} -> {:?}",
            a.phase,
            b.phase
        );
        if a.phase == b.phase
            && let (Some(x), Some(y)) = (a.indexing_percent, b.indexing_percent)
        {
            assert!(y >= x, "indexing_percent went back: {x} -> {y}");
        }
        for p in [a, b] {
            if let Some(total) = p.counts.tracks_expected {
                assert!(
                    p.counts.tracks_indexed + p.counts.tracks_unchanged + p.counts.tracks_failed
                        <= total,
                    "{p:?}"
                );
            }
            if let Some(pct) = p.indexing_percent {
                assert!((0.0..=100.0).contains(&pct));
                assert!(
                    p.counts.tracks_expected.is_some(),
                    "no percent before the total: {p:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_gets_snapshot_monotonic_updates_and_exact_final_state() -> Result<()> {
    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 2000)? as u64;
    let cfgdir = traversable_tempdir()?;
    // 200 batches with a 10 ms pause after each (a debug-build hook): indexing lasts ≈ 2 s on
    // any machine, long enough for rates to be sampled (on a quiet machine it otherwise ended
    // inside the first 200 ms rate window and no update carried a rate).
    let d = Daemon::start_with_env(
        &["--config", &slow_config(cfgdir.path())?],
        &[("CORALD_TEST_BATCH_PAUSE_MS", "10")],
    )
    .await?;
    let c = d.client().await?;

    let mut sub = c.scan_subscribe(None).await?;
    let added = c
        .library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let id = added.last_scan.context("no scan queued")?.scan.request_id;
    let mut updates = Vec::new();
    let mut resubscribed_snapshot = None;
    while let Some(p) = sub.next().await {
        let p = p?;
        assert_eq!(p.scan.request_id, id);
        // Mid-scan, a second client subscribes: its first message is the current snapshot.
        if resubscribed_snapshot.is_none()
            && p.phase == ScanPhase::Indexing
            && p.counts.tracks_indexed > 0
        {
            let c2 = d.client().await?;
            let mut sub2 = c2
                .scan_subscribe(Some(ScanFilter {
                    request_id: Some(id),
                    library_id: None,
                }))
                .await?;
            let first = tokio::time::timeout(Duration::from_secs(2), sub2.next())
                .await
                .context("no snapshot within 2 s")?
                .context("subscription closed")??;
            assert_eq!(first.scan.request_id, id);
            assert!(!first.phase.is_terminal());
            assert!(
                first.counts.tracks_indexed >= p.counts.tracks_indexed,
                "{first:?} vs {p:?}"
            );
            resubscribed_snapshot = Some(first);
            drop(sub2); // disconnect mid-scan
        }
        let end = p.phase.is_terminal();
        updates.push(p);
        if end {
            break;
        }
    }
    assert!(
        resubscribed_snapshot.is_some(),
        "never saw the scan mid-indexing"
    );
    // A subscriber gets the latest state when it looks: the queued state may already have
    // given way to discovery, but the scan is seen long before it ends.
    assert!(
        updates[0].phase <= ScanPhase::Indexing && updates[0].counts.tracks_indexed < n,
        "first update came too late: {:?}",
        updates[0]
    );
    assert_monotonic(&updates);
    assert!(
        updates.len() >= 3,
        "expected intermediate updates, got {}",
        updates.len()
    );
    let last = updates.last().context("no updates")?;
    assert_eq!(last.phase, ScanPhase::Completed);
    assert_eq!(last.indexing_percent, Some(100.0));
    assert_eq!(
        (last.counts.tracks_indexed, last.counts.tracks_failed),
        (n, 0)
    );
    assert_eq!(last.counts.tracks_expected, Some(n));
    assert!(last.finished_at.is_some());
    assert!(last.eta_seconds.is_none());

    // Rates are smoothed numbers, and they are reported while indexing.
    assert!(
        updates
            .iter()
            .any(|p| p.tracks_per_second.is_some_and(|r| r > 0.0))
    );

    // Finished scans stay queryable; scan.active no longer lists it.
    assert_eq!(c.scan_get(id).await?.phase, ScanPhase::Completed);
    assert!(
        c.scan_active()
            .await?
            .iter()
            .all(|p| p.scan.request_id != id)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_does_not_stall_scans_or_grow_memory() -> Result<()> {
    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 1500)? as u64;
    let cfgdir = traversable_tempdir()?;
    std::fs::write(
        cfgdir.path().join("c.toml"),
        "[progress]\nnotify_interval_ms = 10\n[watch]\nenabled = false\n",
    )?;
    let cfg = cfgdir.path().join("c.toml").to_string_lossy().into_owned();
    let d = Daemon::start_with(&["--config", &cfg]).await?;
    let c = d.client().await?;
    let (lib_id, first) = coral_tests::daemon::add_and_scan(&c, lib.path()).await?;
    assert_eq!(first.counts.tracks_indexed, n);

    let t = Instant::now();
    let p = coral_tests::daemon::scan(&c, lib_id, None, true).await?;
    let baseline = t.elapsed();
    assert_eq!(p.counts.tracks_indexed, n);

    let pid = d.pid().context("no pid")?;
    let rss_before = rss_kib(pid)?;
    let _stuck: Vec<UnixStream> = (0..20)
        .map(|_| stuck_subscriber(&d.socket, 50))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    for _ in 0..3 {
        let p = coral_tests::daemon::scan(&c, lib_id, None, true).await?;
        assert_eq!(p.phase, ScanPhase::Completed);
        assert_eq!(p.counts.tracks_indexed, n);
    }
    let with_stuck = t.elapsed() / 3;
    let rss_after = rss_kib(pid)?;
    eprintln!(
        "full rescan: {baseline:?} alone, {with_stuck:?} with 1000 stuck subscriptions; RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        with_stuck < baseline * 3 + Duration::from_secs(2),
        "stuck subscribers slowed the scan: {baseline:?} -> {with_stuck:?}"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Other clients are still served promptly.
    let t = Instant::now();
    c.daemon_status().await?;
    assert!(t.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_scan_quickly_and_leaves_the_db_consistent() -> Result<()> {
    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 3000)? as u64;
    let cfgdir = traversable_tempdir()?;
    let d = Daemon::start_with(&["--config", &slow_config(cfgdir.path())?]).await?;
    let c = d.client().await?;
    let added = c
        .library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let id = added.last_scan.context("no scan")?.scan.request_id;
    eventually(Duration::from_secs(60), "indexing to start", || async {
        c.scan_get(id)
            .await
            .ok()
            .filter(|p| p.counts.tracks_indexed > 0)
    })
    .await?;
    let asked = Instant::now();
    c.scan_cancel(id).await?;
    let p = wait_scan(&c, id).await?;
    let took = asked.elapsed();
    assert_eq!(p.phase, ScanPhase::Cancelled, "{p:?}");
    assert!(took < Duration::from_secs(3), "cancel took {took:?}");
    assert!(
        p.counts.tracks_indexed < n,
        "the scan finished before the cancel landed"
    );
    let mut db = d.db().await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tracks")
        .fetch_one(&mut db)
        .await?;
    assert_eq!(
        rows as u64, p.counts.tracks_indexed,
        "every counted track is in the DB and no more"
    );
    // Cancelling again is an error that says so.
    let e = c.scan_cancel(id).await.expect_err("already ended");
    assert!(e.to_string().contains("already ended"), "{e}");
    // A cancelled scan is finished: the next scan picks up the rest.
    let p = coral_tests::daemon::scan(&c, added.id, None, false).await?;
    assert_eq!(p.counts.tracks_indexed + p.counts.tracks_unchanged, n);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_killed_mid_way_resumes_with_its_request_id_and_matches_a_clean_run() -> Result<()> {
    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 3000)? as u64;
    let cfgdir = traversable_tempdir()?;
    let mut d = Daemon::start_with(&["--config", &slow_config(cfgdir.path())?]).await?;
    let c = d.client().await?;
    let added = c
        .library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let id = added.last_scan.context("no scan")?.scan.request_id;
    eventually(
        Duration::from_secs(60),
        "indexing to be under way",
        || async {
            c.scan_get(id)
                .await
                .ok()
                .filter(|p| p.counts.tracks_indexed > 100)
        },
    )
    .await?;
    drop(c);
    d.kill()?;
    d.spawn().await?;
    let c = d.client().await?;
    let p = wait_scan(&c, id).await?;
    assert_eq!(p.scan.request_id, id);
    assert!(p.scan.resumed, "{p:?}");
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    // The same counts an uninterrupted run reports.
    assert_eq!(
        (
            p.counts.tracks_indexed,
            p.counts.tracks_unchanged,
            p.counts.tracks_failed
        ),
        (n, 0, 0),
        "{p:?}"
    );
    let mut db = d.db().await?;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT rel_path) FROM tracks")
            .fetch_one(&mut db)
            .await?;
    assert_eq!((rows as u64, distinct as u64), (n, n));
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM scans WHERE finished_at IS NULL")
            .fetch_one(&mut db)
            .await?;
    assert_eq!(unfinished, 0);
    let _ = LibrarySelector::Id(added.id);
    Ok(())
}
