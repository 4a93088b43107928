//! The bridge's one connection to corald: connect and reconnect with back-off, one upstream
//! `scan.subscribe` whose updates fan out to every browser subscription, a cache of the latest
//! state of each active scan (the snapshot new subscribers get), and the connection state that
//! `bridge.status` announces.
//!
//! Every update gets a bridge-wide sequence number; subscribers use it to drop stale copies (the
//! same state can arrive through the snapshot and the broadcast).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use coral_proto::client::connect;
use coral_proto::{CoralApiClient, ScanProgress, codes};
use jsonrpsee::async_client::Client;
use jsonrpsee::core::client::{Error as ClientError, Subscription};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

/// First retry delay after corald went away; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Updates buffered per subscriber before it lags (and resynchronises from the cache).
const BROADCAST_CAPACITY: usize = 256;
/// Finished scans remembered, so a lagging subscriber still learns how they ended.
const RECENT_FINISHED: usize = 64;

/// The state of the upstream connection: the `bridge.status` notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeStatus {
    /// True while the bridge holds a working connection to corald.
    pub connected: bool,
    /// Why the bridge is not connected (null while connected).
    pub error: Option<String>,
}

/// One scan state as the bridge saw it, with its sequence number.
#[derive(Debug, Clone)]
pub struct Update {
    pub seq: u64,
    pub progress: Arc<ScanProgress>,
}

#[derive(Default)]
struct Cache {
    seq: u64,
    active: HashMap<Uuid, Update>,
    finished: VecDeque<Update>,
}

/// Shared by the reconnect task and every browser connection.
pub struct Upstream {
    socket: PathBuf,
    client: RwLock<Option<Arc<Client>>>,
    status: watch::Sender<BridgeStatus>,
    updates: broadcast::Sender<Update>,
    cache: Mutex<Cache>,
}

/// Why a forwarded call failed before corald answered it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("corald is not reachable ({0}); the bridge keeps trying to reconnect")]
    Unavailable(String),
}

impl Upstream {
    pub fn new(socket: PathBuf) -> Arc<Upstream> {
        let (status, _) = watch::channel(BridgeStatus {
            connected: false,
            error: Some("connecting to corald".to_owned()),
        });
        let (updates, _) = broadcast::channel(BROADCAST_CAPACITY);
        Arc::new(Upstream {
            socket,
            client: RwLock::new(None),
            status,
            updates,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// The current connection, or why there is none.
    pub fn client(&self) -> Result<Arc<Client>, UpstreamError> {
        let guard = self.client.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(c) if c.is_connected() => Ok(Arc::clone(c)),
            _ => Err(UpstreamError::Unavailable(
                self.status
                    .borrow()
                    .error
                    .clone()
                    .unwrap_or_else(|| "connection lost".to_owned()),
            )),
        }
    }

    pub fn status(&self) -> watch::Receiver<BridgeStatus> {
        self.status.subscribe()
    }

    pub fn subscribe_updates(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    /// Latest state of every active scan, and (with `finished_after`) of the scans that ended
    /// after that sequence number.
    pub fn snapshot(&self, finished_after: Option<u64>) -> Vec<Update> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Update> = cache.active.values().cloned().collect();
        if let Some(after) = finished_after {
            out.extend(cache.finished.iter().filter(|u| u.seq > after).cloned());
        }
        out.sort_by_key(|u| u.seq);
        out
    }

    /// Record a state and send it to every subscriber. Older copies of a state already seen
    /// (by `updated_at`) and anything about a scan that already finished are dropped.
    fn publish(&self, p: ScanProgress) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache
            .finished
            .iter()
            .any(|u| u.progress.scan.request_id == p.scan.request_id)
        {
            return;
        }
        if let Some(old) = cache.active.get(&p.scan.request_id)
            && old.progress.updated_at > p.updated_at
        {
            return;
        }
        cache.seq += 1;
        let update = Update {
            seq: cache.seq,
            progress: Arc::new(p),
        };
        let id = update.progress.scan.request_id;
        if update.progress.phase.is_terminal() {
            cache.active.remove(&id);
            if cache.finished.len() == RECENT_FINISHED {
                cache.finished.pop_front();
            }
            cache.finished.push_back(update.clone());
        } else {
            cache.active.insert(id, update.clone());
        }
        // Sent under the lock, so the broadcast order is the sequence order.
        let _ = self.updates.send(update);
    }

    fn forget(&self, id: Uuid) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.active.remove(&id);
    }

    fn set_status(&self, connected: bool, error: Option<String>) {
        let status = BridgeStatus { connected, error };
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    fn set_client(&self, client: Option<Arc<Client>>) {
        *self.client.write().unwrap_or_else(PoisonError::into_inner) = client;
    }

    /// Keep a connection to corald for as long as the bridge runs.
    pub async fn run(self: Arc<Self>) {
        let mut delay = MIN_BACKOFF;
        loop {
            match self.connect_once().await {
                Ok((client, sub)) => {
                    delay = MIN_BACKOFF;
                    eprintln!("coralctl bridge: connected to corald");
                    self.forward(sub).await;
                    self.set_client(None);
                    drop(client);
                    self.set_status(false, Some("the connection to corald was lost".to_owned()));
                    eprintln!("coralctl bridge: lost the connection to corald; reconnecting");
                }
                Err(e) => {
                    self.set_client(None);
                    self.set_status(false, Some(e));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Connect, subscribe, bring the cache up to date and announce the connection.
    async fn connect_once(&self) -> Result<(Arc<Client>, Subscription<ScanProgress>), String> {
        let client = Arc::new(connect(&self.socket).await.map_err(|e| e.to_string())?);
        let sub = client
            .scan_subscribe(None)
            .await
            .map_err(|e| format!("subscribing to scan progress failed: {e}"))?;
        self.set_client(Some(Arc::clone(&client)));
        // What changed while the bridge was away: the subscription's own snapshot covers the
        // active scans; scans that were active before and are not any more ended meanwhile.
        let active = client
            .scan_active()
            .await
            .map_err(|e| format!("listing active scans failed: {e}"))?;
        let before: Vec<Uuid> = self
            .snapshot(None)
            .iter()
            .map(|u| u.progress.scan.request_id)
            .collect();
        let now_active: HashSet<Uuid> = active.iter().map(|p| p.scan.request_id).collect();
        for p in active {
            self.publish(p);
        }
        for id in before.into_iter().filter(|id| !now_active.contains(id)) {
            match client.scan_get(id).await {
                Ok(p) => self.publish(p),
                Err(ClientError::Call(e)) if e.code() == codes::SCAN_NOT_FOUND => self.forget(id),
                Err(_) => {}
            }
        }
        self.set_status(true, None);
        Ok((client, sub))
    }

    /// Pass every upstream update on until the connection ends.
    async fn forward(&self, mut sub: Subscription<ScanProgress>) {
        while let Some(item) = sub.next().await {
            match item {
                Ok(p) => self.publish(p),
                Err(e) => eprintln!("coralctl bridge: ignoring an unreadable progress update: {e}"),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::{Duration as ChronoDuration, Utc};
    use coral_proto::{ScanCounts, ScanMode, ScanPhase, ScanTrigger};

    pub(crate) fn progress(id: Uuid, phase: ScanPhase, indexed: u64) -> ScanProgress {
        let now = Utc::now() + ChronoDuration::milliseconds(indexed as i64);
        ScanProgress {
            counts: ScanCounts {
                files_discovered: 100,
                tracks_expected: Some(100),
                tracks_indexed: indexed,
                ..ScanCounts::default()
            },
            indexing_percent: Some(indexed as f64),
            ..ScanProgress::starting(
                id,
                1,
                "/music".to_owned(),
                ScanTrigger::Manual,
                ScanMode::Incremental,
                phase,
                now,
            )
        }
    }

    #[test]
    fn cache_keeps_latest_active_and_drops_stale_or_finished() {
        let up = Upstream::new(PathBuf::from("/nonexistent"));
        let mut rx = up.subscribe_updates();
        let id = Uuid::new_v4();
        up.publish(progress(id, ScanPhase::Indexing, 10));
        up.publish(progress(id, ScanPhase::Indexing, 50));
        up.publish(progress(id, ScanPhase::Indexing, 20)); // older: dropped
        let snap = up.snapshot(None);
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].progress.counts.tracks_indexed, 50);
        up.publish(progress(id, ScanPhase::Completed, 100));
        assert!(up.snapshot(None).is_empty());
        assert_eq!(
            up.snapshot(Some(0)).len(),
            1,
            "finished scans are remembered"
        );
        up.publish(progress(id, ScanPhase::Indexing, 200)); // after the end: dropped
        assert!(up.snapshot(None).is_empty());
        let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|u| u.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn no_client_means_unavailable_with_the_reason() {
        let up = Upstream::new(PathBuf::from("/nonexistent"));
        up.set_status(false, Some("corald is not running".to_owned()));
        let err = up.client().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("corald is not running"), "{err}");
    }
}
