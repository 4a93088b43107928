//! The filesystem watcher with real inotify on real files, through a real
//! corald. Every wait polls with a deadline; the daemon runs with `debounce_ms = 300` and
//! `root_check_s = 1` so the quiet periods stay short.
//!
//! The watch-limit fallback uses the configured limit (`watch.max_watches`), not the kernel's:
//! lowering `fs.inotify.max_user_watches` would need root and would change a machine-wide
//! setting under every other process (and every other test running in parallel).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use coral_proto::{CoralApiClient, LibraryWatch, ScanPhase, ScanProgress, ScanTrigger, WatchMode};
use coral_tests::daemon::{Daemon, add_and_scan, eventually, traversable_tempdir};
use coral_tests::fixtures::{self, FixtureTrack};
use jsonrpsee::async_client::Client;
use sqlx::Row;

const DEBOUNCE: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(60);

/// Start corald with a fast watcher (plus `extra` lines in the `[watch]` section).
async fn start(cfg_dir: &Path, extra: &str) -> Result<Daemon> {
    let p = cfg_dir.join("corald.toml");
    std::fs::write(
        &p,
        format!(
            "[watch]\ndebounce_ms = {}\nroot_check_s = 1\n{extra}\n",
            DEBOUNCE.as_millis()
        ),
    )?;
    Daemon::start_with(&["--config", &p.to_string_lossy()]).await
}

/// Relative path → (track id, title) of every track of a library.
async fn rows(d: &Daemon, library_id: i64) -> Result<BTreeMap<String, (i64, Option<String>)>> {
    let mut db = d.db().await?;
    let rows = sqlx::query("SELECT id, rel_path_text, title FROM tracks WHERE library_id = $1")
        .bind(library_id)
        .fetch_all(&mut db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get("rel_path_text"), (r.get("id"), r.get("title"))))
        .collect())
}

/// Scans the watcher queued for a library, oldest first.
async fn fs_scans(c: &Client, library_id: i64) -> Result<Vec<ScanProgress>> {
    let mut v: Vec<ScanProgress> = c
        .scan_list(Some(1000))
        .await?
        .into_iter()
        .filter(|p| {
            p.scan.library_id == library_id && p.scan.trigger == ScanTrigger::FileSystemEvent
        })
        .collect();
    v.sort_by_key(|p| p.scan.started_at);
    Ok(v)
}

/// Wait until no scan is queued or running, then a little longer than the quiet period, and
/// again until none is (so a late watcher scan is not missed).
async fn settle(c: &Client) -> Result<()> {
    for _ in 0..2 {
        eventually(WAIT, "all scans to end", || async {
            c.scan_active().await.ok().filter(|a| a.is_empty())
        })
        .await?;
        tokio::time::sleep(DEBOUNCE * 3).await;
    }
    eventually(WAIT, "all scans to end", || async {
        c.scan_active().await.ok().filter(|a| a.is_empty())
    })
    .await?;
    Ok(())
}

async fn watch_of(c: &Client, library_id: i64) -> Result<LibraryWatch> {
    c.daemon_status()
        .await?
        .watch
        .into_iter()
        .find(|w| w.library_id == library_id)
        .context("daemon.status has no watch entry for the library")
}

/// Wait for the library's watch mode.
async fn wait_mode(c: &Client, library_id: i64, mode: WatchMode) -> Result<LibraryWatch> {
    eventually(WAIT, &format!("watch mode {mode:?}"), || async {
        watch_of(c, library_id)
            .await
            .ok()
            .filter(|w| w.mode == mode)
    })
    .await
}

/// Wait until the library's rows satisfy `f`.
async fn wait_rows<F>(
    d: &Daemon,
    library_id: i64,
    what: &str,
    f: F,
) -> Result<BTreeMap<String, (i64, Option<String>)>>
where
    F: Fn(&BTreeMap<String, (i64, Option<String>)>) -> bool,
{
    eventually(WAIT, what, || async {
        rows(d, library_id).await.ok().filter(|r| f(r))
    })
    .await
}

fn track(rel: &str, format: &'static str, title: &str) -> FixtureTrack {
    FixtureTrack::simple(rel, format, title)
}

/// Copy every file of `src` (flat) into `dst` (created).
fn copy_dir(src: &Path, dst: &Path) -> Result<usize> {
    std::fs::create_dir_all(dst)?;
    let mut n = 0;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
            n += 1;
        }
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_album_copied_in_is_indexed_once_after_the_quiet_period() -> Result<()> {
    let lib = traversable_tempdir()?;
    fixtures::make_track(lib.path(), &track("Old/0.mp3", "mp3", "Already There"))?;
    let scratch = traversable_tempdir()?;
    let album: Vec<FixtureTrack> = ["mp3", "flac", "ogg_vorbis", "mp3", "flac"]
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let ext = if *f == "ogg_vorbis" { "ogg" } else { f };
            track(
                &format!("{i:02} Song.{ext}"),
                f,
                &format!("Copied Song {i}"),
            )
        })
        .collect();
    fixtures::make_tracks(scratch.path(), &album)?;
    let cfg = traversable_tempdir()?;
    let d = start(cfg.path(), "").await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, lib.path()).await?;
    let w = watch_of(&c, id).await?;
    assert_eq!(w.mode, WatchMode::Inotify, "{w:?}");
    assert_eq!(w.watches, 2, "root and Old/: {w:?}");

    let copied = copy_dir(scratch.path(), &lib.path().join("Artist/Album"))?;
    let copy_done = Utc::now();
    let r = wait_rows(&d, id, "the copied album to be indexed", |r| {
        r.len() == 1 + copied
    })
    .await?;
    for t in &album {
        let rel = format!("Artist/Album/{}", t.rel_path.display());
        assert_eq!(r[&rel].1.as_deref(), Some(t.title.as_str()), "{rel}");
    }
    settle(&c).await?;
    let scans = fs_scans(&c, id).await?;
    assert_eq!(
        scans.len(),
        1,
        "indexed by exactly one watcher scan: {scans:#?}"
    );
    let s = &scans[0];
    assert_eq!(s.phase, ScanPhase::Completed, "{s:?}");
    assert_eq!(s.counts.tracks_indexed, copied as u64, "{s:?}");
    assert_eq!(s.scan.mode, coral_proto::ScanMode::Incremental);
    assert_eq!(
        s.scan.path.as_deref(),
        Some("Artist"),
        "a path-targeted scan: {s:?}"
    );
    let waited = (s.scan.started_at - copy_done).to_std().unwrap_or_default();
    assert!(
        waited >= DEBOUNCE - Duration::from_millis(50),
        "queued only after the quiet period ({waited:?})"
    );
    let w = watch_of(&c, id).await?;
    assert_eq!((w.watches, w.pending_paths), (4, 0), "{w:?}");
    assert!(w.last_event_at.is_some());

    // coralctl status shows the watcher.
    let out = d.ctl(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("inotify") && text.contains("4 watches"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_still_being_written_is_not_indexed_until_it_is_closed() -> Result<()> {
    let lib = traversable_tempdir()?;
    let scratch = traversable_tempdir()?;
    let src = fixtures::make_track(scratch.path(), &track("slow.flac", "flac", "Slow Copy"))?;
    let bytes = std::fs::read(&src)?;
    let cfg = traversable_tempdir()?;
    let d = start(cfg.path(), "").await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, lib.path()).await?;

    // The directory exists (and is watched) before the copy starts; a file written into a
    // directory whose watch does not exist yet cannot be seen open (its scan runs after the
    // quiet period, and again when it is closed).
    std::fs::create_dir(lib.path().join("incoming"))?;
    eventually(WAIT, "the new directory to be watched", || async {
        watch_of(&c, id).await.ok().filter(|w| w.watches == 2)
    })
    .await?;
    settle(&c).await?;
    let mut f = std::fs::File::create(lib.path().join("incoming/slow.flac"))?;
    f.write_all(&bytes[..bytes.len() / 2])?;
    f.flush()?;
    // Four quiet periods with the file open: nothing more may be queued.
    let scans_before = fs_scans(&c, id).await?.len();
    tokio::time::sleep(DEBOUNCE * 4).await;
    assert_eq!(
        fs_scans(&c, id).await?.len(),
        scans_before,
        "scanned mid-copy"
    );
    let w = watch_of(&c, id).await?;
    assert_eq!(w.open_files, 1, "{w:?}");
    assert!(w.pending_paths >= 1, "{w:?}");
    f.write_all(&bytes[bytes.len() / 2..])?;
    drop(f);
    let r = wait_rows(&d, id, "the closed file to be indexed", |r| !r.is_empty()).await?;
    assert_eq!(r["incoming/slow.flac"].1.as_deref(), Some("Slow Copy"));
    settle(&c).await?;
    let scans = fs_scans(&c, id).await?;
    assert_eq!(scans.len(), scans_before + 1, "{scans:#?}");
    let last = scans.last().context("the scan after the close")?;
    assert_eq!(
        (last.counts.tracks_indexed, last.counts.tracks_failed),
        (1, 0),
        "{last:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retag_rename_move_and_delete_keep_the_index_right_and_the_ids() -> Result<()> {
    let lib = traversable_tempdir()?;
    fixtures::make_tracks(
        lib.path(),
        &[
            track("A/one.mp3", "mp3", "One"),
            track("A/two.flac", "flac", "Two"),
            track("B/three.ogg", "ogg_vorbis", "Three"),
            track("B/sub/four.mp3", "mp3", "Four"),
        ],
    )?;
    let scratch = traversable_tempdir()?;
    let retagged = fixtures::make_track(scratch.path(), &track("one.mp3", "mp3", "One Retagged"))?;
    let newfile = fixtures::make_track(scratch.path(), &track("new.mp3", "mp3", "Newcomer"))?;
    let cfg = traversable_tempdir()?;
    let d = start(cfg.path(), "").await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, lib.path()).await?;
    let before = rows(&d, id).await?;
    assert_eq!(before.len(), 4);
    let root = lib.path();

    // Retag: write a temporary (hidden) file and rename it over the old one.
    std::fs::copy(&retagged, root.join("A/.one.mp3.tmp"))?;
    std::fs::rename(root.join("A/.one.mp3.tmp"), root.join("A/one.mp3"))?;
    let r = wait_rows(&d, id, "the retagged title", |r| {
        r.get("A/one.mp3").and_then(|t| t.1.as_deref()) == Some("One Retagged")
    })
    .await?;
    assert_eq!(r["A/one.mp3"].0, before["A/one.mp3"].0, "same row");
    settle(&c).await?;
    let scans_before_moves = fs_scans(&c, id).await?.len();
    assert_eq!(scans_before_moves, 1);

    // Rename a file: same id, new path, no rescan.
    std::fs::rename(root.join("A/two.flac"), root.join("A/two (renamed).flac"))?;
    let r = wait_rows(&d, id, "the renamed file", |r| {
        r.contains_key("A/two (renamed).flac") && !r.contains_key("A/two.flac")
    })
    .await?;
    assert_eq!(r["A/two (renamed).flac"].0, before["A/two.flac"].0);

    // Move a directory inside the library: every row below keeps its id.
    std::fs::rename(root.join("B"), root.join("A/B moved"))?;
    let r = wait_rows(&d, id, "the moved directory", |r| {
        r.contains_key("A/B moved/three.ogg") && r.contains_key("A/B moved/sub/four.mp3")
    })
    .await?;
    assert_eq!(r["A/B moved/three.ogg"].0, before["B/three.ogg"].0);
    assert_eq!(r["A/B moved/sub/four.mp3"].0, before["B/sub/four.mp3"].0);
    assert_eq!(r.len(), 4, "{r:?}");
    settle(&c).await?;
    assert_eq!(
        fs_scans(&c, id).await?.len(),
        scans_before_moves,
        "moves are applied without a rescan"
    );

    // The moved directory is still watched under its new path.
    std::fs::copy(&newfile, root.join("A/B moved/sub/new.mp3"))?;
    wait_rows(&d, id, "a file added to the moved directory", |r| {
        r.contains_key("A/B moved/sub/new.mp3")
    })
    .await?;

    // Delete: the row goes; the others stay.
    std::fs::remove_file(root.join("A/one.mp3"))?;
    let r = wait_rows(&d, id, "the deleted file's row to go", |r| {
        !r.contains_key("A/one.mp3")
    })
    .await?;
    assert_eq!(r.len(), 4, "{r:?}");

    // Moved out of the library: removed. Moved back in: added.
    let outside = scratch.path().join("parked");
    std::fs::rename(root.join("A/B moved"), &outside)?;
    wait_rows(&d, id, "rows of the directory moved out to go", |r| {
        r.keys().all(|k| !k.starts_with("A/B moved/"))
    })
    .await?;
    std::fs::rename(&outside, root.join("Back"))?;
    let r = wait_rows(&d, id, "the directory moved back in", |r| {
        r.contains_key("Back/three.ogg") && r.contains_key("Back/sub/new.mp3")
    })
    .await?;
    assert_eq!(r.len(), 4, "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_into_freshly_created_nested_directories_are_found() -> Result<()> {
    let lib = traversable_tempdir()?;
    let scratch = traversable_tempdir()?;
    let srcs = fixtures::make_tracks(
        scratch.path(),
        &[
            track("a.mp3", "mp3", "Nested A"),
            track("b.flac", "flac", "Nested B"),
        ],
    )?;
    let cfg = traversable_tempdir()?;
    let d = start(cfg.path(), "").await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, lib.path()).await?;
    // mkdir -p and write at once, before any watch can exist on the new directories.
    let mut expected = Vec::new();
    for i in 0..5 {
        let dir = format!("new{i}/deeper/deepest");
        std::fs::create_dir_all(lib.path().join(&dir))?;
        for s in &srcs {
            let name = s.file_name().context("file name")?;
            std::fs::copy(s, lib.path().join(&dir).join(name))?;
            expected.push(format!("{dir}/{}", name.to_string_lossy()));
        }
    }
    let r = wait_rows(&d, id, "every nested file", |r| r.len() == expected.len()).await?;
    for e in &expected {
        assert!(r.contains_key(e), "{e} missing: {r:?}");
    }
    let w = watch_of(&c, id).await?;
    assert_eq!(
        w.watches,
        1 + 5 * 3,
        "every new directory is watched: {w:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_files_dropped_at_once_take_a_few_scans() -> Result<()> {
    let lib = traversable_tempdir()?;
    let cfg = traversable_tempdir()?;
    let d = start(cfg.path(), "").await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, lib.path()).await?;
    // 200 directories of 10 files (hard links of a hidden template, which is not watched).
    let n = fixtures::big_library(lib.path(), 2000)?;
    let started = Instant::now();
    eventually(Duration::from_secs(300), "2000 files indexed", || async {
        rows(&d, id).await.ok().filter(|r| r.len() == n)
    })
    .await?;
    let took = started.elapsed();
    settle(&c).await?;
    let scans = fs_scans(&c, id).await?;
    assert!(
        !scans.is_empty() && scans.len() <= 5,
        "{} watcher scans for one burst: {:#?}",
        scans.len(),
        scans
            .iter()
            .map(|s| (&s.scan.path, s.counts.tracks_indexed))
            .collect::<Vec<_>>()
    );
    let indexed: u64 = scans.iter().map(|s| s.counts.tracks_indexed).sum();
    assert_eq!(indexed, n as u64, "each file indexed once");
    eprintln!("{n} files indexed by {} scans in {took:?}", scans.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_that_goes_away_pauses_the_watcher_and_deletes_nothing() -> Result<()> {
    let base = traversable_tempdir()?;
    let root = base.path().join("music");
    fixtures::make_tracks(
        &root,
        &[
            track("a/1.mp3", "mp3", "One"),
            track("a/2.flac", "flac", "Two"),
        ],
    )?;
    let cfg = traversable_tempdir()?;
    let d = start(cfg.path(), "").await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, &root).await?;
    let before = rows(&d, id).await?;

    // Unmounted (the root disappears).
    let away = base.path().join("elsewhere");
    std::fs::rename(&root, &away)?;
    let w = wait_mode(&c, id, WatchMode::Paused).await?;
    assert!(
        w.warning
            .as_deref()
            .unwrap_or_default()
            .contains("nothing is scanned or deleted"),
        "{w:?}"
    );
    let status = c.daemon_status().await?;
    assert!(
        status.warnings.iter().any(|m| m.contains("paused")),
        "{:?}",
        status.warnings
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // two root checks
    assert!(
        fs_scans(&c, id).await?.is_empty(),
        "nothing scanned while paused"
    );
    assert_eq!(rows(&d, id).await?, before, "nothing deleted");

    // An empty directory appears where the root was (a mount point without its disk).
    std::fs::create_dir(&root)?;
    wait_mode(&c, id, WatchMode::Inotify).await?;
    settle(&c).await?;
    let scans = fs_scans(&c, id).await?;
    assert_eq!(scans.len(), 1, "{scans:#?}");
    assert_eq!(scans[0].counts.tracks_removed, 0, "{:?}", scans[0]);
    assert!(
        scans[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("nothing was deleted"),
        "{:?}",
        scans[0]
    );
    assert_eq!(rows(&d, id).await?, before);

    // The disk comes back.
    std::fs::remove_dir(&root)?;
    wait_mode(&c, id, WatchMode::Paused).await?;
    std::fs::rename(&away, &root)?;
    wait_mode(&c, id, WatchMode::Inotify).await?;
    settle(&c).await?;
    let scans = fs_scans(&c, id).await?;
    let last = scans.last().context("a scan after the root came back")?;
    assert_eq!(scans.len(), 2, "{scans:#?}");
    assert_eq!(last.phase, ScanPhase::Completed);
    assert_eq!(
        (last.counts.tracks_unchanged, last.counts.tracks_removed),
        (2, 0),
        "{last:?}"
    );
    assert_eq!(rows(&d, id).await?, before, "same rows, same ids");
    assert!(c.daemon_status().await?.warnings.is_empty());

    // Watching again: a new file is found.
    fixtures::make_track(&root, &track("a/3.mp3", "mp3", "Three"))?;
    wait_rows(&d, id, "a file added after the root came back", |r| {
        r.len() == 3
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_limit_falls_back_to_polling_with_simulated_watch_limit() -> Result<()> {
    let lib = traversable_tempdir()?;
    fixtures::make_tracks(
        lib.path(),
        &[
            track("a/1.mp3", "mp3", "One"),
            track("b/2.mp3", "mp3", "Two"),
            track("c/d/3.mp3", "mp3", "Three"),
        ],
    )?;
    let cfg = traversable_tempdir()?;
    // Root, a, b, c, c/d: five directories, three watches allowed.
    let d = start(cfg.path(), "max_watches = 3\npoll_interval_s = 2").await?;
    let c = d.client().await?;
    let (id, first) = add_and_scan(&c, lib.path()).await?;
    assert_eq!(first.counts.tracks_indexed, 3, "{first:?}");
    let w = wait_mode(&c, id, WatchMode::Polling).await?;
    let warning = w.warning.clone().unwrap_or_default();
    assert!(warning.contains("fs.inotify.max_user_watches"), "{warning}");
    assert!(warning.contains("needs 5 watches"), "{warning}");
    assert!(warning.contains("polled every 2 s"), "{warning}");
    assert_eq!((w.watches, w.poll_interval_seconds), (0, Some(2)), "{w:?}");
    let status = c.daemon_status().await?;
    assert!(
        status
            .warnings
            .iter()
            .any(|m| m.contains("watch limit") && m.contains(&w.path)),
        "{:?}",
        status.warnings
    );
    let out = d.ctl(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("polling") && text.contains("every 2 s"),
        "{text}"
    );

    // Changes are still found, by polling.
    fixtures::make_track(lib.path(), &track("a/new.mp3", "mp3", "Found By Polling"))?;
    wait_rows(&d, id, "the polled change", |r| r.contains_key("a/new.mp3")).await?;
    let scans = fs_scans(&c, id).await?;
    assert!(
        scans
            .iter()
            .any(|s| s.scan.path.is_none() && s.counts.tracks_indexed == 1),
        "{scans:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_libraries_are_not_watched_and_say_so() -> Result<()> {
    let lib = traversable_tempdir()?;
    let cfg = traversable_tempdir()?;
    let canonical: PathBuf = std::fs::canonicalize(lib.path())?;
    let d = start(
        cfg.path(),
        &format!("exclude_libraries = [\"{}\"]", canonical.display()),
    )
    .await?;
    let c = d.client().await?;
    let (id, _) = add_and_scan(&c, lib.path()).await?;
    let w = watch_of(&c, id).await?;
    assert_eq!(w.mode, WatchMode::Disabled, "{w:?}");
    assert!(w.warning.unwrap_or_default().contains("exclude_libraries"));
    fixtures::make_track(lib.path(), &track("x.mp3", "mp3", "Unseen"))?;
    tokio::time::sleep(DEBOUNCE * 4).await;
    if !fs_scans(&c, id).await?.is_empty() || !rows(&d, id).await?.is_empty() {
        bail!("an excluded library was scanned by the watcher");
    }
    Ok(())
}
