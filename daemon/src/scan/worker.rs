//! The ScanWorker: drains the scan channel one job at a time, bumping its heartbeat while it
//! waits, and runs each job through its phases (see [`super::job`]: discover, probe, store);
//! a job's last phase, embedding, runs as a task of its own beside the next jobs, and the
//! worker ends the job and persists its final state when that task is done.
//!
//! Safety rule (see [`super::discover`]): when the library root (or target directory) is
//! missing, unreadable or suddenly empty, or a directory below it cannot be read, nothing there
//! is deleted.

use std::sync::Arc;

use coral_proto::ScanPhase;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::job::ScanRun;
pub use super::job::{ScanFailure, ScanOutcome};
use super::queue::{ScanJob, ScanQueue};
use crate::db::health::DbHealth;
use crate::liveness::Heartbeat;
use crate::progress::{ScanHandle, ScanReporter};

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
            r = ScanRun::new(self, job).run() => r,
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
                Ok(()) => {
                    // Complete under the active model now? Then it serves this library, and
                    // the library's vectors of earlier models go (before the job ends).
                    let info = handle.info();
                    let covered = crate::embed::serving::covers_library(info.trigger);
                    embedder.library_embedded(info.library_id, covered).await;
                    Ok(outcome)
                }
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
            indexed = p.counts.tracks_indexed,
            unchanged = p.counts.tracks_unchanged,
            removed = p.counts.tracks_removed,
            failed = p.counts.tracks_failed,
            embedded = p.counts.embeddings_done,
            "scan finished"
        );
        self.persist(h, stop).await;
    }

    /// Save the scan's state, waiting for the database if it is down (until `cancel`).
    pub(super) async fn persist(&self, h: &ScanHandle, cancel: &CancellationToken) {
        crate::progress::persist::save_waiting(
            &self.pool,
            &self.db,
            h,
            cancel,
            Some(&self.heartbeat),
        )
        .await;
    }
}
