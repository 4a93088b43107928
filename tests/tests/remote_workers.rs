//! Embedding workers on other machines: corald (with `embed.local = false`) indexes and queues,
//! `corald worker` processes take the queued tracks from the same PostgreSQL server, under
//! leases. Real processes, a real external server (the managed PostgreSQL binaries run as a
//! standalone server; the workers reach it like any client would), the real model.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coral_proto::{CoralApiClient, ScanPhase};
use coral_tests::daemon::{Daemon, corald_bin, eventually, traversable_tempdir, wait_scan};
use coral_tests::fixtures::{self, FixtureTrack};
use corald::db::managed::{ManagedPostgres, ManagedPostgresConfig};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(180);

/// An external PostgreSQL server in a temporary directory, and its URL.
struct Server {
    _dir: tempfile::TempDir,
    pg: ManagedPostgres,
    url: String,
}

impl Server {
    async fn start() -> Result<Server> {
        let dir = traversable_tempdir()?;
        let pg = ManagedPostgres::start(ManagedPostgresConfig {
            data_dir: dir.path().join("pg"),
            install_dir: None,
            run_as: None,
        })
        .await?;
        let url = format!(
            "postgres://coral@localhost/coral?host={}",
            pg.socket_dir().display()
        );
        Ok(Server { _dir: dir, pg, url })
    }

    async fn pool(&self) -> Result<PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await?)
    }
}

/// The configuration corald and the workers share: embeddings of tracks from 5 s, short
/// leases, no watcher; `local` says whether corald embeds too.
fn config(dir: &Path, server: &Server, local: bool) -> Result<PathBuf> {
    let p = dir.join(if local { "local.toml" } else { "remote.toml" });
    std::fs::write(
        &p,
        format!(
            "[watch]\nenabled = false\n[database]\nurl = {:?}\n[embed]\nmin_duration_s = 5\nlease_s = 3\nlocal = {local}\n",
            server.url
        ),
    )?;
    Ok(p)
}

/// A running `corald worker`, killed when dropped.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(cfg: &Path, url: &str, path_map: &[&str], log: PathBuf) -> Result<Worker> {
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(corald_bin());
        cmd.arg("worker")
            .arg("--config")
            .arg(cfg)
            .arg("--database-url")
            .arg(url)
            .arg("--device")
            .arg("cpu");
        for m in path_map {
            cmd.arg("--path-map").arg(m);
        }
        let child = cmd
            .env("RUST_LOG", "info,corald=debug")
            .env_remove("CORAL_CONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting corald worker")?;
        Ok(Worker { child, log })
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` tracks of 8 s under `root/dir/`: one encoded file, hard-linked under many names.
fn library(root: &Path, dir: &str, n: usize) -> Result<()> {
    let first = fixtures::make_track(
        root,
        &FixtureTrack {
            duration_s: 8.0,
            ..FixtureTrack::simple(format!("{dir}/000.flac"), "flac", dir)
        },
    )?;
    for i in 1..n {
        std::fs::hard_link(&first, root.join(format!("{dir}/{i:03}.flac")))?;
    }
    Ok(())
}

async fn count(pool: &PgPool, sql: &'static str) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// The scan completed with every one of its `tracks` embedded, and each has exactly one vector.
async fn every_track_embedded_once(
    pool: &PgPool,
    done: &coral_proto::ScanProgress,
    tracks: usize,
) -> Result<()> {
    ensure!(done.phase == ScanPhase::Completed, "{done:?}");
    ensure!(
        (
            done.counts.embeddings_done,
            done.counts.embeddings_skipped,
            done.counts.embeddings_failed
        ) == (tracks as u64, 0, 0),
        "{done:?}"
    );
    let vectors = count(pool, "SELECT count(*) FROM track_embeddings").await?;
    let distinct = count(
        pool,
        "SELECT count(DISTINCT track_id) FROM track_embeddings",
    )
    .await?;
    ensure!(
        (vectors, distinct) == (tracks as i64, tracks as i64),
        "one vector per track: {vectors} vectors of {distinct} tracks"
    );
    Ok(())
}

/// A test's end: the worker, corald's client and corald go, in that order, then the server
/// stops.
async fn shut_down(
    worker: Worker,
    c: jsonrpsee::async_client::Client,
    d: Daemon,
    server: &mut Server,
) -> Result<()> {
    drop(worker);
    drop(c);
    drop(d);
    server.pg.stop().await?;
    Ok(())
}

async fn embedding_enabled(c: &jsonrpsee::async_client::Client) -> Result<bool> {
    let on = c.daemon_status().await?.embedding.enabled;
    if !on {
        eprintln!("embeddings are not enabled in this build: no queue to consume");
    }
    Ok(on)
}

/// What [`one_library`] sets up: the external server; the temporary directories of the
/// configuration and of the library (kept while they are used); the configuration file; corald
/// on the server with `embed.local = false`; its client; the library's queued scan.
type Setup = (
    Server,
    (tempfile::TempDir, tempfile::TempDir),
    PathBuf,
    Daemon,
    jsonrpsee::async_client::Client,
    uuid::Uuid,
);

/// An external server, corald on it with `embed.local = false`, and one library of `tracks`
/// tracks added (its scan queued); `None` when this build has no embeddings.
async fn one_library(tracks: usize) -> Result<Option<Setup>> {
    let server = Server::start().await?;
    let cfg_dir = traversable_tempdir()?;
    let cfg = config(cfg_dir.path(), &server, false)?;
    let lib = traversable_tempdir()?;
    library(lib.path(), "Album", tracks)?;
    let d = Daemon::start_with(&["--config", &cfg.to_string_lossy()]).await?;
    let c = d.client().await?;
    if !embedding_enabled(&c).await? {
        return Ok(None);
    }
    let added = c
        .library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let scan = added.last_scan.context("no scan")?.scan.request_id;
    Ok(Some((server, (cfg_dir, lib), cfg, d, c, scan)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_tracks_are_taken_over_and_every_track_is_embedded_once() -> Result<()> {
    const TRACKS: usize = 40;
    let Some((mut server, _dirs, cfg, d, c, scan)) = one_library(TRACKS).await? else {
        return Ok(());
    };
    let p = eventually(WAIT, "the scan to queue its tracks", || async {
        c.scan_get(scan)
            .await
            .ok()
            .filter(|p| p.phase == ScanPhase::Embedding)
    })
    .await?;
    ensure!(p.counts.embeddings_expected == Some(TRACKS as u64), "{p:?}");
    // corald leaves them to the workers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = c.scan_get(scan).await?;
    ensure!(
        p.phase == ScanPhase::Embedding && p.counts.embeddings_done == 0,
        "{p:?}"
    );

    let pool = server.pool().await?;
    let logs = traversable_tempdir()?;
    let mut first = Worker::start(&cfg, &server.url, &[], logs.path().join("w1.log"))?;
    let first_owner = format!("worker@%:{}", first.id());
    // Mid-batch: it has stored vectors and holds leases on more.
    let held = eventually(WAIT, "the first worker to hold leases mid-run", || async {
        let leased: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM embed_queue WHERE state = 'queued' AND leased_by LIKE $1",
        )
        .bind(&first_owner)
        .fetch_one(&pool)
        .await
        .ok()?;
        let stored = count(&pool, "SELECT count(*) FROM track_embeddings")
            .await
            .ok()?;
        (leased > 0 && stored > 0).then_some(leased)
    })
    .await
    .with_context(|| first.log_text())?;
    let second = Worker::start(&cfg, &server.url, &[], logs.path().join("w2.log"))?;
    first.kill();
    let stranded: Vec<i64> = sqlx::query_scalar(
        "SELECT track_id FROM embed_queue WHERE state = 'queued' AND leased_by LIKE $1",
    )
    .bind(&first_owner)
    .fetch_all(&pool)
    .await?;
    eprintln!(
        "killed the first worker holding {held} leases ({} still held at the kill)",
        stranded.len()
    );

    let done = wait_scan(&c, scan)
        .await
        .with_context(|| second.log_text())?;
    every_track_embedded_once(&pool, &done, TRACKS).await?;
    let stranded_embedded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM track_embeddings WHERE track_id = ANY($1)")
            .bind(&stranded)
            .fetch_one(&pool)
            .await?;
    ensure!(
        stranded_embedded == stranded.len() as i64,
        "the killed worker's leased tracks were taken over"
    );
    ensure!(
        count(&pool, "SELECT count(*) FROM embed_queue").await? == 0,
        "the finished scan's rows are gone"
    );

    // coralctl status lists the live worker.
    let out = d.ctl(&["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let second_id = format!(":{} on ", second.id());
    ensure!(
        text.contains("workers") && text.contains(&second_id) && text.contains("(cpu)"),
        "{text}"
    );
    drop(c);
    drop(second);
    drop(d);
    server.pg.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reads_through_its_path_map_and_skips_files_changed_since_indexing() -> Result<()>
{
    let mut server = Server::start().await?;
    let cfg_dir = traversable_tempdir()?;
    let cfg = config(cfg_dir.path(), &server, false)?;
    let music = traversable_tempdir()?;
    let served = music.path().join("served");
    library(&served, "Album", 6)?;

    let d = Daemon::start_with(&["--config", &cfg.to_string_lossy()]).await?;
    let c = d.client().await?;
    if !embedding_enabled(&c).await? {
        return Ok(());
    }
    let added = c.library_add(served.to_string_lossy().into_owned()).await?;
    let scan = added.last_scan.context("no scan")?.scan.request_id;
    eventually(WAIT, "the scan to queue its tracks", || async {
        c.scan_get(scan)
            .await
            .ok()
            .filter(|p| p.phase == ScanPhase::Embedding)
    })
    .await?;

    // The worker's machine sees the library elsewhere; where corald sees it there is nothing.
    let mounted = music.path().join("mounted");
    std::fs::rename(&served, &mounted)?;
    // One file is replaced after it was indexed.
    let changed = mounted.join("Album/003.flac");
    std::fs::remove_file(&changed)?;
    fixtures::make_track(
        &mounted,
        &FixtureTrack {
            duration_s: 9.0,
            ..FixtureTrack::simple("Album/003.flac", "flac", "Replaced")
        },
    )?;
    let map = format!("{}={}", served.display(), mounted.display());
    let logs = traversable_tempdir()?;
    let w = Worker::start(&cfg, &server.url, &[&map], logs.path().join("w.log"))?;
    let done = wait_scan(&c, scan).await.with_context(|| w.log_text())?;
    ensure!(done.phase == ScanPhase::Completed, "{done:?}");
    ensure!(
        (
            done.counts.embeddings_done,
            done.counts.embeddings_skipped,
            done.counts.embeddings_failed
        ) == (5, 1, 0),
        "five read through the mapping, the changed one skipped: {done:?}\n{}",
        w.log_text()
    );
    let pool = server.pool().await?;
    let changed_has_vector: i64 = count(
        &pool,
        "SELECT count(*) FROM track_embeddings e JOIN tracks t ON t.id = e.track_id
         WHERE t.rel_path_text = 'Album/003.flac'",
    )
    .await?;
    ensure!(changed_has_vector == 0, "no vector from the changed file");
    ensure!(
        w.log_text().contains("changed since it was indexed"),
        "{}",
        w.log_text()
    );
    shut_down(w, c, d, &mut server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_scan_drops_its_queued_tracks_and_no_one_elses() -> Result<()> {
    let mut server = Server::start().await?;
    let cfg_dir = traversable_tempdir()?;
    let cfg = config(cfg_dir.path(), &server, false)?;
    let one = traversable_tempdir()?;
    library(one.path(), "One", 5)?;
    let two = traversable_tempdir()?;
    library(two.path(), "Two", 3)?;

    let d = Daemon::start_with(&["--config", &cfg.to_string_lossy()]).await?;
    let c = d.client().await?;
    if !embedding_enabled(&c).await? {
        return Ok(());
    }
    let mut scans = Vec::new();
    for root in [one.path(), two.path()] {
        let added = c.library_add(root.to_string_lossy().into_owned()).await?;
        scans.push(added.last_scan.context("no scan")?.scan.request_id);
    }
    for id in &scans {
        eventually(WAIT, "both scans to queue their tracks", || async {
            c.scan_get(*id)
                .await
                .ok()
                .filter(|p| p.phase == ScanPhase::Embedding)
        })
        .await?;
    }
    let pool = server.pool().await?;
    ensure!(
        count(
            &pool,
            "SELECT count(*) FROM embed_queue WHERE state = 'queued'"
        )
        .await?
            == 8
    );

    c.scan_cancel(scans[0]).await?;
    let cancelled = wait_scan(&c, scans[0]).await?;
    ensure!(cancelled.phase == ScanPhase::Cancelled, "{cancelled:?}");
    let left: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT request_id, count(*) FROM embed_queue GROUP BY request_id")
            .fetch_all(&pool)
            .await?;
    ensure!(left == vec![(scans[1], 3)], "{left:?}");

    // The other scan still ends, once a worker comes.
    let logs = traversable_tempdir()?;
    let w = Worker::start(&cfg, &server.url, &[], logs.path().join("w.log"))?;
    let done = wait_scan(&c, scans[1])
        .await
        .with_context(|| w.log_text())?;
    ensure!(
        done.phase == ScanPhase::Completed && done.counts.embeddings_done == 3,
        "{done:?}"
    );
    shut_down(w, c, d, &mut server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_tracks_that_no_request_follows_are_dropped_at_start() -> Result<()> {
    let mut d = Daemon::start().await?;
    let c = d.client().await?;
    if !embedding_enabled(&c).await? {
        return Ok(());
    }
    drop(c);
    // A start-up sweep's rows, left by a corald killed during it.
    let mut db = d.db().await?;
    sqlx::query(
        "INSERT INTO embed_queue (request_id, track_id, model_id, priority, state, file_size,
                                  file_mtime_ns)
         SELECT $1, 1, max(id), 1, 'queued', 1, 1 FROM models",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&mut db)
    .await?;
    drop(db);
    d.terminate()?;
    d.spawn().await?;
    let c = d.client().await?;
    eventually(WAIT, "the embedder to start", || async {
        c.daemon_status().await.ok().filter(|s| s.embedding.enabled)
    })
    .await?;
    let mut db = d.db().await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM embed_queue")
        .fetch_one(&mut db)
        .await?;
    ensure!(left == 0, "{left} orphaned rows left");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_at_random_points_lose_and_duplicate_nothing() -> Result<()> {
    const TRACKS: usize = 30;
    const KILLS: u64 = 5;
    let Some((mut server, _dirs, cfg, d, c, scan)) = one_library(TRACKS).await? else {
        return Ok(());
    };
    let pool = server.pool().await?;
    let logs = traversable_tempdir()?;
    // Kills at pseudo-random points: during start-up, while leasing, mid-batch.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for k in 0..KILLS {
        let mut w = Worker::start(
            &cfg,
            &server.url,
            &[],
            logs.path().join(format!("w{k}.log")),
        )?;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let after = Duration::from_millis(500 + seed % 4000);
        tokio::time::sleep(after).await;
        w.kill();
        let stored = count(&pool, "SELECT count(*) FROM track_embeddings").await?;
        eprintln!("kill {k} after {after:?}: {stored} vectors stored");
        if c.scan_get(scan).await?.phase.is_terminal() {
            break;
        }
    }
    let last = Worker::start(&cfg, &server.url, &[], logs.path().join("last.log"))?;
    let done = wait_scan(&c, scan).await.with_context(|| last.log_text())?;
    every_track_embedded_once(&pool, &done, TRACKS).await?;
    shut_down(last, c, d, &mut server).await
}
