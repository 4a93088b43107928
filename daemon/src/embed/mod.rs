//! Embeddings for "similar tracks": decode → mono + resample → windows batched across tracks →
//! libtorch inference → pgvector.
//!
//! ```text
//!  embed_for_scan ─► embed_queue ─► consumer ─► decode queue ─► decode threads ─► infer queue ─► inference thread ─► store task
//!  (consumer::plan:   (PostgreSQL;   (claims     (bounded)       (symphonia: seek   (bounded)      (owns the model;   (one INSERT
//!   skip rules, no     leases, any    under a                     to the windows;                   batches windows    per batch)
//!   repeated work)     machine)       lease)                      rubato → model rate)              of many tracks)
//! ```
//!
//! Every eligible track gets exactly one report — done, skipped or failed — on the scan's
//! counters, which are the counts of the scan's rows in the queue (`consumer`). A track already
//! embedded for the active model (same model name, version and window choice) from its current
//! file (size and mtime) counts as done without work; a track whose file changed is embedded
//! again and its vector replaced. Damaged files and files without a decoder are recorded, so
//! they are not decoded again until they change. `config` is the `[embed]` section, `queue` the
//! queue's SQL, `pipeline` the stages' loops, `phase_*` the stages' work, `serving` which model
//! answers for a library across a model change.
//!
//! Without the `embed` cargo feature there is no libtorch: [`Embedder::start`] says so and the
//! daemon runs without embeddings.

pub mod consumer;
pub mod model;
pub mod phase_1_decode;
pub mod phase_1_decode_ffmpeg;
pub mod phase_2_resample;
pub mod phase_3_batch;
pub mod phase_4_infer;
pub mod phase_5_store;
mod pipeline;
pub mod queue;
pub mod serving;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

pub use crate::config::embed::EmbedConfig;
use crate::db::health::{DbHealth, RetryError, retry};
use crate::liveness::Heartbeat;
use crate::progress::{ScanCounters, ScanHandle};
use model::{ModelError, ModelManifest};
use phase_2_resample::WindowPlan;
use phase_4_infer::{DeviceChoice, InferError, InferStats};
use phase_5_store::{NewIssue, RegisteredModel};
use pipeline::{housekeeping, start_decoders, start_inference, store_task};
/// The token `Embedder::start` and `Embedder::embed` take (re-exported for callers).
pub use tokio_util::sync::CancellationToken;

/// Why embeddings are unavailable or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("track {0} has no embedding (not embedded yet, skipped, or failed)")]
    NoEmbedding(i64),
    #[error("cancelled")]
    Cancelled,
    #[error("the embedding pipeline is shutting down")]
    Stopped,
    #[error("the embedding pipeline stopped: {0}")]
    Broken(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<RetryError> for EmbedError {
    fn from(e: RetryError) -> Self {
        match e {
            RetryError::Cancelled => EmbedError::Cancelled,
            RetryError::Sql(e) => EmbedError::Database(e),
        }
    }
}

/// A track to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedTarget {
    pub track_id: i64,
    pub path: PathBuf,
    pub duration_ms: i64,
}

/// What a run settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbedSummary {
    /// Embedded now.
    pub embedded: u64,
    /// Already embedded from the same file: counted done without work.
    pub unchanged: u64,
    pub skipped: u64,
    pub failed: u64,
}

impl EmbedSummary {
    pub fn done(&self) -> u64 {
        self.embedded + self.unchanged
    }
}

/// Live figures of the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EmbedStats {
    /// Tracks waiting for a decode thread.
    pub decode_queue: u64,
    /// Decoded tracks waiting for the inference thread.
    pub infer_queue: u64,
    pub tracks_decoded: u64,
    /// Seconds of audio decoded (windows plus margins).
    pub audio_seconds_decoded: f64,
    pub windows_inferred: u64,
    pub batches: u64,
    /// Seconds the inference thread spent in forward passes.
    pub inference_seconds: f64,
    pub tracks_stored: u64,
}

/// How a track ended.
#[derive(Debug)]
enum Outcome {
    Done(i64),
    Skipped {
        track_id: i64,
        reason: String,
        record: bool,
    },
    Failed {
        track_id: i64,
        reason: String,
        record: bool,
    },
}

/// The tracks of one request in this process's pipeline: its cancel token and where its
/// outcomes go (the queue consumer).
struct JobCtx {
    request_id: Uuid,
    cancel: CancellationToken,
    outcomes: mpsc::UnboundedSender<(Uuid, Outcome)>,
}

impl JobCtx {
    fn report(&self, o: Outcome) {
        let _ = self.outcomes.send((self.request_id, o));
    }
}

/// A track travelling through the stages.
struct WorkItem {
    job: Arc<JobCtx>,
    track_id: i64,
    path: PathBuf,
    duration_ms: i64,
    file_size: i64,
    file_mtime_ns: i64,
}

/// State the stages share (counters, and whether a stage died).
#[derive(Default)]
struct Shared {
    decode_queue: AtomicU64,
    tracks_decoded: AtomicU64,
    decoded_ms: AtomicU64,
    tracks_stored: AtomicU64,
    embedded: AtomicI64,
    infer: InferStats,
    /// Set once `start` has succeeded.
    running: std::sync::atomic::AtomicBool,
    broken: CancellationToken,
    broken_reason: Mutex<Option<String>>,
    /// Cancelled when the store task has ended (everything computed is stored).
    finished: CancellationToken,
    /// Recent samples of `tracks_stored`, for the throughput in `daemon.status`.
    rate: Mutex<RateWindow>,
}

/// Samples of a growing counter over the last minute; the rate is the growth between the oldest
/// and the newest sample.
#[derive(Debug, Default)]
struct RateWindow {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateWindow {
    const SPAN: Duration = Duration::from_secs(60);

    fn record(&mut self, at: Instant, value: u64) {
        self.samples.push_back((at, value));
        while let Some(&(t, _)) = self.samples.front()
            && at.saturating_duration_since(t) > Self::SPAN
        {
            self.samples.pop_front();
        }
    }

    fn per_second(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, v0)), Some(&(t1, v1))) if t1 > t0 => {
                v1.saturating_sub(v0) as f64 / (t1 - t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

impl Shared {
    fn mark_broken(&self, stop: &CancellationToken, reason: String) {
        if stop.is_cancelled() || !self.running.load(Ordering::Acquire) {
            return;
        }
        tracing::error!(reason = %reason, "embedding pipeline stopped");
        lock(&self.broken_reason).get_or_insert(reason);
        self.broken.cancel();
    }
}

struct Inner {
    pool: PgPool,
    /// Database reachability; reads and writes are retried through it during an outage.
    db: Arc<DbHealth>,
    model: RegisteredModel,
    manifest: ModelManifest,
    model_path: PathBuf,
    device: String,
    min_ms: i64,
    max_ms: i64,
    decode_tx: Mutex<Option<mpsc::Sender<WorkItem>>>,
    stop: CancellationToken,
    shared: Arc<Shared>,
    /// This consumer's name in the queue's leases (`corald@HOST:PID`).
    owner: String,
    lease_s: f64,
    /// `FROM=TO` library-root mappings (workers reading the music through another mount).
    path_map: Vec<(PathBuf, PathBuf)>,
    /// Cancel tokens of the requests followed in this process.
    cancels: Mutex<HashMap<Uuid, CancellationToken>>,
    /// Wakes the consumer (rows were queued).
    wake: tokio::sync::Notify,
    /// Wakes the followers (rows were settled).
    settled: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The stages wind down now; that is not a failure.
        self.shared.running.store(false, Ordering::Release);
    }
}

impl Inner {
    fn broken_error(&self) -> EmbedError {
        EmbedError::Broken(
            lock(&self.shared.broken_reason)
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        )
    }
}

/// The embedding service: cheap to clone.
#[derive(Clone)]
pub struct Embedder {
    inner: Arc<Inner>,
}

/// Tracks per store statement at most.
const STORE_BATCH: usize = 64;

impl Embedder {
    /// Load the model (or explain why embeddings are unavailable: feature off, model missing or
    /// damaged, libtorch failure, device) and start the decode threads, the inference thread
    /// and the store task. The threads end when `stop` is cancelled.
    pub async fn start(
        cfg: &EmbedConfig,
        pool: PgPool,
        stop: CancellationToken,
    ) -> Result<Embedder, EmbedError> {
        Self::start_with_health(cfg, pool, stop, None, DbHealth::detached()).await
    }

    /// Like [`start`](Self::start), for the daemon: the inference thread beats `heartbeat`
    /// while it waits for windows and after every forward pass (so the service watchdog notices
    /// a wedged model), and database outages are reported to `db` (the daemon's record): the
    /// pipeline waits for the database instead of failing tracks while it is down.
    pub async fn start_with_health(
        cfg: &EmbedConfig,
        pool: PgPool,
        stop: CancellationToken,
        heartbeat: Option<Arc<Heartbeat>>,
        db: Arc<DbHealth>,
    ) -> Result<Embedder, EmbedError> {
        Self::start_as(cfg, pool, stop, heartbeat, db, Role::Daemon).await
    }

    /// The pipeline of a `corald worker`: it consumes the queue of the corald that owns the
    /// database, reading the music through `path_map` (library root `FROM` is `TO` here).
    pub async fn start_worker(
        cfg: &EmbedConfig,
        pool: PgPool,
        stop: CancellationToken,
        db: Arc<DbHealth>,
        path_map: Vec<(PathBuf, PathBuf)>,
    ) -> Result<Embedder, EmbedError> {
        Self::start_as(cfg, pool, stop, None, db, Role::Worker { path_map }).await
    }

    async fn start_as(
        cfg: &EmbedConfig,
        pool: PgPool,
        stop: CancellationToken,
        heartbeat: Option<Arc<Heartbeat>>,
        db: Arc<DbHealth>,
        role: Role,
    ) -> Result<Embedder, EmbedError> {
        cfg.validate()
            .map_err(|e| EmbedError::Config(e.to_string()))?;
        if !phase_4_infer::available() {
            return Err(InferError::FeatureDisabled.into());
        }
        let choice = DeviceChoice::parse(&cfg.device)
            .ok_or_else(|| EmbedError::Config(format!("bad device {:?}", cfg.device)))?;
        let model = match &cfg.model {
            Some(configured) => configured.clone(),
            None => PathBuf::from(default_model_name(choice, &pool, &db, &stop, &role).await?),
        };
        let path = model::locate(&model)?;
        let files = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || model::load(&path))
                .await
                .map_err(|e| EmbedError::Internal(format!("model loading task: {e}")))??
        };
        let manifest = files.manifest.clone();
        let plan = WindowPlan {
            count: cfg.windows,
            window_samples: manifest.window_samples * cfg.window_patches,
            sample_rate: manifest.sample_rate,
        };
        let row_len = plan.window_samples;
        let threads = cfg.inference_threads();
        let decode_threads = cfg.decoder_threads();
        let shared = Arc::new(Shared::default());
        let (infer_tx, store_rx, device) = start_inference(
            cfg,
            files,
            choice,
            row_len,
            Arc::clone(&shared),
            heartbeat,
            &stop,
        )
        .await?;

        let params = cfg.window_params();
        let registered = retry(&db, "register the model", &stop, None, || {
            phase_5_store::register_model(&pool, &manifest, &params)
        })
        .await?;
        let embedded = retry(&db, "count embeddings", &stop, None, || {
            phase_5_store::count_embedded(&pool, registered.id)
        })
        .await?;
        shared.embedded.store(embedded, Ordering::Relaxed);
        let (decode_tx, decode_rx) = mpsc::channel::<WorkItem>(2 * decode_threads + 2);

        let inner = Arc::new(Inner {
            pool: pool.clone(),
            db: Arc::clone(&db),
            model: registered,
            manifest: manifest.clone(),
            model_path: path.clone(),
            device: device.clone(),
            min_ms: (cfg.min_duration_s * 1000.0).round() as i64,
            max_ms: (cfg.max_duration_s * 1000.0).round() as i64,
            decode_tx: Mutex::new(Some(decode_tx)),
            stop: stop.clone(),
            shared: Arc::clone(&shared),
            owner: format!("{}{}", role.prefix(), std::process::id()),
            lease_s: cfg.lease_s,
            path_map: match &role {
                Role::Daemon => Vec::new(),
                Role::Worker { path_map } => path_map.clone(),
            },
            cancels: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            settled: tokio::sync::Notify::new(),
        });
        if matches!(role, Role::Daemon) {
            reclaim_earlier_run(&pool, &db, &stop, &role.prefix()).await?;
        }

        start_decoders(decode_threads, decode_rx, &infer_tx, plan, &shared, &stop)?;
        drop(infer_tx);
        tokio::spawn(store_task(
            Arc::clone(&shared),
            pool.clone(),
            db,
            stop.clone(),
            registered,
            store_rx,
        ));
        tokio::spawn(housekeeping(Arc::downgrade(&inner), stop.clone()));
        if cfg.local || !matches!(role, Role::Daemon) {
            tokio::spawn(consumer::consume(Arc::downgrade(&inner), stop.clone()));
        } else {
            tracing::info!("embed.local = false: the queued tracks are left to corald workers");
        }
        shared.running.store(true, Ordering::Release);

        tracing::info!(
            model = %manifest.name,
            version = %manifest.version,
            path = %path.display(),
            device = %device,
            threads,
            decode_threads,
            windows = cfg.windows,
            embedded,
            "embeddings ready"
        );
        Ok(Embedder { inner })
    }

    /// Enabled, model, device, the number of tracks embedded for the active model, queue depths
    /// and throughput.
    pub fn status(&self) -> coral_proto::EmbeddingStatus {
        let i = &self.inner;
        let stats = self.stats();
        coral_proto::EmbeddingStatus {
            enabled: true,
            model: Some(format!("{} v{}", i.manifest.name, i.manifest.version)),
            device: Some(i.device.clone()),
            tracks_embedded: i.shared.embedded.load(Ordering::Relaxed),
            decode_queue: stats.decode_queue,
            inference_queue: stats.infer_queue,
            tracks_per_second: lock(&i.shared.rate).per_second(),
            windows_per_inference_second: if stats.inference_seconds > 0.0 {
                stats.windows_inferred as f64 / stats.inference_seconds
            } else {
                0.0
            },
            tracks_embedded_since_start: stats.tracks_stored,
            workers: Vec::new(),
        }
    }

    /// The queue's consumers seen in the last minute (this pipeline and `corald worker`s).
    pub async fn workers(&self) -> Result<Vec<coral_proto::EmbedWorker>, EmbedError> {
        let rows = queue::workers(&self.inner.pool, consumer::WORKER_SEEN_S).await?;
        Ok(rows
            .into_iter()
            .map(|w| coral_proto::EmbedWorker {
                id: w.id,
                host: w.host,
                device: w.device,
                started_at: w.started_at,
                last_seen_at: w.last_seen_at,
                tracks_done: u64::try_from(w.tracks_done).unwrap_or(0),
                tracks_per_second: w.tracks_per_second,
            })
            .collect())
    }

    /// Resolves once the pipeline has wound down after `stop` (or after every `Embedder` was
    /// dropped): vectors computed before the stop are stored by then. Call it before closing
    /// the database pool.
    pub async fn stopped(&self) {
        self.inner.shared.finished.cancelled().await;
    }

    /// Queue depths and throughput counters.
    pub fn stats(&self) -> EmbedStats {
        let s = &self.inner.shared;
        let f = &self.inner.shared.infer;
        EmbedStats {
            decode_queue: s.decode_queue.load(Ordering::Relaxed),
            infer_queue: f.queued_tracks.load(Ordering::Relaxed),
            tracks_decoded: s.tracks_decoded.load(Ordering::Relaxed),
            audio_seconds_decoded: s.decoded_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            windows_inferred: f.windows.load(Ordering::Relaxed),
            batches: f.batches.load(Ordering::Relaxed),
            inference_seconds: f.busy_us.load(Ordering::Relaxed) as f64 / 1e6,
            tracks_stored: s.tracks_stored.load(Ordering::Relaxed),
        }
    }

    /// The active model's manifest.
    pub fn manifest(&self) -> &ModelManifest {
        &self.inner.manifest
    }

    /// Where the model was loaded from.
    pub fn model_path(&self) -> &std::path::Path {
        &self.inner.model_path
    }

    /// The model's id in the `models` table.
    pub fn model_id(&self) -> i64 {
        self.inner.model.id
    }

    /// The model as registered (id and dimension), for similarity queries.
    pub fn model(&self) -> phase_5_store::RegisteredModel {
        self.inner.model
    }

    /// Embed these tracks for a scan, reporting each on the scan's counters (expected first,
    /// then done / skipped / failed). Resolves when every target is settled, or early with
    /// `Cancelled` when the scan is cancelled (queued work of the scan is dropped; vectors
    /// already computed are stored, which keeps the database consistent).
    pub async fn embed_for_scan(
        &self,
        handle: Arc<ScanHandle>,
        targets: Vec<EmbedTarget>,
    ) -> Result<(), EmbedError> {
        let span = tracing::info_span!("embed", request_id = %handle.request_id());
        let cancel = handle.cancel_token().clone();
        // A re-embed job after a model change waits behind every other request.
        let background = handle.info().trigger == coral_proto::ScanTrigger::ModelChange;
        self.run(
            handle.request_id(),
            cancel,
            targets,
            Some(handle.counters()),
            background,
        )
        .instrument(span)
        .await
        .map(|_| ())
    }

    /// Embed tracks outside a scan (start-up sweep, tools): like `embed_for_scan`, returning the
    /// tally instead of reporting it.
    pub async fn embed(
        &self,
        request_id: Uuid,
        targets: Vec<EmbedTarget>,
        cancel: CancellationToken,
    ) -> Result<EmbedSummary, EmbedError> {
        let span = tracing::info_span!("embed", request_id = %request_id);
        self.run(request_id, cancel, targets, None, false)
            .instrument(span)
            .await
    }

    /// Tracks lacking an embedding of their current file for the active model, within the
    /// duration limits, and without a recorded failure for that file.
    pub async fn missing_targets(&self) -> Result<Vec<EmbedTarget>, EmbedError> {
        self.missing_targets_in(&phase_5_store::LibraryScope::default())
            .await
    }

    /// Like [`missing_targets`](Self::missing_targets), in the libraries of `scope` only.
    pub async fn missing_targets_in(
        &self,
        scope: &phase_5_store::LibraryScope,
    ) -> Result<Vec<EmbedTarget>, EmbedError> {
        let i = &self.inner;
        Ok(retry(
            &i.db,
            "list tracks lacking embeddings",
            &i.stop,
            None,
            || phase_5_store::missing(&i.pool, i.model.id, i.min_ms, i.max_ms, scope),
        )
        .await?
        .into_iter()
        .map(|m| EmbedTarget {
            track_id: m.id,
            path: m.path,
            duration_ms: m.duration_ms,
        })
        .collect())
    }

    /// An embedding request of `library_id` completed (`covered_all`: it covered every track of
    /// the library lacking a vector of the active model): when the library is now complete
    /// under the active model, that model serves it from now on and its vectors of earlier
    /// models are dropped (see [`serving`]). Failures are logged; the next request checks again.
    pub async fn library_embedded(&self, library_id: i64, covered_all: bool) {
        if let Err(e) = serving::after_embedding(&self.inner, library_id, covered_all).await {
            tracing::warn!(library_id, error = %e, "cannot check whether the library switches models");
        }
    }

    async fn run(
        &self,
        request_id: Uuid,
        cancel: CancellationToken,
        targets: Vec<EmbedTarget>,
        counters: Option<&ScanCounters>,
        background: bool,
    ) -> Result<EmbedSummary, EmbedError> {
        let inner = &self.inner;
        let started = Instant::now();
        let rows = consumer::plan(inner, targets, &cancel).await?;
        if let Some(c) = counters {
            c.set_embeddings_expected(rows.len() as u64);
        }
        if rows.is_empty() {
            return Ok(EmbedSummary::default());
        }
        let priority = queue::priority(&rows, background);
        let result =
            consumer::enqueue_and_follow(inner, request_id, rows, priority, &cancel, counters)
                .await;
        let elapsed = started.elapsed().as_secs_f64();
        let summary = result.as_ref().ok().map(|t| EmbedSummary {
            embedded: t.done,
            unchanged: t.unchanged,
            skipped: t.skipped,
            failed: t.failed,
        });
        let s = summary.unwrap_or_default();
        tracing::info!(
            embedded = s.embedded,
            unchanged = s.unchanged,
            skipped = s.skipped,
            failed = s.failed,
            seconds = format!("{elapsed:.1}"),
            outcome = match &result {
                Ok(_) => "completed".to_owned(),
                Err(e) => e.to_string(),
            },
            "embedding finished"
        );
        result.map(|_| s)
    }
}

/// Which process runs the pipeline.
enum Role {
    /// corald: it queues its scans' tracks and consumes them too.
    Daemon,
    /// `corald worker`: it only consumes.
    Worker { path_map: Vec<(PathBuf, PathBuf)> },
}

impl Role {
    /// The start of this process's consumer name in queue leases: `corald@HOST:` or
    /// `worker@HOST:` (the pid follows).
    fn prefix(&self) -> String {
        let kind = match self {
            Role::Daemon => "corald",
            Role::Worker { .. } => "worker",
        };
        format!("{kind}@{}:", host_name())
    }
}

/// This machine's name (the kernel's), for consumer names and the workers table.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The model to load when `embed.model` is not set. corald: the int8 model on a CPU, the fp32
/// one on CUDA. `corald worker`: the model the server last registered (`models.last_used_at`),
/// so that workers embed for the server's queue whatever their device (a CPU-only model on a
/// CUDA worker then runs on its CPU, with a warning); a device default before any.
async fn default_model_name(
    choice: DeviceChoice,
    pool: &PgPool,
    db: &Arc<DbHealth>,
    stop: &CancellationToken,
    role: &Role,
) -> Result<String, EmbedError> {
    if matches!(role, Role::Worker { .. }) {
        let latest = retry(db, "read the server's model", stop, None, || {
            phase_5_store::latest_model_name(pool)
        })
        .await?;
        if let Some(name) = latest {
            tracing::info!(model = %name, "embed.model not set: using the server's model");
            return Ok(name);
        }
    }
    let accelerator =
        tokio::task::spawn_blocking(move || phase_4_infer::resolves_to_accelerator(choice))
            .await
            .map_err(|e| EmbedError::Internal(format!("device probe task: {e}")))??;
    Ok(model::default_model_name(accelerator).to_owned())
}

async fn flush_issues(inner: &Inner, request_id: Uuid, issues: &mut Vec<NewIssue>) {
    if issues.is_empty() {
        return;
    }
    let r = retry(
        &inner.db,
        "record embedding issues",
        &inner.stop,
        None,
        || phase_5_store::record_issues(&inner.pool, inner.model.id, Some(request_id), issues),
    )
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not record embedding issues; they will be retried");
    }
    issues.clear();
}

/// corald's own leases from its previous run (killed, or stopped mid-track) are free now, and
/// queued rows of requests that run ended are dropped. (Workers are many per host: their
/// leases expire instead.)
async fn reclaim_earlier_run(
    pool: &PgPool,
    db: &DbHealth,
    stop: &CancellationToken,
    prefix: &str,
) -> Result<(), EmbedError> {
    let released = retry(db, "release old leases", stop, None, || {
        queue::release_leases_of(pool, prefix)
    })
    .await?;
    if released > 0 {
        tracing::info!(released, "took back queued tracks leased by an earlier run");
    }
    let orphans = retry(db, "forget unfollowed queue rows", stop, None, || {
        queue::forget_orphans(pool)
    })
    .await?;
    if orphans > 0 {
        tracing::info!(
            orphans,
            "dropped queued tracks of requests that ended in an earlier run"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_measures_growth_over_the_last_minute() {
        let t0 = Instant::now();
        let mut w = RateWindow::default();
        assert_eq!(w.per_second(), 0.0, "no samples");
        w.record(t0, 100);
        assert_eq!(w.per_second(), 0.0, "one sample");
        w.record(t0 + Duration::from_secs(10), 150);
        assert!((w.per_second() - 5.0).abs() < 1e-9);
        // Samples older than a minute drop out: only the last minute's growth counts.
        w.record(t0 + Duration::from_secs(65), 150);
        w.record(t0 + Duration::from_secs(75), 150);
        assert_eq!(w.per_second(), 0.0, "idle for the last minute");
    }

    #[cfg(not(feature = "embed"))]
    #[tokio::test]
    async fn without_the_feature_start_explains_why() {
        // A pool that is never used: start fails before touching the database.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@localhost/none")
            .expect("lazy pool");
        let e = Embedder::start(&EmbedConfig::default(), pool, CancellationToken::new())
            .await
            .err()
            .expect("no libtorch in this build");
        assert!(e.to_string().contains("embed"), "{e}");
    }
}
