//! Wiring: start the database, the ScanReporter, the scan channel and worker, resume scans a
//! restart interrupted, serve the API, and shut everything down in order on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, Database, DbError, scans};
use crate::progress::ScanReporter;
use crate::rpc::api::{CoralRpc, RpcContext};
use crate::rpc::server::{self, SocketError};
use crate::scan::queue::{ScanQueue, ScanRequest};
use crate::scan::worker::ScanWorker;
use coral_proto::CoralApiServer;

/// Why corald could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("cannot start the scan thread pool: {0}")]
    Threads(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Run the daemon until SIGTERM/SIGINT (or until `stop` is cancelled).
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), DaemonError> {
    let state_dir = config.state_dir();
    let socket = config.socket_path();
    std::fs::create_dir_all(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    // Refuse early if another corald answers on the socket, before touching the database.
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        return Err(SocketError::AlreadyRunning(socket).into());
    }

    let database = Database::open(&config.database, &state_dir).await?;
    let pool = database.pool.clone();
    tracing::info!(database = database.description(), state_dir = %state_dir.display(), "database ready");

    let reporter = ScanReporter::new();
    let (queue, jobs) = ScanQueue::new(
        config.scan.queue_capacity,
        Arc::clone(&reporter),
        pool.clone(),
    );
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(config.scan_threads())
        .thread_name(|i| format!("coral-scan-{i}"))
        .build()
        .map_err(|e| DaemonError::Threads(e.to_string()))?;
    let worker = ScanWorker {
        pool: pool.clone(),
        reporter: Arc::clone(&reporter),
        queue: Arc::clone(&queue),
        threads: Arc::new(threads),
        batch_size: config.scan.batch_size,
    };

    resume_interrupted(&pool, &queue).await;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Arc::clone(&reporter).run_ticker(
        Duration::from_millis(config.progress.notify_interval_ms),
        stop.clone(),
    ));
    tasks.spawn(persist_loop(
        Arc::clone(&reporter),
        pool.clone(),
        Duration::from_millis(config.progress.persist_interval_ms),
        stop.clone(),
    ));
    tasks.spawn(worker.run(jobs, stop.clone()));

    let listener = server::bind(&socket).await?;
    let rpc = CoralRpc(Arc::new(RpcContext {
        pool: pool.clone(),
        reporter: Arc::clone(&reporter),
        queue: Arc::clone(&queue),
        started_at: Utc::now(),
        socket: socket.clone(),
        state_dir: state_dir.clone(),
        database: database.description().to_owned(),
    }));
    tasks.spawn(server::serve(listener, rpc.into_rpc(), stop.clone()));
    tracing::info!(socket = %socket.display(), pid = std::process::id(), "corald ready");

    let signals = wait_for_signal(stop.clone());
    tokio::select! {
        r = signals => r.map_err(DaemonError::Signals)?,
        _ = stop.cancelled() => {}
    }
    tracing::info!("shutting down");
    stop.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(20), drain)
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 20 s");
    }
    // Persist the last state of scans that were interrupted; they resume at the next start.
    for h in reporter.handles() {
        if !h.phase().is_terminal() {
            reporter.publish(&h);
            if let Err(e) = scans::upsert(&pool, &h.latest()).await {
                tracing::warn!(error = %e, "could not persist scan state at shutdown");
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    database.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal(stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = stop.cancelled() => {}
    }
    Ok(())
}

/// Queue again every scan that was queued or running when corald last stopped, with the same
/// request id and `resumed = true`.
async fn resume_interrupted(pool: &sqlx::PgPool, queue: &ScanQueue) {
    let rows = match scans::unfinished(pool).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "cannot read interrupted scans; they will not resume");
            return;
        }
    };
    for row in rows {
        let request_id = row.request_id;
        let removed = row.counters().tracks_removed;
        let req = ScanRequest {
            library_id: row.library_id,
            library_root: PathBuf::from(&row.library_path),
            subdir: row.subdir.as_ref().map(PathBuf::from),
            mode: row.mode(),
            trigger: row.trigger(),
        };
        match queue.resume(req, request_id).await {
            Ok(h) => {
                h.counters()
                    .tracks_removed
                    .store(removed, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(%request_id, library = %row.library_path, "resuming interrupted scan");
            }
            Err(e) => tracing::error!(%request_id, error = %e, "cannot resume scan"),
        }
    }
}

/// Write each running scan's state to the database when it changed, every `interval`.
async fn persist_loop(
    reporter: Arc<ScanReporter>,
    pool: sqlx::PgPool,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut persisted: std::collections::HashMap<uuid::Uuid, u64> = Default::default();
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let handles = reporter.handles();
        persisted.retain(|id, _| handles.iter().any(|h| h.request_id() == *id));
        for h in handles {
            if h.phase().is_terminal() {
                continue; // the worker persists the final state itself
            }
            let v = h.version();
            if persisted.get(&h.request_id()) == Some(&v) {
                continue;
            }
            match scans::upsert(&pool, &h.latest()).await {
                Ok(()) => {
                    persisted.insert(h.request_id(), v);
                }
                Err(e) => {
                    tracing::warn!(request_id = %h.request_id(), error = %e, "could not persist scan state")
                }
            }
        }
    }
}

/// Silence the unused warning for the migrator re-export used by tests and tools.
pub use db::MIGRATOR;
