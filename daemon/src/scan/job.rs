//! One scan job, its phases in order: discover (the database's rows under the scanned tree, the
//! walk, and their comparison: see [`super::discover`]), index (probe new and changed files on
//! the rayon pool batch by batch while the previous batch is stored), remove the rows of
//! vanished files, and hand the tracks the scan wrote over to the embedding phase, which the
//! worker runs as a task of its own. A re-embed job (trigger `model_change`) has only the last
//! step: its library's tracks lacking a vector of the active model. Every phase reports to the
//! ScanReporter; every database call is retried while the database is down.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coral_proto::{ScanMode, ScanPhase, ScanTrigger};
use rayon::prelude::*;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::discover::{self, Removal};
use super::phase_1_walk::{self, FoundFile, WalkObserver, WalkOutcome};
use super::phase_2_probe::{self, ProbeError, ProbedTrack};
use super::phase_3_store;
use super::queue::ScanJob;
use super::worker::ScanWorker;
use crate::db::health::{self, RetryError};
use crate::db::scan_errors::{self, ErrorRow, ExistingError};
use crate::db::tracks::{self, ExistingTrack, TrackRow};
use crate::embed::phase_5_store::LibraryScope;
use crate::embed::{EmbedError, EmbedTarget};
use crate::liveness::Heartbeat;
use crate::progress::{ScanCounters, ScanHandle};

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
    pub embed: Option<Vec<EmbedTarget>>,
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

/// Rows of one probed batch: tracks, and errors of the files that could not be read.
type Batch = (Vec<TrackRow>, Vec<ErrorRow>);

/// What the discover phase leaves to the later ones.
struct Discovered {
    walked: WalkOutcome,
    to_probe: Vec<FoundFile>,
    removal: Removal,
}

/// One job on the worker, from discovery to the hand-over to embedding.
pub(super) struct ScanRun<'a> {
    worker: &'a ScanWorker,
    job: &'a ScanJob,
    /// The job's mode, read once as the run starts.
    mode: ScanMode,
}

impl<'a> ScanRun<'a> {
    pub(super) fn new(worker: &'a ScanWorker, job: &'a ScanJob) -> Self {
        ScanRun {
            worker,
            job,
            mode: job.mode(),
        }
    }

    fn handle(&self) -> &ScanHandle {
        &self.job.handle
    }

    /// Run the phases in order: discover → index (probe + store) → remove vanished files →
    /// list the tracks to embed.
    pub(super) async fn run(self) -> Result<ScanOutcome, ScanFailure> {
        if self.job.trigger == ScanTrigger::ModelChange {
            return self.reembed().await;
        }
        let mut outcome = ScanOutcome::default();
        // Counters are recounted from the disk and the database (a resumed scan too), except
        // removals, which are done once and persisted with the delete.
        let removed_before = self
            .handle()
            .counters()
            .tracks_removed
            .load(std::sync::atomic::Ordering::Relaxed);
        self.set_phase(ScanPhase::Discovering).await;
        let found = self.discover(&mut outcome.warnings).await?;
        self.set_phase(ScanPhase::Indexing).await;
        self.record_walk_issues(&found.walked).await?;
        self.index(found.to_probe).await?;
        self.check_cancel()?;
        self.remove_vanished(&found.removal, removed_before).await?;
        if self.worker.embedder.is_some() {
            outcome.embed = Some(self.hand_over_to_embedding().await?);
        }
        Ok(outcome)
    }

    /// Discover: read what the database holds under the scanned tree, walk the tree, compare
    /// the two, and count what needs no work.
    async fn discover(&self, warnings: &mut Vec<String>) -> Result<Discovered, ScanFailure> {
        let (existing, known_errors) = self.read_database().await?;
        self.check_cancel()?;
        let walked = self.walk().await?;
        self.check_cancel()?;

        let compared = discover::compare(
            &walked.files,
            &existing,
            &known_errors,
            self.mode,
            self.job.request_id(),
        );
        let removal = discover::removal(&walked, &existing, &known_errors);
        warnings.extend(discover::warnings(&removal, &walked, &self.scanned_dir()));

        let c = self.handle().counters();
        c.set_tracks_expected(walked.files.len() as u64 + discover::file_issues(&walked));
        ScanCounters::add(&c.tracks_unchanged, compared.unchanged);
        ScanCounters::add(&c.tracks_indexed, compared.already_indexed);
        ScanCounters::add(&c.tracks_failed, compared.known_bad);
        Ok(Discovered {
            walked,
            to_probe: compared.to_probe,
            removal,
        })
    }

    /// The directory the job walks: the library root, or the subtree below it.
    fn scanned_dir(&self) -> PathBuf {
        match &self.job.subdir {
            Some(s) => self.job.library_root.join(s),
            None => self.job.library_root.clone(),
        }
    }

    /// The tracks and the error rows the database holds under the scanned tree.
    async fn read_database(&self) -> Result<(Vec<ExistingTrack>, Vec<ExistingError>), ScanFailure> {
        let pool = &self.worker.pool;
        let library_id = self.job.library_id;
        let subdir_bytes = self
            .job
            .subdir
            .as_ref()
            .map(|s| s.as_os_str().as_bytes().to_vec());
        let existing = self
            .with_db("read tracks", || {
                tracks::existing(pool, library_id, subdir_bytes.as_deref())
            })
            .await?;
        let known_errors = self
            .with_db("read scan errors", || {
                scan_errors::existing(pool, library_id, subdir_bytes.as_deref())
            })
            .await?;
        Ok((existing, known_errors))
    }

    /// Walk the scanned tree on the rayon pool; a tree that cannot be walked fails the scan
    /// (see [`discover::walked`]).
    async fn walk(&self) -> Result<WalkOutcome, ScanFailure> {
        let root = self.job.library_root.clone();
        let subdir = self.job.subdir.clone();
        let handle = Arc::clone(&self.job.handle);
        let threads = Arc::clone(&self.worker.threads);
        let hb = Arc::clone(&self.worker.heartbeat);
        // The scan's span (request_id, library) follows the work onto blocking threads.
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            threads
                .install(|| phase_1_walk::walk(&root, subdir.as_deref(), &Observer(&handle, &hb)))
        })
        .await
        .map_err(|e| ScanFailure::Internal(format!("walk task failed: {e}")))?;
        discover::walked(result)
    }

    /// Walk issues (special files, unreadable dirs) are recorded like probe failures.
    async fn record_walk_issues(&self, walked: &WalkOutcome) -> Result<(), ScanFailure> {
        if walked.issues.is_empty() {
            return Ok(());
        }
        let rows: Vec<ErrorRow> = walked
            .issues
            .iter()
            .map(|i| {
                phase_3_store::error_row(i.rel_path.clone(), i.size, i.mtime_ns, "walk", &i.message)
            })
            .collect();
        self.with_db("write walk issues", || {
            phase_3_store::write_batch(
                &self.worker.pool,
                self.job.library_id,
                self.job.request_id(),
                &[],
                &rows,
            )
        })
        .await?;
        ScanCounters::add(
            &self.handle().counters().tracks_failed,
            discover::file_issues(walked),
        );
        Ok(())
    }

    /// Index: probe `files` on the rayon pool batch by batch while the previous batch is
    /// stored.
    async fn index(&self, files: Vec<FoundFile>) -> Result<(), ScanFailure> {
        if files.is_empty() {
            return Ok(());
        }
        let (tx, mut rx) = mpsc::channel::<Batch>(2);
        let producer = self.spawn_probe(files, tx);
        let result = self.store(&mut rx).await;
        drop(rx);
        producer
            .await
            .map_err(|e| ScanFailure::Internal(format!("probe task failed: {e}")))?;
        result
    }

    /// Probe: a blocking task that probes `files` one batch at a time and sends each batch's
    /// rows; it stops when the scan is cancelled or the receiver is gone.
    fn spawn_probe(&self, files: Vec<FoundFile>, tx: mpsc::Sender<Batch>) -> JoinHandle<()> {
        let h = Arc::clone(&self.job.handle);
        let root = self.job.library_root.clone();
        let batch_size = self.worker.batch_size;
        let threads = Arc::clone(&self.worker.threads);
        let hb = Arc::clone(&self.worker.heartbeat);
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            for chunk in files.chunks(batch_size) {
                if h.is_cancelled() {
                    return;
                }
                let results = threads.install(|| probe_chunk(chunk, &root, &hb, &span));
                if tx.blocking_send(batch_rows(results, &root)).is_err() {
                    return;
                }
            }
        })
    }

    /// Store: write each probed batch as it arrives (tracks and errors in one transaction).
    async fn store(&self, rx: &mut mpsc::Receiver<Batch>) -> Result<(), ScanFailure> {
        let c = self.handle().counters();
        while let Some((rows, errors)) = rx.recv().await {
            self.check_cancel()?;
            // A batch that fails because the database is down is written again once it is
            // back: never dropped, and the scan does not fail for it.
            let written = self
                .with_db("write batch", || {
                    phase_3_store::write_batch(
                        &self.worker.pool,
                        self.job.library_id,
                        self.job.request_id(),
                        &rows,
                        &errors,
                    )
                })
                .await?;
            crate::test_hooks::batch_pause().await;
            ScanCounters::add(&c.tracks_indexed, written.indexed);
            ScanCounters::add(&c.tracks_failed, written.failed);
            self.worker.heartbeat.beat();
        }
        Ok(())
    }

    /// Delete the rows of vanished files (none when the tree looked unmounted).
    async fn remove_vanished(
        &self,
        removal: &Removal,
        removed_before: u64,
    ) -> Result<(), ScanFailure> {
        let Removal::Vanished {
            track_ids,
            error_paths,
        } = removal
        else {
            return Ok(());
        };
        if track_ids.is_empty() && error_paths.is_empty() {
            return Ok(());
        }
        let removed = self
            .with_db("delete vanished files", || {
                phase_3_store::delete_vanished(
                    &self.worker.pool,
                    self.job.library_id,
                    self.job.request_id(),
                    track_ids,
                    error_paths,
                    removed_before,
                )
            })
            .await?;
        ScanCounters::add(&self.handle().counters().tracks_removed, removed);
        Ok(())
    }

    /// Hand over to embedding: every track this scan wrote (before a restart too) is embedded,
    /// or found already embedded from the same file and counted done without work. That runs
    /// beside the next scans (see `ScanWorker::run_job`).
    async fn hand_over_to_embedding(&self) -> Result<Vec<EmbedTarget>, ScanFailure> {
        let root = &self.job.library_root;
        let targets = self
            .with_db("list tracks to embed", || {
                tracks::written_by_scan(
                    &self.worker.pool,
                    self.job.library_id,
                    self.job.request_id(),
                )
            })
            .await?
            .into_iter()
            .map(|(track_id, rel_path, duration_ms)| EmbedTarget {
                track_id,
                path: root.join(OsStr::from_bytes(&rel_path)),
                duration_ms,
            })
            .collect::<Vec<_>>();
        self.handle()
            .counters()
            .set_embeddings_expected(targets.len() as u64);
        self.set_phase(ScanPhase::Embedding).await;
        Ok(targets)
    }

    /// A re-embed job after a model change (`crate::embed::serving`): nothing is walked or
    /// read; the library's tracks lacking a vector of the active model go straight to the
    /// embedding phase (a resumed job lists only those still lacking one).
    async fn reembed(&self) -> Result<ScanOutcome, ScanFailure> {
        let Some(embedder) = &self.worker.embedder else {
            return Ok(ScanOutcome {
                warnings: vec!["embeddings are unavailable: nothing was embedded".into()],
                embed: None,
            });
        };
        let scope = LibraryScope {
            only: Some(self.job.library_id),
            except: Vec::new(),
        };
        let targets = embedder
            .missing_targets_in(&scope)
            .await
            .map_err(|e| match e {
                EmbedError::Cancelled => ScanFailure::Cancelled,
                e => ScanFailure::Embedding(e.to_string()),
            })?;
        self.check_cancel()?;
        self.handle()
            .counters()
            .set_embeddings_expected(targets.len() as u64);
        self.set_phase(ScanPhase::Embedding).await;
        Ok(ScanOutcome {
            warnings: Vec::new(),
            embed: Some(targets),
        })
    }

    /// Run a database operation of the scan, retried while the database is unavailable.
    async fn with_db<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ScanFailure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let h = self.handle();
        let hb = Some(&*self.worker.heartbeat);
        Ok(health::retry(&self.worker.db, what, h.cancel_token(), hb, op).await?)
    }

    async fn set_phase(&self, phase: ScanPhase) {
        let h = self.handle();
        self.worker.heartbeat.beat();
        tracing::debug!(phase = phase.as_str(), "scan phase");
        self.worker.reporter.set_phase(h, phase);
        self.worker.persist(h, h.cancel_token()).await;
    }

    fn check_cancel(&self) -> Result<(), ScanFailure> {
        if self.handle().is_cancelled() {
            Err(ScanFailure::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Probe one batch of files in parallel (on the current rayon pool).
fn probe_chunk<'f>(
    chunk: &'f [FoundFile],
    root: &Path,
    hb: &Heartbeat,
    span: &tracing::Span,
) -> Vec<(&'f FoundFile, Result<ProbedTrack, ProbeError>)> {
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
}

/// The rows of a probed batch: a track per file read, an error per file that was not.
fn batch_rows(results: Vec<(&FoundFile, Result<ProbedTrack, ProbeError>)>, root: &Path) -> Batch {
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
    (rows, errors)
}
