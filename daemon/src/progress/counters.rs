//! The per-scan counters. Each sits on its own cache line (`CachePadded`) because scan threads,
//! decode workers and the inference thread bump different counters of the same scan at once.

use std::sync::atomic::{AtomicU64, Ordering};

use coral_proto::ScanCounts;
use crossbeam_utils::CachePadded;

/// Sentinel for "total not known yet".
const UNKNOWN: u64 = u64::MAX;

/// Counters of one scan. All methods are lock-free and safe from any thread.
#[derive(Debug)]
pub struct ScanCounters {
    pub files_discovered: CachePadded<AtomicU64>,
    tracks_expected: CachePadded<AtomicU64>,
    pub tracks_indexed: CachePadded<AtomicU64>,
    pub tracks_unchanged: CachePadded<AtomicU64>,
    pub tracks_removed: CachePadded<AtomicU64>,
    pub tracks_failed: CachePadded<AtomicU64>,
    embeddings_expected: CachePadded<AtomicU64>,
    pub embeddings_done: CachePadded<AtomicU64>,
    pub embeddings_skipped: CachePadded<AtomicU64>,
    pub embeddings_failed: CachePadded<AtomicU64>,
}

impl Default for ScanCounters {
    fn default() -> Self {
        let z = || CachePadded::new(AtomicU64::new(0));
        ScanCounters {
            files_discovered: z(),
            tracks_expected: CachePadded::new(AtomicU64::new(UNKNOWN)),
            tracks_indexed: z(),
            tracks_unchanged: z(),
            tracks_removed: z(),
            tracks_failed: z(),
            embeddings_expected: CachePadded::new(AtomicU64::new(UNKNOWN)),
            embeddings_done: z(),
            embeddings_skipped: z(),
            embeddings_failed: z(),
        }
    }
}

fn load_opt(a: &AtomicU64) -> Option<u64> {
    match a.load(Ordering::Acquire) {
        UNKNOWN => None,
        v => Some(v),
    }
}

impl ScanCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_tracks_expected(&self, n: u64) {
        self.tracks_expected
            .store(n.min(UNKNOWN - 1), Ordering::Release);
    }

    pub fn set_embeddings_expected(&self, n: u64) {
        self.embeddings_expected
            .store(n.min(UNKNOWN - 1), Ordering::Release);
    }

    pub fn tracks_expected(&self) -> Option<u64> {
        load_opt(&self.tracks_expected)
    }

    pub fn embeddings_expected(&self) -> Option<u64> {
        load_opt(&self.embeddings_expected)
    }

    /// Restore values (a resumed scan picks up its persisted counters).
    pub fn restore(&self, v: &ScanCounts) {
        let r = Ordering::Relaxed;
        self.files_discovered.store(v.files_discovered, r);
        self.tracks_indexed.store(v.tracks_indexed, r);
        self.tracks_unchanged.store(v.tracks_unchanged, r);
        self.tracks_removed.store(v.tracks_removed, r);
        self.tracks_failed.store(v.tracks_failed, r);
        self.embeddings_done.store(v.embeddings_done, r);
        self.embeddings_skipped.store(v.embeddings_skipped, r);
        self.embeddings_failed.store(v.embeddings_failed, r);
        self.tracks_expected
            .store(v.tracks_expected.unwrap_or(UNKNOWN), Ordering::Release);
        self.embeddings_expected
            .store(v.embeddings_expected.unwrap_or(UNKNOWN), Ordering::Release);
    }

    /// Reset everything (a resumed scan recounts from the database).
    pub fn reset(&self) {
        self.restore(&ScanCounts::default());
    }

    pub fn values(&self) -> ScanCounts {
        let r = Ordering::Relaxed;
        // Totals first (Acquire), then the done-counters: a reader never sees more done than
        // expected as long as writers only count work after setting the total.
        let tracks_expected = self.tracks_expected();
        let embeddings_expected = self.embeddings_expected();
        ScanCounts {
            files_discovered: self.files_discovered.load(r),
            tracks_expected,
            tracks_indexed: self.tracks_indexed.load(r),
            tracks_unchanged: self.tracks_unchanged.load(r),
            tracks_removed: self.tracks_removed.load(r),
            tracks_failed: self.tracks_failed.load(r),
            embeddings_expected,
            embeddings_done: self.embeddings_done.load(r),
            embeddings_skipped: self.embeddings_skipped.load(r),
            embeddings_failed: self.embeddings_failed.load(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn parallel_increments_are_exact() {
        let c = Arc::new(ScanCounters::default());
        c.set_tracks_expected(8 * 100_000);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        match i % 3 {
                            0 => ScanCounters::add(&c.tracks_indexed, 1),
                            1 => ScanCounters::add(&c.tracks_failed, 1),
                            _ => ScanCounters::add(&c.tracks_unchanged, 1),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("counter thread panicked");
        }
        let v = c.values();
        assert_eq!(v.tracks_indexed, 3 * 100_000);
        assert_eq!(v.tracks_failed, 3 * 100_000);
        assert_eq!(v.tracks_unchanged, 2 * 100_000);
        assert_eq!(v.tracks_settled(), v.tracks_expected.unwrap_or(0));
    }

    #[test]
    fn totals_are_unknown_until_set() {
        let c = ScanCounters::default();
        assert_eq!(c.tracks_expected(), None);
        c.set_tracks_expected(0);
        assert_eq!(c.tracks_expected(), Some(0));
        c.reset();
        assert_eq!(c.tracks_expected(), None);
    }
}
