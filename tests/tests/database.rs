//! Database faults against a real corald and real PostgreSQL servers: the managed postmaster
//! killed (SIGKILL) and shut down (SIGQUIT, immediate) mid-scan, corald restarting it each
//! time; killed during the embedding phase; the whole cluster frozen mid-scan (SIGSTOP: queries
//! hang rather than fail); and an external `database.url` that is unreachable at start-up.
//! Each asserts that the scan ends with exactly what a clean scan writes, that `daemon.status`
//! showed the outage while it lasted and shows `ok` after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use coral_proto::{CoralApiClient, DatabaseState, ScanPhase, codes};
use coral_tests::daemon::{Daemon, eventually, scan, traversable_tempdir, wait_scan};
use coral_tests::fixtures::{self, FixtureTrack};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::{Connection, Row};

/// Tracks in the fault libraries, written 5 per batch with a pause after each batch (a test
/// hook of debug builds), so the scan is mid-indexing when the fault hits.
const TRACKS: usize = 200;
const BATCH: usize = 5;
const PAUSE_MS: &str = "150";

/// A library of `TRACKS` FLAC files (one encoded, the rest copies: each is a distinct file).
fn library(root: &Path) -> Result<Vec<String>> {
    let src = fixtures::make_track(root, &FixtureTrack::simple("source.flac", "flac", "Take"))?;
    let mut rels = Vec::with_capacity(TRACKS);
    for i in 0..TRACKS {
        let rel = format!("disc{}/track{i:03}.flac", i % 4);
        let dest = root.join(&rel);
        std::fs::create_dir_all(dest.parent().context("parent")?)?;
        std::fs::copy(&src, &dest)?;
        rels.push(rel);
    }
    std::fs::remove_file(&src)?;
    rels.sort();
    Ok(rels)
}

fn write_config(d: &Path, extra: &str) -> Result<PathBuf> {
    let cfg = d.join("faults.toml");
    std::fs::write(
        &cfg,
        format!(
            "[watch]\nenabled = false\n[embed]\nenabled = false\n[scan]\nbatch_size = {BATCH}\n{extra}"
        ),
    )?;
    Ok(cfg)
}

async fn start_daemon(extra_config: &str) -> Result<Daemon> {
    let cfgdir = traversable_tempdir()?;
    let cfg = write_config(cfgdir.path(), extra_config)?;
    let d = Daemon::start_with_env(
        &["--config", &cfg.to_string_lossy()],
        &[("CORALD_TEST_BATCH_PAUSE_MS", PAUSE_MS)],
    )
    .await?;
    // The config file is read at start only.
    drop(cfgdir);
    Ok(d)
}

/// Every track row that a scan writes from the file (not the bookkeeping columns).
type Rows = BTreeMap<String, (i64, i64, Option<String>, i64, String)>;

async fn track_rows(d: &Daemon) -> Result<Rows> {
    let mut db = d.db().await?;
    let rows =
        sqlx::query("SELECT rel_path_text, size, mtime_ns, title, duration_ms, format FROM tracks")
            .fetch_all(&mut db)
            .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get("rel_path_text"),
                (
                    r.get("size"),
                    r.get("mtime_ns"),
                    r.get("title"),
                    r.get("duration_ms"),
                    r.get("format"),
                ),
            )
        })
        .collect())
}

/// What the fault scan must have left: every file once, no scan errors, and the same rows a
/// clean (fault-free) full rescan writes.
async fn assert_nothing_lost(d: &Daemon, library_id: i64, expected: &[String]) -> Result<()> {
    let c = d.client().await?;
    let after_fault = track_rows(d).await?;
    let paths: Vec<&String> = after_fault.keys().collect();
    assert_eq!(paths.len(), expected.len(), "one row per file");
    assert!(
        paths.iter().zip(expected).all(|(a, b)| *a == b),
        "the rows are exactly the library's files"
    );
    let mut db = d.db().await?;
    let errors: i64 = sqlx::query_scalar("SELECT count(*) FROM scan_errors")
        .fetch_one(&mut db)
        .await?;
    assert_eq!(errors, 0, "no file recorded as failed");
    let clean = scan(&c, library_id, None, true).await?;
    assert_eq!(clean.phase, ScanPhase::Completed, "{clean:?}");
    assert_eq!(clean.counts.tracks_indexed, expected.len() as u64);
    assert_eq!(
        track_rows(d).await?,
        after_fault,
        "a clean full rescan writes the same rows"
    );
    Ok(())
}

/// `daemon.status` polled every 100 ms in the background: the database state transitions seen,
/// with when they were seen.
struct StatusLog {
    seen: Arc<Mutex<Vec<(Duration, DatabaseState)>>>,
    /// Polls that got no answer: (when, error).
    errors: Arc<Mutex<Vec<(Duration, String)>>>,
    stop: stop_flag::Stop,
    started: Instant,
}

mod stop_flag {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    pub struct Stop(Arc<AtomicBool>);
    impl Stop {
        pub fn set(&self) {
            self.0.store(true, Ordering::Relaxed)
        }
        pub fn is_set(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}

impl StatusLog {
    async fn start(d: &Daemon) -> Result<StatusLog> {
        let c = d.client().await?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = stop_flag::Stop::default();
        let started = Instant::now();
        {
            let seen = Arc::clone(&seen);
            let errors = Arc::clone(&errors);
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.is_set() {
                    match c.daemon_status().await {
                        Ok(s) => {
                            if let Some(h) = s.database_health {
                                let mut v = seen.lock().unwrap_or_else(|e| e.into_inner());
                                if v.last().is_none_or(|(_, last)| *last != h.state) {
                                    v.push((started.elapsed(), h.state));
                                }
                            }
                        }
                        Err(e) => errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((started.elapsed(), e.to_string())),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Ok(StatusLog {
            seen,
            errors,
            stop,
            started,
        })
    }

    fn transitions(&self) -> Vec<(Duration, DatabaseState)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn errors(&self) -> Vec<(Duration, String)> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn last(&self) -> Option<DatabaseState> {
        self.transitions().last().map(|(_, s)| *s)
    }

    /// When the first outage began and ended, as seen by the poller.
    fn outage(&self) -> Option<(Duration, Option<Duration>)> {
        let t = self.transitions();
        let i = t
            .iter()
            .position(|(_, s)| *s == DatabaseState::Unavailable)?;
        let end = t[i + 1..]
            .iter()
            .find(|(_, s)| *s == DatabaseState::Ok)
            .map(|(at, _)| *at);
        Some((t[i].0, end))
    }
}

impl Drop for StatusLog {
    fn drop(&mut self) {
        self.stop.set();
    }
}

fn postmaster_pid(d: &Daemon) -> Result<i32> {
    let text = std::fs::read_to_string(d.state_dir.join("postgres/postmaster.pid"))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("postmaster.pid has no pid")
}

/// The postmaster and every process it started (backends, checkpointer, walwriter, …).
fn cluster_pids(postmaster: i32) -> Vec<i32> {
    let mut pids = vec![postmaster];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Sends SIGCONT to frozen processes when dropped, so a failing test never leaves a stopped
/// cluster behind.
struct Frozen(Vec<i32>);

impl Frozen {
    fn freeze(pids: Vec<i32>) -> Result<Frozen> {
        for &p in &pids {
            kill(Pid::from_raw(p), Signal::SIGSTOP)?;
        }
        Ok(Frozen(pids))
    }
    fn thaw(&mut self) {
        for p in self.0.drain(..) {
            let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Add the library and wait until its scan has written `n` tracks (mid-indexing).
async fn start_scan_and_wait_for(d: &Daemon, root: &Path, n: u64) -> Result<(i64, uuid::Uuid)> {
    let c = d.client().await?;
    let lib = c.library_add(root.to_string_lossy().into_owned()).await?;
    let id = lib
        .last_scan
        .context("library.add queued no scan")?
        .scan
        .request_id;
    eventually(
        Duration::from_secs(60),
        "the scan to be mid-indexing",
        || {
            let c = &c;
            async move {
                c.scan_get(id)
                    .await
                    .ok()
                    .filter(|p| p.phase == ScanPhase::Indexing && p.counts.tracks_indexed >= n)
            }
        },
    )
    .await?;
    Ok((lib.id, id))
}

/// The log's database lines, printed with `--nocapture` (the figures in RELIABILITY.md).
fn print_database_lines(log: &str) {
    for l in log.lines().filter(|l| {
        (l.contains("database") || l.contains("PostgreSQL")) && !l.contains("DEBUG sqlx")
    }) {
        eprintln!("  | {l}");
    }
}

fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Bring the managed cluster down with `signal` to its postmaster and wait until corald has
/// restarted it and reports ok again. Returns (time to a new postmaster, time to status ok).
async fn bring_down(d: &Daemon, signal: Signal) -> Result<(Duration, Duration)> {
    let c = d.client().await?;
    let before = c
        .daemon_status()
        .await?
        .database_health
        .context("no database_health")?;
    let old = postmaster_pid(d)?;
    let t0 = Instant::now();
    kill(Pid::from_raw(old), signal)?;
    eventually(
        Duration::from_secs(90),
        "a restarted postmaster",
        || async { postmaster_pid(d).ok().filter(|p| *p != old) },
    )
    .await?;
    let restarted = t0.elapsed();
    eventually(
        Duration::from_secs(90),
        "status ok after the restart",
        || async {
            c.daemon_status()
                .await
                .ok()
                .and_then(|s| s.database_health)
                .filter(|h| h.state == DatabaseState::Ok && h.restarts == before.restarts + 1)
        },
    )
    .await?;
    Ok((restarted, t0.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postmaster_is_restarted_and_the_scan_finishes_with_nothing_lost() -> Result<()> {
    let lib = traversable_tempdir()?;
    let expected = library(lib.path())?;
    let d = start_daemon("").await?;
    let c = d.client().await?;
    let status = StatusLog::start(&d).await?;
    let (library_id, id) = start_scan_and_wait_for(&d, lib.path(), 15).await?;

    // A crash (SIGKILL: socket and lock file left behind, connections refused) ...
    let killed_at = status.started.elapsed();
    let (kill_restart, kill_ok) = bring_down(&d, Signal::SIGKILL).await?;
    let p = c.scan_get(id).await?;
    assert_eq!(p.phase, ScanPhase::Indexing, "still indexing: {p:?}");
    // ... then an immediate shutdown (SIGQUIT, as `pg_ctl stop -m immediate`: the socket is
    // gone, connections fail at once and corald's own retries take over).
    let (quit_restart, quit_ok) = bring_down(&d, Signal::SIGQUIT).await?;

    let p = wait_scan(&c, id).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.tracks_indexed, TRACKS as u64, "{p:?}");
    assert_eq!(p.counts.tracks_failed, 0, "{p:?}");
    assert!(
        !p.scan.resumed,
        "the scan ran on, it was not restarted: {p:?}"
    );
    assert_eq!(p.error, None);

    let (began, ended) = status.outage().context(format!(
        "daemon.status never showed the outage: {:?}",
        status.transitions()
    ))?;
    ended.context("daemon.status never showed ok after the outage")?;
    assert!(began >= killed_at);
    let ups_and_downs = status.transitions();
    assert_eq!(status.last(), Some(DatabaseState::Ok));
    let h = c
        .daemon_status()
        .await?
        .database_health
        .context("no database_health")?;
    // The poller samples every 100 ms but a call may take up to 1 s while the database is
    // going down, so a short second outage can slip between two samples: the outage counter
    // is the record of both.
    if h.outages < 2 {
        print_database_lines(&d.log_text());
    }
    assert!(
        h.outages >= 2,
        "both outages counted: {h:?}; seen {ups_and_downs:?}; failed polls: {:?}",
        status.errors()
    );
    assert_eq!(h.state, DatabaseState::Ok);
    assert_eq!(h.restarts, 2, "{h:?}");
    assert!(h.last_error.is_some());
    eprintln!(
        "SIGKILL: new postmaster after {:.1} s, status ok after {:.1} s; SIGQUIT: {:.1} s, {:.1} s; \
         {} outages, {} retries; status transitions {ups_and_downs:?}",
        kill_restart.as_secs_f64(),
        kill_ok.as_secs_f64(),
        quit_restart.as_secs_f64(),
        quit_ok.as_secs_f64(),
        h.outages,
        h.retries
    );

    let log = d.log_text();
    print_database_lines(&log);
    assert_eq!(
        count_lines(&log, "database unavailable; corald keeps its work") as u64,
        h.outages,
        "one warning per outage, not per attempt:\n{log}"
    );
    assert!(h.outages <= 4, "{h:?}");
    assert_eq!(count_lines(&log, "restarting it"), 2, "{log}");
    assert_eq!(count_lines(&log, "scan failed"), 0, "{log}");
    assert_nothing_lost(&d, library_id, &expected).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_cluster_mid_scan_is_reported_and_the_scan_finishes_with_nothing_lost() -> Result<()>
{
    let lib = traversable_tempdir()?;
    let expected = library(lib.path())?;
    let d = start_daemon("").await?;
    let c = d.client().await?;
    let status = StatusLog::start(&d).await?;
    let (library_id, id) = start_scan_and_wait_for(&d, lib.path(), 20).await?;

    // SIGSTOP the whole cluster for 5 s: connections stay open, queries get no answer.
    let pm = postmaster_pid(&d)?;
    let mut frozen = Frozen::freeze(cluster_pids(pm))?;
    let frozen_at = status.started.elapsed();
    let saw = eventually(
        Duration::from_secs(5),
        "status unavailable while frozen",
        || async { (status.last() == Some(DatabaseState::Unavailable)).then_some(()) },
    )
    .await;
    let remaining = Duration::from_secs(5).saturating_sub(status.started.elapsed() - frozen_at);
    tokio::time::sleep(remaining).await;
    frozen.thaw();
    let thawed_at = status.started.elapsed();
    saw.context(format!(
        "daemon.status did not report the frozen database: {:?}",
        status.transitions()
    ))?;

    eventually(
        Duration::from_secs(30),
        "status ok after the thaw",
        || async { (status.last() == Some(DatabaseState::Ok)).then_some(()) },
    )
    .await?;
    let p = wait_scan(&c, id).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.tracks_indexed, TRACKS as u64, "{p:?}");
    assert_eq!(p.counts.tracks_failed, 0, "{p:?}");
    assert_eq!(p.error, None);
    assert_eq!(
        postmaster_pid(&d)?,
        pm,
        "a stopped server is waited for, not restarted"
    );
    let h = c
        .daemon_status()
        .await?
        .database_health
        .context("no database_health")?;
    assert_eq!((h.state, h.restarts), (DatabaseState::Ok, 0), "{h:?}");
    let (began, ended) = status.outage().context("no outage seen")?;
    let ended = ended.context("no recovery seen")?;
    eprintln!(
        "frozen {frozen_at:?} .. {thawed_at:?}; status unavailable {began:?} .. ok {ended:?}; \
         {} outage(s), {} retries",
        h.outages, h.retries
    );
    let log = d.log_text();
    print_database_lines(&log);
    assert_eq!(count_lines(&log, "scan failed"), 0, "{log}");
    assert_nothing_lost(&d, library_id, &expected).await
}

/// corald on the external server at `url` (no watcher, no embeddings, no batch pause).
async fn start_on_external(url: &str) -> Result<Daemon> {
    let cfgdir = traversable_tempdir()?;
    let cfg = write_config(cfgdir.path(), &format!("[database]\nurl = {url:?}\n"))?;
    // The config file is read at start only.
    Daemon::start_with(&["--config", &cfg.to_string_lossy()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_created_yet_is_waited_for_then_used() -> Result<()> {
    // The server answers, but the database corald is told to use does not exist yet (as while
    // a server is being provisioned): corald waits and says why, instead of exiting.
    let ext = traversable_tempdir()?;
    let mut server =
        corald::db::managed::ManagedPostgres::start(corald::db::managed::ManagedPostgresConfig {
            data_dir: ext.path().join("pg"),
            install_dir: None,
            run_as: None,
        })
        .await?;
    let socket_dir = server.socket_dir().to_path_buf();
    let url = |db: &str| {
        format!(
            "postgres://coral@localhost/{db}?host={}",
            socket_dir.display()
        )
    };
    let mut d = start_on_external(&url("later")).await?;
    let c = d.client().await?;
    let h = eventually(
        Duration::from_secs(30),
        "the reason to be shown",
        || async {
            c.daemon_status()
                .await
                .ok()
                .and_then(|s| s.database_health)
                .filter(|h| {
                    h.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("does not exist"))
                })
        },
    )
    .await?;
    assert_eq!(h.state, DatabaseState::Unavailable, "{h:?}");
    let why = h.last_error.unwrap_or_default();
    assert!(why.contains("database \"later\" does not exist"), "{why}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = d.pid().context("corald pid")?;
    assert!(
        kill(Pid::from_raw(pid as i32), None).is_ok(),
        "corald exited instead of waiting:\n{}",
        d.log_text()
    );

    // The database is created: start-up completes and it is used.
    let mut admin = sqlx::PgConnection::connect(&url("coral")).await?;
    sqlx::query("CREATE DATABASE later")
        .execute(&mut admin)
        .await?;
    eventually(
        Duration::from_secs(90),
        "corald to complete start-up",
        || async { c.library_list().await.ok() },
    )
    .await
    .with_context(|| d.log_text())?;
    let lib = traversable_tempdir()?;
    fixtures::make_track(lib.path(), &FixtureTrack::simple("a.flac", "flac", "Later"))?;
    let (_, p) = coral_tests::daemon::add_and_scan(&c, lib.path()).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    drop(c);
    d.terminate()?;
    drop(admin);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_external_database_at_start_is_waited_for_then_used() -> Result<()> {
    // Where an external server will listen: a Unix socket directory with nothing in it yet.
    let ext = traversable_tempdir()?;
    let data_dir = ext.path().join("pg");
    let socket_dir = data_dir.join("run");
    let url = format!(
        "postgres://coral:s3cret-pw@localhost/coral?host={}",
        socket_dir.display()
    );
    // Start-up does not exit: the socket answers while corald waits for its database.
    let mut d = start_on_external(&url).await?;
    let c = d.client().await?;
    let s = c.daemon_status().await?;
    let h = s.database_health.context("no database_health")?;
    assert_eq!(h.state, DatabaseState::Unavailable, "{h:?}");
    assert_eq!(s.database, "external");
    let why = h.last_error.clone().unwrap_or_default();
    assert!(why.contains("postgres://coral:***@localhost"), "{why}");
    assert!(
        !why.contains("s3cret"),
        "the password is never shown: {why}"
    );

    let e = c.library_list().await.expect_err("no database yet");
    let text = format!("{e:?}");
    assert!(
        text.contains(&codes::DATABASE_UNAVAILABLE.to_string())
            && text.contains("waiting for its database"),
        "{text}"
    );
    let ctl = d.ctl(&["status"])?;
    let out = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success(), "{out}");
    assert!(out.contains("external, UNAVAILABLE"), "{out}");

    // It keeps retrying, with back-off, and stays up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = d.pid().context("corald pid")?;
    assert!(
        kill(Pid::from_raw(pid as i32), None).is_ok(),
        "corald exited"
    );
    let h = c.daemon_status().await?.database_health.context("health")?;
    assert!(h.retries >= 2, "{h:?}");
    assert_eq!(h.outages, 1, "{h:?}");
    let log = d.log_text();
    assert_eq!(
        count_lines(&log, "the database cannot be reached"),
        1,
        "one error at start, not one per attempt:\n{log}"
    );
    assert!(log.contains("postgres://coral:***@localhost"), "{log}");
    assert!(!log.contains("s3cret"), "{log}");

    // Now a real PostgreSQL (with pgvector) comes up there.
    let began = Instant::now();
    let mut server =
        corald::db::managed::ManagedPostgres::start(corald::db::managed::ManagedPostgresConfig {
            data_dir: data_dir.clone(),
            install_dir: None,
            run_as: None,
        })
        .await?;
    if server.socket_dir() != socket_dir {
        bail!(
            "the test server listens in {} instead of {}",
            server.socket_dir().display(),
            socket_dir.display()
        );
    }
    let server_up = began.elapsed();
    // Start-up completes once the server answers: the methods that need the database work.
    // (Not the health flag: under load a 2 s health probe can time out and flip it back.)
    // The deadline is generous for a loaded CI machine; alone it takes about a second.
    eventually(Duration::from_secs(90), "corald to connect", || async {
        c.library_list().await.ok()
    })
    .await
    .with_context(|| {
        let log = d.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "corald's log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    let connected = began.elapsed();
    eprintln!(
        "external server up after {:.1} s; corald ready after {:.1} s",
        server_up.as_secs_f64(),
        connected.as_secs_f64()
    );

    // Start-up completed: migrations ran, scans work.
    let lib = traversable_tempdir()?;
    fixtures::make_track(lib.path(), &FixtureTrack::simple("a.flac", "flac", "Late"))?;
    let (_, p) = coral_tests::daemon::add_and_scan(&c, lib.path()).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.tracks_indexed, 1);
    assert_eq!(c.track_search("late".into(), None, None).await?.len(), 1);
    let log = d.log_text();
    print_database_lines(&log);
    assert!(log.contains("completing start-up"), "{log}");

    drop(c);
    d.terminate()?;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postmaster_during_embedding_loses_no_embedding() -> Result<()> {
    const LONG: usize = 24;
    let lib = traversable_tempdir()?;
    let mut t = FixtureTrack::simple("source.flac", "flac", "Long take");
    t.duration_s = 65.0;
    let src = fixtures::make_track(lib.path(), &t)?;
    for i in 0..LONG {
        std::fs::copy(&src, lib.path().join(format!("long{i:02}.flac")))?;
    }
    std::fs::remove_file(&src)?;
    let cfgdir = traversable_tempdir()?;
    let cfg = cfgdir.path().join("corald.toml");
    std::fs::write(&cfg, "[watch]\nenabled = false\n")?;
    let d = Daemon::start_with(&["--config", &cfg.to_string_lossy()]).await?;
    let c = d.client().await?;
    let s = c.daemon_status().await?;
    if !s.embedding.enabled {
        eprintln!(
            "skipped: embeddings unavailable in this build ({:?})",
            s.warnings
        );
        return Ok(());
    }
    let lib_row = c
        .library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let id = lib_row.last_scan.context("no scan")?.scan.request_id;
    eventually(Duration::from_secs(120), "embedding under way", || async {
        c.scan_get(id)
            .await
            .ok()
            .filter(|p| p.phase == ScanPhase::Embedding && p.counts.embeddings_done >= 2)
    })
    .await?;
    let before = c.scan_get(id).await?;
    let (restarted, ok) = bring_down(&d, Signal::SIGKILL).await?;
    let p = wait_scan(&c, id).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.embeddings_done, LONG as u64, "{p:?}");
    assert_eq!(
        (p.counts.embeddings_failed, p.counts.embeddings_skipped),
        (0, 0),
        "{p:?}"
    );
    let mut db = d.db().await?;
    let (rows, tracks): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT track_id) FROM track_embeddings")
            .fetch_one(&mut db)
            .await?;
    assert_eq!((rows, tracks), (LONG as i64, LONG as i64));
    let issues: i64 = sqlx::query_scalar("SELECT count(*) FROM track_embedding_issues")
        .fetch_one(&mut db)
        .await?;
    assert_eq!(issues, 0);
    let h = c.daemon_status().await?.database_health.context("health")?;
    eprintln!(
        "killed at {}/{LONG} embedded; new postmaster after {:.1} s, status ok after {:.1} s; \
         {} outage(s), {} retries",
        before.counts.embeddings_done,
        restarted.as_secs_f64(),
        ok.as_secs_f64(),
        h.outages,
        h.retries
    );
    let log = d.log_text();
    print_database_lines(&log);
    assert_eq!(count_lines(&log, "scan failed"), 0, "{log}");
    assert_eq!(count_lines(&log, "track not embedded"), 0, "{log}");
    Ok(())
}
