//! coralctl end to end through the real binary against a real corald: tables and `--json`,
//! `scan --wait/--follow` exit codes, live bars in a pseudo-terminal, one line per update when
//! piped, reconnection when corald restarts, and the message when corald is not running.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use coral_proto::{Library, ScanPhase, ScanProgress, ScanStarted, Track};
use coral_tests::daemon::{Daemon, coralctl_bin, eventually, traversable_tempdir};
use coral_tests::fixtures::{self, FixtureTrack};

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "coralctl failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `coralctl --json library add <dir>`, which must succeed: the library it added.
fn ctl_library_add(d: &Daemon, dir: &Path) -> Result<Library> {
    Ok(serde_json::from_str(&ok(&d.ctl(&[
        "--json",
        "library",
        "add",
        &dir.to_string_lossy(),
    ])?))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_end_to_end() -> Result<()> {
    let lib = traversable_tempdir()?;
    fixtures::make_track(lib.path(), &{
        let mut t = FixtureTrack::simple("Zoë/Album/01 Première.flac", "flac", "Première");
        t.artist = "Zoë Keating".into();
        t
    })?;
    fixtures::make_track(
        lib.path(),
        &FixtureTrack::simple("x/two.mp3", "mp3", "Second Song"),
    )?;
    std::fs::write(lib.path().join("x/broken.mp3"), b"not audio at all")?;
    let d = Daemon::start().await?;

    let added = ctl_library_add(&d, lib.path())?;
    let id = added.id.to_string();
    let out = d.ctl(&["scan", &id, "--wait"])?;
    let summary = ok(&out);
    assert!(summary.contains("completed"), "{summary}");

    let libs: Vec<Library> = serde_json::from_str(&ok(&d.ctl(&["--json", "library", "list"])?))?;
    assert_eq!(libs.len(), 1);
    assert_eq!((libs[0].track_count, libs[0].failed_count), (2, 1));
    assert!(libs[0].last_scan.is_some());
    let table = ok(&d.ctl(&["library", "list"])?);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&*lib.path().to_string_lossy()), "{table}");

    let hits: Vec<Track> =
        serde_json::from_str(&ok(&d.ctl(&["--json", "search", "zoe premiere"])?))?;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].tags.title.as_deref(), Some("Première"));
    let human = ok(&d.ctl(&["search", "second"])?);
    assert!(
        human.contains("Second Song") && human.contains("ARTIST"),
        "{human}"
    );
    let one = ok(&d.ctl(&["track", &hits[0].id.to_string()])?);
    assert!(one.contains("Zoë Keating") && one.contains("flac"), "{one}");

    let started: ScanStarted = serde_json::from_str(&ok(&d.ctl(&[
        "--json",
        "scan",
        &lib.path().to_string_lossy(),
    ])?))?;
    assert_eq!(started.library_id, added.id);
    let scans: Vec<ScanProgress> = serde_json::from_str(&ok(&d.ctl(&["--json", "scans"])?))?;
    assert!(
        scans
            .iter()
            .any(|s| s.scan.request_id == started.request_id)
    );
    let status = ok(&d.ctl(&["status"])?);
    assert!(status.contains("tracks     2"), "{status}");

    // Errors: a message on stderr and exit status 1.
    let out = d.ctl(&["library", "add", "/nonexistent/music"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let out = d.ctl(&["scan", "12345"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no library 12345"));

    // library remove forgets the tracks.
    ok(&d.ctl(&["library", "remove", &id])?);
    let libs: Vec<Library> = serde_json::from_str(&ok(&d.ctl(&["--json", "library", "list"])?))?;
    assert!(libs.is_empty());
    Ok(())
}

#[test]
fn says_where_it_looked_when_corald_is_not_running() -> Result<()> {
    let dir = traversable_tempdir()?;
    let sock = dir.path().join("nothing.sock");
    let out = Command::new(coralctl_bin())
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*sock.to_string_lossy()), "{err}");
    assert!(
        err.contains("not running") && err.contains("start it"),
        "{err}"
    );
    Ok(())
}

async fn library_with(d: &Daemon, files: usize) -> Result<(tempfile::TempDir, i64)> {
    let lib = traversable_tempdir()?;
    fixtures::big_library(lib.path(), files)?;
    let c = d.client().await?;
    let (id, _) = coral_tests::daemon::add_and_scan(&c, lib.path()).await?;
    Ok((lib, id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_prints_lines_or_json_when_piped_and_bars_on_a_terminal() -> Result<()> {
    let d = Daemon::start().await?;
    let (_lib, id) = library_with(&d, 300).await?;
    let id = id.to_string();

    // Not a terminal: one line per update, exit 0.
    let lines = ok(&d.ctl(&["scan", &id, "--full", "--follow"])?);
    let last = lines.lines().last().context("no output")?;
    assert!(
        last.contains("completed") && last.contains("100.0%"),
        "{lines}"
    );

    // --json: one object per line, percentages monotonic, the last completed.
    let out = ok(&d.ctl(&["--json", "scan", &id, "--full", "--follow"])?);
    let updates: Vec<ScanProgress> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let last = updates.last().context("no updates")?;
    assert_eq!(last.phase, ScanPhase::Completed);
    assert_eq!(last.indexing_percent, Some(100.0));
    let pcts: Vec<f64> = updates.iter().filter_map(|p| p.indexing_percent).collect();
    assert!(pcts.windows(2).all(|w| w[1] >= w[0]), "{pcts:?}");

    // A pseudo-terminal (util-linux `script`): indicatif bars, then the summary.
    let cmd = format!(
        "{} --socket {} scan {id} --full --follow",
        coralctl_bin().display(),
        d.socket.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .context("running script(1)")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("indexing"), "{screen}");
    assert!(screen.contains("100%"), "{screen}");
    assert!(screen.contains("completed"), "{screen}");
    assert!(
        screen.contains('\u{1b}'),
        "expected terminal control sequences: {screen}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_survives_a_daemon_restart() -> Result<()> {
    let cfgdir = traversable_tempdir()?;
    let cfg = cfgdir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[scan]\nbatch_size = 10\nthreads = 1\n[watch]\nenabled = false\n",
    )?;
    let cfg = cfg.to_string_lossy().into_owned();
    let mut d = Daemon::start_with(&["--config", &cfg]).await?;
    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 3000)? as u64;
    let added = ctl_library_add(&d, lib.path())?;
    let scan_id = added.last_scan.context("no scan")?.scan.request_id;

    let follower = Command::new(coralctl_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["--json", "scan", &added.id.to_string(), "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // That request merged into the queued library_added scan, or follows its own; either way
    // kill corald while the first scan is indexing.
    let c = d.client().await?;
    eventually(Duration::from_secs(60), "indexing under way", || async {
        use coral_proto::CoralApiClient;
        c.scan_get(scan_id)
            .await
            .ok()
            .filter(|p| p.counts.tracks_indexed > 50)
    })
    .await?;
    drop(c);
    d.kill()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.spawn().await?;
    let out = tokio::task::spawn_blocking(move || follower.wait_with_output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "follow failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: ScanProgress = serde_json::from_str(stdout.lines().last().context("no output")?)?;
    assert_eq!(last.phase, ScanPhase::Completed);
    assert!(
        String::from_utf8_lossy(&out.stderr).is_empty(),
        "--json keeps stderr quiet"
    );
    let _ = n;
    Ok(())
}
