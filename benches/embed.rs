//! Embedding pipeline throughput: each stage alone, the whole pipeline,
//! and bliss-audio analysing the same tracks, in one run.
//!
//! The tracks are generated music (drum patterns, chord progressions, distorted sawtooth riffs;
//! see `coral_tests::music`) of `CORAL_BENCH_EMBED_SECONDS` (default 180) seconds, encoded by
//! ffmpeg into mp3, flac and ogg, `CORAL_BENCH_EMBED_TRACKS` (default 12) of them, cached under
//! `target/bench-embed-library/`. Criterion groups:
//!
//! * `embed/decode`: stage 1 alone, one thread: symphonia seeks to the 8 windows of each track
//!   and decodes them (plus a 50 ms margin each side), downmixed to mono;
//! * `embed/decode_formats`: stage 1 alone, one thread, on one track of the same length per
//!   format (chord music encoded by ffmpeg): symphonia for MP3, FLAC, Vorbis, AAC, ALAC and WAV,
//!   libopus (through symphonia) for Opus, the FFmpeg fallback (a child process) for WMA,
//!   WavPack and TrueAudio, cached under `target/bench-embed-library/formats-<seconds>s/`;
//! * `embed/resample`: stage 2 alone, one thread: rubato FFT resampling of those decoded regions
//!   from 44.1 kHz to the model's 16 kHz;
//! * `embed/inference`: stage 4 alone: forward passes of the committed musicnn models via
//!   libtorch with `embed.threads` = the number of cores, at 1, 2, 8 and 32 windows per pass
//!   (32 windows per iteration): on a CPU the default int8 model and the fp32 one, on CUDA the
//!   fp32 one;
//! * `embed/end_to_end`: `Embedder::embed` on every track with the default configuration (the
//!   daemon's code, a real PostgreSQL: the harness daemon's managed cluster), vectors deleted
//!   before each iteration;
//! * `embed/queue`: the embedding queue's own work per track (enqueue, lease 4 rows at a time,
//!   settle, forget) on the same cluster, for 80 requests of every track, no decoding;
//! * `embed/workers`: 1, then 2 `corald worker` processes embedding every track that an
//!   in-process embedder with `embed.local = false` queued;
//! * `embed/bliss` (with `--features bliss`): bliss-audio 0.13 (symphonia decoders) analysing the
//!   same files with `analyze_paths`, which uses every core.
//!
//! Afterwards the bench reads criterion's estimates back and prints tracks/s for each, the end
//! to end figure as a share of the slowest stage, and the ratio to bliss-audio.
//!
//! ```sh
//! source ~/.cache/coral/libtorch.env
//! cargo build --release --workspace --bins --features corald/embed
//! OMP_WAIT_POLICY=PASSIVE cargo bench -p coral-benches --features corald/embed,coral-benches/bliss --bench embed
//! ```
//!
//! `CORAL_BENCH_EMBED_ONLY=decode_formats` runs that group alone (no music library, model
//! inference or database), e.g.
//! `cargo bench -p coral-benches --bench embed -- --warm-up-time 1 --measurement-time 3`.
//!
//! Without the `embed` feature only decode and resample run. `CORAL_BENCH_DEVICE` (default
//! `cpu`) picks the device of the inference and end-to-end groups: `cuda` on a GPU machine (see
//! `benches/gpu.sh`, which also records the accelerator's utilisation).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use coral_tests::daemon::Daemon;
use coral_tests::music::{self, MusicKind};
use corald::embed::model;
use corald::embed::phase_1_decode::{self, DecodedBy, SeekPolicy};
use corald::embed::phase_2_resample::{WindowMaker, WindowPlan};
use corald::embed::phase_4_infer::{self, DeviceChoice};
use corald::embed::{CancellationToken, EmbedConfig, EmbedTarget, Embedder};
use criterion::{BenchmarkId, Criterion, Throughput};

/// Windows per inference iteration (divisible by every batch size benched).
const INFER_WINDOWS: usize = 32;
const BATCHES: [usize; 4] = [1, 2, 8, 32];

fn env_usize(key: &str, default: usize) -> Result<usize> {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{key}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// `CORAL_BENCH_DEVICE`: `cpu` (default), `cuda` or `cuda:N`.
fn bench_device() -> Result<String> {
    let d = std::env::var("CORAL_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    ensure!(
        DeviceChoice::parse(&d).is_some(),
        "CORAL_BENCH_DEVICE={d:?}: expected cpu, cuda or cuda:N"
    );
    Ok(d)
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The model the daemon loads by default on the bench device: the int8 model on a CPU, the
/// fp32 one on CUDA.
fn model_path() -> PathBuf {
    model_named(default_model())
}

fn default_model() -> &'static str {
    model::default_model_name(bench_device().is_ok_and(|d| d.starts_with("cuda")))
}

fn model_named(name: &str) -> PathBuf {
    workspace_dir().join(format!("model/{name}.pt"))
}

/// The generated library: (path, duration in seconds) per track, made once per size.
fn library(tracks: usize, seconds: usize) -> Result<Vec<(PathBuf, f64)>> {
    let root = workspace_dir().join(format!("target/bench-embed-library/{tracks}x{seconds}s"));
    let mut out = Vec::new();
    for i in 0..tracks {
        let kind = MusicKind::ALL[i % 3];
        let ext = ["mp3", "flac", "ogg"][(i / 3) % 3];
        let rel = format!("{i:02} {kind:?}.{ext}");
        let path = root.join(&rel);
        if !path.is_file() {
            music::make_music(&root, &rel, kind, i as u32, seconds as f64)?;
        }
        out.push((path, seconds as f64));
    }
    Ok(out)
}

/// The daemon's default window choice for `manifest`'s model.
fn plan(manifest: &model::ModelManifest) -> WindowPlan {
    let c = EmbedConfig::default();
    WindowPlan {
        count: c.windows,
        window_samples: manifest.window_samples * c.window_patches,
        sample_rate: manifest.sample_rate,
    }
}

fn main() -> Result<()> {
    let tracks = env_usize("CORAL_BENCH_EMBED_TRACKS", 12)?;
    let seconds = env_usize("CORAL_BENCH_EMBED_SECONDS", 180)?;
    ensure!(tracks >= 1 && seconds >= 60, "at least 1 track of 60 s");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // corald.service sets OMP_WAIT_POLICY=PASSIVE (libtorch's OpenMP threads sleep instead of
    // spinning while they wait, leaving the cores to the decode threads); libgomp reads it when
    // it loads, so it has to come from the environment.
    println!(
        "embed bench: {tracks} tracks of {seconds} s, machine: {}, load average {}, OMP_WAIT_POLICY={}",
        coral_benches::machine(),
        coral_benches::loadavg(),
        std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "(unset)".into())
    );
    let files = model::load(&model_path())?;
    let plan = plan(&files.manifest);
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();

    // Stage 1 per format.
    let format_figures = decode_formats(&mut c, &plan, seconds)?;
    if std::env::var("CORAL_BENCH_EMBED_ONLY").is_ok_and(|v| v == "decode_formats") {
        c.final_summary();
        format_summary(&format_figures);
        return Ok(());
    }
    let lib = library(tracks, seconds)?;

    // Stage 1: decode only.
    let regions: Vec<_> = lib.iter().map(|(_, d)| plan.regions(*d)).collect();
    let mut decoded = Vec::new();
    for ((path, _), r) in lib.iter().zip(&regions) {
        decoded.push(phase_1_decode::decode_regions(path, r, SeekPolicy::Seek)?);
    }
    let decoded_seconds: f64 = decoded
        .iter()
        .map(|d| d.decoded_frames as f64 / f64::from(d.sample_rate))
        .sum();
    println!(
        "decoded per pass: {:.1} audio-s for {tracks} tracks ({:.1} s per track)",
        decoded_seconds,
        decoded_seconds / tracks as f64
    );
    {
        let mut g = c.benchmark_group("embed/decode");
        g.throughput(Throughput::Elements(tracks as u64));
        g.bench_function("seek to windows, 1 thread", |b| {
            b.iter(|| {
                for ((path, _), r) in lib.iter().zip(&regions) {
                    let d = phase_1_decode::decode_regions(path, r, SeekPolicy::Seek);
                    std::hint::black_box(d.map(|d| d.decoded_frames).unwrap_or(0));
                }
            })
        });
        g.finish();
    }

    // Stage 2: resample only.
    {
        let mut maker = WindowMaker::new(plan);
        let mut g = c.benchmark_group("embed/resample");
        g.throughput(Throughput::Elements(tracks as u64));
        g.bench_function("fft 44.1k to 16k mono, 1 thread", |b| {
            b.iter(|| {
                for d in &decoded {
                    for region in &d.regions {
                        let y = maker.resample(region, d.sample_rate);
                        std::hint::black_box(y.map(|y| y.len()).unwrap_or(0));
                    }
                }
            })
        });
        g.finish();
    }

    // Stage 4: inference only.
    if phase_4_infer::available() {
        let row = plan.window_samples;
        let device = bench_device()?;
        let choice = DeviceChoice::parse(&device).context("CORAL_BENCH_DEVICE")?;
        let input: Vec<f32> = music::synthesize(MusicKind::Chords, 0, 100.0)
            .into_iter()
            .step_by(2)
            .take(INFER_WINDOWS * row)
            .collect();
        ensure!(input.len() == INFER_WINDOWS * row, "not enough input");
        // The default model first, then the other one the device can run (on a CPU: the fp32
        // model, for the ratio the int8 convolutions buy).
        let mut names = vec![default_model()];
        if !device.starts_with("cuda") {
            names.extend([
                "musicnn-msd-int8",
                model::DEFAULT_ACCELERATOR_MODEL,
                "musicnn-msd",
            ]);
        }
        let mut g = c.benchmark_group("embed/inference");
        g.throughput(Throughput::Elements(INFER_WINDOWS as u64));
        for name in names {
            let files = model::load(&model_named(name))?;
            let mut m = phase_4_infer::load_model(&files, choice, cores, row)?;
            println!("inference with {name} on {}", m.device_label());
            for batch in BATCHES {
                g.bench_with_input(
                    BenchmarkId::new(format!("{device}, {name}, {cores} threads, batch"), batch),
                    &batch,
                    |b, &batch| {
                        b.iter(|| {
                            for chunk in input.chunks(batch * row) {
                                let y = m.forward(chunk, batch);
                                std::hint::black_box(y.map(|y| y.len()).unwrap_or(0));
                            }
                        })
                    },
                );
            }
        }
        g.finish();

        end_to_end(&mut c, &lib)?;
    } else {
        println!("corald built without the `embed` feature: no inference or end-to-end figures");
    }

    #[cfg(feature = "bliss")]
    {
        use bliss_audio::decoder::Decoder as _;
        use bliss_audio::decoder::symphonia::SymphoniaDecoder;
        let paths: Vec<PathBuf> = lib.iter().map(|(p, _)| p.clone()).collect();
        let mut g = c.benchmark_group("embed/bliss");
        g.throughput(Throughput::Elements(tracks as u64));
        g.sample_size(10);
        g.bench_function(format!("bliss-audio 0.13 symphonia, {cores} cores"), |b| {
            b.iter(|| {
                let ok = SymphoniaDecoder::analyze_paths(&paths)
                    .filter(|(_, r)| r.is_ok())
                    .count();
                assert_eq!(ok, paths.len(), "bliss failed on a track");
            })
        });
        g.finish();
    }

    c.final_summary();
    format_summary(&format_figures);
    summary(tracks, seconds, cores);
    Ok(())
}

/// The per-format tracks: (name, file, codec arguments when the extension does not choose
/// them, expected decoder).
const DECODE_FORMATS: [(&str, &str, Option<&[&str]>, DecodedBy); 10] = [
    ("mp3", "music.mp3", None, DecodedBy::Symphonia),
    ("flac", "music.flac", None, DecodedBy::Symphonia),
    ("vorbis", "music.ogg", None, DecodedBy::Symphonia),
    ("aac", "music-aac.m4a", None, DecodedBy::Symphonia),
    (
        "alac",
        "music-alac.m4a",
        Some(&["-c:a", "alac"]),
        DecodedBy::Symphonia,
    ),
    ("wav", "music.wav", None, DecodedBy::Symphonia),
    ("opus", "music.opus", None, DecodedBy::Symphonia),
    ("wma", "music.wma", None, DecodedBy::Ffmpeg),
    ("wavpack", "music.wv", None, DecodedBy::Ffmpeg),
    ("tta", "music.tta", None, DecodedBy::Ffmpeg),
];

/// What one format's decode pass does: (benchmark id, audio-s decoded per track).
type FormatFigures = Vec<(String, f64)>;

/// `embed/decode_formats`: the windows of one `seconds`-long track per format, one thread.
fn decode_formats(c: &mut Criterion, plan: &WindowPlan, seconds: usize) -> Result<FormatFigures> {
    let root = workspace_dir().join(format!("target/bench-embed-library/formats-{seconds}s"));
    let source = root.join("source.wav");
    if !source.is_file() {
        std::fs::create_dir_all(&root)?;
        music::write_wav(
            &source,
            &music::synthesize(MusicKind::Chords, 0, seconds as f64),
        )?;
    }
    let input = ["-i".as_ref(), source.as_os_str()];
    let regions = plan.regions(seconds as f64);
    let mut tracks = Vec::new();
    for (name, rel, codec, expected) in DECODE_FORMATS {
        let path = root.join(rel);
        if !path.is_file() {
            match codec {
                Some(codec) => {
                    coral_tests::fixtures::encode_into_place_with(&root, rel, &input, codec)?
                }
                None => coral_tests::fixtures::encode_into_place(&root, rel, &input)?,
            };
        }
        let d = phase_1_decode::decode_regions(&path, &regions, SeekPolicy::Seek)
            .with_context(|| format!("decoding {name}"))?;
        ensure!(
            d.decoded_by == expected,
            "{name}: decoded by {:?}, expected {expected:?}",
            d.decoded_by
        );
        let decoder = match (name, d.decoded_by) {
            ("opus", DecodedBy::Symphonia) => "libopus",
            (_, DecodedBy::Symphonia) => "symphonia",
            (_, DecodedBy::Ffmpeg) => "ffmpeg",
        };
        let id = format!("{name}, {decoder}");
        let decoded_s = d.decoded_frames as f64 / f64::from(d.sample_rate.max(1));
        tracks.push((id, path, decoded_s));
    }
    let mut g = c.benchmark_group("embed/decode_formats");
    g.throughput(Throughput::Elements(1));
    for (id, path, _) in &tracks {
        g.bench_with_input(
            BenchmarkId::new(format!("{} windows, 1 thread", plan.count), id),
            path,
            |b, path| {
                b.iter(|| {
                    let d = phase_1_decode::decode_regions(path, &regions, SeekPolicy::Seek);
                    std::hint::black_box(d.map(|d| d.decoded_frames).unwrap_or(0));
                })
            },
        );
    }
    g.finish();
    Ok(tracks.into_iter().map(|(id, _, s)| (id, s)).collect())
}

fn format_summary(figures: &FormatFigures) {
    let medians = medians("embed/decode_formats");
    println!(
        "\nper-format decode (criterion medians; one track, its {} windows, 1 thread):",
        EmbedConfig::default().windows
    );
    for (id, decoded_s) in figures {
        let leaf = |k: &String| k.rsplit('/').next() == Some(id.as_str());
        let Some((_, s)) = medians.iter().find(|(k, _)| leaf(k)) else {
            println!("  {id:<22} (no estimate)");
            continue;
        };
        println!(
            "  {id:<22} {:>8.2} ms/track {:>8.1} tracks/s {:>9.0} audio-s decoded/s ({decoded_s:.1} s per track)",
            s * 1e3,
            1.0 / s,
            decoded_s / s
        );
    }
}

/// The daemon's pipeline on every track, from an empty `track_embeddings` each iteration.
fn end_to_end(c: &mut Criterion, lib: &[(PathBuf, f64)]) -> Result<()> {
    let rt = coral_benches::runtime(2)?;
    let dir = coral_tests::daemon::traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(&config, "[embed]\nenabled = false\n")?;
    let root = lib
        .first()
        .and_then(|(p, _)| p.parent())
        .context("empty library")?
        .to_path_buf();
    let (daemon, pool, embedder, targets, cfg) = rt.block_on(async {
        let d = Daemon::start_with(&["--config", &config.to_string_lossy()]).await?;
        let client = d.client().await?;
        coral_tests::daemon::add_and_scan(&client, &root).await?;
        let pool = d.pool(4).await?;
        let rows: Vec<(i64, String, i64)> =
            sqlx::query_as("SELECT id, rel_path_text, duration_ms FROM tracks")
                .fetch_all(&pool)
                .await?;
        ensure!(
            rows.len() == lib.len(),
            "indexed {} of {}",
            rows.len(),
            lib.len()
        );
        let targets: Vec<EmbedTarget> = rows
            .into_iter()
            .map(|(track_id, rel, duration_ms)| EmbedTarget {
                track_id,
                path: root.join(rel),
                duration_ms,
            })
            .collect();
        let cfg = EmbedConfig {
            model: Some(model_path()),
            device: bench_device()?,
            ..EmbedConfig::default()
        };
        let embedder = Embedder::start(&cfg, pool.clone(), CancellationToken::new()).await?;
        anyhow::Ok((d, pool, embedder, targets, cfg))
    })?;
    let mut g = c.benchmark_group("embed/end_to_end");
    g.throughput(Throughput::Elements(lib.len() as u64));
    g.bench_function(format!("default config, {}", bench_device()?), |b| {
        b.iter_custom(|iters| timed_embeds(&rt, &pool, &embedder, &targets, iters))
    });
    g.finish();
    let model_id = embedder.model_id();
    drop(embedder);
    // Its consumer notices within a poll (0.4 s) and ends; the rows below are the bench's.
    std::thread::sleep(Duration::from_secs(1));
    queue_cost(c, &rt, &pool, model_id, &targets)?;
    workers(c, &rt, &daemon, &pool, &targets, &cfg)?;
    Ok(())
}

/// `iters` runs of `embedder.embed` on every target from an empty `track_embeddings`: the time
/// from the request to its end, summed.
fn timed_embeds(
    rt: &tokio::runtime::Runtime,
    pool: &sqlx::PgPool,
    embedder: &Embedder,
    targets: &[EmbedTarget],
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let run = rt.block_on(async {
            sqlx::query("DELETE FROM track_embeddings")
                .execute(pool)
                .await?;
            let t = Instant::now();
            let s = embedder
                .embed(
                    uuid::Uuid::new_v4(),
                    targets.to_vec(),
                    CancellationToken::new(),
                )
                .await?;
            ensure!(s.embedded == targets.len() as u64, "{s:?}");
            anyhow::Ok(t.elapsed())
        });
        match run {
            Ok(t) => total += t,
            Err(e) => panic!("embedding run failed: {e:#}"),
        }
    }
    total
}

/// Requests in the queue-cost iteration; each queues every track once.
const QUEUE_REQUESTS: usize = 80;

/// The queue's own work per track, as a consumer meets it: enqueue (one statement per
/// request), lease 4 rows at a time (the decode queue's room on 2 cores) with their track and
/// library, settle each lease, forget the requests. No decoding.
fn queue_cost(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    pool: &sqlx::PgPool,
    model_id: i64,
    targets: &[EmbedTarget],
) -> Result<()> {
    use corald::embed::queue::{self, QueueRow, QueueState};
    let rows: Vec<QueueRow> = targets
        .iter()
        .map(|t| QueueRow {
            track_id: t.track_id,
            state: QueueState::Queued,
            file_size: 0,
            file_mtime_ns: 0,
        })
        .collect();
    let mut g = c.benchmark_group("embed/queue");
    g.throughput(Throughput::Elements((QUEUE_REQUESTS * rows.len()) as u64));
    g.sample_size(10);
    g.bench_function("enqueue, claim 4, settle", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let run = rt.block_on(async {
                    let t = Instant::now();
                    let ids: Vec<uuid::Uuid> =
                        (0..QUEUE_REQUESTS).map(|_| uuid::Uuid::new_v4()).collect();
                    for (n, id) in ids.iter().enumerate() {
                        queue::enqueue(pool, *id, model_id, n as i64, &rows).await?;
                    }
                    let mut settled = 0;
                    loop {
                        let got = queue::claim(pool, model_id, "bench@queue:0", 60.0, 4).await?;
                        if got.is_empty() {
                            break;
                        }
                        let done: Vec<_> = got
                            .iter()
                            .map(|c| (c.request_id, c.track_id, QueueState::Done))
                            .collect();
                        settled += queue::settle(pool, &done).await?;
                    }
                    ensure!(settled as usize == QUEUE_REQUESTS * rows.len());
                    for id in &ids {
                        queue::forget(pool, *id).await?;
                    }
                    anyhow::Ok(t.elapsed())
                });
                match run {
                    Ok(t) => total += t,
                    Err(e) => panic!("queue run failed: {e:#}"),
                }
            }
            total
        })
    });
    g.finish();
    Ok(())
}

/// `corald worker` processes (1, then 2) embedding every track, queued by an in-process
/// embedder that does not consume (`embed.local = false`), through the harness daemon's
/// cluster. From an empty `track_embeddings` each iteration.
fn workers(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    daemon: &Daemon,
    pool: &sqlx::PgPool,
    targets: &[EmbedTarget],
    cfg: &EmbedConfig,
) -> Result<()> {
    let url = format!(
        "postgres://coral@localhost/coral?host={}",
        daemon.state_dir.join("postgres/run").display()
    );
    let dir = coral_tests::daemon::traversable_tempdir()?;
    let worker_cfg = dir.path().join("worker.toml");
    std::fs::write(
        &worker_cfg,
        format!(
            "log = \"warn\"\n[embed]\nmodel = {:?}\ndevice = {:?}\n",
            model_path(),
            cfg.device
        ),
    )?;
    let queue_only = EmbedConfig {
        local: false,
        ..cfg.clone()
    };
    let producer = rt.block_on(Embedder::start(
        &queue_only,
        pool.clone(),
        CancellationToken::new(),
    ))?;
    let mut g = c.benchmark_group("embed/workers");
    g.throughput(Throughput::Elements(targets.len() as u64));
    g.sample_size(10);
    for n in [1usize, 2] {
        let mut children: Vec<std::process::Child> = (0..n)
            .map(|_| {
                std::process::Command::new(coral_tests::daemon::corald_bin())
                    .args(["worker", "--config"])
                    .arg(&worker_cfg)
                    .args(["--database-url", &url])
                    .env("OMP_WAIT_POLICY", "PASSIVE")
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .context("starting corald worker")
            })
            .collect::<Result<_>>()?;
        g.bench_function(BenchmarkId::new("corald worker processes", n), |b| {
            b.iter_custom(|iters| timed_embeds(rt, pool, &producer, targets, iters))
        });
        for mut child in children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    g.finish();
    Ok(())
}

/// Every benchmark directory under `target/criterion/<group>` (criterion's own naming).
fn medians(group: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let base = workspace_dir()
        .join("target/criterion")
        .join(group.replace('/', "_"));
    let Ok(entries) = std::fs::read_dir(&base) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let mut stack = vec![path];
        while let Some(p) = stack.pop() {
            let est = p.join("new/estimates.json");
            if est.is_file() {
                let rel = p
                    .strip_prefix(&base)
                    .map(|r| r.display().to_string())
                    .unwrap_or_default();
                if let Some(s) = std::fs::read_to_string(&est)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["median"]["point_estimate"].as_f64())
                {
                    out.insert(rel, s / 1e9);
                }
            } else if let Ok(children) = std::fs::read_dir(&p) {
                stack.extend(
                    children
                        .flatten()
                        .map(|c| c.path())
                        .filter(|c| c.is_dir() && !c.ends_with("report")),
                );
            }
        }
    }
    out
}

fn summary(tracks: usize, seconds: usize, cores: usize) {
    let windows = EmbedConfig::default().windows as f64;
    let per_track = |group: &str| -> Vec<(String, f64)> {
        medians(group)
            .into_iter()
            .map(|(id, s)| (id, tracks as f64 / s))
            .collect()
    };
    println!("\nsummary (tracks/s from criterion's medians; a track = {seconds} s of music):");
    let mut slowest: Option<(String, f64)> = None;
    let mut consider = |name: String, tps: f64| {
        if slowest.as_ref().is_none_or(|(_, s)| tps < *s) {
            slowest = Some((name, tps));
        }
    };
    for group in ["embed/decode", "embed/resample"] {
        for (id, tps) in per_track(group) {
            println!("  {group:<20} {id:<45} {tps:>8.2} tracks/s");
            consider(format!("{group} {id}"), tps);
        }
    }
    // Inference: windows/s → tracks/s at the pipeline's windows per track and default batch
    // (2 on CPU, 32 on CUDA).
    let default_batch = if bench_device().is_ok_and(|d| d.starts_with("cuda")) {
        32
    } else {
        2
    };
    let device = bench_device().unwrap_or_else(|_| "cpu".into());
    let device = device.split(':').next().unwrap_or("cpu").to_owned();
    let of_device = |(id, _): &(String, f64)| id.starts_with(&device);
    for (id, s) in medians("embed/inference").into_iter().filter(of_device) {
        let wps = INFER_WINDOWS as f64 / s;
        let tps = wps / windows;
        println!(
            "  {:<20} {id:<45} {tps:>8.2} tracks/s ({wps:.1} windows/s)",
            "embed/inference"
        );
        if id.contains(&format!(", {}, ", default_model()))
            && id.ends_with(&format!("batch/{default_batch}"))
        {
            consider(format!("embed/inference {id}"), tps);
        }
    }
    let e2e = medians("embed/end_to_end")
        .into_iter()
        .find(|(id, _)| id.contains(&device))
        .map(|(_, s)| tracks as f64 / s);
    let bliss = medians("embed/bliss")
        .into_values()
        .next()
        .map(|s| tracks as f64 / s);
    if let Some(e) = e2e {
        println!(
            "  {:<20} {:<45} {e:>8.2} tracks/s",
            "embed/end_to_end",
            format!("default config, {device}")
        );
    }
    if let Some(b) = bliss {
        println!(
            "  {:<20} {:<45} {b:>8.2} tracks/s",
            "embed/bliss",
            format!("bliss-audio 0.13, {cores} cores")
        );
    }
    if let (Some(e), Some((name, s))) = (e2e, &slowest) {
        println!(
            "end to end / slowest stage ({name}): {:.0} % (target ≥ 80 %)",
            100.0 * e / s
        );
    }
    if let (Some(e), Some(b)) = (e2e, bliss) {
        println!("end to end / bliss-audio: {:.2}× (target ≥ 2×)", e / b);
    }
    for (id, s) in medians("embed/workers") {
        println!(
            "  {:<20} {id:<45} {:>8.2} tracks/s",
            "embed/workers",
            tracks as f64 / s
        );
    }
    if let (Some(e), Some(q)) = (e2e, medians("embed/queue").into_values().next()) {
        let per_track = q / (QUEUE_REQUESTS * tracks) as f64;
        println!(
            "queue cost per track: {:.2} ms = {:.2} % of the end-to-end time per track (target < 5 %)",
            per_track * 1e3,
            100.0 * per_track * e
        );
    }
}
