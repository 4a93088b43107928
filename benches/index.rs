//! Indexing throughput of the real corald.
//!
//! Generates (once, cached under `target/bench-library/`) a library of 20,000 real audio files
//! — 20 short mp3/flac/ogg/m4a/wav files encoded by ffmpeg, hard-linked 1,000 times — starts the
//! release `corald` with its own managed PostgreSQL and talks to it over its Unix socket, and
//! times:
//!
//! * **full index**: the first scan of the library (`library.add` into empty tables) and a
//!   `scan --full` re-index (every file probed again and rewritten) — reported in files/s;
//! * **no-op rescan**: an incremental scan of the unchanged library (walk + compare with the
//!   database, nothing read or written) — reported in seconds and scaled to 100,000 files.
//!
//! Each timing runs from the RPC request to the scan's terminal `scan.progress` notification;
//! the daemon's own `finished_at - started_at` is printed beside it. To show where the time
//! goes it also prints, per scan, the time in each phase and the CPU used by corald and by
//! PostgreSQL, and times corald's walk and probe stages in this process (same code, same
//! thread count) without the database.
//!
//! Run `cargo build --release --workspace --bins` first (the bench starts that binary), then
//! `cargo bench -p coral-benches --bench index`. `CORAL_BENCH_FILES` (default 20000),
//! `CORAL_BENCH_FULL_SAMPLES` (3), `CORAL_BENCH_NOOP_SAMPLES` (10) and
//! `CORAL_BENCH_BREAKDOWN=0` (skip the in-process stage timings) tune it;
//! `CORAL_BENCH_DISTINCT=1` uses 20,000 distinct copies (≈ 1.8 GB, own inodes) instead of hard
//! links.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use coral_benches::{
    CpuSample, ScanRun, Summary, add_library, bench_library, distinct_files, library_files,
    machine, require_corald, rescan, samples,
};
use coral_proto::{CoralApiClient, LibrarySelector, ScanPhase};
use coral_tests::daemon::Daemon;
use corald::scan::phase_1_walk::{self, WalkObserver};
use corald::scan::phase_2_probe;
use rayon::prelude::*;

/// Full index target (files per second).
const TARGET_FILES_PER_S: f64 = 5_000.0;
/// No-op rescan target for 100,000 files (seconds).
const TARGET_NOOP_100K_S: f64 = 2.0;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench` (and any filter); this bench has a single sequence.
    require_corald()?;
    let files = library_files()?;
    let full_samples = samples("CORAL_BENCH_FULL_SAMPLES", 3)?;
    let noop_samples = samples("CORAL_BENCH_NOOP_SAMPLES", 10)?;
    let breakdown = std::env::var("CORAL_BENCH_BREAKDOWN").map_or(true, |v| v != "0");
    let distinct = distinct_files();
    println!(
        "index bench: {files} files ({}), machine: {}, load average {}",
        if distinct {
            "distinct copies"
        } else {
            "hard links to a 20-file template"
        },
        machine(),
        coral_benches::loadavg()
    );
    let root = bench_library(files, distinct)?;
    let rt = coral_benches::runtime(1)?;
    rt.block_on(run(&root, files, full_samples, noop_samples))?;
    if breakdown {
        stages(&root, files)?;
    }
    Ok(())
}

/// One timed scan plus the CPU its processes used during it.
struct Timed {
    run: ScanRun,
    cpu: CpuSample,
}

async fn timed<F, Fut>(d: &Daemon, f: F) -> Result<Timed>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<ScanRun>>,
{
    let before = CpuSample::read(d)?;
    let run = f().await?;
    let cpu = CpuSample::read(d)?.since(&before);
    Ok(Timed { run, cpu })
}

fn describe(kind: &str, i: usize, t: &Timed) {
    let phase = |p| {
        t.run
            .phase_time(p)
            .map_or("-".to_owned(), |d| format!("{:.3}", d.as_secs_f64()))
    };
    println!(
        "  {kind} #{i}: wall {:.3} s (daemon {:.3} s) | discovering {} s, indexing {} s | \
         CPU corald {:.2} s, postgres {:.2} s | indexed {}, unchanged {}",
        t.run.wall.as_secs_f64(),
        t.run.daemon.as_secs_f64(),
        phase(ScanPhase::Discovering),
        phase(ScanPhase::Indexing),
        t.cpu.corald.as_secs_f64(),
        t.cpu.postgres.as_secs_f64(),
        t.run.last.counts.tracks_indexed,
        t.run.last.counts.tracks_unchanged,
    );
}

fn secs(v: &[Timed]) -> Vec<f64> {
    v.iter().map(|t| t.run.wall.as_secs_f64()).collect()
}

async fn run(root: &Path, files: usize, full_samples: usize, noop_samples: usize) -> Result<()> {
    let d = Daemon::start().await?;
    let client = d.client().await?;
    let n = files as u64;

    // (a) first index, through library.add, then (b) no-op rescans, then (a') full re-index.
    let mut first = Vec::new();
    let (mut lib, run0) = {
        let before = CpuSample::read(&d)?;
        let (lib, run) = add_library(&client, root).await?;
        let cpu = CpuSample::read(&d)?.since(&before);
        ensure!(
            run.last.counts.tracks_indexed == n,
            "first scan indexed {}",
            run.last.counts.tracks_indexed
        );
        (lib, Timed { run, cpu })
    };
    describe("first index", 1, &run0);
    first.push(run0);

    let mut noop = Vec::new();
    for i in 0..noop_samples {
        let t = timed(&d, || rescan(&client, lib, false)).await?;
        ensure!(
            t.run.last.counts.tracks_unchanged == n && t.run.last.counts.tracks_indexed == 0,
            "no-op rescan was not a no-op: {:?}",
            t.run.last
        );
        describe("no-op rescan", i + 1, &t);
        noop.push(t);
    }

    let mut full = Vec::new();
    for i in 0..full_samples {
        let t = timed(&d, || rescan(&client, lib, true)).await?;
        ensure!(
            t.run.last.counts.tracks_indexed == n,
            "full scan indexed {}",
            t.run.last.counts.tracks_indexed
        );
        describe("full re-index", i + 1, &t);
        full.push(t);
    }

    // More first-index samples: forget the library (its rows go) and add it again.
    for i in 1..full_samples {
        client
            .library_remove(LibrarySelector::Id(lib))
            .await
            .context("library.remove")?;
        let before = CpuSample::read(&d)?;
        let (id, run) = add_library(&client, root).await?;
        let cpu = CpuSample::read(&d)?.since(&before);
        lib = id;
        ensure!(
            run.last.counts.tracks_indexed == n,
            "first scan indexed {}",
            run.last.counts.tracks_indexed
        );
        let t = Timed { run, cpu };
        describe("first index", i + 1, &t);
        first.push(t);
    }

    println!();
    println!(
        "summary ({files} files, wall time from the RPC request to the final notification; load average now {}):",
        coral_benches::loadavg()
    );
    let first_s = Summary::of(&secs(&first));
    let full_s = Summary::of(&secs(&full));
    let noop_s = Summary::of(&secs(&noop));
    let rate = |s: f64| files as f64 / s;
    println!(
        "  first index (library.add): min {:.3} s, median {:.3} s (n={}) -> {:.0} files/s at the median, {:.0} at best",
        first_s.min,
        first_s.median,
        first_s.n,
        rate(first_s.median),
        rate(first_s.min)
    );
    println!(
        "  full re-index (scan --full): min {:.3} s, median {:.3} s (n={}) -> {:.0} files/s at the median, {:.0} at best",
        full_s.min,
        full_s.median,
        full_s.n,
        rate(full_s.median),
        rate(full_s.min)
    );
    let scale = 100_000.0 / files as f64;
    println!(
        "  no-op rescan: min {:.3} s, median {:.3} s (n={}) -> 100k-equivalent {:.2} s at the median, {:.2} at best",
        noop_s.min,
        noop_s.median,
        noop_s.n,
        noop_s.median * scale,
        noop_s.min * scale
    );
    let verdict = |ok: bool| if ok { "MET" } else { "MISSED" };
    println!(
        "  target full index >= {TARGET_FILES_PER_S:.0} files/s: first index {}, re-index {} (medians)",
        verdict(rate(first_s.median) >= TARGET_FILES_PER_S),
        verdict(rate(full_s.median) >= TARGET_FILES_PER_S)
    );
    println!(
        "  target no-op rescan (100k-equivalent) <= {TARGET_NOOP_100K_S} s: {} (median)",
        verdict(noop_s.median * scale <= TARGET_NOOP_100K_S)
    );
    Ok(())
}

struct Quiet;

impl WalkObserver for Quiet {
    fn discovered(&self, _n: u64) {}
    fn cancelled(&self) -> bool {
        false
    }
}

/// corald's walk and probe stages timed in this process, on a rayon pool of corald's default
/// size (one thread per CPU), without the daemon or the database: what a scan costs before any
/// row is written.
fn stages(root: &Path, files: usize) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    println!();
    println!("stages in-process ({threads} rayon threads, no database):");
    let mut walks = Vec::new();
    let mut found = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = pool
            .install(|| phase_1_walk::walk(root, None, &Quiet))
            .context("walking the library")?;
        walks.push(t.elapsed().as_secs_f64());
        found = out.files;
    }
    ensure!(found.len() == files, "walk found {} files", found.len());
    let w = Summary::of(&walks);
    println!(
        "  walk: min {:.3} s, median {:.3} s -> 100k-equivalent {:.2} s",
        w.min,
        w.median,
        w.median * 100_000.0 / files as f64
    );
    let mut probes = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        let ok = pool.install(|| {
            found
                .par_iter()
                .filter(|f| {
                    phase_2_probe::probe_file(&root.join(OsStr::from_bytes(&f.rel_path))).is_ok()
                })
                .count()
        });
        probes.push(t.elapsed().as_secs_f64());
        ensure!(ok == files, "probe read {ok} of {files} files");
    }
    let p = Summary::of(&probes);
    println!(
        "  probe (open + sniff + integrity checks + lofty): min {:.3} s, median {:.3} s -> {:.0} files/s",
        p.min,
        p.median,
        files as f64 / p.median
    );
    Ok(())
}
