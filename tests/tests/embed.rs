//! The embedding pipeline with the real model on real libtorch (CPU), real
//! audio encoded by ffmpeg, and a real PostgreSQL with pgvector (the harness daemon's managed
//! cluster).
//!
//! Needs corald built with `--features corald/embed` (scripts/test does). In a build without it
//! the tests check that corald explains why embeddings are unavailable, and stop there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::Utc;
use coral_proto::{CoralApiClient, ScanInfo, ScanMode, ScanPhase, ScanTrigger};
use coral_tests::daemon::{Daemon, add_and_scan, scan, traversable_tempdir};
use coral_tests::fixtures::{self, FixtureTrack};
use coral_tests::music::{self, MusicKind};
use corald::embed::model::{self, ModelFiles};
use corald::embed::phase_2_resample::{WindowMaker, WindowPlan};
use corald::embed::phase_3_batch::Batcher;
use corald::embed::phase_4_infer::{self, DeviceChoice, Forward};
use corald::embed::{CancellationToken, EmbedConfig, EmbedError, EmbedTarget, Embedder};
use corald::progress::ScanReporter;
use corald::similarity::{SimilarFilter, Similarity, SimilarityError};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

fn repo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/musicnn-msd.pt")
}

/// True when corald can run models; otherwise checks the explanation and says why the test
/// stops early.
async fn embed_available() -> Result<bool> {
    if phase_4_infer::available() {
        return Ok(true);
    }
    let pool = PgPoolOptions::new().connect_lazy("postgres://nobody@localhost/none")?;
    match Embedder::start(&EmbedConfig::default(), pool, CancellationToken::new()).await {
        Err(EmbedError::Infer(e)) => {
            ensure!(e.to_string().contains("--features corald/embed"), "{e}");
            eprintln!("corald built without the `embed` feature: {e}");
            Ok(false)
        }
        Err(e) => bail!("unexpected error without the embed feature: {e}"),
        Ok(_) => bail!("embeddings started without the embed feature"),
    }
}

fn load_model(files: &ModelFiles, row_len: usize) -> Result<Box<dyn Forward + Send>> {
    Ok(phase_4_infer::load_model(
        files,
        DeviceChoice::Cpu,
        2,
        row_len,
    )?)
}

/// The closed-form clips of model/reference.json, evaluated in f64 and rounded to f32.
fn reference_clip(name: &str, n: usize) -> Vec<f32> {
    use std::f64::consts::PI;
    let sr = 16_000.0;
    (0..n)
        .map(|i| {
            let n = i as f64;
            let v = match name {
                "A" => {
                    0.4 * (2.0 * PI * 440.0 * n / sr).sin()
                        + 0.2
                            * (2.0 * PI * 1234.5 * n / sr).sin()
                            * (0.5 + 0.5 * (2.0 * PI * 0.5 * n / sr).sin())
                }
                _ => {
                    0.3 * (2.0 * PI * 110.0 * n / sr).sin()
                        + 0.2
                            * (2.0 * PI * 660.0 * n / sr).sin()
                            * (2.0 * PI * 4.0 * n / sr).sin().powi(2)
                        + 0.1
                            * (2.0 * PI * 3000.0 * n / sr + 0.5 * (2.0 * PI * 5.0 * n / sr).sin())
                                .sin()
                }
            };
            v as f32
        })
        .collect()
}

/// The reference's metric: max over rows of max_i |got_i − ref_i| / ‖ref‖₂.
fn reference_error(got: &[f32], reference: &[Vec<f64>]) -> f64 {
    let dim = reference[0].len();
    reference
        .iter()
        .enumerate()
        .map(|(r, want)| {
            let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
            want.iter()
                .zip(&got[r * dim..(r + 1) * dim])
                .map(|(w, g)| (f64::from(*g) - w).abs() / norm)
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
}

#[test]
fn the_rust_side_reproduces_the_reference_embeddings() -> Result<()> {
    reproduces_reference(&repo_model(), "reference.json")
}

/// The default CPU model: int8 kernels through the same libtorch, against the numbers
/// PyTorch gave (model/reference-int8.json, with its looser tolerance).
#[test]
fn the_rust_side_reproduces_the_int8_reference_embeddings() -> Result<()> {
    reproduces_reference(
        &repo_model().with_file_name("musicnn-msd-int8.pt"),
        "reference-int8.json",
    )
}

/// The default model on a CPU: both networks, int8 kernels, 400 dimensions.
#[test]
fn the_rust_side_reproduces_the_fused_int8_reference_embeddings() -> Result<()> {
    reproduces_reference(
        &repo_model().with_file_name("musicnn-msd-mtt-int8.pt"),
        "reference-mtt-int8.json",
    )
}

fn reproduces_reference(pt: &Path, reference_file: &str) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    if !rt.block_on(embed_available())? {
        return Ok(());
    }
    let files = model::load(pt)?;
    let window = files.manifest.window_samples;
    let text = std::fs::read_to_string(pt.with_file_name(reference_file))?;
    let reference: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(reference["model_sha256"] == files.manifest.sha256.as_str());
    let tolerance = reference["tolerance"]["cpu"]
        .as_f64()
        .context("tolerance")?;
    let case = |name: &str| -> Result<Vec<Vec<f64>>> {
        serde_json::from_value(reference["cases"][name]["embeddings"].clone())
            .with_context(|| format!("case {name}"))
    };
    let a = reference_clip("A", 2 * window);
    let b = reference_clip("B", 2 * window);

    // Whole clips: one row of two windows each (the module averages them).
    let mut two = load_model(&files, 2 * window)?;
    let single = two.forward(&a, 1)?;
    let e = reference_error(&single, &case("single")?);
    assert!(e <= tolerance, "single: error {e:e} > {tolerance:e}");
    let batch = two.forward(&[a.clone(), b.clone()].concat(), 2)?;
    let e = reference_error(&batch, &case("batch")?);
    assert!(e <= tolerance, "batch: error {e:e} > {tolerance:e}");

    // Windows as the pipeline sends them: [4, 47616].
    let mut one = load_model(&files, window)?;
    let input = [&a[..window], &a[window..], &b[..window], &b[window..]].concat();
    let windows = one.forward(&input, 4)?;
    let e = reference_error(&windows, &case("windows")?);
    assert!(e <= tolerance, "windows: error {e:e} > {tolerance:e}");
    Ok(())
}

#[test]
fn batch_boundaries_do_not_change_embeddings() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    if !rt.block_on(embed_available())? {
        return Ok(());
    }
    let files = model::load(&repo_model())?;
    let window = files.manifest.window_samples;
    let dim = files.manifest.embedding_dim;
    let mut m = load_model(&files, window)?;
    // Three "tracks" of 8 windows each, all different.
    let tracks: Vec<Vec<f32>> = (0..3)
        .map(|t| {
            let noise = fixtures::pseudo_random_bytes(7 + t, 8 * window);
            (0..8 * window)
                .map(|i| {
                    let n = i as f32 / 16_000.0;
                    0.3 * (2.0 * std::f32::consts::PI * (200.0 + 150.0 * t as f32) * n).sin()
                        + (f32::from(noise[i]) / 255.0 - 0.5) * 0.1 * t as f32
                })
                .collect()
        })
        .collect();
    // Alone: one forward pass of 8 windows per track.
    let alone: Vec<Vec<f32>> = tracks
        .iter()
        .map(|t| {
            let y = m.forward(t, 8)?;
            let mut sum = vec![0f64; dim];
            for row in y.chunks(dim) {
                for (s, v) in sum.iter_mut().zip(row) {
                    *s += f64::from(*v);
                }
            }
            corald::embed::phase_3_batch::normalised_mean(&sum, 8).context("zero embedding")
        })
        .collect::<Result<_>>()?;
    // Batched: 5 windows per pass, so tracks straddle batches.
    let mut batcher = Batcher::new(window, dim);
    for (i, t) in tracks.iter().enumerate() {
        batcher
            .push(i, t.clone(), 8)
            .map_err(|f| anyhow::anyhow!(f.reason))?;
    }
    let mut got: HashMap<usize, Vec<f32>> = HashMap::new();
    while let Some(batch) = batcher.next_batch(5) {
        let y = m.forward(&batch.input, batch.rows)?;
        let (done, failed) = batcher.complete(batch, &y);
        ensure!(failed.is_empty());
        for d in done {
            got.insert(d.meta, d.embedding);
        }
    }
    for (i, want) in alone.iter().enumerate() {
        let have = &got[&i];
        let diff = want
            .iter()
            .zip(have)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-5, "track {i}: batched differs by {diff:e}");
    }
    Ok(())
}

#[test]
fn seeking_to_the_windows_gives_the_same_audio_as_decoding_everything() -> Result<()> {
    let lib = tempfile::tempdir()?;
    let plan = WindowPlan {
        count: 8,
        window_samples: 47_616,
        sample_rate: 16_000,
    };
    for format in [
        "mp3",
        "flac",
        "ogg_vorbis",
        "m4a_aac",
        "m4a_alac",
        "wav",
        "aiff",
    ] {
        let mut t = FixtureTrack::simple(format!("{format}.bin"), format, format);
        t.duration_s = 70.0;
        let path = fixtures::make_track(lib.path(), &t)?;
        let seek = WindowMaker::new(plan).make(&path, t.duration_s)?;
        let read = WindowMaker::new(plan)
            .with_policy(corald::embed::phase_1_decode::SeekPolicy::DecodeAll)
            .make(&path, t.duration_s)?;
        assert_eq!(seek.count, 8);
        assert_eq!(seek.samples.len(), 8 * 47_616);
        let diff = seek
            .samples
            .iter()
            .zip(&read.samples)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Every window holds the tone (ffmpeg: amplitude 1/8, -3 dB to stereo) from end to end.
        for (w, window) in read.samples.chunks(47_616).enumerate() {
            for (q, quarter) in window.chunks(47_616 / 4).enumerate() {
                let peak = quarter.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    peak > 0.05,
                    "{format}: window {w} quarter {q} is silent (peak {peak})"
                );
            }
        }
        eprintln!("{format}: seeking vs decoding everything: max difference {diff:e}");
        assert!(diff < 1e-4, "{format}: seeking differs by {diff}");
        // Decoding only the windows reads a fraction of the track.
        assert!(
            seek.decoded_seconds < 0.6 * t.duration_s,
            "{format}: {}",
            seek.decoded_seconds
        );
    }
    Ok(())
}

/// Kinds of generated audio; similar tracks must be of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Sine,
    PinkNoise,
}

/// Encode `seconds` of `kind` audio (variant `v` changes pitch or seed) at `root/rel`.
fn make_clip(root: &Path, rel: &str, kind: Kind, v: u32, seconds: f64) -> Result<PathBuf> {
    let source = match kind {
        Kind::Sine => format!(
            "sine=frequency={}:duration={seconds}:sample_rate=44100",
            220 + 110 * v
        ),
        Kind::PinkNoise => format!(
            "anoisesrc=color=pink:amplitude=0.3:seed={}:duration={seconds}:sample_rate=44100",
            v + 1
        ),
    };
    let input = ["-f", "lavfi", "-i", &source, "-ac", "2"].map(std::ffi::OsStr::new);
    fixtures::encode_into_place(root, rel, &input)
}

/// Three tracks of each kind of generated music (drum patterns, chord progressions,
/// distorted sawtooth riffs), 62–86 s long, in mp3, flac and ogg; every variant has its own
/// tempo, key and pattern.
fn similarity_library(root: &Path) -> Result<HashMap<String, MusicKind>> {
    let mut kinds = HashMap::new();
    for (i, ext) in ["mp3", "flac", "ogg"].iter().enumerate() {
        let v = i as u32;
        for (k, kind) in MusicKind::ALL.into_iter().enumerate() {
            let rel = format!("{kind:?}/{kind:?} {v}.{ext}");
            let seconds = 62.0 + 8.0 * (i + k) as f64;
            music::make_music(root, &rel, kind, v, seconds)?;
            kinds.insert(rel, kind);
        }
    }
    Ok(kinds)
}

/// A pool on the harness daemon's managed PostgreSQL.
async fn pool_of(d: &Daemon) -> Result<PgPool> {
    d.pool(4).await
}

/// A daemon that indexes but does not embed (the test drives the Embedder itself).
async fn daemon_without_embeddings() -> Result<Daemon> {
    let dir = traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(&config, "[embed]\nenabled = false\n")?;
    let d = Daemon::start_with(&["--config", &config.to_string_lossy()]).await?;
    // Keep the config file's directory for the daemon's lifetime.
    std::mem::forget(dir);
    Ok(d)
}

fn test_config() -> EmbedConfig {
    EmbedConfig {
        model: Some(repo_model()),
        device: "cpu".into(),
        threads: 2,
        ..EmbedConfig::default()
    }
}

/// Every track as an embedding target (id → (relative path, target)).
async fn all_targets(pool: &PgPool, root: &Path) -> Result<HashMap<String, EmbedTarget>> {
    let rows = sqlx::query("SELECT id, rel_path_text, duration_ms FROM tracks")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let rel: String = r.get("rel_path_text");
            let t = EmbedTarget {
                track_id: r.get("id"),
                path: root.join(&rel),
                duration_ms: r.get("duration_ms"),
            };
            (rel, t)
        })
        .collect())
}

fn scan_handle(reporter: &ScanReporter) -> Arc<corald::progress::ScanHandle> {
    reporter.register(
        ScanInfo {
            request_id: uuid::Uuid::new_v4(),
            library_id: 1,
            library_path: "/test".into(),
            path: None,
            trigger: ScanTrigger::Manual,
            mode: ScanMode::Incremental,
            started_at: Utc::now(),
            resumed: false,
        },
        ScanPhase::Embedding,
    )
}

async fn embedding_rows(pool: &PgPool, model_id: i64) -> Result<HashMap<i64, (Vec<f32>, String)>> {
    let rows = sqlx::query(
        "SELECT track_id, embedding::real[] AS v, created_at::text AS c
         FROM track_embeddings WHERE model_id = $1",
    )
    .bind(model_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get("track_id"), (r.get("v"), r.get("c"))))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_embeds_each_eligible_track_once_and_finds_similar_ones() -> Result<()> {
    if !embed_available().await? {
        return Ok(());
    }
    let lib = traversable_tempdir()?;
    let root = lib.path();
    let kinds = similarity_library(root)?;
    // Skip rules and failures.
    make_clip(root, "short/twenty seconds.flac", Kind::Sine, 5, 20.0)?;
    // Headers intact (the indexer reads 90 s), audio garbled: decoding fails.
    let garbled = make_clip(root, "broken/garbled.mp3", Kind::PinkNoise, 7, 90.0)?;
    let mut bytes = std::fs::read(&garbled)?;
    let keep = 8192;
    let noise = fixtures::pseudo_random_bytes(0xBAD, bytes.len() - keep);
    bytes[keep..].copy_from_slice(&noise);
    std::fs::write(&garbled, &bytes)?;

    let d = daemon_without_embeddings().await?;
    let c = d.client().await?;
    let (library_id, p) = add_and_scan(&c, root).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    let pool = pool_of(&d).await?;
    let targets = all_targets(&pool, root).await?;
    assert_eq!(targets.len(), 11, "{:?}", targets.keys());

    let stop = CancellationToken::new();
    let embedder = Embedder::start(&test_config(), pool.clone(), stop.clone()).await?;
    let model_id = embedder.model_id();
    let status = embedder.status();
    assert_eq!(status.device.as_deref(), Some("cpu"));
    assert_eq!(status.tracks_embedded, 0);

    // The start-up sweep sees what is in range: not the 20 s track.
    let missing = embedder.missing_targets().await?;
    assert_eq!(missing.len(), 10, "{missing:?}");

    let reporter = ScanReporter::new();
    let h = scan_handle(&reporter);
    let t0 = Instant::now();
    embedder
        .embed_for_scan(Arc::clone(&h), targets.values().cloned().collect())
        .await?;
    let elapsed = t0.elapsed();
    let v = h.counters().values();
    assert_eq!(v.embeddings_expected, Some(11));
    assert_eq!(v.embeddings_done, 9, "{v:?}\n{}", d.log_text());
    assert_eq!(v.embeddings_skipped, 1, "20 s track: {v:?}");
    assert_eq!(v.embeddings_failed, 1, "garbled mp3: {v:?}");
    eprintln!("embedded 9 tracks (+2 settled without model work) in {elapsed:?}");

    // Exactly one normalised vector per eligible track.
    let rows = embedding_rows(&pool, model_id).await?;
    assert_eq!(rows.len(), 9);
    for (rel, kind) in &kinds {
        let id = targets[rel].track_id;
        let (v, _) = rows
            .get(&id)
            .with_context(|| format!("{rel} ({kind:?}) has no vector"))?;
        assert_eq!(v.len(), 200);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{rel}: norm {norm}");
    }
    let issues: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT track_id, outcome, reason FROM track_embedding_issues WHERE model_id = $1",
    )
    .bind(model_id)
    .fetch_all(&pool)
    .await?;
    let issue_of = |rel: &str| {
        issues
            .iter()
            .find(|i| i.0 == targets[rel].track_id)
            .cloned()
    };
    let broken = issue_of("broken/garbled.mp3").context("garbled issue recorded")?;
    assert_eq!(broken.1, "failed", "{broken:?}");
    assert_eq!(embedder.status().tracks_embedded, 9);

    // Similar tracks: the nearest neighbour is of the same kind; never the track itself.
    let similarity = Similarity::new(pool.clone(), embedder.model());
    let all = SimilarFilter::default();
    let record = |id: i64| {
        let pool = pool.clone();
        async move {
            corald::db::tracks::get(&pool, id)
                .await?
                .context("track row")
        }
    };
    for (rel, kind) in &kinds {
        let id = targets[rel].track_id;
        let near: Vec<(i64, f64)> = similarity
            .similar(&record(id).await?, &all, 5)
            .await?
            .into_iter()
            .map(|(t, s)| (t.id, s))
            .collect();
        assert_eq!(near.len(), 5, "{rel}");
        assert!(near.iter().all(|(n, _)| *n != id));
        assert!(
            near.windows(2).all(|w| w[0].1 >= w[1].1),
            "best first: {near:?}"
        );
        let by_id: HashMap<i64, &String> = kinds.keys().map(|r| (targets[r].track_id, r)).collect();
        let first = by_id[&near[0].0];
        assert_eq!(kinds[first], *kind, "{rel}: nearest is {first} ({near:?})");
    }
    let short = targets["short/twenty seconds.flac"].track_id;
    assert!(matches!(
        similarity.similar(&record(short).await?, &all, 5).await,
        Err(SimilarityError::NoEmbedding(id)) if id == short
    ));
    // The model's HNSW index exists and serves the query.
    let mut conn = pool.acquire().await?;
    // Tiny tables favour other plans; rule them out to see that the index applies.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET enable_bitmapscan = off")
        .execute(&mut *conn)
        .await?;
    let literal: String =
        sqlx::query_scalar("SELECT quote_literal(embedding::text) FROM track_embeddings LIMIT 1")
            .fetch_one(&mut *conn)
            .await?;
    let sql = format!(
        "EXPLAIN {}",
        corald::similarity::vectors::index_sql(corald::embed::phase_5_store::RegisteredModel {
            id: model_id,
            dim: 200,
        })
        .replace("$1", &literal)
        .replace("$2", &literal)
        .replace("$3", "'{0}'::bigint[]")
        .replace("$4", "NULL")
        .replace("$5", "0")
        .replace("$6", "9223372036854775807")
        .replace("$7", &literal)
        .replace("$8", "5")
    );
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let plan = plan.join("\n");
    assert!(
        plan.contains(&format!("track_embeddings_hnsw_{model_id}")),
        "{plan}"
    );
    drop(conn);

    // No repeated work: the same scan again changes nothing.
    let h2 = scan_handle(&reporter);
    embedder
        .embed_for_scan(Arc::clone(&h2), targets.values().cloned().collect())
        .await?;
    let v2 = h2.counters().values();
    assert_eq!(
        (
            v2.embeddings_done,
            v2.embeddings_skipped,
            v2.embeddings_failed
        ),
        (9, 1, 1)
    );
    assert_eq!(
        embedding_rows(&pool, model_id).await?,
        rows,
        "nothing rewritten"
    );
    assert!(embedder.missing_targets().await?.is_empty());

    // A changed file gets a new vector, replacing the old one.
    let changed = "Drums/Drums 0.mp3";
    tokio::time::sleep(Duration::from_millis(20)).await;
    make_clip(root, changed, Kind::PinkNoise, 9, 90.0)?;
    scan(&c, library_id, None, false).await?;
    let missing = embedder.missing_targets().await?;
    assert_eq!(
        missing.iter().map(|t| t.track_id).collect::<Vec<_>>(),
        [targets[changed].track_id]
    );
    let summary = embedder
        .embed(
            uuid::Uuid::new_v4(),
            all_targets(&pool, root).await?.into_values().collect(),
            CancellationToken::new(),
        )
        .await?;
    assert_eq!((summary.embedded, summary.unchanged), (1, 8), "{summary:?}");
    let after = embedding_rows(&pool, model_id).await?;
    assert_eq!(after.len(), 9);
    let id = targets[changed].track_id;
    assert_ne!(
        after[&id].0, rows[&id].0,
        "the vector of the changed file was replaced"
    );
    for (k, v) in &rows {
        if *k != id {
            assert_eq!(&after[k], v);
        }
    }

    stop.cancel();
    Ok(())
}

/// Opus decodes through libopus and WMA through the FFmpeg fallback: their tracks get vectors
/// like any other (Opus was once skipped as "no decoder for opus", WMA could not be read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opus_and_wma_tracks_get_embeddings_stored() -> Result<()> {
    if !embed_available().await? {
        return Ok(());
    }
    let lib = traversable_tempdir()?;
    let root = lib.path();
    make_clip(root, "opus/tone.opus", Kind::Sine, 6, 70.0)?;
    make_clip(root, "opus/noise.opus", Kind::PinkNoise, 6, 70.0)?;
    make_clip(root, "wma/tone.wma", Kind::Sine, 7, 70.0)?;
    let d = daemon_without_embeddings().await?;
    let c = d.client().await?;
    let (_, p) = add_and_scan(&c, root).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    let pool = pool_of(&d).await?;
    let targets = all_targets(&pool, root).await?;
    assert_eq!(targets.len(), 3, "{:?}", targets.keys());

    let stop = CancellationToken::new();
    let embedder = Embedder::start(&test_config(), pool.clone(), stop.clone()).await?;
    let reporter = ScanReporter::new();
    let h = scan_handle(&reporter);
    embedder
        .embed_for_scan(Arc::clone(&h), targets.values().cloned().collect())
        .await?;
    let v = h.counters().values();
    assert_eq!(
        (v.embeddings_done, v.embeddings_skipped, v.embeddings_failed),
        (3, 0, 0),
        "{v:?}\n{}",
        d.log_text()
    );
    let rows = embedding_rows(&pool, embedder.model_id()).await?;
    for (rel, t) in &targets {
        let (v, _) = rows
            .get(&t.track_id)
            .with_context(|| format!("{rel} has no vector"))?;
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            v.len() == 200 && (norm - 1.0).abs() < 1e-4,
            "{rel}: norm {norm}"
        );
    }
    let (tone, noise) = (
        &rows[&targets["opus/tone.opus"].track_id].0,
        &rows[&targets["opus/noise.opus"].track_id].0,
    );
    assert_ne!(tone, noise, "a tone and noise embed differently");
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_quickly_and_a_rerun_redoes_nothing_stored() -> Result<()> {
    if !embed_available().await? {
        return Ok(());
    }
    let lib = traversable_tempdir()?;
    let root = lib.path();
    // Enough tracks that embedding takes a while on 2 cores.
    let mut tracks = Vec::new();
    for i in 0..24u32 {
        let mut t = FixtureTrack::simple(format!("t/{i:02}.flac"), "flac", &format!("Track {i}"));
        t.duration_s = 65.0;
        tracks.push(t);
    }
    fixtures::make_tracks(root, &tracks)?;
    let d = daemon_without_embeddings().await?;
    let c = d.client().await?;
    let (_, p) = add_and_scan(&c, root).await?;
    assert_eq!(p.counts.tracks_indexed, 24);
    let pool = pool_of(&d).await?;
    let targets: Vec<EmbedTarget> = all_targets(&pool, root).await?.into_values().collect();

    let stop = CancellationToken::new();
    let embedder = Embedder::start(&test_config(), pool.clone(), stop.clone()).await?;
    let reporter = ScanReporter::new();
    let h = scan_handle(&reporter);
    let task = tokio::spawn({
        let e = embedder.clone();
        let h = Arc::clone(&h);
        let targets = targets.clone();
        async move { e.embed_for_scan(h, targets).await }
    });
    // Wait for the first stored vector, then cancel.
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.counters().values().embeddings_done == 0 {
        ensure!(Instant::now() < deadline, "nothing embedded within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.cancel_token().cancel();
    let cancelled_at = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), task).await??;
    let took = cancelled_at.elapsed();
    assert!(matches!(r, Err(EmbedError::Cancelled)), "{r:?}");
    assert!(took < Duration::from_millis(1500), "cancel took {took:?}");
    let v = h.counters().values();
    assert!(v.embeddings_done < 24, "cancelled before the end: {v:?}");

    // Stop this embedder (as a daemon shutdown would); a forward pass in flight may still land.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), embedder.stopped())
        .await
        .context("the pipeline did not wind down within 10 s of stop")?;
    let model_id = embedder.model_id();
    drop(embedder);
    let stored = embedding_rows(&pool, model_id).await?;
    assert!(!stored.is_empty() && stored.len() < 24, "{}", stored.len());
    for (v, _) in stored.values() {
        assert_eq!(v.len(), 200);
    }

    // A new Embedder (as after a restart) embeds only the rest.
    let stop = CancellationToken::new();
    let embedder = Embedder::start(&test_config(), pool.clone(), stop.clone()).await?;
    assert_eq!(embedder.status().tracks_embedded, stored.len() as i64);
    let missing = embedder.missing_targets().await?;
    assert_eq!(missing.len(), 24 - stored.len());
    let summary = embedder
        .embed(uuid::Uuid::new_v4(), targets, CancellationToken::new())
        .await?;
    assert_eq!(summary.unchanged, stored.len() as u64, "{summary:?}");
    assert_eq!(summary.embedded, (24 - stored.len()) as u64, "{summary:?}");
    let after = embedding_rows(&pool, embedder.model_id()).await?;
    assert_eq!(after.len(), 24);
    for (k, v) in &stored {
        assert_eq!(&after[k], v, "track {k} was not embedded again");
    }
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_model_is_refused_with_a_reason() -> Result<()> {
    if !embed_available().await? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let pt = dir.path().join("musicnn-msd.pt");
    let mut bytes = std::fs::read(repo_model())?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&pt, &bytes)?;
    std::fs::copy(
        repo_model().with_extension("json"),
        pt.with_extension("json"),
    )?;
    let pool = PgPoolOptions::new().connect_lazy("postgres://nobody@localhost/none")?;
    let cfg = EmbedConfig {
        model: Some(pt.clone()),
        ..test_config()
    };
    let e = Embedder::start(&cfg, pool.clone(), CancellationToken::new())
        .await
        .err()
        .context("a damaged model must not load")?;
    assert!(e.to_string().contains("sha256"), "{e}");
    assert!(e.to_string().contains(&pt.display().to_string()), "{e}");

    let cfg = EmbedConfig {
        model: Some(dir.path().join("absent.pt")),
        ..test_config()
    };
    let e = Embedder::start(&cfg, pool, CancellationToken::new())
        .await
        .err()
        .context("a missing model must not load")?;
    assert!(e.to_string().contains("absent.pt"), "{e}");
    Ok(())
}

/// Through the daemon and its API: the wiring of the pipeline into scans, `daemon.status`,
/// `track.get` and `track.similar`, on three kinds of generated music.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_similar_through_the_api_returns_the_same_kind() -> Result<()> {
    if !embed_available().await? {
        return Ok(());
    }
    let lib = traversable_tempdir()?;
    let kinds = similarity_library(lib.path())?;
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let (_, p) = add_and_scan(&c, lib.path()).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(p.counts.embeddings_expected, Some(9), "{p:?}");
    assert_eq!(p.counts.embeddings_done, 9, "{p:?}");
    let status = c.daemon_status().await?;
    let e = &status.embedding;
    assert!(e.enabled, "{e:?}");
    assert_eq!(e.tracks_embedded, 9);
    assert_eq!(e.tracks_embedded_since_start, 9, "{e:?}");
    assert_eq!((e.decode_queue, e.inference_queue), (0, 0), "idle: {e:?}");
    assert!(
        e.windows_per_inference_second > 1.0,
        "72 windows took forward-pass time: {e:?}"
    );

    let mut db = d.db().await?;
    let ids: Vec<(i64, String)> = sqlx::query_as("SELECT id, rel_path_text FROM tracks")
        .fetch_all(&mut db)
        .await?;
    let kind_of: HashMap<i64, MusicKind> = ids.iter().map(|(id, rel)| (*id, kinds[rel])).collect();
    for (id, rel) in &ids {
        let near = c
            .track_similar(coral_proto::TrackRef::Id(*id), Some(3), None)
            .await?;
        assert_eq!(near.len(), 3, "{rel}");
        assert!(near.iter().all(|s| s.track.id != *id));
        let named: Vec<_> = near
            .iter()
            .map(|s| (kind_of[&s.track.id], s.score))
            .collect();
        assert_eq!(
            kind_of[&near[0].track.id], kind_of[id],
            "{rel}: nearest are {named:?}"
        );
        assert!(near[0].score > near[2].score - 1e-9);
        assert!(c.track_get(*id).await?.has_embedding, "{rel}");
    }

    // `has_embedding` speaks of the model serving the track's library: the one the library
    // was last complete under, which a newer model does not displace before the library is
    // complete under it too…
    let first = ids[0].0;
    sqlx::query(
        "INSERT INTO models (name, version, params, dim, sample_rate, window_samples, sha256,
                             last_used_at)
         VALUES ('other', '1', 'windows=8,patches=1', 200, 16000, 47616, 'x', now() + interval '1 s')",
    )
    .execute(&mut db)
    .await?;
    assert!(
        c.track_get(first).await?.has_embedding,
        "still served by the model its library is complete under"
    );
    // …and, in a library complete under no model, the active model: the one registered last.
    sqlx::query("DELETE FROM library_models")
        .execute(&mut db)
        .await?;
    assert!(
        !c.track_get(first).await?.has_embedding,
        "no vector of the newer model yet"
    );
    Ok(())
}

/// Throughput on this machine (not a pass/fail check): decode + resample audio-s/s with
/// seeking and with whole-file reading, inference windows/s, and tracks/s end to end.
/// `cargo test -p coral-tests --release --features corald/embed --test embed -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn throughput_figures() -> Result<()> {
    if !embed_available().await? {
        return Ok(());
    }
    let lib = traversable_tempdir()?;
    let root = lib.path();
    let n = 24u32;
    let mut paths = Vec::new();
    for i in 0..n {
        let ext = ["mp3", "flac", "ogg"][i as usize % 3];
        let kind = if i % 2 == 0 {
            Kind::Sine
        } else {
            Kind::PinkNoise
        };
        paths.push(make_clip(root, &format!("{i:02}.{ext}"), kind, i, 180.0)?);
    }
    let files = model::load(&repo_model())?;
    let plan = WindowPlan {
        count: 8,
        window_samples: files.manifest.window_samples,
        sample_rate: files.manifest.sample_rate,
    };
    for policy in [
        corald::embed::phase_1_decode::SeekPolicy::Seek,
        corald::embed::phase_1_decode::SeekPolicy::Sequential,
    ] {
        let mut maker = WindowMaker::new(plan).with_policy(policy);
        let t = Instant::now();
        let mut audio = 0.0;
        for p in &paths {
            audio += maker.make(p, 180.0)?.decoded_seconds;
        }
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "decode+resample ({policy:?}, 1 thread): {:.1} tracks/s, {:.0} audio-s decoded per s, {:.0} track-s per s",
            f64::from(n) / s,
            audio / s,
            180.0 * f64::from(n) / s
        );
    }
    inference_figures(&files)?;
    let d = daemon_without_embeddings().await?;
    let c = d.client().await?;
    add_and_scan(&c, root).await?;
    let pool = pool_of(&d).await?;
    let targets: Vec<EmbedTarget> = all_targets(&pool, root).await?.into_values().collect();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let cfg = EmbedConfig {
        threads: env("CORAL_BENCH_THREADS").unwrap_or(2),
        batch_size: env("CORAL_BENCH_BATCH").unwrap_or(0),
        decode_threads: env("CORAL_BENCH_DECODERS").unwrap_or(0),
        ..test_config()
    };
    let embedder = Embedder::start(&cfg, pool, CancellationToken::new()).await?;
    let t = Instant::now();
    let summary = embedder
        .embed(uuid::Uuid::new_v4(), targets, CancellationToken::new())
        .await?;
    let s = t.elapsed().as_secs_f64();
    eprintln!(
        "end to end: {} tracks in {s:.2} s = {:.2} tracks/s ({:?})",
        summary.embedded,
        summary.embedded as f64 / s,
        embedder.stats()
    );
    Ok(())
}

/// Inference windows/s by batch size; threads from `CORAL_BENCH_THREADS` (default 2).
fn inference_figures(files: &ModelFiles) -> Result<()> {
    let threads: usize = std::env::var("CORAL_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let window = files.manifest.window_samples;
    let mut m = phase_4_infer::load_model(files, DeviceChoice::Cpu, threads, window)?;
    let batches: Vec<usize> = std::env::var("CORAL_BENCH_BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|b| b.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 16, 32]);
    let noise = fixtures::pseudo_random_bytes(42, 32 * window);
    for batch in batches {
        let input: Vec<f32> = noise[..batch * window]
            .iter()
            .map(|b| (f32::from(*b) - 127.5) / 256.0)
            .collect();
        m.forward(&input, batch)?;
        let t = Instant::now();
        let rounds = (64 / batch).max(3);
        for _ in 0..rounds {
            m.forward(&input, batch)?;
        }
        let s = t.elapsed().as_secs_f64();
        let windows = (rounds * batch) as f64;
        eprintln!(
            "inference batch {batch:>2} ({threads} threads): {:.1} windows/s = {:.0} audio-s/s",
            windows / s,
            windows * files.manifest.window_seconds() / s
        );
    }
    Ok(())
}

/// `cargo test --release -p coral-tests --features corald/embed --test embed inference_batch -- --ignored --nocapture`
#[test]
#[ignore = "measurement, run by hand"]
fn inference_batch_sizes() -> Result<()> {
    if !phase_4_infer::available() {
        return Ok(());
    }
    inference_figures(&model::load(&repo_model())?)
}
