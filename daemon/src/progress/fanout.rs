//! Fan-out of progress snapshots to subscribers. Each subscriber pulls: it waits for the
//! reporter's generation to change, then takes the latest snapshot of every matching scan it has
//! not sent yet. A slow subscriber therefore skips intermediate states and holds no queue; the
//! pipeline never waits for it.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use coral_proto::{ScanFilter, ScanProgress};
use tokio::sync::watch;
use uuid::Uuid;

use super::reporter::{ScanHandle, ScanReporter};

/// One subscriber's view: what it has already been sent.
pub struct ProgressSubscriber {
    reporter: Arc<ScanReporter>,
    filter: ScanFilter,
    generation: watch::Receiver<u64>,
    sent: HashMap<Uuid, (Arc<ScanHandle>, u64)>,
    since: DateTime<Utc>,
}

impl ProgressSubscriber {
    pub fn new(reporter: Arc<ScanReporter>, filter: ScanFilter) -> Self {
        let mut generation = reporter.generation();
        generation.mark_unchanged();
        ProgressSubscriber {
            reporter,
            filter,
            generation,
            sent: HashMap::new(),
            since: Utc::now(),
        }
    }

    /// The current state of every matching active scan (the snapshot a new or reconnecting
    /// client starts from). Marks them as sent.
    pub fn snapshot(&mut self) -> Vec<Arc<ScanProgress>> {
        let mut out = Vec::new();
        for h in self.reporter.handles() {
            let p = h.latest();
            if p.phase.is_terminal() || !self.filter.matches(&p) {
                continue;
            }
            self.sent
                .insert(h.request_id(), (Arc::clone(&h), h.version()));
            out.push(p);
        }
        out.sort_by_key(|p| p.scan.started_at);
        out
    }

    /// Wait until something matching changed, then return the latest snapshot of each changed
    /// scan. `None` when the reporter is gone.
    pub async fn next_updates(&mut self) -> Option<Vec<Arc<ScanProgress>>> {
        loop {
            self.generation.changed().await.ok()?;
            let updates = self.collect();
            if !updates.is_empty() {
                return Some(updates);
            }
        }
    }

    fn collect(&mut self) -> Vec<Arc<ScanProgress>> {
        let mut out = Vec::new();
        for h in self.reporter.handles() {
            let version = h.version();
            let p = h.latest();
            match self.sent.get(&h.request_id()) {
                Some((_, v)) if *v >= version => continue,
                Some(_) => {}
                None => {
                    // A scan this subscriber never saw: send it unless it ended before we
                    // subscribed (then it is history, not news).
                    if !self.filter.matches(&p) || p.finished_at.is_some_and(|f| f < self.since) {
                        continue;
                    }
                }
            }
            self.sent.insert(h.request_id(), (Arc::clone(&h), version));
            out.push(p);
        }
        // Scans that ended and were sent in their final state need no more tracking.
        self.sent
            .retain(|_, (h, v)| !(h.phase().is_terminal() && *v >= h.version()));
        out.sort_by_key(|p| p.scan.started_at);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::counters::ScanCounters;
    use coral_proto::ScanInfo;
    use coral_proto::{ScanMode, ScanPhase, ScanTrigger};

    fn info(library_id: i64) -> ScanInfo {
        ScanInfo {
            request_id: Uuid::new_v4(),
            library_id,
            library_path: "/music".into(),
            path: None,
            trigger: ScanTrigger::FileSystemEvent,
            mode: ScanMode::Incremental,
            started_at: Utc::now(),
            resumed: false,
        }
    }

    #[tokio::test]
    async fn snapshot_then_latest_state_only() {
        let r = ScanReporter::new();
        let a = r.register(info(1), ScanPhase::Queued);
        let _other = r.register(info(2), ScanPhase::Queued);
        let mut sub = ProgressSubscriber::new(
            Arc::clone(&r),
            ScanFilter {
                library_id: Some(1),
                request_id: None,
            },
        );
        let snap = sub.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].scan.request_id, a.request_id());

        // Many changes while the subscriber is not looking: it gets only the latest.
        a.counters().set_tracks_expected(100);
        r.set_phase(&a, ScanPhase::Indexing);
        for _ in 0..50 {
            ScanCounters::add(&a.counters().tracks_indexed, 2);
            r.publish(&a);
        }
        let updates = sub.next_updates().await.expect("reporter alive");
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].counts.tracks_indexed, 100);
        assert_eq!(updates[0].indexing_percent, Some(100.0));

        r.finish(&a, ScanPhase::Completed, None);
        let updates = sub.next_updates().await.expect("reporter alive");
        assert_eq!(updates[0].phase, ScanPhase::Completed);
        assert!(
            sub.sent.is_empty(),
            "finished scans are forgotten once sent"
        );
    }

    #[tokio::test]
    async fn new_scans_reach_existing_subscribers() {
        let r = ScanReporter::new();
        let mut sub = ProgressSubscriber::new(Arc::clone(&r), ScanFilter::default());
        assert!(sub.snapshot().is_empty());
        let h = r.register(info(3), ScanPhase::Queued);
        let updates = sub.next_updates().await.expect("reporter alive");
        assert_eq!(updates[0].scan.request_id, h.request_id());
        assert_eq!(updates[0].scan.trigger, ScanTrigger::FileSystemEvent);
    }
}
