//! Shared parts of the corald benchmarks: the built binaries they drive, a generated library
//! cached between runs, waiting for a scan through a real `scan.subscribe` subscription, CPU
//! time of processes from `/proc`, the machine's description and min/median summaries.
//!
//! Everything here drives real parts: the `corald` binary built in release mode, its managed
//! PostgreSQL, its Unix socket, and audio files encoded by ffmpeg.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use coral_proto::{CoralApiClient, ScanFilter, ScanPhase, ScanProgress};
use coral_tests::fixtures::{self, FixtureTrack};
use jsonrpsee::async_client::Client;
use uuid::Uuid;

/// Files in the generated template that [`bench_library`] replicates.
pub const TEMPLATE_FILES: usize = 20;

/// Library size of the benches unless `CORAL_BENCH_FILES` says otherwise.
pub const DEFAULT_FILES: usize = 20_000;

/// The library size to use: `CORAL_BENCH_FILES`, else [`DEFAULT_FILES`] (rounded to whole
/// template copies).
pub fn library_files() -> Result<usize> {
    let n = match std::env::var("CORAL_BENCH_FILES") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .with_context(|| format!("CORAL_BENCH_FILES={v:?} is not a number"))?,
        Err(_) => DEFAULT_FILES,
    };
    ensure!(
        n >= TEMPLATE_FILES,
        "CORAL_BENCH_FILES must be at least {TEMPLATE_FILES}"
    );
    Ok(n / TEMPLATE_FILES * TEMPLATE_FILES)
}

/// A sample count from the environment variable `var`, else `default` (at least 1).
pub fn samples(var: &str, default: usize) -> Result<usize> {
    match std::env::var(var) {
        Ok(v) => {
            let n = v
                .trim()
                .parse::<usize>()
                .with_context(|| format!("{var}={v:?} is not a number"))?;
            Ok(n.max(1))
        }
        Err(_) => Ok(default),
    }
}

/// Fails with the command to run when the release `corald` binary is not built next to the
/// bench executable (the harness starts the binary, it does not build it).
pub fn require_corald() -> Result<PathBuf> {
    let bin = coral_tests::daemon::corald_bin();
    if !bin.is_file() {
        bail!(
            "{} does not exist: the benches start the real corald binary, which `cargo bench` \
             does not build. Run `cargo build --release --workspace --bins` first, then \
             `cargo bench -p coral-benches`.",
            bin.display()
        );
    }
    Ok(bin)
}

/// The cargo target directory (`target/`): the bench executable lives in
/// `target/release/deps/`.
pub fn target_dir() -> PathBuf {
    let bin = coral_tests::daemon::bin_dir();
    bin.parent().map(Path::to_path_buf).unwrap_or(bin)
}

/// "N cores (nproc), <CPU model>" for the report.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cores} cores (nproc), {model}")
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg` (other work on the machine skews
/// every figure: print it beside them).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The 20 tracks of the template: mp3, flac, ogg vorbis, m4a/aac and wav, 1–2 s each, with
/// distinct tags in `Artist/Album/NN Title.ext` directories.
pub fn template_tracks() -> Vec<FixtureTrack> {
    const FORMATS: [(&str, &str); 5] = [
        ("mp3", "mp3"),
        ("flac", "flac"),
        ("ogg_vorbis", "ogg"),
        ("m4a_aac", "m4a"),
        ("wav", "wav"),
    ];
    (0..TEMPLATE_FILES)
        .map(|i| {
            let (format, ext) = FORMATS[i % FORMATS.len()];
            let artist = format!("Bench Artist {}", i / 10);
            let album = format!("Bench Album {}", i / 5);
            let title = format!("Bench Track {i:02}");
            let mut t = FixtureTrack::simple(
                PathBuf::from(&artist)
                    .join(&album)
                    .join(format!("{:02} {title}.{ext}", i % 5 + 1)),
                format,
                &title,
            );
            t.artist = artist;
            t.album = album;
            t.track_number = Some((i % 5 + 1) as u32);
            t.year = Some(1990 + i as i32);
            t.genre = Some(["Rock", "Jazz", "Ambient", "Folk"][i % 4].to_owned());
            t.duration_s = 1.0 + (i % 5) as f64 * 0.25;
            t
        })
        .collect()
}

/// Whether `CORAL_BENCH_DISTINCT=1` asks for a library of distinct files (copies) instead of
/// hard links to the template.
pub fn distinct_files() -> bool {
    std::env::var("CORAL_BENCH_DISTINCT").is_ok_and(|v| v == "1")
}

/// A library of `files` real audio files under `target/bench-library/`, generated once and
/// reused by later runs: the [`template_tracks`] encoded by ffmpeg, then replicated
/// `files / 20` times into `copy_NNNN/` directories. By default the copies are hard links
/// (all share the template's 20 inodes: identical content and mtimes, a tiny page-cache
/// footprint); with `distinct` they are real copies (20,000 files ≈ 1.8 GB), so every file has
/// its own inode and pages.
pub fn bench_library(files: usize, distinct: bool) -> Result<PathBuf> {
    let base = target_dir().join("bench-library");
    let template = base.join("template-v1");
    let template_done = base.join("template-v1.complete");
    if !template_done.exists() {
        fixtures::require_ffmpeg()?;
        let _ = std::fs::remove_dir_all(&template);
        std::fs::create_dir_all(&template)
            .with_context(|| format!("creating {}", template.display()))?;
        fixtures::make_tracks(&template, &template_tracks())?;
        std::fs::write(&template_done, b"")?;
    }
    let name = if distinct {
        format!("library-{files}-distinct-v1")
    } else {
        format!("library-{files}-v1")
    };
    let root = base.join(&name);
    let done = base.join(format!("{name}.complete"));
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&root);
        let started = Instant::now();
        let copies = files / TEMPLATE_FILES;
        let n = if distinct {
            let mut n = 0;
            for i in 0..copies {
                n += copy_tree(&template, &root.join(format!("copy_{i:04}")))?;
            }
            n
        } else {
            fixtures::replicate_template(&template, &root, copies)?
        };
        ensure!(n == files, "replicated {n} files, expected {files}");
        std::fs::write(&done, b"")?;
        eprintln!(
            "generated {files} files under {} in {:.1} s",
            root.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(root)
}

/// Copy the tree `src` to `dst` file by file (new inodes); returns the number of files.
fn copy_tree(src: &Path, dst: &Path) -> Result<usize> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut files = 0;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            files += copy_tree(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to)
                .with_context(|| format!("copying to {}", to.display()))?;
            files += 1;
        }
    }
    Ok(files)
}

/// How a scan went, seen from the client.
#[derive(Debug, Clone)]
pub struct ScanRun {
    /// From the request that started it to the terminal notification.
    pub wall: Duration,
    /// `finished_at - started_at` as the daemon reports it (queued to finished).
    pub daemon: Duration,
    /// When the client first saw each phase, relative to the request.
    pub phases: Vec<(ScanPhase, Duration)>,
    /// Notifications the waiting subscription received for this scan.
    pub notifications: usize,
    /// Delivery latency of each of them (receive time minus `updated_at`), in ms.
    pub latencies_ms: Vec<f64>,
    pub last: ScanProgress,
}

impl ScanRun {
    /// Time between the first sighting of `from` and of the next phase seen after it.
    pub fn phase_time(&self, phase: ScanPhase) -> Option<Duration> {
        let i = self.phases.iter().position(|(p, _)| *p == phase)?;
        let start = self.phases[i].1;
        let end = self.phases.get(i + 1).map_or(self.wall, |(_, t)| *t);
        Some(end.saturating_sub(start))
    }
}

/// How old a notification's snapshot is now, in ms (same machine clock on both ends).
pub fn latency_ms(p: &ScanProgress) -> f64 {
    (Utc::now() - p.updated_at)
        .num_microseconds()
        .map_or(f64::NAN, |us| us as f64 / 1000.0)
}

fn elapsed_between(a: DateTime<Utc>, b: Option<DateTime<Utc>>) -> Duration {
    b.and_then(|b| (b - a).to_std().ok()).unwrap_or_default()
}

/// Start a scan with `start` (which returns its request id) and wait for its terminal state
/// through a `scan.subscribe` subscription opened before the request, so no notification is
/// missed; falls back to `scan.get` if the subscription stays silent for a second.
pub async fn run_scan<F, Fut>(client: &Client, start: F) -> Result<ScanRun>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Uuid>>,
{
    let mut sub = client
        .scan_subscribe(Some(ScanFilter::default()))
        .await
        .context("scan.subscribe")?;
    let t0 = Instant::now();
    let id = start().await?;
    let mut phases: Vec<(ScanPhase, Duration)> = Vec::new();
    let mut notifications = 0;
    let mut latencies_ms = Vec::new();
    let deadline = t0 + Duration::from_secs(1800);
    let last = loop {
        ensure!(Instant::now() < deadline, "scan {id} did not end in 30 min");
        let p = match tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            Ok(Some(p)) => {
                let p = p.context("decoding a scan.progress notification")?;
                if p.scan.request_id != id {
                    continue;
                }
                notifications += 1;
                latencies_ms.push(latency_ms(&p));
                p
            }
            Ok(None) => bail!("the scan.progress subscription closed"),
            Err(_) => client.scan_get(id).await.context("scan.get")?,
        };
        if phases.last().map(|(ph, _)| *ph) != Some(p.phase) {
            phases.push((p.phase, t0.elapsed()));
        }
        if p.phase.is_terminal() {
            break p;
        }
    };
    let wall = t0.elapsed();
    let _ = sub.unsubscribe().await;
    ensure!(
        last.phase == ScanPhase::Completed,
        "scan {id} ended {:?}: {:?}",
        last.phase,
        last.error
    );
    Ok(ScanRun {
        wall,
        daemon: elapsed_between(last.scan.started_at, last.finished_at),
        phases,
        notifications,
        latencies_ms,
        last,
    })
}

/// Add `root` as a library and time its first (library_added) scan. Returns the library id.
pub async fn add_library(client: &Client, root: &Path) -> Result<(i64, ScanRun)> {
    let mut library_id = 0;
    let run = run_scan(client, || async {
        let lib = client
            .library_add(root.to_string_lossy().into_owned())
            .await
            .context("library.add")?;
        library_id = lib.id;
        lib.last_scan
            .map(|s| s.scan.request_id)
            .context("library.add queued no scan")
    })
    .await?;
    Ok((library_id, run))
}

/// Time a scan of library `id` (`full`: re-read every file).
pub async fn rescan(client: &Client, id: i64, full: bool) -> Result<ScanRun> {
    run_scan(client, || async {
        Ok(client
            .scan_start(coral_proto::LibrarySelector::Id(id), None, Some(full))
            .await
            .context("scan.start")?
            .request_id)
    })
    .await
}

fn clock_tick() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (pid, ppid, utime + stime in ticks) from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(u32, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((pid, ppid, utime + stime))
}

/// User + system CPU time of process `pid` (all its threads).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let (_, _, ticks) = stat(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_tick()))
}

/// User + system CPU time of `root` and every live descendant (e.g. PostgreSQL's postmaster
/// and its backends).
pub fn tree_cpu_time(root: u32) -> Duration {
    let mut procs = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(s) = stat(pid)
            {
                procs.push(s);
            }
        }
    }
    let mut members = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, ppid, _) in &procs {
            if members.contains(ppid) && !members.contains(pid) {
                members.push(*pid);
                grew = true;
            }
        }
    }
    let ticks: u64 = procs
        .iter()
        .filter(|(pid, _, _)| members.contains(pid))
        .map(|(_, _, t)| t)
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_tick())
}

/// The postmaster pid of a daemon's managed PostgreSQL (first line of `postmaster.pid`).
pub fn postmaster_pid(state_dir: &Path) -> Result<u32> {
    let file = state_dir.join("postgres/postmaster.pid");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("{} has no pid", file.display()))
}

/// CPU used by a running daemon and by its PostgreSQL, read together.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub corald: Duration,
    pub postgres: Duration,
}

impl CpuSample {
    pub fn read(d: &coral_tests::daemon::Daemon) -> Result<CpuSample> {
        let pid = d.pid().context("corald is not running")?;
        Ok(CpuSample {
            corald: cpu_time(pid)?,
            postgres: tree_cpu_time(postmaster_pid(&d.state_dir)?),
        })
    }

    pub fn since(&self, before: &CpuSample) -> CpuSample {
        CpuSample {
            corald: self.corald.saturating_sub(before.corald),
            postgres: self.postgres.saturating_sub(before.postgres),
        }
    }
}

/// Min, median and max of some timings.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// Summarise `values` (must not be empty).
    pub fn of(values: &[f64]) -> Summary {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Summary {
            n,
            min: v[0],
            median,
            max: v[n - 1],
        }
    }
}

/// The `q` quantile (0..=1) of `values` by the nearest-rank method; `None` when empty.
pub fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// A multi-threaded tokio runtime for a bench's client side.
pub fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_quantiles() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.n, s.min, s.median, s.max), (4, 1.0, 2.5, 10.0));
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.99), Some(99.0));
        assert_eq!(quantile(&mut v, 0.5), Some(50.0));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let pid = std::process::id();
        assert!(cpu_time(pid).is_ok());
        assert!(tree_cpu_time(pid) >= cpu_time(pid).unwrap_or_default());
    }

    #[test]
    fn template_has_distinct_paths() {
        let t = template_tracks();
        let mut paths: Vec<_> = t.iter().map(|t| t.rel_path.clone()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), TEMPLATE_FILES);
    }
}
