//! Embeddings for "similar tracks": decode → mono + resample → windows batched across tracks →
//! libtorch inference → pgvector.
//!
//! ```text
//!  embed_for_scan ─► decode queue ─► decode threads ─► infer queue ─► inference thread ─► store task
//!  (skip rules,      (bounded)       (symphonia: seek   (bounded)      (owns the model;   (one INSERT
//!   no repeated                       to the windows;                   batches windows    per batch)
//!   work)                             rubato → model rate)              of many tracks)
//! ```
//!
//! Every eligible track gets exactly one report — done, skipped or failed — on the scan's
//! counters. A track already embedded for the active model (same model name, version and window
//! choice) from its current file (size and mtime) counts as done without work; a track whose
//! file changed is embedded again and its vector replaced. Damaged files and files without a
//! decoder (Opus: symphonia 0.6 has no Opus decoder) are recorded, so they are not decoded again
//! until they change.
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
pub mod queue;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use crate::db::health::{DbHealth, RetryError, retry};
use crate::progress::{ScanCounters, ScanHandle};
use crate::systemd::Heartbeat;
use model::{ModelError, ModelManifest};
use phase_2_resample::{WindowMaker, WindowPlan};
use phase_3_batch::Finished;
use phase_4_infer::{DeviceChoice, InferError, InferInput, InferOutput, InferStats, LoopConfig};
use phase_5_store::{NewEmbedding, NewIssue, RegisteredModel};
/// The token `Embedder::start` and `Embedder::embed` take (re-exported for callers).
pub use tokio_util::sync::CancellationToken;

/// The `[embed]` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Compute embeddings for new and changed tracks.
    pub enabled: bool,
    /// The TorchScript model (`.pt`; its manifest is the same name with `.json`). Default: the
    /// bundled musicnn model, searched next to the binary, in /usr/share/coral/models and in
    /// `${XDG_DATA_HOME:-~/.local/share}/coral/models`.
    pub model: Option<PathBuf>,
    /// `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CPU threads for inference (0: one per CPU).
    pub threads: usize,
    /// Threads that decode and resample audio (0: a quarter of the CPUs, at least 1).
    pub decode_threads: usize,
    /// Windows per forward pass (0: 2 on CPU, 32 on CUDA). On CPU small batches run fastest
    /// per window (measured with musicnn on 2 cores: ≈80 windows/s at 1–2 windows per pass,
    /// ≈42 at 4, ≈29 at 8); accelerators want big ones.
    pub batch_size: usize,
    /// Run a partial batch when its oldest window has waited this long.
    pub batch_timeout_ms: u64,
    /// Windows per track, at the centres of equal slices of the track.
    pub windows: usize,
    /// Length of each window in model windows (musicnn: 1 ≈ 3 s).
    pub window_patches: usize,
    /// Tracks shorter than this are skipped (seconds).
    pub min_duration_s: f64,
    /// Tracks longer than this are skipped (seconds).
    pub max_duration_s: f64,
    /// Embed in this process. `false`: corald queues its scans' tracks and leaves all the
    /// embedding to `corald worker`s on other machines (the model is still loaded, to name the
    /// vectors' model and check stored ones).
    pub local: bool,
    /// How long a consumer holds the queued tracks it took (seconds). A consumer that dies
    /// (a killed `corald worker`) leaves them for another consumer after this long; a track
    /// takes seconds from its claim to its vector.
    pub lease_s: f64,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            enabled: true,
            model: None,
            device: "auto".to_owned(),
            threads: 0,
            decode_threads: 0,
            batch_size: 0,
            batch_timeout_ms: 50,
            windows: 8,
            window_patches: 1,
            min_duration_s: 60.0,
            max_duration_s: 900.0,
            local: true,
            lease_s: 120.0,
        }
    }
}

impl EmbedConfig {
    /// Check the values; the error names the key (`embed.…`) and what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_key()
            .map_err(|(key, problem)| format!("`{key}` {problem}"))
    }

    /// Like [`validate`](Self::validate), as (key, problem).
    pub fn validate_key(&self) -> Result<(), (&'static str, String)> {
        if DeviceChoice::parse(&self.device).is_none() {
            return Err((
                "embed.device",
                format!("must be auto, cpu, cuda or cuda:N (got {:?})", self.device),
            ));
        }
        if self.threads > 1024 {
            return Err((
                "embed.threads",
                format!("must be at most 1024 (got {})", self.threads),
            ));
        }
        if self.decode_threads > 256 {
            return Err((
                "embed.decode_threads",
                format!("must be at most 256 (got {})", self.decode_threads),
            ));
        }
        if self.batch_size > 4096 {
            return Err((
                "embed.batch_size",
                format!("must be at most 4096 (got {})", self.batch_size),
            ));
        }
        if self.batch_timeout_ms > 60_000 {
            return Err((
                "embed.batch_timeout_ms",
                format!("must be at most 60000 (got {})", self.batch_timeout_ms),
            ));
        }
        if !(1..=64).contains(&self.windows) {
            return Err((
                "embed.windows",
                format!("must be between 1 and 64 (got {})", self.windows),
            ));
        }
        if !(1..=32).contains(&self.window_patches) {
            return Err((
                "embed.window_patches",
                format!("must be between 1 and 32 (got {})", self.window_patches),
            ));
        }
        if !(self.min_duration_s.is_finite() && self.min_duration_s >= 0.0) {
            return Err((
                "embed.min_duration_s",
                format!("must be a number ≥ 0 (got {})", self.min_duration_s),
            ));
        }
        if !(self.max_duration_s.is_finite() && self.max_duration_s > self.min_duration_s) {
            return Err((
                "embed.max_duration_s",
                format!(
                    "must be a number greater than embed.min_duration_s ({}) (got {})",
                    self.min_duration_s, self.max_duration_s
                ),
            ));
        }
        if !(self.lease_s.is_finite() && (1.0..=86_400.0).contains(&self.lease_s)) {
            return Err((
                "embed.lease_s",
                format!("must be between 1 and 86400 (got {})", self.lease_s),
            ));
        }
        if let Some(m) = &self.model
            && m.as_os_str().is_empty()
        {
            return Err(("embed.model", "must not be empty".into()));
        }
        Ok(())
    }

    fn cores() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    /// Inference threads on CPU.
    pub fn inference_threads(&self) -> usize {
        if self.threads == 0 {
            Self::cores()
        } else {
            self.threads
        }
    }

    /// Decode threads.
    pub fn decoder_threads(&self) -> usize {
        if self.decode_threads == 0 {
            (Self::cores() / 4).max(1)
        } else {
            self.decode_threads
        }
    }

    /// The window choice, as stored with the model (a change means new vectors).
    pub fn window_params(&self) -> String {
        format!("windows={},patches={}", self.windows, self.window_patches)
    }
}

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
        cfg.validate().map_err(EmbedError::Config)?;
        if !phase_4_infer::available() {
            return Err(InferError::FeatureDisabled.into());
        }
        let choice = DeviceChoice::parse(&cfg.device)
            .ok_or_else(|| EmbedError::Config(format!("bad device {:?}", cfg.device)))?;
        let path = model::locate(cfg.model.as_deref())?;
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
        let guess_rows = if cfg.batch_size == 0 {
            32
        } else {
            cfg.batch_size
        };
        let infer_capacity = (2 * guess_rows).div_ceil(cfg.windows).max(2) + decode_threads;

        // The inference thread loads the model itself (libtorch's CPU threads are per thread).
        let (ready_tx, ready_rx) = oneshot::channel();
        let (infer_tx, infer_rx) = std_mpsc::sync_channel::<InferInput<WorkItem>>(infer_capacity);
        let (store_tx, store_rx) = mpsc::channel::<Finished<WorkItem>>(4 * STORE_BATCH);
        let shared = Arc::new(Shared::default());
        let loop_cfg = (cfg.batch_size, Duration::from_millis(cfg.batch_timeout_ms));
        {
            let stop = stop.clone();
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("coral-infer".into())
                .spawn(move || {
                    inference_thread(
                        files, choice, threads, row_len, loop_cfg, ready_tx, infer_rx, store_tx,
                        stop, shared, heartbeat,
                    )
                })
                .map_err(|e| {
                    EmbedError::Internal(format!("cannot start the inference thread: {e}"))
                })?;
        }
        let (device, _accelerator) = ready_rx.await.map_err(|_| {
            EmbedError::Internal("the inference thread ended while loading".into())
        })??;

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
        // Leases of this corald's previous run (killed, or stopped mid-track) are free now.
        // (Workers are many per host: theirs expire.)
        if matches!(role, Role::Daemon) {
            let prefix = role.prefix();
            let released = retry(&db, "release old leases", &stop, None, || {
                queue::release_leases_of(&pool, &prefix)
            })
            .await?;
            if released > 0 {
                tracing::info!(released, "took back queued tracks leased by an earlier run");
            }
            let orphans = retry(&db, "forget unfollowed queue rows", &stop, None, || {
                queue::forget_orphans(&pool)
            })
            .await?;
            if orphans > 0 {
                tracing::info!(
                    orphans,
                    "dropped queued tracks of requests that ended in an earlier run"
                );
            }
        }

        let decode_rx = Arc::new(Mutex::new(decode_rx));
        for i in 0..decode_threads {
            let rx = Arc::clone(&decode_rx);
            let tx = infer_tx.clone();
            let shared = Arc::clone(&shared);
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("coral-decode-{i}"))
                .spawn(move || decode_thread(rx, tx, plan, shared, stop))
                .map_err(|e| EmbedError::Internal(format!("cannot start a decode thread: {e}")))?;
        }
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
        self.run(
            handle.request_id(),
            cancel,
            targets,
            Some(handle.counters()),
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
        self.run(request_id, cancel, targets, None)
            .instrument(span)
            .await
    }

    /// Tracks lacking an embedding of their current file for the active model, within the
    /// duration limits, and without a recorded failure for that file.
    pub async fn missing_targets(&self) -> Result<Vec<EmbedTarget>, EmbedError> {
        let i = &self.inner;
        Ok(retry(
            &i.db,
            "list tracks lacking embeddings",
            &i.stop,
            None,
            || phase_5_store::missing(&i.pool, i.model.id, i.min_ms, i.max_ms),
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

    /// Nearest neighbours by cosine distance (HNSW index), excluding the track itself:
    /// `(track_id, cosine similarity)`, best first.
    pub async fn similar(&self, track_id: i64, limit: u32) -> Result<Vec<(i64, f64)>, EmbedError> {
        let i = &self.inner;
        let v = phase_5_store::embedding_of(&i.pool, i.model.id, track_id)
            .await?
            .ok_or(EmbedError::NoEmbedding(track_id))?;
        Ok(phase_5_store::nearest(&i.pool, i.model, &v, track_id, limit).await?)
    }

    async fn run(
        &self,
        request_id: Uuid,
        cancel: CancellationToken,
        targets: Vec<EmbedTarget>,
        counters: Option<&ScanCounters>,
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
        let result = consumer::enqueue_and_follow(inner, request_id, rows, &cancel, counters).await;
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

/// Decoding is a small share of the work on CPU; when it preempts one of libtorch's threads,
/// the others wait at the next barrier. A lower priority (nice +5, this thread only) lets the
/// decoder fill the gaps instead.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread; failure only leaves the priority as is.
        unsafe {
            let tid = libc::gettid();
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 5);
        }
    }
}

/// Decode thread: work items → model-rate windows → inference queue.
fn decode_thread(
    rx: Arc<Mutex<mpsc::Receiver<WorkItem>>>,
    tx: std_mpsc::SyncSender<InferInput<WorkItem>>,
    plan: WindowPlan,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    lower_thread_priority();
    let mut maker = WindowMaker::new(plan);
    loop {
        let item = lock(&rx).blocking_recv();
        let Some(item) = item else { return };
        shared.decode_queue.fetch_sub(1, Ordering::Relaxed);
        if stop.is_cancelled() {
            return;
        }
        if item.job.cancel.is_cancelled() {
            continue;
        }
        let duration_s = item.duration_ms as f64 / 1000.0;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            maker.make(&item.path, duration_s)
        }));
        let outcome = match result {
            Ok(Ok(w)) => {
                shared.tracks_decoded.fetch_add(1, Ordering::Relaxed);
                shared
                    .decoded_ms
                    .fetch_add((w.decoded_seconds * 1000.0) as u64, Ordering::Relaxed);
                shared.infer.queued_tracks.fetch_add(1, Ordering::Relaxed);
                if tx
                    .send(InferInput {
                        meta: item,
                        samples: w.samples,
                        windows: w.count,
                    })
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Ok(Err(e)) if e.is_unsupported() => Outcome::Skipped {
                track_id: item.track_id,
                reason: e.to_string(),
                record: true,
            },
            Ok(Err(e)) => Outcome::Failed {
                track_id: item.track_id,
                reason: e.to_string(),
                record: true,
            },
            Err(panic) => {
                maker = WindowMaker::new(plan);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(request_id = %item.job.request_id, path = %item.path.display(), panic = %what, "decoder panicked on this file");
                Outcome::Failed {
                    track_id: item.track_id,
                    reason: format!("the decoder crashed on this file ({what})"),
                    record: true,
                }
            }
        };
        item.job.report(outcome);
    }
}

/// The inference thread: loads the model, reports readiness, runs the batching loop.
#[allow(clippy::too_many_arguments)]
fn inference_thread(
    files: model::ModelFiles,
    choice: DeviceChoice,
    threads: usize,
    row_len: usize,
    (batch_size, flush_after): (usize, Duration),
    ready: oneshot::Sender<Result<(String, bool), EmbedError>>,
    rx: std_mpsc::Receiver<InferInput<WorkItem>>,
    store_tx: mpsc::Sender<Finished<WorkItem>>,
    stop: CancellationToken,
    shared: Arc<Shared>,
    heartbeat: Option<Arc<Heartbeat>>,
) {
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        phase_4_infer::load_model(&files, choice, threads, row_len)
    }));
    drop(files);
    let mut model = match loaded {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
        Err(_) => {
            let _ = ready.send(Err(EmbedError::Internal(
                "libtorch panicked while loading the model".into(),
            )));
            return;
        }
    };
    let accelerator = model.is_accelerator();
    let max_rows = match batch_size {
        0 if accelerator => 32,
        0 => 2,
        n => n,
    };
    if ready.send(Ok((model.device_label(), accelerator))).is_err() {
        return;
    }
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        phase_4_infer::run_loop(
            model.as_mut(),
            rx,
            |out| match out {
                InferOutput::Done(f) => send_to_store(&store_tx, f, &|| {
                    if let Some(h) = &heartbeat {
                        h.beat();
                    }
                }),
                InferOutput::Failed(f) => {
                    f.meta.job.report(Outcome::Failed {
                        track_id: f.meta.track_id,
                        reason: f.reason,
                        record: false,
                    });
                    true
                }
            },
            |item: &WorkItem| !item.job.cancel.is_cancelled(),
            LoopConfig {
                max_rows,
                flush_after,
            },
            &stop,
            &shared.infer,
            || {
                if let Some(h) = &heartbeat {
                    h.beat();
                }
            },
        );
    }));
    if let Some(h) = &heartbeat {
        // Ended (shutdown, or broken: reported through `daemon.status`): not a stall.
        h.retire();
    }
    let why = match run {
        Ok(()) => "the inference thread ended",
        Err(_) => "the inference thread panicked (libtorch error)",
    };
    shared.mark_broken(&stop, why.to_owned());
}

/// Hand a finished track to the store task (false once it is gone). A full queue means the
/// store task is waiting, for the database during an outage: the inference thread keeps
/// beating meanwhile, since waiting for the database is not a wedged model.
fn send_to_store<T>(tx: &mpsc::Sender<T>, mut item: T, beat: &dyn Fn()) -> bool {
    loop {
        match tx.try_send(item) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(back)) => {
                item = back;
                beat();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Store task: finished tracks → `track_embeddings`, batched; reports each track.
async fn store_task(
    shared: Arc<Shared>,
    pool: PgPool,
    db: Arc<DbHealth>,
    stop: CancellationToken,
    model: RegisteredModel,
    mut rx: mpsc::Receiver<Finished<WorkItem>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < STORE_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let rows: Vec<NewEmbedding> = batch
            .iter()
            .map(|f| NewEmbedding {
                track_id: f.meta.track_id,
                embedding: f.embedding.clone(),
                file_size: f.meta.file_size,
                file_mtime_ns: f.meta.file_mtime_ns,
                windows: i32::try_from(f.windows).unwrap_or(i32::MAX),
            })
            .collect();
        // While the database is down the batch waits (the pipeline behind it backs up) and is
        // written once it is back; only a shutdown gives up on it.
        let stored = retry(&db, "store embeddings", &stop, None, || {
            phase_5_store::store_embeddings(&pool, model.id, &rows)
        })
        .await;
        let results: Vec<Result<bool, String>> = match stored {
            Ok(stored) => {
                let stored: std::collections::HashSet<i64> = stored.into_iter().collect();
                rows.iter()
                    .map(|r| Ok(stored.contains(&r.track_id)))
                    .collect()
            }
            Err(e) => {
                // Find the row at fault: store one by one.
                tracing::warn!(error = %e, rows = rows.len(), "batch insert failed: storing one by one");
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    out.push(
                        phase_5_store::store_embeddings(&pool, model.id, std::slice::from_ref(r))
                            .await
                            .map(|s| !s.is_empty())
                            .map_err(|e| format!("database error: {e}")),
                    );
                }
                out
            }
        };
        let stored_now = results.iter().filter(|r| matches!(r, Ok(true))).count() as u64;
        shared
            .tracks_stored
            .fetch_add(stored_now, Ordering::Relaxed);
        if let Ok(n) = phase_5_store::count_embedded(&pool, model.id).await {
            shared.embedded.store(n, Ordering::Relaxed);
        }
        for (f, r) in batch.into_iter().zip(results) {
            let o = match r {
                Ok(true) => Outcome::Done(f.meta.track_id),
                Ok(false) => Outcome::Skipped {
                    track_id: f.meta.track_id,
                    reason: "removed from the index while it was embedded".into(),
                    record: false,
                },
                Err(reason) => Outcome::Failed {
                    track_id: f.meta.track_id,
                    reason,
                    record: false,
                },
            };
            f.meta.job.report(o);
        }
    }
    shared.finished.cancel();
}

/// Closes the decode queue on shutdown and keeps the embedded-tracks count fresh (scans
/// delete tracks, and their vectors with them).
async fn housekeeping(inner: Weak<Inner>, stop: CancellationToken) {
    let mut timer = tokio::time::interval(Duration::from_secs(30));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rate_timer = tokio::time::interval(Duration::from_secs(2));
    rate_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rate_timer.tick() => {
                let Some(inner) = inner.upgrade() else { return };
                let stored = inner.shared.tracks_stored.load(Ordering::Relaxed);
                lock(&inner.shared.rate).record(Instant::now(), stored);
            }
            _ = stop.cancelled() => {
                if let Some(inner) = inner.upgrade() {
                    lock(&inner.decode_tx).take();
                }
                return;
            }
            _ = timer.tick() => {
                let Some(inner) = inner.upgrade() else { return };
                if let Ok(n) = phase_5_store::count_embedded(&inner.pool, inner.model.id).await {
                    inner.shared.embedded.store(n, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_store_queue_keeps_the_inference_heartbeat_beating() {
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        tx.try_send(0).expect("room for one");
        let beats = Arc::new(AtomicU64::new(0));
        let sender = {
            let beats = Arc::clone(&beats);
            std::thread::spawn(move || {
                send_to_store(&tx, 1, &|| {
                    beats.fetch_add(1, Ordering::Relaxed);
                })
            })
        };
        // The queue stays full for a while (the store task waits for the database).
        std::thread::sleep(Duration::from_millis(300));
        assert!(beats.load(Ordering::Relaxed) >= 3, "beats while waiting");
        assert_eq!(rx.try_recv().ok(), Some(0));
        assert!(
            sender.join().expect("sender thread"),
            "delivered once there was room"
        );
        assert_eq!(rx.try_recv().ok(), Some(1));
        drop(rx);
        let (tx, rx) = mpsc::channel::<u32>(1);
        drop(rx);
        assert!(
            !send_to_store(&tx, 2, &|| {}),
            "a closed queue ends the loop"
        );
    }

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

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = EmbedConfig::default();
        c.validate().expect("defaults are valid");
        assert_eq!(c.windows, 8);
        assert_eq!(c.min_duration_s, 60.0);
        assert_eq!(c.max_duration_s, 900.0);
        assert_eq!(c.window_params(), "windows=8,patches=1");
    }

    #[test]
    fn validation_names_the_key() {
        let bad = |f: &dyn Fn(&mut EmbedConfig)| {
            let mut c = EmbedConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(&|c| c.device = "gpu".into()).contains("embed.device"));
        assert!(bad(&|c| c.windows = 0).contains("embed.windows"));
        assert!(bad(&|c| c.window_patches = 0).contains("embed.window_patches"));
        assert!(bad(&|c| c.min_duration_s = -1.0).contains("embed.min_duration_s"));
        assert!(bad(&|c| c.max_duration_s = 10.0).contains("embed.max_duration_s"));
        assert!(bad(&|c| c.batch_size = 100_000).contains("embed.batch_size"));
        assert!(bad(&|c| c.lease_s = 0.5).contains("embed.lease_s"));
        assert!(bad(&|c| c.lease_s = f64::NAN).contains("embed.lease_s"));
        let (key, _) = {
            let c = EmbedConfig {
                device: "cuda:x".into(),
                ..EmbedConfig::default()
            };
            c.validate_key().unwrap_err()
        };
        assert_eq!(key, "embed.device");
    }

    #[test]
    fn parses_from_toml_and_rejects_unknown_keys() {
        let c: EmbedConfig = toml::from_str(
            "device = \"cuda:1\"\nwindows = 4\nmin_duration_s = 30\nmodel = \"/m/x.pt\"",
        )
        .expect("parses");
        assert_eq!(c.device, "cuda:1");
        assert_eq!(c.windows, 4);
        assert_eq!(c.min_duration_s, 30.0);
        assert!(c.enabled);
        assert!(toml::from_str::<EmbedConfig>("window = 4").is_err());
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
