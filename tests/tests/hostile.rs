//! Hostile conditions (a corrupt corpus; SIGKILL at random points and restart), against a real
//! corald with its managed PostgreSQL and the real embedding model:
//!
//! 1. a corpus of corrupt, truncated, misnamed, oddly named, unreadable, looping, special and
//!    changing files (`coral_tests::hostile_corpus`) is scanned and embedded: the daemon stays
//!    up, the scan completes, every bad file is recorded with a reason, and the counts add up;
//! 2. corald is SIGKILLed at seeded random points of scans (discovery, indexing, embedding)
//!    and restarted on the same state, at least ten times: the database ends equal to a clean
//!    run's and every interrupted scan ends resumed, then completed; a library whose first scan
//!    a kill prevented is scanned at the next start.
//!
//! The seed is printed; set `CORAL_HOSTILE_SEED` to replay a run. Figures are printed too
//! (`--nocapture`), for RELIABILITY.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use coral_proto::{CoralApiClient, LibrarySelector, ScanPhase, ScanProgress};
use coral_tests::daemon::{Daemon, add_and_scan, is_root, scan, traversable_tempdir, wait_scan};
use coral_tests::fixtures::{self, FixtureTrack};
use coral_tests::hostile_corpus::{
    self, Corpus, CorpusOptions, EmbedExpect, Expect, Kind, Mutator, Rng,
};
use sqlx::Row;

/// Owner given to the unreadable entries when the tests run as root (and hidden from corald).
const HIDDEN_ID: u32 = 4242;

fn seed() -> u64 {
    std::env::var("CORAL_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00C0_4A15)
}

/// Whether corald was built with the embedding feature (scripts/test builds it so).
async fn embeddings_enabled(c: &jsonrpsee::async_client::Client) -> Result<bool> {
    let s = c.daemon_status().await?;
    if !s.embedding.enabled {
        eprintln!(
            "embeddings unavailable ({:?}): embedding checks skipped",
            s.embedding
        );
    }
    Ok(s.embedding.enabled)
}

/// A daemon that may not read the unreadable entries: as root, one that cannot see their
/// owner (user namespace); without one, a plain daemon and a note.
async fn corpus_daemon() -> Result<(Daemon, bool, Option<String>)> {
    if !is_root() {
        return Ok((Daemon::start().await?, true, None));
    }
    match Daemon::start_hiding_owner(&[], HIDDEN_ID).await {
        Ok(d) => Ok((d, true, None)),
        Err(e) => Ok((
            Daemon::start().await?,
            false,
            Some(format!("user namespace unavailable ({e:#})")),
        )),
    }
}

/// The rows `sql` selects: their `rel_path` column (raw) → what `value` reads from the row.
async fn rows_by_path<V>(
    db: &mut sqlx::PgConnection,
    sql: &'static str,
    value: impl Fn(&sqlx::postgres::PgRow) -> V,
) -> Result<BTreeMap<Vec<u8>, V>> {
    let rows = sqlx::query(sql).fetch_all(db).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<Vec<u8>, _>("rel_path"), value(r)))
        .collect())
}

/// Every `tracks` row: raw path → (title, duration_ms, format).
async fn track_rows(d: &Daemon) -> Result<BTreeMap<Vec<u8>, (Option<String>, i64, String)>> {
    rows_by_path(
        &mut d.db().await?,
        "SELECT rel_path, title, duration_ms, format FROM tracks",
        |r| (r.get("title"), r.get("duration_ms"), r.get("format")),
    )
    .await
}

/// Every `scan_errors` row: raw path → (stage, message).
async fn error_rows(d: &Daemon) -> Result<BTreeMap<Vec<u8>, (String, String)>> {
    rows_by_path(
        &mut d.db().await?,
        "SELECT rel_path, stage, message FROM scan_errors",
        |r| (r.get("stage"), r.get("message")),
    )
    .await
}

/// Raw path → embedding outcome ("done", or the issue's outcome and reason).
async fn embed_rows(d: &Daemon) -> Result<BTreeMap<Vec<u8>, (String, String)>> {
    let mut db = d.db().await?;
    let rows = sqlx::query(
        "SELECT t.rel_path, 'done' AS outcome, '' AS reason
           FROM track_embeddings e JOIN tracks t ON t.id = e.track_id
         UNION ALL
         SELECT t.rel_path, i.outcome, i.reason
           FROM track_embedding_issues i JOIN tracks t ON t.id = i.track_id",
    )
    .fetch_all(&mut db)
    .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let path: Vec<u8> = r.get("rel_path");
        let v = (r.get("outcome"), r.get("reason"));
        ensure!(
            out.insert(path.clone(), v).is_none(),
            "two embedding rows (vector or issue) for {}",
            String::from_utf8_lossy(&path)
        );
    }
    Ok(out)
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).chars().take(80).collect()
}

/// Checks one finished scan's counters: the indexing counts add up to the files seen and the
/// embedding counts to the tracks it wrote.
fn counts_add_up(p: &ScanProgress) -> Result<()> {
    let expected = p.counts.tracks_expected.context("no tracks_expected")?;
    ensure!(
        p.counts.tracks_indexed + p.counts.tracks_unchanged + p.counts.tracks_failed == expected,
        "indexed {} + unchanged {} + failed {} != seen {expected}: {p:?}",
        p.counts.tracks_indexed,
        p.counts.tracks_unchanged,
        p.counts.tracks_failed
    );
    if let Some(e) = p.counts.embeddings_expected {
        ensure!(
            p.counts.embeddings_done + p.counts.embeddings_skipped + p.counts.embeddings_failed
                == e,
            "embeddings done {} + skipped {} + failed {} != eligible {e}: {p:?}",
            p.counts.embeddings_done,
            p.counts.embeddings_skipped,
            p.counts.embeddings_failed
        );
    }
    Ok(())
}

/// Checks every row against the corpus: each entry has exactly the row(s) it should, no row
/// belongs to nothing, every error has a reason.
fn check_rows(
    corpus: &Corpus,
    tracks: &BTreeMap<Vec<u8>, (Option<String>, i64, String)>,
    errors: &BTreeMap<Vec<u8>, (String, String)>,
) -> Result<()> {
    let mut claimed = BTreeSet::new();
    for e in &corpus.entries {
        let (t, err) = (tracks.get(&e.rel_path), errors.get(&e.rel_path));
        let what = format!("{:?} {}", e.kind, show(&e.rel_path));
        match e.expect {
            Expect::Indexed => ensure!(
                t.is_some() && err.is_none(),
                "{what}: expected a track row, got track {t:?}, error {err:?}"
            ),
            Expect::Failed | Expect::DirIssue => ensure!(
                t.is_none() && err.is_some(),
                "{what}: expected an error row, got track {t:?}, error {err:?}"
            ),
            Expect::Either => ensure!(
                t.is_some() != err.is_some(),
                "{what}: expected a track row or an error row, got track {t:?}, error {err:?}"
            ),
            Expect::Unseen => ensure!(
                t.is_none() && err.is_none(),
                "{what}: expected nothing, got track {t:?}, error {err:?}"
            ),
        }
        if let Some((stage, message)) = err {
            ensure!(
                !stage.is_empty() && message.len() > 5,
                "{what}: error without a reason: {stage:?} {message:?}"
            );
        }
        claimed.insert(e.rel_path.clone());
    }
    for p in tracks.keys().chain(errors.keys()) {
        ensure!(
            claimed.contains(p),
            "a row for a path the corpus does not have: {}",
            show(p)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_library_is_scanned_and_embedded_and_every_file_accounted_for() -> Result<()> {
    let seed = seed();
    let t0 = Instant::now();
    let (d, enforced, why_not) = corpus_daemon().await?;
    let mut d = d;
    let lib = traversable_tempdir()?;
    let root = lib.path().join("music");
    let corpus = hostile_corpus::build(
        &root,
        CorpusOptions {
            seed,
            unreadable_owner: (is_root() && enforced).then_some(HIDDEN_ID),
            permissions_enforced: enforced,
        },
    )?;
    let mut notes = corpus.notes.clone();
    notes.extend(why_not);
    eprintln!(
        "seed {seed}; corpus {:?} ({} entries) built in {:.1} s; notes: {notes:?}",
        corpus.counts(),
        corpus.entries.len(),
        t0.elapsed().as_secs_f64()
    );

    let c = d.client().await?;
    let embeds = embeddings_enabled(&c).await?;
    let mutator = Mutator::start(corpus.changing.clone(), seed ^ 0xF1F0);
    let t1 = Instant::now();
    let (library_id, p) = add_and_scan(&c, &root).await?;
    let scan_s = t1.elapsed().as_secs_f64();
    let changes = mutator.stop();
    eprintln!("first scan: {scan_s:.1} s, {changes} changes to the changing files; {p:?}");

    // Alive, answering, the scan completed.
    ensure!(d.running()?, "corald died:\n{}", d.log_text());
    c.daemon_status().await?;
    ensure!(p.phase == ScanPhase::Completed, "{p:?}\n{}", d.log_text());
    if enforced {
        let warning = p.error.clone().unwrap_or_default();
        ensure!(
            warning.contains("could not be read"),
            "the unreadable directory is reported: {warning:?}"
        );
    }
    counts_add_up(&p)?;

    // Every entry has its row, with a reason when it failed.
    let tracks = track_rows(&d).await?;
    let errors = error_rows(&d).await?;
    check_rows(&corpus, &tracks, &errors)?;
    // Per kind: (indexed, failed files, directory issues, unseen), and one sample reason.
    let mut by_kind: BTreeMap<Kind, ([usize; 4], String)> = BTreeMap::new();
    for e in &corpus.entries {
        let slot = by_kind.entry(e.kind).or_default();
        match (tracks.contains_key(&e.rel_path), errors.get(&e.rel_path)) {
            (true, _) => slot.0[0] += 1,
            (_, Some((stage, message))) => {
                slot.0[if e.expect == Expect::DirIssue { 2 } else { 1 }] += 1;
                slot.1 = format!("{stage}: {}", message.chars().take(90).collect::<String>());
            }
            _ => slot.0[3] += 1,
        }
    }
    for (kind, (n, sample)) in &by_kind {
        eprintln!(
            "{kind:?}: indexed {}, failed {}, dir issues {}, unseen {}; e.g. {sample}",
            n[0], n[1], n[2], n[3]
        );
    }
    for e in corpus.entries.iter().filter(|e| e.expect == Expect::Either) {
        match errors.get(&e.rel_path) {
            Some((stage, message)) => {
                eprintln!("{}: failed at {stage}: {message}", show(&e.rel_path))
            }
            None => eprintln!("{}: indexed", show(&e.rel_path)),
        }
    }
    let dir_issues = corpus
        .entries
        .iter()
        .filter(|e| e.expect == Expect::DirIssue)
        .count();
    let failed_files = errors.len() - dir_issues;
    ensure!(
        p.counts.tracks_indexed == tracks.len() as u64
            && p.counts.tracks_failed == failed_files as u64,
        "indexed {} / {} rows, failed {} / {failed_files} rows: {p:?}",
        p.counts.tracks_indexed,
        tracks.len(),
        p.counts.tracks_failed
    );
    ensure!(
        p.counts.tracks_expected == Some((tracks.len() + failed_files) as u64),
        "files seen {:?} != {} rows: {p:?}",
        p.counts.tracks_expected,
        tracks.len() + failed_files
    );
    let libs = c.library_list().await?;
    let l = libs
        .iter()
        .find(|l| l.id == library_id)
        .context("library listed")?;
    ensure!(
        l.track_count == tracks.len() as i64 && l.failed_count == errors.len() as i64,
        "{l:?}"
    );
    // Stages name where it failed: the walk (links, special files, the directory), opening
    // (permissions) or the content.
    for e in &corpus.entries {
        let Some((stage, message)) = errors.get(&e.rel_path) else {
            continue;
        };
        let want = match e.kind {
            Kind::BrokenSymlink | Kind::Fifo | Kind::Socket | Kind::DeviceNode => {
                Some(("walk", ""))
            }
            Kind::UnreadableDir => Some(("walk", "cannot be read")),
            Kind::Unreadable => Some(("open", "permission denied")),
            Kind::Empty => Some(("probe", "empty")),
            Kind::Truncated | Kind::RandomBytes => Some(("probe", "")),
            _ => None,
        };
        if let Some((s, m)) = want {
            ensure!(
                stage == s && message.contains(m),
                "{:?} {}: stage {stage:?}, message {message:?} (want {s:?} with {m:?})",
                e.kind,
                show(&e.rel_path)
            );
        }
    }
    // Absurd tags: the title survives (capped), and the multi-MB frame did not stop indexing.
    let title = |p: &str| tracks.get(p.as_bytes()).and_then(|t| t.0.clone());
    ensure!(title("tags/huge-frame.mp3").as_deref() == Some("Huge Frame"));
    ensure!(title("tags/many-frames.mp3").as_deref() == Some("Many Frames"));
    let long_title = title("tags/huge-title.mp3").unwrap_or_default();
    ensure!(
        long_title.starts_with("Long Title") && long_title.len() <= 1024,
        "capped title: {} bytes",
        long_title.len()
    );
    // Content decides the format, not the name.
    for (path, format) in [
        ("misnamed/flac-as.mp3", "flac"),
        ("misnamed/mp3-as.flac", "mp3"),
        ("misnamed/wav-as.ogg", "wav"),
        ("misnamed/ogg_vorbis-as.m4a", "ogg_vorbis"),
        ("misnamed/m4a_aac-as.wav", "mp4"),
    ] {
        let got = tracks.get(path.as_bytes()).map(|t| t.2.as_str());
        ensure!(got == Some(format), "{path}: {got:?}");
    }

    // Embedding: each indexed entry settled as expected, and the scan's tally matches.
    if embeds {
        let emb = embed_rows(&d).await?;
        for e in &corpus.entries {
            let got = emb.get(&e.rel_path);
            let what = format!("{:?} {}", e.kind, show(&e.rel_path));
            match e.embed {
                EmbedExpect::Nothing => ensure!(got.is_none(), "{what}: {got:?}"),
                EmbedExpect::Done => ensure!(
                    got.map(|g| g.0.as_str()) == Some("done"),
                    "{what}: expected a vector, got {got:?}\n{}",
                    d.log_text()
                ),
                EmbedExpect::Failed => ensure!(
                    got.is_some_and(|g| g.0 == "failed" && g.1.len() > 5),
                    "{what}: expected a recorded failure, got {got:?}"
                ),
                EmbedExpect::Any => {}
            }
        }
        let done = emb.values().filter(|v| v.0 == "done").count() as u64;
        let failed = emb.values().filter(|v| v.0 == "failed").count() as u64;
        ensure!(
            p.counts.embeddings_expected == Some(tracks.len() as u64),
            "every written track is an embedding target: {p:?}"
        );
        ensure!(
            p.counts.embeddings_done == done && p.counts.embeddings_failed == failed,
            "done {done}, failed {failed} in the database: {p:?}"
        );
        eprintln!(
            "embedding: {} done, {} skipped, {} failed",
            p.counts.embeddings_done, p.counts.embeddings_skipped, p.counts.embeddings_failed
        );
    }

    // A second scan, nothing changing now: completes, re-reads no known-bad file, same rows.
    let p2 = scan(&c, library_id, None, false).await?;
    ensure!(p2.phase == ScanPhase::Completed, "{p2:?}");
    counts_add_up(&p2)?;
    ensure!(
        p2.counts.tracks_failed == failed_files as u64 - changed_to_failed(&corpus, &errors),
        "second scan failed count {} (first {failed_files}): {p2:?}",
        p2.counts.tracks_failed
    );
    let tracks2 = track_rows(&d).await?;
    let errors2 = error_rows(&d).await?;
    check_rows(&corpus, &tracks2, &errors2)?;
    ensure!(d.running()?, "corald died:\n{}", d.log_text());
    let panics = d.log_text().matches("panicked").count();
    ensure!(panics == 0, "{panics} panics in the log:\n{}", d.log_text());
    corpus.unlock();
    d.terminate()?;
    eprintln!(
        "hostile corpus: {} entries, whole test {:.1} s",
        corpus.entries.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Changing files that were recorded as failed in the first scan and are whole again now (the
/// mutator restored them): the second scan indexes them, so they leave the failed count.
fn changed_to_failed(corpus: &Corpus, errors: &BTreeMap<Vec<u8>, (String, String)>) -> u64 {
    corpus
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Changing && errors.contains_key(&e.rel_path))
        .count() as u64
}

/// Files in the crash-loop library (1 s tracks, not embedded) besides the embeddable ones.
const CRASH_LIBRARY_FILES: usize = 3000;
/// Kills at least this many times, and until each phase was hit once, at most `MAX_KILLS`.
const MIN_KILLS: usize = 10;
const MAX_KILLS: usize = 16;

/// What a database holds, for comparing a crashed-and-restarted daemon's with a clean one's.
#[derive(Debug, PartialEq)]
struct Snapshot {
    /// rel_path → every stored property and tag of the track.
    tracks: BTreeMap<Vec<u8>, String>,
    /// rel_path → the vector stored for it.
    embeddings: BTreeMap<Vec<u8>, Vec<f32>>,
    /// rel_path of every recorded error.
    errors: BTreeSet<Vec<u8>>,
}

async fn snapshot(d: &Daemon) -> Result<Snapshot> {
    let mut db = d.db().await?;
    let tracks = rows_by_path(
        &mut db,
        "SELECT rel_path, concat_ws('|', size, mtime_ns, format, codec, duration_ms, sample_rate,
                channels, bit_depth, bitrate_kbps, title, artist, album, album_artist,
                track_number, disc_number, year, genre, search_text) AS props
         FROM tracks",
        |r| r.get("props"),
    )
    .await?;
    let dups: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT track_id FROM track_embeddings
                               GROUP BY track_id, model_id HAVING count(*) > 1) d",
    )
    .fetch_one(&mut db)
    .await?;
    ensure!(dups == 0, "{dups} tracks with more than one embedding");
    let embeddings = rows_by_path(
        &mut db,
        "SELECT t.rel_path, e.embedding::real[] AS v
         FROM track_embeddings e JOIN tracks t ON t.id = e.track_id",
        |r| r.get("v"),
    )
    .await?;
    let errors = sqlx::query_scalar("SELECT rel_path FROM scan_errors")
        .fetch_all(&mut db)
        .await?
        .into_iter()
        .collect();
    Ok(Snapshot {
        tracks,
        embeddings,
        errors,
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Seconds from the scan's start to each phase it entered (first seen, polling every 10 ms).
async fn timed_scan(
    c: &jsonrpsee::async_client::Client,
    id: uuid::Uuid,
) -> Result<(ScanProgress, Vec<(ScanPhase, f64)>)> {
    let t0 = Instant::now();
    let mut seen: Vec<(ScanPhase, f64)> = Vec::new();
    loop {
        let p = c.scan_get(id).await?;
        if seen.last().map(|s| s.0) != Some(p.phase) {
            seen.push((p.phase, t0.elapsed().as_secs_f64()));
        }
        if p.phase.is_terminal() {
            return Ok((p, seen));
        }
        ensure!(t0.elapsed() < Duration::from_secs(180), "scan too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Set the mtime of `paths` to `base + offset_s` (offset 0 restores `base`).
fn set_mtimes(paths: &[(std::path::PathBuf, std::time::SystemTime)], offset_s: u64) -> Result<()> {
    for (p, base) in paths {
        std::fs::File::options()
            .write(true)
            .open(p)?
            .set_modified(*base + Duration::from_secs(offset_s))?;
    }
    Ok(())
}

/// Files per replica directory of `fixtures::big_library`.
const REPLICA: usize = 10;

/// Between scans: one `tracks` row per audio file on disk, and each long track's row and vector
/// are those of its file as it is now (same mtime), so a resumed scan lost no write and no
/// embedding.
async fn consistent(
    d: &Daemon,
    files: usize,
    long: &[std::path::PathBuf],
    embeds: bool,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut db = d.db().await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tracks")
        .fetch_one(&mut db)
        .await?;
    ensure!(n == files as i64, "{n} tracks for {files} files");
    for p in long {
        let name = p.file_name().context("file name")?.to_string_lossy();
        let md = std::fs::metadata(p)?;
        let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        let row: (i64, Option<i64>) = sqlx::query_as(
            "SELECT t.mtime_ns, e.file_mtime_ns FROM tracks t
             LEFT JOIN track_embeddings e ON e.track_id = t.id
             WHERE t.rel_path_text = 'long/' || $1",
        )
        .bind(name.as_ref())
        .fetch_one(&mut db)
        .await
        .with_context(|| format!("the row of long/{name}"))?;
        ensure!(
            row.0 == mtime,
            "long/{name}: row mtime {} != file {mtime}",
            row.0
        );
        if embeds {
            ensure!(
                row.1 == Some(mtime),
                "long/{name}: embedding of mtime {:?}, file {mtime}",
                row.1
            );
        }
    }
    Ok(())
}

fn crash_config(dir: &Path) -> Result<String> {
    let cfg = dir.join("corald.toml");
    // Small batches: more batch writes for a kill to land in. No watcher: only our scans run.
    std::fs::write(&cfg, "[watch]\nenabled = false\n[scan]\nbatch_size = 100\n")?;
    Ok(cfg.to_string_lossy().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_and_duplicates_nothing() -> Result<()> {
    let seed = seed();
    let mut rng = Rng::new(seed ^ 0xC4A5_4100);
    let t0 = Instant::now();
    let lib = traversable_tempdir()?;
    let root = lib.path().join("music");
    let small = fixtures::big_library(&root, CRASH_LIBRARY_FILES)?;
    let long: Vec<FixtureTrack> = ["mp3", "flac", "ogg_vorbis"]
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let ext = if *f == "ogg_vorbis" { "ogg" } else { f };
            let mut t =
                FixtureTrack::simple(format!("long/{i}.{ext}"), f, &format!("Long Track {i}"));
            t.duration_s = rng.range_f64(60.5, 70.0);
            t
        })
        .collect();
    let long_paths = fixtures::make_tracks(&root, &long)?;
    let long_mtimes = long_paths
        .iter()
        .map(|p| Ok((p.clone(), std::fs::metadata(p)?.modified()?)))
        .collect::<Result<Vec<_>>>()?;
    let cfg = crash_config(lib.path())?;
    eprintln!(
        "seed {seed}; library: {small} small files + {} embeddable, built in {:.1} s",
        long.len(),
        t0.elapsed().as_secs_f64()
    );

    // The clean run: the reference database and the phase timings.
    let mut clean = Daemon::start_with(&["--config", &cfg]).await?;
    let c = clean.client().await?;
    let embeds = embeddings_enabled(&c).await?;
    let added = c.library_add(root.to_string_lossy().into_owned()).await?;
    let first = added.last_scan.context("library.add queued no scan")?;
    let (p, phases) = timed_scan(&c, first.scan.request_id).await?;
    ensure!(p.phase == ScanPhase::Completed, "{p:?}");
    counts_add_up(&p)?;
    let clean_s = phases.last().map_or(0.0, |s| s.1);
    let reference = snapshot(&clean).await?;
    ensure!(reference.tracks.len() == small + long.len());
    if embeds {
        ensure!(reference.embeddings.len() == long.len(), "{:?}", p);
    }
    eprintln!(
        "clean run: {clean_s:.2} s, phases {phases:?} (test at {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    clean.terminate()?;
    drop(clean);
    // How long each phase lasted in the clean run.
    let phase_len = |phase: ScanPhase| -> f64 {
        let i = phases.iter().position(|s| s.0 == phase);
        match i {
            Some(i) if i + 1 < phases.len() => phases[i + 1].1 - phases[i].1,
            _ => 0.0,
        }
    };

    // The crash loop: one daemon, killed and restarted on the same state directory.
    let mut d = Daemon::start_with(&["--config", &cfg]).await?;
    let mut c = d.client().await?;
    let library_id = c.library_add(root.to_string_lossy().into_owned()).await?.id;
    let mut interrupted: BTreeSet<uuid::Uuid> = BTreeSet::new();
    let mut kills: Vec<(String, f64)> = Vec::new();
    let mut hit: BTreeMap<&'static str, usize> = BTreeMap::new();
    let targets = [
        ScanPhase::Discovering,
        ScanPhase::Indexing,
        ScanPhase::Embedding,
    ];
    let mut touch = 0u64;
    let mut restarts: Vec<f64> = Vec::new();
    // The replica directory removed from the library, if any, and each new scan's expected
    // removed count.
    let mut removed: Option<usize> = None;
    let mut expect_removed: BTreeMap<uuid::Uuid, u64> = BTreeMap::new();
    let replica = |i: usize| root.join(format!("copy_{i:04}"));
    let loop_start = Instant::now();
    eprintln!("crash loop starts at {:.1} s", t0.elapsed().as_secs_f64());
    loop {
        let covered = targets
            .iter()
            .filter(|t| !embeds && **t == ScanPhase::Embedding || hit.contains_key(t.as_str()))
            .count()
            == targets.len();
        if kills.len() >= MAX_KILLS || (kills.len() >= MIN_KILLS && covered) {
            break;
        }
        // Even kills: a uniform delay over the clean run's length. Odd kills: aim at a phase
        // (one not hit yet first), killing a random fraction into its clean duration once the
        // scan reaches it.
        let k = kills.len();
        let target = (k % 2 == 1).then(|| {
            let missing: Vec<ScanPhase> = targets
                .iter()
                .copied()
                .filter(|t| (embeds || *t != ScanPhase::Embedding) && !hit.contains_key(t.as_str()))
                .collect();
            if missing.is_empty() {
                targets[rng.below(targets.len() as u64) as usize]
            } else {
                missing[rng.below(missing.len() as u64) as usize]
            }
        });
        // A scan to interrupt: the resumed one, or a new one. A long track is touched first so
        // it has embedding work; it is a full scan (every file probed and written again)
        // every other time and whenever the kill aims at discovery or indexing. A resumed scan
        // has little or nothing left to index: aiming there, let it finish first.
        let mut active = c.scan_active().await?;
        if matches!(target, Some(ScanPhase::Discovering | ScanPhase::Indexing)) {
            for p in active.drain(..) {
                let p = wait_scan(&c, p.scan.request_id).await?;
                ensure!(p.phase == ScanPhase::Completed, "{p:?}\n{}", d.log_text());
            }
        }
        let id = match active.first() {
            Some(p) => p.scan.request_id,
            None => {
                // Idle: what the last scans left must match the disk already.
                let files = small + long.len() - removed.map_or(0, |_| REPLICA);
                consistent(&d, files, &long_paths, embeds).await?;
                touch += 1;
                let one = touch as usize % long_mtimes.len();
                set_mtimes(&long_mtimes[one..=one], touch)?;
                // Every other new scan removes one replica directory (10 files) or puts the
                // removed one back (hard links: the same size and mtime as before).
                let mut removes = 0;
                if let Some(i) = removed.take() {
                    fixtures::copy_template(&root.join(".template"), &replica(i))?;
                } else if touch % 2 == 1 {
                    let i = rng.below((small / REPLICA) as u64) as usize;
                    std::fs::remove_dir_all(replica(i))?;
                    removed = Some(i);
                    removes = REPLICA as u64;
                }
                let full = touch.is_multiple_of(2)
                    || matches!(target, Some(ScanPhase::Discovering | ScanPhase::Indexing));
                let id = c
                    .scan_start(LibrarySelector::Id(library_id), None, Some(full))
                    .await?
                    .request_id;
                expect_removed.insert(id, removes);
                id
            }
        };
        let started = Instant::now();
        match target {
            None => {
                let delay = rng.range_f64(0.0, clean_s);
                tokio::time::sleep(Duration::from_secs_f64(delay)).await;
            }
            Some(target) => {
                let extra = rng.range_f64(0.0, phase_len(target));
                let deadline = Instant::now() + Duration::from_secs_f64(clean_s * 2.0 + 5.0);
                loop {
                    let p = c.scan_get(id).await?;
                    if p.phase == target || p.phase.is_terminal() || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                tokio::time::sleep(Duration::from_secs_f64(extra)).await;
            }
        }
        let at = c.scan_get(id).await?;
        let after = started.elapsed().as_secs_f64();
        d.kill()?;
        let phase = if at.phase.is_terminal() {
            "after the end"
        } else {
            interrupted.insert(id);
            at.phase.as_str()
        };
        *hit.entry(phase).or_default() += 1;
        kills.push((phase.to_owned(), after));
        let restart = Instant::now();
        d.spawn().await?;
        restarts.push(restart.elapsed().as_secs_f64());
        c = d.client().await?;
    }
    let loop_s = loop_start.elapsed().as_secs_f64();
    eprintln!("kills (phase, s after scan start): {kills:?}; restarts took {restarts:.2?} s");
    for t in targets {
        ensure!(
            hit.contains_key(t.as_str()) || (!embeds && t == ScanPhase::Embedding),
            "no kill landed in {t:?} in {} tries: {kills:?}",
            kills.len()
        );
    }

    // Let the last resumed scan finish, then put the long tracks' mtimes back and scan once more
    // so the library is the clean run's again.
    for p in c.scan_active().await? {
        let p = wait_scan(&c, p.scan.request_id).await?;
        ensure!(p.phase == ScanPhase::Completed, "{p:?}\n{}", d.log_text());
    }
    consistent(
        &d,
        small + long.len() - removed.map_or(0, |_| REPLICA),
        &long_paths,
        embeds,
    )
    .await?;
    set_mtimes(&long_mtimes, 0)?;
    if let Some(i) = removed.take() {
        fixtures::copy_template(&root.join(".template"), &replica(i))?;
    }
    let last = scan(&c, library_id, None, false).await?;
    ensure!(last.phase == ScanPhase::Completed, "{last:?}");
    counts_add_up(&last)?;
    if embeds {
        let s = c.daemon_status().await?;
        ensure!(
            s.embedding.tracks_embedded == long.len() as i64,
            "{:?}",
            s.embedding
        );
    }

    // Every interrupted scan was resumed and completed; no scan failed; counts add up.
    let all = c.scan_list(Some(1000)).await?;
    for p in &all {
        ensure!(
            p.phase == ScanPhase::Completed,
            "scan {} ended {:?}: {p:?}\n{}",
            p.scan.request_id,
            p.phase,
            d.log_text()
        );
        counts_add_up(p)?;
        if interrupted.contains(&p.scan.request_id) {
            ensure!(p.scan.resumed, "interrupted scan not marked resumed: {p:?}");
        }
        if let Some(n) = expect_removed.get(&p.scan.request_id) {
            ensure!(
                p.counts.tracks_removed == *n,
                "removed {} tracks, expected {n} (resumed {}): {p:?}",
                p.counts.tracks_removed,
                p.scan.resumed
            );
        }
    }
    let listed: BTreeSet<uuid::Uuid> = all.iter().map(|p| p.scan.request_id).collect();
    ensure!(
        interrupted.is_subset(&listed),
        "interrupted scans missing from scan.list"
    );

    // The database equals the clean run's.
    let got = snapshot(&d).await?;
    let differ: Vec<String> = reference
        .tracks
        .iter()
        .filter(|(k, v)| got.tracks.get(*k) != Some(v))
        .map(|(k, v)| format!("{}: {v} vs {:?}", show(k), got.tracks.get(k)))
        .chain(
            got.tracks
                .keys()
                .filter(|k| !reference.tracks.contains_key(*k))
                .map(|k| format!("extra {}", show(k))),
        )
        .take(10)
        .collect();
    ensure!(
        differ.is_empty(),
        "tracks differ from the clean run: {differ:#?}"
    );
    ensure!(got.errors == reference.errors, "scan errors differ");
    ensure!(
        got.embeddings.keys().eq(reference.embeddings.keys()),
        "embedded tracks differ: {:?} vs {:?}",
        got.embeddings.keys().map(|k| show(k)).collect::<Vec<_>>(),
        reference
            .embeddings
            .keys()
            .map(|k| show(k))
            .collect::<Vec<_>>()
    );
    for (k, v) in &reference.embeddings {
        let sim = cosine(v, &got.embeddings[k]);
        ensure!(
            sim > 0.9999,
            "{}: embedding differs (cosine {sim})",
            show(k)
        );
    }
    ensure!(d.running()?, "corald died");
    let panics = d.log_text().matches("panicked").count();
    ensure!(panics == 0, "{panics} panics in the log");
    d.terminate()?;
    eprintln!(
        "crash loop: {} kills in {loop_s:.1} s, by phase at the kill {hit:?}; {} scans \
         interrupted, all resumed and completed; whole test {:.1} s",
        kills.len(),
        interrupted.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A kill inside `library.add`, after the library row is written and before its first scan is
/// persisted, must not leave a library that is never scanned (with the watcher off nothing
/// else would scan it). The state such a kill leaves is made directly: the row, no scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_added_just_before_a_kill_is_scanned_after_the_restart() -> Result<()> {
    let lib = traversable_tempdir()?;
    for (i, f) in ["mp3", "flac", "ogg_vorbis"].iter().enumerate() {
        let ext = if *f == "ogg_vorbis" { "ogg" } else { f };
        fixtures::make_track(
            lib.path(),
            &FixtureTrack::simple(format!("a/{i}.{ext}"), f, &format!("Song {i}")),
        )?;
    }
    let mut d = Daemon::start().await?;
    d.kill()?;
    let path = std::fs::canonicalize(lib.path())?;
    let mut db = d.db().await?;
    sqlx::query("INSERT INTO libraries (path) VALUES ($1)")
        .bind(path.to_string_lossy().as_ref())
        .execute(&mut db)
        .await?;
    d.spawn().await?;
    let c = d.client().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let scan_id = loop {
        let libs = c.library_list().await?;
        ensure!(libs.len() == 1, "{libs:?}");
        if let Some(s) = &libs[0].last_scan {
            break s.scan.request_id;
        }
        ensure!(
            Instant::now() < deadline,
            "the library added before the kill was never scanned: {libs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let p = wait_scan(&c, scan_id).await?;
    ensure!(p.phase == ScanPhase::Completed, "{p:?}");
    ensure!(p.counts.tracks_indexed == 3, "{p:?}");
    // Once scanned, a restart queues nothing more for it.
    d.kill()?;
    d.spawn().await?;
    let c = d.client().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scans = c.scan_list(Some(10)).await?;
    ensure!(scans.len() == 1, "{scans:?}");
    Ok(())
}
