//! The status line under systemd (`STATUS=`, shown by `systemctl status corald`): what runs,
//! how far it is, and the track count when idle.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{self, health::DbHealth};
use crate::progress::ScanReporter;
use crate::systemd::Notifier;

/// Keeps `STATUS=` current: at once when a scan changes phase, at most every 250 ms while
/// scans run, and every 30 s when idle (the track count can change through `library.remove`).
#[derive(Clone)]
pub(super) struct StatusReporter {
    pub notifier: Notifier,
    pub reporter: Arc<ScanReporter>,
    pub pool: sqlx::PgPool,
    pub db: Arc<DbHealth>,
}

impl StatusReporter {
    /// The current line; `count` re-counts the tracks (an idle line needs the count).
    pub(super) async fn line(&self, count: bool) -> String {
        let active = self.reporter.active();
        let available = self.db.is_available();
        let tracks = if available
            && count
            && active
                .iter()
                .all(|p| p.phase == coral_proto::ScanPhase::Queued)
        {
            tokio::time::timeout(Duration::from_secs(1), db::tracks::count(&self.pool))
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        let line = crate::systemd::status_line(&active, tracks);
        if available {
            line
        } else {
            format!("database unavailable, retrying · {line}")
        }
    }

    pub(super) async fn run(self, stop: CancellationToken) {
        let mut generation = self.reporter.generation();
        let mut last = String::new();
        let mut last_count = std::time::Instant::now();
        let mut was_busy = true; // count once at the start
        loop {
            let busy = self
                .reporter
                .active()
                .iter()
                .any(|p| p.phase != coral_proto::ScanPhase::Queued);
            // Count the tracks when a scan just ended and every 30 s while idle; otherwise keep
            // the idle line's previous count.
            let recount = !busy && (was_busy || last_count.elapsed() >= Duration::from_secs(30));
            // An outage starting or ending changes the line too.
            let outage_shown = last.starts_with("database unavailable");
            let outage_changed = self.db.is_available() == outage_shown;
            let line = if busy || recount || outage_changed {
                if recount {
                    last_count = std::time::Instant::now();
                }
                self.line(true).await
            } else {
                last.clone()
            };
            was_busy = busy;
            let outage = line.starts_with("database unavailable");
            if line != last {
                self.notifier.status(&line);
                last = line;
            }
            let wait = if busy {
                Duration::from_millis(250)
            } else if outage || !self.db.is_available() {
                Duration::from_secs(1) // show the outage and its end promptly
            } else {
                Duration::from_secs(30)
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = generation.changed() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
