//! The ScanReporter: the registry of every scan's live state. The pipeline bumps counters and
//! announces phase changes; the reporter turns them into `ScanProgress` snapshots with smoothed
//! rates, an ETA and percentages that never go backwards, and publishes a snapshot when it
//! changed — at once on phase changes, otherwise at most once per notify interval (the ticker).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use coral_proto::{ScanCounts, ScanInfo, ScanMode, ScanPhase, ScanProgress};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::counters::ScanCounters;

/// Weight of the newest sample in the smoothed rates.
const RATE_SMOOTHING: f64 = 0.3;
/// Rates and ETA need at least this much time in a phase before they mean anything.
const MIN_RATE_WINDOW: Duration = Duration::from_millis(1000);
/// Finished scans stay in memory this long so late subscribers and `scan.get` see them.
const FINISHED_RETENTION: Duration = Duration::from_secs(120);

#[derive(Debug)]
struct MutableState {
    mode: ScanMode,
    phase: ScanPhase,
    phase_started: Instant,
    finished_at: Option<DateTime<Utc>>,
    finished_instant: Option<Instant>,
    error: Option<String>,
    // smoothed rates
    last_sample: Instant,
    last_tracks_settled: u64,
    last_embeddings_settled: u64,
    tracks_rate: Option<f64>,
    embeddings_rate: Option<f64>,
    // high-water marks so percentages never go backwards
    indexing_percent: Option<f64>,
    embedding_percent: Option<f64>,
}

/// One scan's live state, shared by the worker, the embedding stages and subscribers.
#[derive(Debug)]
pub struct ScanHandle {
    info: ScanInfo,
    counters: ScanCounters,
    state: Mutex<MutableState>,
    version: AtomicU64,
    /// The version of the snapshot last written to the `scans` table.
    saved_version: AtomicU64,
    latest: Mutex<Arc<ScanProgress>>,
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves plain data behind.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn floor_tenth(v: f64) -> f64 {
    ((v * 10.0).floor() / 10.0).clamp(0.0, 100.0)
}

/// Percent of a phase done, floored to 0.1 so it never shows 100 before the phase is over.
pub(crate) fn percent(settled: u64, expected: u64) -> f64 {
    if expected == 0 {
        100.0
    } else {
        // 99.95 % must not round up to 100 before the phase is really over.
        floor_tenth(settled.min(expected) as f64 * 100.0 / expected as f64)
    }
}

/// What a snapshot shows beyond the counters: percentages, rates and the ETA.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    pub indexing_percent: Option<f64>,
    pub embedding_percent: Option<f64>,
    pub tracks_per_second: Option<f64>,
    pub embeddings_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
}

/// The percentages a phase shows for these counts: null until the phase's total is known, 100
/// once the phase is over, the settled share otherwise (and where a scan stopped).
pub(crate) fn phase_percents(phase: ScanPhase, v: &ScanCounts) -> (Option<f64>, Option<f64>) {
    let indexing = match phase {
        ScanPhase::Queued | ScanPhase::Discovering => None,
        ScanPhase::Embedding | ScanPhase::Completed => Some(100.0),
        ScanPhase::Indexing | ScanPhase::Failed | ScanPhase::Cancelled => {
            v.tracks_expected.map(|e| percent(v.tracks_settled(), e))
        }
    };
    let embedding = match phase {
        ScanPhase::Completed => v.embeddings_expected.map(|_| 100.0),
        ScanPhase::Embedding | ScanPhase::Failed | ScanPhase::Cancelled => v
            .embeddings_expected
            .map(|e| percent(v.embeddings_settled(), e)),
        ScanPhase::Queued | ScanPhase::Discovering | ScanPhase::Indexing => None,
    };
    (indexing, embedding)
}

/// The one place a [`ScanProgress`] is put together: live snapshots, the placeholder of a scan
/// not yet published, and scans read back from the database all come from here.
pub(crate) fn scan_progress(
    info: &ScanInfo,
    mode: ScanMode,
    phase: ScanPhase,
    finished_at: Option<DateTime<Utc>>,
    v: &ScanCounts,
    f: Figures,
    error: Option<String>,
) -> ScanProgress {
    ScanProgress {
        scan: ScanInfo {
            mode,
            ..info.clone()
        },
        phase,
        updated_at: Utc::now(),
        finished_at,
        counts: *v,
        indexing_percent: f.indexing_percent,
        embedding_percent: f.embedding_percent,
        tracks_per_second: f.tracks_per_second,
        embeddings_per_second: f.embeddings_per_second,
        eta_seconds: f.eta_seconds,
        error,
    }
}

impl ScanHandle {
    fn new(info: ScanInfo, phase: ScanPhase) -> Self {
        let now = Instant::now();
        let placeholder = scan_progress(
            &info,
            info.mode,
            phase,
            None,
            &ScanCounts::default(),
            Figures::default(),
            None,
        );
        ScanHandle {
            state: Mutex::new(MutableState {
                mode: info.mode,
                phase,
                phase_started: now,
                finished_at: None,
                finished_instant: None,
                error: None,
                last_sample: now,
                last_tracks_settled: 0,
                last_embeddings_settled: 0,
                tracks_rate: None,
                embeddings_rate: None,
                indexing_percent: None,
                embedding_percent: None,
            }),
            info,
            counters: ScanCounters::default(),
            version: AtomicU64::new(0),
            saved_version: AtomicU64::new(0),
            latest: Mutex::new(Arc::new(placeholder)),
            cancel: CancellationToken::new(),
        }
    }

    pub fn request_id(&self) -> Uuid {
        self.info.request_id
    }

    pub fn info(&self) -> &ScanInfo {
        &self.info
    }

    pub fn counters(&self) -> &ScanCounters {
        &self.counters
    }

    /// Cancelled when someone asked this scan to stop.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn phase(&self) -> ScanPhase {
        lock(&self.state).phase
    }

    pub fn mode(&self) -> ScanMode {
        lock(&self.state).mode
    }

    /// A queued incremental job that a full request was merged into becomes full.
    pub fn upgrade_mode(&self, mode: ScanMode) {
        let mut s = lock(&self.state);
        if mode == ScanMode::Full {
            s.mode = ScanMode::Full;
        }
    }

    pub fn set_error(&self, message: impl Into<String>) {
        lock(&self.state).error = Some(message.into());
    }

    /// Version of the latest published snapshot; grows with every publish.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The latest published snapshot.
    pub fn latest(&self) -> Arc<ScanProgress> {
        Arc::clone(&lock(&self.latest))
    }

    /// The latest published snapshot with its version, read together.
    pub fn latest_versioned(&self) -> (u64, Arc<ScanProgress>) {
        let latest = lock(&self.latest);
        (self.version(), Arc::clone(&latest))
    }

    /// The version last written to the `scans` table (0: none yet). Only
    /// [`crate::progress::persist`] sets it.
    pub fn saved_version(&self) -> u64 {
        self.saved_version.load(Ordering::Acquire)
    }

    pub(crate) fn mark_saved(&self, version: u64) {
        self.saved_version.fetch_max(version, Ordering::AcqRel);
    }

    fn finished_instant(&self) -> Option<Instant> {
        lock(&self.state).finished_instant
    }

    /// Compute a fresh snapshot from the counters (updating rates and high-water marks).
    fn compute(&self, now: Instant) -> ScanProgress {
        let v: ScanCounts = self.counters.values();
        let mut s = lock(&self.state);
        let phase = s.phase;

        // Smoothed rates, sampled at most every 200 ms.
        let dt = now.duration_since(s.last_sample).as_secs_f64();
        if dt >= 0.2 {
            let tracks = v.tracks_settled();
            let embeds = v.embeddings_settled();
            if phase == ScanPhase::Indexing {
                let inst = tracks.saturating_sub(s.last_tracks_settled) as f64 / dt;
                s.tracks_rate = Some(match s.tracks_rate {
                    None => inst,
                    Some(r) => RATE_SMOOTHING * inst + (1.0 - RATE_SMOOTHING) * r,
                });
            }
            if phase == ScanPhase::Embedding {
                let inst = embeds.saturating_sub(s.last_embeddings_settled) as f64 / dt;
                s.embeddings_rate = Some(match s.embeddings_rate {
                    None => inst,
                    Some(r) => RATE_SMOOTHING * inst + (1.0 - RATE_SMOOTHING) * r,
                });
            }
            s.last_sample = now;
            s.last_tracks_settled = tracks;
            s.last_embeddings_settled = embeds;
        }

        let (indexing_now, embedding_now) = phase_percents(phase, &v);
        s.indexing_percent = max_opt(s.indexing_percent, indexing_now);
        s.embedding_percent = max_opt(s.embedding_percent, embedding_now);

        let in_phase = now.duration_since(s.phase_started) >= MIN_RATE_WINDOW;
        let eta = match phase {
            ScanPhase::Indexing if in_phase => {
                eta(v.tracks_expected, v.tracks_settled(), s.tracks_rate)
            }
            ScanPhase::Embedding if in_phase => eta(
                v.embeddings_expected,
                v.embeddings_settled(),
                s.embeddings_rate,
            ),
            _ => None,
        };
        let terminal = phase.is_terminal();
        let figures = Figures {
            indexing_percent: s.indexing_percent,
            embedding_percent: s.embedding_percent,
            tracks_per_second: s.tracks_rate.filter(|_| !terminal).map(round2),
            embeddings_per_second: s.embeddings_rate.filter(|_| !terminal).map(round2),
            eta_seconds: eta.filter(|_| !terminal).map(round2),
        };
        scan_progress(
            &self.info,
            s.mode,
            phase,
            s.finished_at,
            &v,
            figures,
            s.error.clone(),
        )
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn eta(expected: Option<u64>, settled: u64, rate: Option<f64>) -> Option<f64> {
    let remaining = expected?.saturating_sub(settled) as f64;
    match rate {
        Some(r) if r > 0.01 => Some(remaining / r),
        _ => None,
    }
}

/// Whether two snapshots differ in anything but their timestamp.
fn same_content(a: &ScanProgress, b: &ScanProgress) -> bool {
    let mut b = b.clone();
    b.updated_at = a.updated_at;
    *a == b
}

/// The registry of scans. One per daemon.
#[derive(Debug)]
pub struct ScanReporter {
    scans: RwLock<HashMap<Uuid, Arc<ScanHandle>>>,
    generation: watch::Sender<u64>,
}

impl Default for ScanReporter {
    fn default() -> Self {
        ScanReporter {
            scans: RwLock::new(HashMap::new()),
            generation: watch::Sender::new(0),
        }
    }
}

impl ScanReporter {
    pub fn new() -> Arc<Self> {
        Arc::new(ScanReporter::default())
    }

    /// Register a scan in `phase` (usually queued) and publish its first snapshot.
    pub fn register(&self, info: ScanInfo, phase: ScanPhase) -> Arc<ScanHandle> {
        self.insert(ScanHandle::new(info, phase))
    }

    /// Register a resumed scan with its persisted counters.
    pub fn register_restored(
        &self,
        info: ScanInfo,
        phase: ScanPhase,
        counters: &ScanCounts,
    ) -> Arc<ScanHandle> {
        let handle = ScanHandle::new(info, phase);
        handle.counters.restore(counters);
        self.insert(handle)
    }

    /// Add a new scan to the registry and publish its first snapshot.
    fn insert(&self, handle: ScanHandle) -> Arc<ScanHandle> {
        let handle = Arc::new(handle);
        self.scans
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(handle.request_id(), Arc::clone(&handle));
        self.publish(&handle);
        handle
    }

    pub fn get(&self, request_id: Uuid) -> Option<Arc<ScanHandle>> {
        self.read().get(&request_id).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Uuid, Arc<ScanHandle>>> {
        self.scans
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every handle still in memory (active and recently finished).
    pub fn handles(&self) -> Vec<Arc<ScanHandle>> {
        self.read().values().cloned().collect()
    }

    /// Snapshots of every queued or running scan, oldest first.
    pub fn active(&self) -> Vec<Arc<ScanProgress>> {
        let mut v: Vec<_> = self
            .read()
            .values()
            .map(|h| h.latest())
            .filter(|p| !p.phase.is_terminal())
            .collect();
        v.sort_by_key(|p| p.scan.started_at);
        v
    }

    /// Move a scan to a new phase and publish at once.
    pub fn set_phase(&self, handle: &ScanHandle, phase: ScanPhase) {
        {
            let mut s = lock(&handle.state);
            if s.phase.is_terminal() || s.phase == phase {
                return;
            }
            s.phase = phase;
            s.phase_started = Instant::now();
            s.last_sample = s.phase_started;
            if phase.is_terminal() {
                s.finished_at = Some(Utc::now());
                s.finished_instant = Some(Instant::now());
            }
        }
        self.publish(handle);
    }

    /// End a scan (completed, failed or cancelled), with an optional error or warning.
    pub fn finish(&self, handle: &ScanHandle, phase: ScanPhase, error: Option<String>) {
        if let Some(e) = error {
            handle.set_error(e);
        }
        self.set_phase(handle, phase);
    }

    /// Publish the handle's current state if it changed. Returns whether it did.
    pub fn publish(&self, handle: &ScanHandle) -> bool {
        let fresh = handle.compute(Instant::now());
        {
            let mut latest = lock(&handle.latest);
            if handle.version() > 0 && same_content(&latest, &fresh) {
                return false;
            }
            *latest = Arc::new(fresh);
            handle.version.fetch_add(1, Ordering::AcqRel);
        }
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        true
    }

    /// Publish every live scan whose counters moved, and forget scans finished long ago.
    /// Call every notify interval.
    pub fn tick(&self) {
        let mut expired = Vec::new();
        for h in self.handles() {
            match h.finished_instant() {
                Some(t) if t.elapsed() > FINISHED_RETENTION => expired.push(h.request_id()),
                Some(_) => {}
                None => {
                    self.publish(&h);
                }
            }
        }
        if !expired.is_empty() {
            let mut scans = self
                .scans
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for id in expired {
                scans.remove(&id);
            }
        }
    }

    /// Run `tick` every `interval` until `stop` is cancelled.
    pub async fn run_ticker(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut timer = tokio::time::interval(interval.max(Duration::from_millis(10)));
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = timer.tick() => self.tick(),
            }
        }
    }

    /// A receiver that changes whenever any scan publishes.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coral_proto::ScanTrigger;

    fn info() -> ScanInfo {
        ScanInfo {
            request_id: Uuid::new_v4(),
            library_id: 1,
            library_path: "/music".into(),
            path: None,
            trigger: ScanTrigger::Manual,
            mode: ScanMode::Incremental,
            started_at: Utc::now(),
            resumed: false,
        }
    }

    #[test]
    fn percentages_follow_the_rules() {
        let r = ScanReporter::default();
        let h = r.register(info(), ScanPhase::Queued);
        assert_eq!(h.latest().indexing_percent, None);
        r.set_phase(&h, ScanPhase::Discovering);
        ScanCounters::add(&h.counters().files_discovered, 3);
        r.publish(&h);
        assert_eq!(
            h.latest().indexing_percent,
            None,
            "no percent before the total"
        );
        h.counters().set_tracks_expected(3);
        r.set_phase(&h, ScanPhase::Indexing);
        assert_eq!(h.latest().indexing_percent, Some(0.0));
        ScanCounters::add(&h.counters().tracks_indexed, 2);
        r.publish(&h);
        assert_eq!(h.latest().indexing_percent, Some(66.6));
        ScanCounters::add(&h.counters().tracks_failed, 1);
        r.publish(&h);
        assert_eq!(h.latest().indexing_percent, Some(100.0));
        r.finish(&h, ScanPhase::Completed, None);
        let p = h.latest();
        assert_eq!(p.phase, ScanPhase::Completed);
        assert_eq!(p.indexing_percent, Some(100.0));
        assert_eq!(p.embedding_percent, None);
        assert!(p.finished_at.is_some());
        assert!(r.active().is_empty());
    }

    #[test]
    fn publish_only_on_change_and_terminal_is_final() {
        let r = ScanReporter::default();
        let h = r.register(info(), ScanPhase::Queued);
        let v = h.version();
        assert!(!r.publish(&h), "nothing changed");
        assert_eq!(h.version(), v);
        r.finish(
            &h,
            ScanPhase::Cancelled,
            Some("cancelled by request".into()),
        );
        r.set_phase(&h, ScanPhase::Indexing);
        assert_eq!(h.phase(), ScanPhase::Cancelled, "terminal phases are final");
        assert_eq!(h.latest().error.as_deref(), Some("cancelled by request"));
    }

    #[test]
    fn percent_never_rounds_up_to_100_early() {
        assert_eq!(percent(9_999, 10_000), 99.9);
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(5, 3), 100.0);
    }

    /// Property: whatever the interleaving of reports from many threads, every published
    /// snapshot keeps the invariants (done ≤ total, percentages within 0..=100, never
    /// backwards within a phase, none before the total is known, exactly 100 at the end).
    #[test]
    fn invariants_hold_over_random_interleavings() {
        for seed in 1..=20u64 {
            let r = Arc::new(ScanReporter::default());
            let h = r.register(info(), ScanPhase::Queued);
            r.set_phase(&h, ScanPhase::Discovering);
            let total = 2_000 + seed * 37;
            h.counters().set_tracks_expected(total);
            r.set_phase(&h, ScanPhase::Indexing);
            let workers: Vec<_> = (0..4u64)
                .map(|w| {
                    let h = Arc::clone(&h);
                    std::thread::spawn(move || {
                        let mut x = seed * 0x9E37_79B9 + w * 0x85EB_CA6B + 1;
                        let share = total / 4 + u64::from(w < total % 4);
                        for _ in 0..share {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let c = h.counters();
                            match x % 3 {
                                0 => ScanCounters::add(&c.tracks_indexed, 1),
                                1 => ScanCounters::add(&c.tracks_unchanged, 1),
                                _ => ScanCounters::add(&c.tracks_failed, 1),
                            }
                            if x % 97 == 0 {
                                std::thread::yield_now();
                            }
                        }
                    })
                })
                .collect();
            let mut seen: Vec<Arc<ScanProgress>> = Vec::new();
            while workers.iter().any(|w| !w.is_finished()) {
                r.publish(&h);
                seen.push(h.latest());
            }
            for w in workers {
                w.join().expect("worker panicked");
            }
            r.publish(&h);
            seen.push(h.latest());
            r.finish(&h, ScanPhase::Completed, None);
            seen.push(h.latest());
            let mut last_pct = 0.0;
            for p in &seen {
                let settled =
                    p.counts.tracks_indexed + p.counts.tracks_unchanged + p.counts.tracks_failed;
                assert!(settled <= total, "seed {seed}: {settled} > {total}");
                let pct = p.indexing_percent.expect("total known");
                assert!((0.0..=100.0).contains(&pct));
                assert!(pct >= last_pct, "seed {seed}: {last_pct} -> {pct}");
                if pct == 100.0 && p.phase == ScanPhase::Indexing {
                    assert_eq!(settled, total, "100 % only when everything is settled");
                }
                last_pct = pct;
            }
            let end = seen.last().expect("final snapshot");
            assert_eq!(end.indexing_percent, Some(100.0));
            assert_eq!(
                end.counts.tracks_indexed + end.counts.tracks_unchanged + end.counts.tracks_failed,
                total
            );
        }
    }
}
