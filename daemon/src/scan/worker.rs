//! The ScanWorker: drains the scan channel one job at a time and runs each through its phases —
//! discover (walk + compare with the database), index (probe changed files in parallel while the
//! previous batch is written), remove vanished files — reporting every step to the ScanReporter.
//! A job's last phase, embedding, runs as a task beside the next jobs.
//!
//! Safety rule: when the library root (or target directory) is missing, unreadable or suddenly
//! empty, or a directory below it cannot be read, nothing there is deleted.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use coral_proto::{ScanMode, ScanPhase};
use rayon::prelude::*;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::phase_1_walk::{self, FoundFile, WalkError, WalkObserver};
use super::phase_2_probe;
use super::phase_3_store;
use super::queue::{ScanJob, ScanQueue};
use crate::db::health::{self, DbHealth, RetryError};
use crate::db::scan_errors::ErrorRow;
use crate::db::{scan_errors, tracks};
use crate::liveness::Heartbeat;
use crate::progress::{ScanCounters, ScanHandle, ScanReporter};

/// Why a scan did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ScanFailure {
    #[error("cancelled")]
    Cancelled,
    #[error("library root unavailable: {0}; nothing was deleted")]
    RootUnavailable(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("embedding failed: {0}")]
    Embedding(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<RetryError> for ScanFailure {
    fn from(e: RetryError) -> Self {
        match e {
            RetryError::Cancelled => ScanFailure::Cancelled,
            RetryError::Sql(e) => ScanFailure::Database(e),
        }
    }
}

/// How a scan's indexing ended: warnings for the progress object's `error` field, and the
/// tracks left to embed (`None` without embeddings).
#[derive(Debug, Default)]
pub struct ScanOutcome {
    pub warnings: Vec<String>,
    pub embed: Option<Vec<crate::embed::EmbedTarget>>,
}

/// Runs scan jobs.
#[derive(Clone)]
pub struct ScanWorker {
    pub pool: PgPool,
    pub reporter: Arc<ScanReporter>,
    pub queue: Arc<ScanQueue>,
    pub threads: Arc<rayon::ThreadPool>,
    pub batch_size: usize,
    /// Bumped while waiting for jobs (every `idle_beat`) and on every unit of progress; the
    /// systemd watchdog stops pinging when it goes quiet.
    pub heartbeat: Arc<Heartbeat>,
    pub idle_beat: std::time::Duration,
    /// The embedding pipeline, when embeddings are enabled and the model loaded.
    pub embedder: Option<crate::embed::Embedder>,
    /// Database reachability: every write is retried through it while the database is down,
    /// so an outage delays a scan but neither fails it nor loses a batch.
    pub db: Arc<DbHealth>,
}

struct Observer<'a>(&'a ScanHandle, &'a Heartbeat);

impl WalkObserver for Observer<'_> {
    fn discovered(&self, n: u64) {
        ScanCounters::add(&self.0.counters().files_discovered, n);
        self.1.beat();
    }
    fn cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

impl ScanWorker {
    /// Take jobs until `stop` is cancelled or the channel closes.
    ///
    /// A job holds the worker while it indexes. Its embedding then runs as a task of its own,
    /// beside the next jobs (several scans may be embedding at once, sharing the pipeline), and
    /// the job ends when its last track is embedded, skipped or failed. So a file copied into a
    /// library is indexed and searchable while a long embedding backlog runs.
    pub async fn run(self, mut rx: mpsc::Receiver<ScanJob>, stop: CancellationToken) {
        let mut idle = tokio::time::interval(self.idle_beat);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut embedding: JoinSet<()> = JoinSet::new();
        loop {
            self.heartbeat.beat();
            let job = tokio::select! {
                _ = stop.cancelled() => break,
                _ = idle.tick() => continue,
                Some(_) = embedding.join_next(), if !embedding.is_empty() => continue,
                job = rx.recv() => match job { Some(j) => j, None => break },
            };
            if crate::test_hooks::wedge_worker_requested(&job.library_root) {
                // Test builds only: a worker stuck on a job, for the watchdog test. It makes
                // no progress and no heartbeats until shutdown.
                tracing::warn!(library = %job.library_root.display(), "CORALD_TEST_WEDGE_WORKER: wedging the scan worker");
                stop.cancelled().await;
                break;
            }
            self.queue.started(&job);
            if job.handle.phase().is_terminal() {
                continue; // cancelled while it waited
            }
            let span = tracing::info_span!(
                "scan",
                request_id = %job.request_id(),
                library = %job.library_root.display()
            );
            if let Some(embed) = self.run_job(&job, &stop).instrument(span.clone()).await {
                embedding.spawn(embed.instrument(span));
            }
        }
        // Shutdown: the embedding tasks persist their scans, which resume at the next start.
        while embedding.join_next().await.is_some() {}
    }

    /// Index one job; then either end it and persist the final state, or, when its tracks are
    /// to be embedded, return the task that embeds them and ends it.
    pub async fn run_job(
        &self,
        job: &ScanJob,
        stop: &CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let h = &job.handle;
        // A daemon shutdown interrupts the scan without ending it: it stays unfinished in the
        // database and resumes at the next start.
        let result = tokio::select! {
            r = self.scan(job) => r,
            _ = stop.cancelled() => {
                tracing::info!("shutting down: scan will resume at next start");
                self.persist(h, stop).await;
                return None;
            }
        };
        let (outcome, targets, embedder) = match (result, &self.embedder) {
            (
                Ok(ScanOutcome {
                    warnings,
                    embed: Some(targets),
                }),
                Some(e),
            ) => (
                ScanOutcome {
                    warnings,
                    embed: None,
                },
                targets,
                e.clone(),
            ),
            (result, _) => {
                self.finish(h, result, stop).await;
                return None;
            }
        };
        let worker = self.clone();
        let handle = Arc::clone(h);
        let stop = stop.clone();
        Some(async move {
            let embedded = tokio::select! {
                r = embedder.embed_for_scan(Arc::clone(&handle), targets) => r,
                _ = stop.cancelled() => {
                    tracing::info!("shutting down: the scan's embedding will resume at next start");
                    worker.persist(&handle, &stop).await;
                    return;
                }
            };
            let result = match embedded {
                Ok(()) => Ok(outcome),
                Err(crate::embed::EmbedError::Cancelled) => Err(ScanFailure::Cancelled),
                Err(crate::embed::EmbedError::Stopped) if stop.is_cancelled() => {
                    worker.persist(&handle, &stop).await;
                    return;
                }
                Err(e) => Err(ScanFailure::Embedding(e.to_string())),
            };
            worker.finish(&handle, result, &stop).await;
        })
    }

    /// End a scan as `result` says and persist its final state.
    async fn finish(
        &self,
        h: &ScanHandle,
        result: Result<ScanOutcome, ScanFailure>,
        stop: &CancellationToken,
    ) {
        match result {
            Ok(outcome) => {
                let warning = (!outcome.warnings.is_empty()).then(|| outcome.warnings.join("; "));
                if let Some(w) = &warning {
                    tracing::warn!(warning = %w, "scan completed with warnings");
                }
                self.reporter.finish(h, ScanPhase::Completed, warning);
            }
            Err(ScanFailure::Cancelled) => {
                self.reporter
                    .finish(h, ScanPhase::Cancelled, Some("cancelled by request".into()));
            }
            Err(e) => {
                tracing::error!(error = %e, "scan failed");
                self.reporter
                    .finish(h, ScanPhase::Failed, Some(e.to_string()));
            }
        }
        let p = h.latest();
        tracing::info!(
            phase = p.phase.as_str(),
            indexed = p.tracks_indexed,
            unchanged = p.tracks_unchanged,
            removed = p.tracks_removed,
            failed = p.tracks_failed,
            embedded = p.embeddings_done,
            "scan finished"
        );
        self.persist(h, stop).await;
    }

    /// Save the scan's state, waiting for the database if it is down (until `cancel`).
    async fn persist(&self, h: &ScanHandle, cancel: &CancellationToken) {
        crate::progress::persist::save_waiting(
            &self.pool,
            &self.db,
            h,
            cancel,
            Some(&self.heartbeat),
        )
        .await;
    }

    /// Run a database operation of scan `h`, retried while the database is unavailable.
    async fn with_db<T, F, Fut>(&self, h: &ScanHandle, what: &str, op: F) -> Result<T, ScanFailure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        Ok(health::retry(&self.db, what, h.cancel_token(), Some(&self.heartbeat), op).await?)
    }

    async fn set_phase(&self, h: &ScanHandle, phase: ScanPhase) {
        self.heartbeat.beat();
        tracing::debug!(phase = phase.as_str(), "scan phase");
        self.reporter.set_phase(h, phase);
        self.persist(h, h.cancel_token()).await;
    }

    fn check_cancel(h: &ScanHandle) -> Result<(), ScanFailure> {
        if h.is_cancelled() {
            Err(ScanFailure::Cancelled)
        } else {
            Ok(())
        }
    }

    async fn scan(&self, job: &ScanJob) -> Result<ScanOutcome, ScanFailure> {
        let h = &job.handle;
        let request_id = job.request_id();
        let mode = job.mode();
        let mut outcome = ScanOutcome::default();
        // Counters are recounted from the disk and the database (a resumed scan too), except
        // removals, which are done once and persisted with the delete.
        let removed_before = h
            .counters()
            .tracks_removed
            .load(std::sync::atomic::Ordering::Relaxed);
        self.set_phase(h, ScanPhase::Discovering).await;

        let subdir_bytes = job
            .subdir
            .as_ref()
            .map(|s| s.as_os_str().as_bytes().to_vec());
        let existing = self
            .with_db(h, "read tracks", || {
                tracks::existing(&self.pool, job.library_id, subdir_bytes.as_deref())
            })
            .await?;
        let known_errors = self
            .with_db(h, "read scan errors", || {
                scan_errors::existing(&self.pool, job.library_id, subdir_bytes.as_deref())
            })
            .await?;
        Self::check_cancel(h)?;

        let walk_result = {
            let root = job.library_root.clone();
            let subdir = job.subdir.clone();
            let handle = Arc::clone(h);
            let threads = Arc::clone(&self.threads);
            let hb = Arc::clone(&self.heartbeat);
            // The scan's span (request_id, library) follows the work onto blocking threads.
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                threads.install(|| {
                    phase_1_walk::walk(&root, subdir.as_deref(), &Observer(&handle, &hb))
                })
            })
            .await
            .map_err(|e| ScanFailure::Internal(format!("walk task failed: {e}")))?
        };
        let walked = match walk_result {
            Ok(w) => w,
            Err(WalkError::Cancelled) => return Err(ScanFailure::Cancelled),
            Err(e) => return Err(ScanFailure::RootUnavailable(e.to_string())),
        };
        Self::check_cancel(h)?;

        // Compare with the database.
        let by_path: HashMap<&[u8], &tracks::ExistingTrack> = existing
            .iter()
            .map(|t| (t.rel_path.as_slice(), t))
            .collect();
        let errors_by_path: HashMap<&[u8], &scan_errors::ExistingError> = known_errors
            .iter()
            .map(|e| (e.rel_path.as_slice(), e))
            .collect();
        let mut to_probe: Vec<FoundFile> = Vec::new();
        let (mut unchanged, mut already_indexed, mut known_bad) = (0u64, 0u64, 0u64);
        for f in &walked.files {
            let size = i64::try_from(f.size).unwrap_or(i64::MAX);
            if let Some(t) = by_path.get(f.rel_path.as_slice())
                && t.size == size
                && t.mtime_ns == f.mtime_ns
            {
                if t.last_scan_id == Some(request_id) {
                    already_indexed += 1; // this scan wrote it before a restart
                    continue;
                }
                if mode == ScanMode::Incremental {
                    unchanged += 1;
                    continue;
                }
            }
            if let Some(e) = errors_by_path.get(f.rel_path.as_slice())
                && e.size == size
                && e.mtime_ns == f.mtime_ns
                && (mode == ScanMode::Incremental || e.request_id == Some(request_id))
            {
                known_bad += 1; // unchanged and still bad: not re-read
                continue;
            }
            to_probe.push(f.clone());
        }
        let file_issues: Vec<_> = walked.issues.iter().filter(|i| !i.is_dir).collect();
        let dir_issues: Vec<_> = walked.issues.iter().filter(|i| i.is_dir).collect();

        // What vanished, unless the tree looks unmounted or a directory was unreadable.
        let found: std::collections::HashSet<&[u8]> =
            walked.files.iter().map(|f| f.rel_path.as_slice()).collect();
        let under_unreadable = |p: &[u8]| {
            walked
                .unreadable_dirs
                .iter()
                .any(|d| d.is_empty() || (p.starts_with(d) && p.get(d.len()) == Some(&b'/')))
        };
        let suddenly_empty =
            walked.files.is_empty() && walked.issues.is_empty() && !existing.is_empty();
        let (vanished_ids, vanished_errors): (Vec<i64>, Vec<Vec<u8>>) = if suddenly_empty {
            let root = match &job.subdir {
                Some(s) => job.library_root.join(s),
                None => job.library_root.clone(),
            };
            outcome.warnings.push(format!(
                "{} is empty but {} tracks are indexed under it (unmounted disk?): nothing was deleted",
                root.display(),
                existing.len()
            ));
            (Vec::new(), Vec::new())
        } else {
            let ids = existing
                .iter()
                .filter(|t| {
                    !found.contains(t.rel_path.as_slice()) && !under_unreadable(&t.rel_path)
                })
                .map(|t| t.id)
                .collect();
            let issue_paths: std::collections::HashSet<&[u8]> = walked
                .issues
                .iter()
                .map(|i| i.rel_path.as_slice())
                .collect();
            let errs = known_errors
                .iter()
                .filter(|e| {
                    !found.contains(e.rel_path.as_slice())
                        && !issue_paths.contains(e.rel_path.as_slice())
                        && !under_unreadable(&e.rel_path)
                })
                .map(|e| e.rel_path.clone())
                .collect();
            (ids, errs)
        };
        if !dir_issues.is_empty() {
            outcome.warnings.push(format!(
                "{} director{} could not be read; nothing below {} was deleted",
                dir_issues.len(),
                if dir_issues.len() == 1 { "y" } else { "ies" },
                if dir_issues.len() == 1 { "it" } else { "them" },
            ));
        }

        let c = h.counters();
        c.set_tracks_expected((walked.files.len() + file_issues.len()) as u64);
        ScanCounters::add(&c.tracks_unchanged, unchanged);
        ScanCounters::add(&c.tracks_indexed, already_indexed);
        ScanCounters::add(&c.tracks_failed, known_bad);
        self.set_phase(h, ScanPhase::Indexing).await;

        // Walk issues (special files, unreadable dirs) are recorded like probe failures.
        if !walked.issues.is_empty() {
            let rows: Vec<ErrorRow> = walked
                .issues
                .iter()
                .map(|i| {
                    phase_3_store::error_row(
                        i.rel_path.clone(),
                        i.size,
                        i.mtime_ns,
                        "walk",
                        &i.message,
                    )
                })
                .collect();
            self.with_db(h, "write walk issues", || {
                phase_3_store::write_batch(&self.pool, job.library_id, request_id, &[], &rows)
            })
            .await?;
            ScanCounters::add(&c.tracks_failed, file_issues.len() as u64);
        }

        self.index(job, to_probe).await?;
        Self::check_cancel(h)?;

        if !vanished_ids.is_empty() || !vanished_errors.is_empty() {
            let removed = self
                .with_db(h, "delete vanished files", || {
                    phase_3_store::delete_vanished(
                        &self.pool,
                        job.library_id,
                        request_id,
                        &vanished_ids,
                        &vanished_errors,
                        removed_before,
                    )
                })
                .await?;
            ScanCounters::add(&c.tracks_removed, removed);
        }

        if self.embedder.is_some() {
            // Every track this scan wrote (before a restart too) is embedded, or found already
            // embedded from the same file and counted done without work. That runs beside the
            // next scans (see `run_job`).
            let targets = self
                .with_db(h, "list tracks to embed", || {
                    tracks::written_by_scan(&self.pool, job.library_id, request_id)
                })
                .await?
                .into_iter()
                .map(
                    |(track_id, rel_path, duration_ms)| crate::embed::EmbedTarget {
                        track_id,
                        path: job.library_root.join(OsStr::from_bytes(&rel_path)),
                        duration_ms,
                    },
                )
                .collect::<Vec<_>>();
            c.set_embeddings_expected(targets.len() as u64);
            self.set_phase(h, ScanPhase::Embedding).await;
            outcome.embed = Some(targets);
        }
        Ok(outcome)
    }

    /// Probe `files` on the rayon pool batch by batch while the previous batch is written.
    async fn index(&self, job: &ScanJob, files: Vec<FoundFile>) -> Result<(), ScanFailure> {
        if files.is_empty() {
            return Ok(());
        }
        let h = Arc::clone(&job.handle);
        let root = job.library_root.clone();
        let batch_size = self.batch_size;
        let threads = Arc::clone(&self.threads);
        let hb = Arc::clone(&self.heartbeat);
        let span = tracing::Span::current();
        let (tx, mut rx) = mpsc::channel::<(Vec<tracks::TrackRow>, Vec<ErrorRow>)>(2);
        let producer = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            for chunk in files.chunks(batch_size) {
                if h.is_cancelled() {
                    return;
                }
                let results: Vec<_> = threads.install(|| {
                    chunk
                        .par_iter()
                        .map(|f| {
                            let _in_scan = span.enter();
                            let path: PathBuf = root.join(OsStr::from_bytes(&f.rel_path));
                            let probed = phase_2_probe::probe_file(&path);
                            hb.beat();
                            (f, probed)
                        })
                        .collect()
                });
                let mut rows = Vec::with_capacity(results.len());
                let mut errors = Vec::new();
                for (f, r) in results {
                    match r {
                        Ok(p) => rows.push(phase_3_store::track_row(f, p)),
                        Err(e) => {
                            tracing::debug!(track_path = %root.join(OsStr::from_bytes(&f.rel_path)).display(), phase = "indexing", error = %e, "file not indexed");
                            errors.push(phase_3_store::probe_error_row(f, &e));
                        }
                    }
                }
                if tx.blocking_send((rows, errors)).is_err() {
                    return;
                }
            }
        });
        let c = job.handle.counters();
        let mut result = Ok(());
        while let Some((rows, errors)) = rx.recv().await {
            if job.handle.is_cancelled() {
                result = Err(ScanFailure::Cancelled);
                break;
            }
            // A batch that fails because the database is down is written again once it is
            // back: never dropped, and the scan does not fail for it.
            let written = match self
                .with_db(&job.handle, "write batch", || {
                    phase_3_store::write_batch(
                        &self.pool,
                        job.library_id,
                        job.request_id(),
                        &rows,
                        &errors,
                    )
                })
                .await
            {
                Ok(written) => written,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            crate::test_hooks::batch_pause().await;
            ScanCounters::add(&c.tracks_indexed, written.indexed);
            ScanCounters::add(&c.tracks_failed, written.failed);
            self.heartbeat.beat();
        }
        drop(rx);
        producer
            .await
            .map_err(|e| ScanFailure::Internal(format!("probe task failed: {e}")))?;
        result
    }
}
