//! The file watcher: how soon a file written into a watched library can be found, and
//! what the watcher costs while nothing happens.
//!
//! * **latency**: a real corald with `[watch] debounce_ms = D` watches a small library; N times,
//!   the bench copies a real audio file (one of the 20 ffmpeg-encoded template tracks) into the
//!   library with `std::fs::copy` (create, write, close: one `close_write`), notes the instant the
//!   copy returned, then calls `track.search` every 5 ms until a track with that path comes back.
//!   Reported: median and p95 of (queryable − close) and of (queryable − close − D), for D = 200
//!   and D = 2000 (the default), so the quiet period and the pipeline cost are told apart.
//! * **idle**: a second corald (default watch settings) adds a library of 20,000 directories
//!   (200 top-level folders × 99 subfolders each, plus the 200; one audio file hard-linked into
//!   each top-level folder). The bench times `library.add` (which arms every watch before it
//!   queues the scan), waits for the first scan and for `daemon.status` to show the watches,
//!   counts the watches on corald's inotify descriptor from `/proc/<pid>/fdinfo`, lets it settle,
//!   then reads corald's user + system CPU time from `/proc/<pid>/stat` before and after an idle
//!   period (20 s) during which the bench sends nothing. It reports CPU % of one core, and RSS.
//!   The latency samples for D = 2000 then run on this same daemon, with the 20,000 watches held.
//!
//! Run `cargo build --release --workspace --bins` first (the bench starts that binary), then
//! `cargo bench -p coral-benches --bench watch`. `CORAL_BENCH_WATCH_SAMPLES` (20),
//! `CORAL_BENCH_WATCH_IDLE_S` (20) and `CORAL_BENCH_WATCH_DIRS` (20000, rounded to whole
//! top-level folders of 100) tune it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use coral_benches::{
    CpuSample, Summary, add_library, bench_library, loadavg, machine, quantile, require_corald,
    samples, target_dir, template_tracks,
};
use coral_proto::{CoralApiClient, WatchMode};
use coral_tests::daemon::{Daemon, traversable_tempdir};
use jsonrpsee::async_client::Client;

/// Directories per top-level folder of the idle tree (the folder and its 99 subfolders).
const DIRS_PER_TOP: usize = 100;
/// How often the bench asks `track.search` whether the file is in.
const POLL: Duration = Duration::from_millis(5);

fn main() -> Result<()> {
    require_corald()?;
    let n = samples("CORAL_BENCH_WATCH_SAMPLES", 20)?;
    let idle_s = samples("CORAL_BENCH_WATCH_IDLE_S", 20)?;
    let dirs = samples("CORAL_BENCH_WATCH_DIRS", 20_000)?.div_ceil(DIRS_PER_TOP) * DIRS_PER_TOP;
    println!(
        "watch bench: {n} latency samples per debounce, {dirs}-directory idle tree, {idle_s} s idle; \
         machine: {}, load average {}",
        machine(),
        loadavg()
    );
    // The template library gives 20 real, distinctly titled audio files (encoded once, cached).
    let template = bench_library(coral_benches::TEMPLATE_FILES, false)?.join("copy_0000");
    let tree = idle_tree(&template, dirs)?;
    let rt = coral_benches::runtime(1)?;
    rt.block_on(run(&template, &tree, dirs, n, idle_s))
}

/// A file of the template: its path and its (unique) title.
fn template_file(template: &Path, i: usize) -> (PathBuf, String) {
    let t = &template_tracks()[i % coral_benches::TEMPLATE_FILES];
    (template.join(&t.rel_path), t.title.clone())
}

/// `dirs` directories under `target/bench-library/watch-tree-<dirs>-v1/`, made once and reused:
/// `dirs / 100` top-level folders `dNNN`, each with subfolders `s00`..`s98` and one template
/// file hard-linked into it.
fn idle_tree(template: &Path, dirs: usize) -> Result<PathBuf> {
    let base = target_dir().join("bench-library");
    let root = base.join(format!("watch-tree-{dirs}-v1"));
    let done = base.join(format!("watch-tree-{dirs}-v1.complete"));
    if done.exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    let started = Instant::now();
    for top in 0..dirs / DIRS_PER_TOP {
        let d = root.join(format!("d{top:03}"));
        for sub in 0..DIRS_PER_TOP - 1 {
            let s = d.join(format!("s{sub:02}"));
            std::fs::create_dir_all(&s).with_context(|| format!("creating {}", s.display()))?;
        }
        let (src, _) = template_file(template, top);
        let to = d.join(src.file_name().context("template file has no name")?);
        if std::fs::hard_link(&src, &to).is_err() {
            std::fs::copy(&src, &to).with_context(|| format!("copying to {}", to.display()))?;
        }
    }
    std::fs::write(&done, b"")?;
    eprintln!(
        "generated {dirs} directories under {} in {:.1} s",
        root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

/// Write a corald config with this debounce and start a daemon on it.
async fn daemon(dir: &Path, debounce_ms: u64) -> Result<Daemon> {
    let cfg = dir.join(format!("corald-{debounce_ms}.toml"));
    std::fs::write(
        &cfg,
        format!("[watch]\nenabled = true\ndebounce_ms = {debounce_ms}\n"),
    )?;
    Daemon::start_with(&["--config", &cfg.to_string_lossy()]).await
}

async fn run(template: &Path, tree: &Path, dirs: usize, n: usize, idle_s: usize) -> Result<()> {
    let tmp = traversable_tempdir()?;
    let mut results = Vec::new();

    // Latency with a short quiet period, on a daemon watching only the small library.
    {
        let mut d = daemon(tmp.path(), 200).await?;
        let client = d.client().await?;
        let lib = tmp.path().join("lib-200");
        let lat = latency(&client, template, &lib, 200, n).await?;
        results.push((200, lat));
        d.terminate().ok();
    }

    // Idle cost on the 20,000-directory tree, then latency with the default quiet period on the
    // same daemon (all those watches held).
    let d = daemon(tmp.path(), 2000).await?;
    let client = d.client().await?;
    let pid = d.pid().context("corald is not running")?;
    let idle = idle(&d, &client, tree, dirs, idle_s, pid).await?;
    let lib = tmp.path().join("lib-2000");
    let lat = latency(&client, template, &lib, 2000, n).await?;
    results.push((2000, lat));

    println!();
    println!(
        "summary (load average now {}; track.search polled every {} ms):",
        loadavg(),
        POLL.as_millis()
    );
    for (debounce, mut v) in results {
        let mut minus: Vec<f64> = v.iter().map(|ms| ms - debounce as f64).collect();
        let s = Summary::of(&v);
        let p95 = quantile(&mut v, 0.95).unwrap_or(f64::NAN);
        let ms = Summary::of(&minus);
        let mp95 = quantile(&mut minus, 0.95).unwrap_or(f64::NAN);
        println!(
            "  debounce_ms = {debounce}: close_write -> queryable median {:.0} ms, p95 {p95:.0} ms \
             (min {:.0}, max {:.0}, n={}); minus the quiet period: median {:.0} ms, p95 {mp95:.0} ms",
            s.median, s.min, s.max, s.n, ms.median
        );
    }
    println!(
        "  idle on {} watches: corald {:.3} % of one core ({:.3} s CPU in {:.1} s), postgres {:.3} %; \
         corald RSS {} KiB; arming (library.add) {:.3} s, first scan done {:.3} s after the request",
        idle.watches,
        idle.corald_pct,
        idle.corald_cpu_s,
        idle.wall_s,
        idle.postgres_pct,
        idle.rss_kib,
        idle.arm_s,
        idle.scan_s
    );
    Ok(())
}

/// Copy `n` template files one at a time into a new library watched with quiet period
/// `debounce_ms`; the time in ms from the end of each copy to the track being found by path.
async fn latency(
    client: &Client,
    template: &Path,
    lib: &Path,
    debounce_ms: u64,
    n: usize,
) -> Result<Vec<f64>> {
    std::fs::create_dir_all(lib)?;
    // One file already there, so the first scan has something to index.
    let (seed, _) = template_file(template, 0);
    std::fs::copy(&seed, lib.join("seed").with_extension(ext(&seed)))?;
    let (lib_id, first) = add_library(client, lib).await?;
    ensure!(
        first.last.counts.tracks_indexed == 1,
        "first scan indexed {}",
        first.last.counts.tracks_indexed
    );
    wait_watched(client, lib_id, 1).await?;
    println!("latency, debounce_ms = {debounce_ms}:");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (src, title) = template_file(template, i);
        let to = lib.join(format!("probe-{i:03}.{}", ext(&src)));
        let to_s = to.to_string_lossy().into_owned();
        std::fs::copy(&src, &to).with_context(|| format!("copying to {}", to.display()))?;
        let closed = Instant::now();
        let deadline = closed + Duration::from_secs(60);
        let found = loop {
            let hits = client
                .track_search(title.clone(), Some(200), None)
                .await
                .context("track.search")?;
            if hits.iter().any(|t| t.path == to_s) {
                break closed.elapsed();
            }
            if Instant::now() > deadline {
                bail!("{} was not queryable within 60 s", to.display());
            }
            tokio::time::sleep(POLL).await;
        };
        let ms = found.as_secs_f64() * 1000.0;
        println!("  #{:02}: {ms:.0} ms", i + 1);
        out.push(ms);
        // Let the scan that found it finish before the next write.
        wait_idle(client).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(out)
}

fn ext(p: &Path) -> String {
    p.extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Until no scan is running or queued.
async fn wait_idle(client: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = client.daemon_status().await.context("daemon.status")?;
        if s.active_scans.is_empty() && s.queued_scans == 0 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "scans still running after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Until `daemon.status` shows library `id` watched by inotify with at least `watches` watches
/// and nothing pending; returns that number of watches.
async fn wait_watched(client: &Client, id: i64, watches: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = client.daemon_status().await.context("daemon.status")?;
        if let Some(w) = s.watch.iter().find(|w| w.library_id == id) {
            ensure!(
                w.mode == WatchMode::Inotify,
                "library {id} is watched in mode {:?}: {:?}",
                w.mode,
                w.warning
            );
            if w.watches >= watches && w.pending_paths == 0 && w.open_files == 0 {
                return Ok(w.watches);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "library {id} not watched with {watches} watches after 120 s: {:?}",
            s.watch
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Idle {
    watches: u64,
    arm_s: f64,
    scan_s: f64,
    wall_s: f64,
    corald_cpu_s: f64,
    corald_pct: f64,
    postgres_pct: f64,
    rss_kib: u64,
}

async fn idle(
    d: &Daemon,
    client: &Client,
    tree: &Path,
    dirs: usize,
    idle_s: usize,
    pid: u32,
) -> Result<Idle> {
    let mut arm = Duration::ZERO;
    let mut lib_id = 0;
    let run = coral_benches::run_scan(client, || async {
        let t = Instant::now();
        let lib = client
            .library_add(tree.to_string_lossy().into_owned())
            .await
            .context("library.add")?;
        arm = t.elapsed();
        lib_id = lib.id;
        lib.last_scan
            .map(|s| s.scan.request_id)
            .context("library.add queued no scan")
    })
    .await?;
    let watches = wait_watched(client, lib_id, dirs as u64).await?;
    let kernel = inotify_watches(pid);
    println!(
        "idle tree: library.add (arms the watches) {:.3} s, first scan done {:.3} s after the \
         request ({} tracks); daemon.status: {watches} watches; kernel (fdinfo): {}",
        arm.as_secs_f64(),
        run.wall.as_secs_f64(),
        run.last.counts.tracks_indexed,
        kernel.map_or("unreadable".to_owned(), |k| k.to_string())
    );
    // Let the scan's aftermath (persisted progress, checkpoints) pass before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = CpuSample::read(d)?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_s as u64)).await;
    let wall = t.elapsed().as_secs_f64();
    let used = CpuSample::read(d)?.since(&before);
    let rss_kib = rss_kib(pid).unwrap_or(0);
    let idle = Idle {
        watches,
        arm_s: arm.as_secs_f64(),
        scan_s: run.wall.as_secs_f64(),
        wall_s: wall,
        corald_cpu_s: used.corald.as_secs_f64(),
        corald_pct: used.corald.as_secs_f64() / wall * 100.0,
        postgres_pct: used.postgres.as_secs_f64() / wall * 100.0,
        rss_kib,
    };
    println!(
        "idle {wall:.1} s: corald {:.3} s CPU ({:.3} % of one core), postgres {:.3} s, corald RSS {rss_kib} KiB \
         (load average {})",
        idle.corald_cpu_s,
        idle.corald_pct,
        used.postgres.as_secs_f64(),
        loadavg()
    );
    Ok(idle)
}

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Watches held on `pid`'s inotify descriptors (one `inotify wd:` line each in fdinfo).
fn inotify_watches(pid: u32) -> Option<usize> {
    let mut total = None;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let is_inotify =
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify"));
        if !is_inotify {
            continue;
        }
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_str()?))
                .ok()?;
        *total.get_or_insert(0) += info
            .lines()
            .filter(|l| l.starts_with("inotify wd:"))
            .count();
    }
    total
}
