//! Live-progress costs, in three parts:
//!
//! * **contention** (criterion): N = 2 and 4 threads (and 1, the uncontended floor) each doing
//!   M = 200,000 increments on one scan's counters, comparing corald's real `ScanCounters`
//!   (`CachePadded<AtomicU64>` fields) with the same counters as plain adjacent `AtomicU64`s
//!   and as a `Mutex` around a struct. Two
//!   workloads: each thread bumps its own counter (the real pattern: walk, probe, store and
//!   embedding stages bump different counters of the same scan — false sharing without
//!   padding), and every thread bumps the same counter (true sharing: padding cannot help).
//! * **reporting share**: the cost of progress reporting as a share of scan time. End to end,
//!   two real corald daemons on the same generated library, one with the default
//!   `[progress] notify_interval_ms = 200, persist_interval_ms = 1000`, one with both at
//!   60000 (reporting effectively off), run `scan --full` alternately; the bench prints the
//!   wall and CPU time of both. In process (criterion), one `ScanReporter::publish` tick and
//!   one snapshot serialisation are timed, which bounds the share far below the end-to-end
//!   noise.
//! * **fanout**: 1,000 `scan.subscribe` subscriptions over real socket connections (1 × 1000,
//!   4 × 250 and 100 × 10) while a full scan runs: corald's CPU time during the scan (from
//!   `/proc/<pid>/stat`) against a run without them, and the delivery latency of every
//!   `scan.progress` notification (receive time minus the snapshot's `updated_at`, one clock).
//!
//! Run `cargo build --release --workspace --bins` first, then
//! `cargo bench -p coral-benches --bench progress` (add `-- contention`, `-- reporting` or
//! `-- fanout` to run one part). `CORAL_BENCH_PROGRESS_FILES` (default 100000: a full scan
//! long enough for many notify ticks) and `CORAL_BENCH_SHARE_SAMPLES` (5 per config) tune it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::Utc;
use coral_benches::{
    CpuSample, Summary, add_library, bench_library, latency_ms, machine, quantile, require_corald,
    rescan, samples,
};
use coral_proto::{
    CoralApiClient, ScanFilter, ScanInfo, ScanMode, ScanPhase, ScanProgress, ScanTrigger,
};
use coral_tests::daemon::Daemon;
use corald::progress::{ScanCounters, ScanReporter};
use criterion::{BenchmarkId, Criterion, Throughput};
use uuid::Uuid;

/// Increments per thread per iteration of the contention bench.
const INCREMENTS: u64 = 200_000;
/// Reporting-share target: share of scan time.
const TARGET_SHARE: f64 = 0.01;
/// Fan-out target: p99 delivery latency.
const TARGET_P99_MS: f64 = 50.0;

fn main() -> Result<()> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants =
        |part: &str| filters.is_empty() || filters.iter().any(|f| part.contains(f.as_str()));
    println!(
        "progress bench, machine: {}, load average {}",
        machine(),
        coral_benches::loadavg()
    );

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    if wants("contention") {
        contention(&mut c);
    }
    c.final_summary();

    if !wants("reporting") && !wants("fanout") {
        return Ok(());
    }
    require_corald()?;
    let files = samples("CORAL_BENCH_PROGRESS_FILES", 100_000)?;
    let files = files / coral_benches::TEMPLATE_FILES * coral_benches::TEMPLATE_FILES;
    ensure!(files > 0, "CORAL_BENCH_PROGRESS_FILES is too small");
    let root = bench_library(files, false)?;
    let rt = coral_benches::runtime(2)?;
    if wants("reporting") {
        rt.block_on(reporting_share(&root, files))?;
    }
    if wants("fanout") {
        rt.block_on(fanout(&root, files))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) counter contention

/// The same eight counters as plain atomics, adjacent in memory: exactly one 64-byte line.
#[derive(Default)]
#[repr(C, align(64))]
struct PlainCounters {
    files_discovered: AtomicU64,
    tracks_indexed: AtomicU64,
    tracks_unchanged: AtomicU64,
    tracks_removed: AtomicU64,
    tracks_failed: AtomicU64,
    embeddings_done: AtomicU64,
    embeddings_skipped: AtomicU64,
    embeddings_failed: AtomicU64,
}

/// The same counters behind one lock.
#[derive(Default)]
struct LockedCounters {
    values: [u64; 8],
}

/// Which counter thread `i` bumps: in the "own" workload the stages' counters (walk:
/// files_discovered, store: tracks_indexed, embedder: embeddings_done, probe failures:
/// tracks_failed); in the "same" workload always tracks_indexed.
fn slot(i: usize, same: bool) -> usize {
    if same { 1 } else { [0, 1, 5, 4][i % 4] }
}

/// Counter `s` of `c` (either counters struct: they have the same eight fields), in field order;
/// 7 and above are `embeddings_failed`.
macro_rules! counter_slot {
    ($c:expr, $s:expr) => {
        match $s {
            0 => &$c.files_discovered,
            1 => &$c.tracks_indexed,
            2 => &$c.tracks_unchanged,
            3 => &$c.tracks_removed,
            4 => &$c.tracks_failed,
            5 => &$c.embeddings_done,
            6 => &$c.embeddings_skipped,
            _ => &$c.embeddings_failed,
        }
    };
}

fn padded_slot(c: &ScanCounters, s: usize) -> &AtomicU64 {
    counter_slot!(c, s)
}

fn plain_slot(c: &PlainCounters, s: usize) -> &AtomicU64 {
    counter_slot!(c, s)
}

#[derive(Clone, Copy)]
enum Kind {
    CachePadded,
    Plain,
    Mutex,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::CachePadded => "cache_padded",
            Kind::Plain => "plain_atomics",
            Kind::Mutex => "mutex",
        }
    }
}

/// N threads × `m` increments, started together; returns the time from the start signal to
/// the last thread's end, and checks the totals are exact.
fn contend(kind: Kind, threads: usize, same: bool, m: u64) -> Duration {
    let padded = ScanCounters::default();
    let plain = PlainCounters::default();
    let locked = Mutex::new(LockedCounters::default());
    let barrier = Barrier::new(threads + 1);
    let elapsed = std::thread::scope(|s| {
        for i in 0..threads {
            let (padded, plain, locked, barrier) = (&padded, &plain, &locked, &barrier);
            s.spawn(move || {
                let k = slot(i, same);
                barrier.wait();
                match kind {
                    Kind::CachePadded => {
                        let c = padded_slot(padded, k);
                        for _ in 0..m {
                            ScanCounters::add(c, 1);
                        }
                    }
                    Kind::Plain => {
                        let c = plain_slot(plain, k);
                        for _ in 0..m {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Kind::Mutex => {
                        for _ in 0..m {
                            locked.lock().unwrap_or_else(|e| e.into_inner()).values[k] += 1;
                        }
                    }
                }
            });
        }
        barrier.wait();
        // The scope joins every thread before it returns: `elapsed` covers them all.
        Instant::now()
    })
    .elapsed();
    let total: u64 = match kind {
        Kind::CachePadded => (0..8)
            .map(|k| padded_slot(&padded, k).load(Ordering::Relaxed))
            .sum(),
        Kind::Plain => (0..8)
            .map(|k| plain_slot(&plain, k).load(Ordering::Relaxed))
            .sum(),
        Kind::Mutex => locked.lock().map_or(0, |l| l.values.iter().sum()),
    };
    assert_eq!(total, threads as u64 * m, "lost increments");
    elapsed
}

fn contention(c: &mut Criterion) {
    for (workload, same) in [("own_counter", false), ("same_counter", true)] {
        let mut g = c.benchmark_group(format!("contention/{workload}"));
        // One thread: the uncontended cost, the floor the others are compared with.
        let counts: &[usize] = if same { &[2, 4] } else { &[1, 2, 4] };
        for &threads in counts {
            g.throughput(Throughput::Elements(threads as u64 * INCREMENTS));
            for kind in [Kind::CachePadded, Kind::Plain, Kind::Mutex] {
                g.bench_with_input(
                    BenchmarkId::new(kind.name(), format!("{threads}_threads")),
                    &threads,
                    |b, &threads| {
                        b.iter_custom(|iters| {
                            (0..iters)
                                .map(|_| contend(kind, threads, same, INCREMENTS))
                                .sum()
                        })
                    },
                );
            }
        }
        g.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// (b) reporting share

fn scan_info() -> ScanInfo {
    ScanInfo {
        request_id: Uuid::new_v4(),
        library_id: 1,
        library_path: "/srv/music".into(),
        path: None,
        trigger: ScanTrigger::Manual,
        mode: ScanMode::Full,
        started_at: Utc::now(),
        resumed: false,
    }
}

/// Median nanoseconds per call of `f` over 5 rounds of `per_round` calls.
fn ns_per_call(per_round: u32, mut f: impl FnMut() -> usize) -> f64 {
    let mut rounds = Vec::new();
    let mut sink = 0usize;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..per_round {
            sink = sink.wrapping_add(std::hint::black_box(f()));
        }
        rounds.push(t.elapsed().as_nanos() as f64 / f64::from(per_round));
    }
    std::hint::black_box(sink);
    Summary::of(&rounds).median
}

/// What reporting costs per notify tick and per persist tick, measured on the real types: a
/// `ScanReporter::publish` of a scan whose counters moved (compute the snapshot, compare,
/// store, wake subscribers), one subscriber's serialisation of the snapshot, and one
/// `scans` upsert (corald's own query) on a running daemon's database. Returns
/// (publish ns, serialise ns, upsert µs).
async fn reporting_costs(d: &Daemon, sample: &ScanProgress) -> Result<(f64, f64, f64)> {
    let r = ScanReporter::new();
    let h = r.register(scan_info(), ScanPhase::Queued);
    h.counters().set_tracks_expected(u64::MAX / 4);
    r.set_phase(&h, ScanPhase::Indexing);
    let publish = ns_per_call(100_000, || {
        ScanCounters::add(&h.counters().tracks_indexed, 500);
        usize::from(r.publish(&h))
    });
    let p = h.latest();
    let serialize = ns_per_call(100_000, || serde_json::to_vec(&*p).map_or(0, |v| v.len()));

    // The persist loop's query, on a throw-away (finished) row of the daemon's database.
    let mut db = d.db().await?;
    let mut row = sample.clone();
    row.scan.request_id = Uuid::new_v4();
    let mut upserts = Vec::new();
    for i in 0..200u64 {
        row.counts.tracks_indexed = i;
        row.updated_at = Utc::now();
        let t = Instant::now();
        corald::db::scans::upsert(&mut db, &row)
            .await
            .context("upserting a scans row")?;
        upserts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((publish, serialize, Summary::of(&upserts).median))
}

fn write_config(dir: &Path, name: &str, notify_ms: u64, persist_ms: u64) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[progress]\nnotify_interval_ms = {notify_ms}\npersist_interval_ms = {persist_ms}\n"
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

async fn reporting_share(root: &Path, files: usize) -> Result<()> {
    let n = samples("CORAL_BENCH_SHARE_SAMPLES", 5)?;
    let dir = coral_tests::daemon::traversable_tempdir()?;
    let on_cfg = write_config(dir.path(), "on.toml", 200, 1000)?;
    let off_cfg = write_config(dir.path(), "off.toml", 60_000, 60_000)?;
    println!();
    println!(
        "reporting share: {files} files, `scan --full` alternately on two daemons, {n} runs each (load average {})",
        coral_benches::loadavg()
    );
    let on = Daemon::start_with(&["--config", &on_cfg]).await?;
    let off = Daemon::start_with(&["--config", &off_cfg]).await?;
    let on_client = on.client().await?;
    let off_client = off.client().await?;
    let (on_lib, _) = add_library(&on_client, root).await?;
    let (off_lib, _) = add_library(&off_client, root).await?;

    let mut wall = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    let mut notes = [Vec::new(), Vec::new()];
    let mut last = None;
    for i in 0..2 * n {
        // Alternate which config goes first so drift on the machine hits both alike.
        let which = (i + i / 2) % 2;
        let (d, client, lib) = if which == 0 {
            (&on, &on_client, on_lib)
        } else {
            (&off, &off_client, off_lib)
        };
        let before = CpuSample::read(d)?;
        let run = rescan(client, lib, true).await?;
        let used = CpuSample::read(d)?.since(&before);
        ensure!(
            run.last.counts.tracks_indexed == files as u64,
            "scan indexed {}",
            run.last.counts.tracks_indexed
        );
        println!(
            "  {} #{}: wall {:.3} s, corald CPU {:.2} s, postgres CPU {:.2} s, {} notifications",
            if which == 0 {
                "reporting on (200 ms / 1 s)"
            } else {
                "reporting off (60 s / 60 s)"
            },
            wall[which].len() + 1,
            run.wall.as_secs_f64(),
            used.corald.as_secs_f64(),
            used.postgres.as_secs_f64(),
            run.notifications
        );
        wall[which].push(run.wall.as_secs_f64());
        cpu[which].push(used.corald.as_secs_f64());
        notes[which].push(run.notifications as f64);
        last = Some(run.last);
    }
    let (w_on, w_off) = (Summary::of(&wall[0]), Summary::of(&wall[1]));
    let (c_on, c_off) = (Summary::of(&cpu[0]), Summary::of(&cpu[1]));
    println!(
        "  wall: on min {:.3} / median {:.3} s, off min {:.3} / median {:.3} s -> on/off {:+.1} % (medians), {:+.1} % (mins)",
        w_on.min,
        w_on.median,
        w_off.min,
        w_off.median,
        (w_on.median / w_off.median - 1.0) * 100.0,
        (w_on.min / w_off.min - 1.0) * 100.0
    );
    println!(
        "  corald CPU: on median {:.2} s, off median {:.2} s -> {:+.1} %",
        c_on.median,
        c_off.median,
        (c_on.median / c_off.median - 1.0) * 100.0
    );
    println!(
        "  notifications per scan (one subscriber): on median {:.0}, off median {:.0}",
        Summary::of(&notes[0]).median,
        Summary::of(&notes[1]).median
    );

    // The bound: what the default config spends per second of scan, against one core-second.
    let last = last.context("no scan ran")?;
    let (publish_ns, serialize_ns, upsert_us) = reporting_costs(&on, &last).await?;
    let per_second_us = 5.0 * (publish_ns + serialize_ns) / 1000.0 + upsert_us;
    let share = per_second_us / 1e6;
    println!(
        "  in process: publish tick {publish_ns:.0} ns, snapshot serialisation {serialize_ns:.0} ns per subscriber, \
         scans upsert {upsert_us:.0} µs (median round trip)"
    );
    println!(
        "  default config per second of scan: 5 ticks x (publish + 1 serialisation) + 1 upsert = {per_second_us:.0} µs \
         = {:.3} % of one core -> target < {:.0} % {}",
        share * 100.0,
        TARGET_SHARE * 100.0,
        if share < TARGET_SHARE {
            "MET"
        } else {
            "MISSED"
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (c) fan-out to 1,000 subscribers

struct FanoutRun {
    label: String,
    subscribers: usize,
    wall: f64,
    cpu: CpuSample,
    delivered: usize,
    finals: usize,
    latencies_ms: Vec<f64>,
    /// Latencies seen by the bench's own waiting subscription (there in every scenario).
    waiter_ms: Vec<f64>,
}

/// One full scan with `conns × per_conn` extra subscriptions.
async fn fanout_run(
    d: &Daemon,
    client: &jsonrpsee::async_client::Client,
    lib: i64,
    files: usize,
    conns: usize,
    per_conn: usize,
) -> Result<FanoutRun> {
    let label = if conns == 0 {
        "no extra subscribers".to_owned()
    } else {
        format!("{conns} connections x {per_conn} subscriptions")
    };
    let mut clients = Vec::new();
    for _ in 0..conns {
        let c = coral_proto::client::connect(&d.socket)
            .await
            .context("connecting a subscriber client")?;
        clients.push(Arc::new(c));
    }
    let mut subs = Vec::new();
    for c in &clients {
        for _ in 0..per_conn {
            subs.push(
                c.scan_subscribe(Some(ScanFilter::default()))
                    .await
                    .context("scan.subscribe")?,
            );
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut sub in subs {
        tasks.spawn(async move {
            // (latency ms, request id, terminal?) of every notification, stopping at a final one.
            let mut seen: Vec<(f64, Uuid, bool)> = Vec::new();
            while let Some(Ok(p)) = sub.next().await {
                let ms = latency_ms(&p);
                let end = p.phase.is_terminal();
                seen.push((ms, p.scan.request_id, end));
                if end {
                    break;
                }
            }
            seen
        });
    }
    let before = CpuSample::read(d)?;
    let run = rescan(client, lib, true).await?;
    // Every subscriber should get the final notification too; give them a moment.
    let mut delivered = 0;
    let mut finals = 0;
    let mut latencies_ms = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        for (ms, id, end) in r.context("subscriber task")? {
            if id == run.last.scan.request_id {
                delivered += 1;
                finals += usize::from(end);
                latencies_ms.push(ms);
            }
        }
    }
    tasks.abort_all();
    let cpu = CpuSample::read(d)?.since(&before);
    ensure!(
        run.last.counts.tracks_indexed == files as u64,
        "scan indexed {}",
        run.last.counts.tracks_indexed
    );
    Ok(FanoutRun {
        label,
        subscribers: conns * per_conn,
        wall: run.wall.as_secs_f64(),
        cpu,
        delivered,
        finals,
        latencies_ms,
        waiter_ms: run.latencies_ms,
    })
}

async fn fanout(root: &Path, files: usize) -> Result<()> {
    println!();
    println!(
        "fan-out: {files} files, one `scan --full` per scenario, default notify interval (200 ms), load average {}",
        coral_benches::loadavg()
    );
    let d = Daemon::start().await?;
    let client = d.client().await?;
    let (lib, _) = add_library(&client, root).await?;
    let scenarios = [(0, 0), (1, 1000), (4, 250), (100, 10), (0, 0)];
    let mut runs = Vec::new();
    for (conns, per) in scenarios {
        let load = coral_benches::loadavg();
        let mut r = fanout_run(&d, &client, lib, files, conns, per).await?;
        r.label = format!("{} [load {load}]", r.label);
        let subs = conns * per;
        let p50 = quantile(&mut r.latencies_ms, 0.5).unwrap_or(f64::NAN);
        let p99 = quantile(&mut r.latencies_ms, 0.99).unwrap_or(f64::NAN);
        let max = quantile(&mut r.latencies_ms, 1.0).unwrap_or(f64::NAN);
        let waiter_p99 = quantile(&mut r.waiter_ms, 0.99).unwrap_or(f64::NAN);
        println!(
            "  {}: scan {:.3} s, corald CPU {:.2} s, postgres CPU {:.2} s | {} notifications to {} subscribers ({} finals) | latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | the bench's own subscriber: {} notifications, p99 {:.1} ms",
            r.label,
            r.wall,
            r.cpu.corald.as_secs_f64(),
            r.cpu.postgres.as_secs_f64(),
            r.delivered,
            subs,
            r.finals,
            p50,
            p99,
            max,
            r.waiter_ms.len(),
            waiter_p99
        );
        if subs > 0 && r.finals != subs {
            bail!(
                "only {} of {subs} subscribers got the final notification",
                r.finals
            );
        }
        runs.push((r, p99));
    }
    let base: Vec<f64> = runs
        .iter()
        .filter(|(r, _)| r.subscribers == 0)
        .map(|(r, _)| r.cpu.corald.as_secs_f64())
        .collect();
    let base_cpu = Summary::of(&base).median;
    for (r, p99) in runs.iter().filter(|(r, _)| r.subscribers > 0) {
        let extra = r.cpu.corald.as_secs_f64() - base_cpu;
        println!(
            "  {}: corald CPU {:+.2} s over the baseline median ({:+.0} %), {:.1} µs per notification; p99 {:.1} ms -> target < {TARGET_P99_MS} ms {}",
            r.label,
            extra,
            extra / base_cpu * 100.0,
            extra * 1e6 / r.delivered as f64,
            p99,
            if *p99 < TARGET_P99_MS {
                "MET"
            } else {
                "MISSED"
            }
        );
    }
    Ok(())
}
