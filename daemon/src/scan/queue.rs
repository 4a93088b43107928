//! The scan channel: a bounded queue of `ScanJob`s fed by the RPC API, library registration and
//! the watcher, drained by the ScanWorker. A job for a library and subtree that is already
//! waiting (or covered by a waiting whole-library job) is merged into it instead of queued twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use coral_proto::{ScanInfo, ScanMode, ScanPhase, ScanTrigger};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::progress::{ScanHandle, ScanReporter};

/// One unit of indexing work.
#[derive(Debug, Clone)]
pub struct ScanJob {
    pub library_id: i64,
    pub library_root: PathBuf,
    /// Subtree of a path-targeted scan, relative to the root; `None` for the whole library.
    pub subdir: Option<PathBuf>,
    pub trigger: ScanTrigger,
    pub handle: Arc<ScanHandle>,
}

impl ScanJob {
    pub fn request_id(&self) -> Uuid {
        self.handle.request_id()
    }

    pub fn mode(&self) -> ScanMode {
        self.handle.mode()
    }
}

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct ScanRequest {
    pub library_id: i64,
    pub library_root: PathBuf,
    pub subdir: Option<PathBuf>,
    pub mode: ScanMode,
    pub trigger: ScanTrigger,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the scan queue is full ({0} jobs waiting); try again when some have run")]
    Full(usize),
    #[error("corald is shutting down")]
    Closed,
}

type PendingKey = (i64, Option<PathBuf>);

/// The sending side of the scan channel, shared by everything that queues scans.
pub struct ScanQueue {
    tx: mpsc::Sender<ScanJob>,
    pending: Mutex<HashMap<PendingKey, Arc<ScanHandle>>>,
    reporter: Arc<ScanReporter>,
    pool: PgPool,
    capacity: usize,
}

impl ScanQueue {
    pub fn new(
        capacity: usize,
        reporter: Arc<ScanReporter>,
        pool: PgPool,
    ) -> (Arc<Self>, mpsc::Receiver<ScanJob>) {
        let (tx, rx) = mpsc::channel(capacity);
        let q = ScanQueue {
            tx,
            pending: Mutex::new(HashMap::new()),
            reporter,
            pool,
            capacity,
        };
        (Arc::new(q), rx)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<PendingKey, Arc<ScanHandle>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Jobs waiting to run.
    pub fn waiting(&self) -> usize {
        self.pending().len()
    }

    /// Queue a scan without waiting. Returns the job's handle and whether it was merged into a
    /// job already waiting.
    pub async fn submit(&self, req: ScanRequest) -> Result<(Arc<ScanHandle>, bool), QueueError> {
        self.enqueue(req, Uuid::new_v4(), false).await
    }

    /// Queue a scan that was interrupted by a restart, keeping its request id. Never merged:
    /// every interrupted scan runs to its own end.
    pub async fn resume(
        &self,
        req: ScanRequest,
        request_id: Uuid,
    ) -> Result<Arc<ScanHandle>, QueueError> {
        Ok(self.enqueue(req, request_id, true).await?.0)
    }

    async fn enqueue(
        &self,
        req: ScanRequest,
        request_id: Uuid,
        resumed: bool,
    ) -> Result<(Arc<ScanHandle>, bool), QueueError> {
        let handle = {
            let mut pending = self.pending();
            let key = (req.library_id, req.subdir.clone());
            let whole = (req.library_id, None);
            // A re-embed job neither absorbs scans nor is absorbed by one: a scan reads the
            // disk, a re-embed job does not; it is kept out of the merge table.
            let mergeable = req.trigger != ScanTrigger::ModelChange;
            let existing = pending
                .get(&key)
                .or_else(|| pending.get(&whole))
                .filter(|h| mergeable && !resumed && !h.phase().is_terminal())
                .cloned();
            if let Some(h) = existing {
                h.upgrade_mode(req.mode);
                return Ok((h, true));
            }
            let info = ScanInfo {
                request_id,
                library_id: req.library_id,
                library_path: req.library_root.to_string_lossy().into_owned(),
                path: req
                    .subdir
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                trigger: req.trigger,
                mode: req.mode,
                started_at: Utc::now(),
                resumed,
            };
            let job_handle = self.reporter.register(info, ScanPhase::Queued);
            let job = ScanJob {
                library_id: req.library_id,
                library_root: req.library_root,
                subdir: req.subdir,
                trigger: req.trigger,
                handle: Arc::clone(&job_handle),
            };
            match self.tx.try_send(job) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.reporter.finish(
                        &job_handle,
                        ScanPhase::Failed,
                        Some("the scan queue was full".into()),
                    );
                    return Err(QueueError::Full(self.capacity));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(QueueError::Closed),
            }
            if mergeable {
                pending.insert(key, Arc::clone(&job_handle));
            }
            job_handle
        };
        crate::progress::persist::save_once(&self.pool, &handle, "queued").await;
        Ok((handle, false))
    }

    /// The worker took this job: it no longer absorbs new requests.
    pub fn started(&self, job: &ScanJob) {
        let mut pending = self.pending();
        let key = (job.library_id, job.subdir.clone());
        if pending
            .get(&key)
            .is_some_and(|h| h.request_id() == job.request_id())
        {
            pending.remove(&key);
        }
    }

    /// Drop a waiting job from the merge table (it was cancelled).
    pub fn forget(&self, request_id: Uuid) {
        self.pending().retain(|_, h| h.request_id() != request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(trigger: ScanTrigger) -> ScanRequest {
        ScanRequest {
            library_id: 1,
            library_root: PathBuf::from("/music"),
            subdir: None,
            mode: ScanMode::Incremental,
            trigger,
        }
    }

    #[tokio::test]
    async fn a_re_embed_job_and_a_scan_of_the_same_library_stay_two_jobs() {
        // Nothing listens there: the queued states are not persisted, which the queue shrugs off.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let (queue, mut rx) = ScanQueue::new(8, ScanReporter::new(), pool);
        let (reembed, merged) = queue
            .submit(request(ScanTrigger::ModelChange))
            .await
            .expect("queued");
        assert!(!merged);
        // A scan asked while the re-embed job waits is a job of its own (it reads the disk)…
        let (scan, merged) = queue
            .submit(request(ScanTrigger::Manual))
            .await
            .expect("queued");
        assert!(!merged);
        assert_ne!(scan.request_id(), reembed.request_id());
        // …and later scans merge into that scan, never into the re-embed job.
        let (again, merged) = queue
            .submit(request(ScanTrigger::FileSystemEvent))
            .await
            .expect("queued");
        assert!(merged);
        assert_eq!(again.request_id(), scan.request_id());
        // A second re-embed job is not absorbed by the waiting scan either.
        let (second, merged) = queue
            .submit(request(ScanTrigger::ModelChange))
            .await
            .expect("queued");
        assert!(!merged);
        assert_ne!(second.request_id(), scan.request_id());
        let mut triggers = Vec::new();
        while let Ok(job) = rx.try_recv() {
            triggers.push(job.trigger);
        }
        assert_eq!(
            triggers,
            [
                ScanTrigger::ModelChange,
                ScanTrigger::Manual,
                ScanTrigger::ModelChange
            ]
        );
    }
}
