//! Liveness heartbeats: each long-running worker (the scan worker, the embedding pipeline's
//! inference thread) bumps a [`Heartbeat`] while it makes progress, and [`Liveness`] knows which
//! of them have gone silent. Workers depend on this module only; `systemd` reads it to decide
//! whether to ping the watchdog.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One worker's sign of life: a timestamp the worker bumps while it makes progress (and on a
/// timer while it waits for work).
#[derive(Debug)]
pub struct Heartbeat {
    name: &'static str,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last beat.
    last_ms: AtomicU64,
    /// The worker has ended on purpose (or gave up): no longer watched.
    retired: AtomicBool,
}

impl Heartbeat {
    /// A heartbeat that is not registered with any [`Liveness`] (tests, tools).
    pub fn detached(name: &'static str) -> Arc<Self> {
        Arc::new(Heartbeat {
            name,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        })
    }

    /// The worker has ended (shut down, or stopped for a reason it reported elsewhere): its
    /// silence from now on is not a stall.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Record that the worker is alive and making progress. One relaxed atomic store.
    pub fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Every worker the watchdog watches.
///
/// Contract for a registered worker: beat at least every [`Liveness::beat_interval`] while
/// idle (e.g. a timer next to the channel it waits on), and at least once per unit of work
/// (a file, a batch) while busy. A worker silent for longer than the stall limit (the watchdog
/// timeout) counts as wedged.
#[derive(Debug)]
pub struct Liveness {
    beats: Mutex<Vec<Arc<Heartbeat>>>,
    stall_limit: Duration,
}

impl Liveness {
    /// `watchdog`: `WATCHDOG_USEC` if enabled. The stall limit is the watchdog timeout itself
    /// (60 s when there is no watchdog, used only for the warning).
    pub fn new(watchdog: Option<Duration>) -> Arc<Self> {
        Arc::new(Liveness {
            beats: Mutex::new(Vec::new()),
            stall_limit: watchdog.unwrap_or(Duration::from_secs(60)),
        })
    }

    fn beats(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Heartbeat>>> {
        self.beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register a worker; it starts alive.
    pub fn register(&self, name: &'static str) -> Arc<Heartbeat> {
        let hb = Heartbeat::detached(name);
        self.adopt(Arc::clone(&hb));
        hb
    }

    /// Watch a heartbeat made with [`Heartbeat::detached`] from now on (for a worker that may
    /// fail to start: it is watched only once it runs).
    pub fn adopt(&self, heartbeat: Arc<Heartbeat>) {
        heartbeat.beat();
        self.beats().push(heartbeat);
    }

    /// How often an idle worker should beat: a quarter of the stall limit, between 100 ms and
    /// 5 s.
    pub fn beat_interval(&self) -> Duration {
        (self.stall_limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Silence after which a worker counts as wedged.
    pub fn stall_limit(&self) -> Duration {
        self.stall_limit
    }

    /// The workers silent for longer than the stall limit, with their silence.
    pub fn stalled(&self) -> Vec<(&'static str, Duration)> {
        let ages: Vec<_> = self
            .beats()
            .iter()
            .filter(|h| !h.is_retired())
            .map(|h| (h.name(), h.age()))
            .collect();
        stalled_workers(&ages, self.stall_limit)
    }
}

/// The watchdog's decision: the workers whose last beat is older than `limit`. Pings go out
/// only when this is empty.
pub fn stalled_workers(
    ages: &[(&'static str, Duration)],
    limit: Duration,
) -> Vec<(&'static str, Duration)> {
    ages.iter()
        .filter(|(_, age)| *age > limit)
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_withholds_pings_for_silent_workers() {
        let limit = Duration::from_secs(30);
        let ages = [
            ("scan worker", Duration::from_secs(2)),
            ("inference", Duration::from_secs(31)),
        ];
        assert_eq!(
            stalled_workers(&ages, limit),
            vec![("inference", Duration::from_secs(31))]
        );
        assert!(stalled_workers(&ages[..1], limit).is_empty());
        assert!(stalled_workers(&[], limit).is_empty());
    }

    #[test]
    fn heartbeat_age_resets_on_beat() {
        let l = Liveness::new(Some(Duration::from_millis(400)));
        assert_eq!(l.beat_interval(), Duration::from_millis(100));
        let hb = l.register("scan worker");
        hb.beat();
        assert!(l.stalled().is_empty());
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(l.stalled().len(), 1);
        hb.beat();
        assert!(l.stalled().is_empty());
    }

    #[test]
    fn adopted_heartbeats_are_watched_until_retired() {
        let l = Liveness::new(Some(Duration::from_millis(400)));
        let inference = Heartbeat::detached("inference");
        std::thread::sleep(Duration::from_millis(450));
        // Not watched before adoption, however old its last beat.
        assert!(l.stalled().is_empty());
        l.adopt(Arc::clone(&inference));
        assert!(l.stalled().is_empty(), "adoption counts as a beat");
        std::thread::sleep(Duration::from_millis(450));
        let stalled: Vec<&str> = l.stalled().iter().map(|(name, _)| *name).collect();
        assert_eq!(stalled, ["inference"]);
        inference.retire();
        assert!(
            l.stalled().is_empty(),
            "a retired worker's silence is not a stall"
        );
    }
}
