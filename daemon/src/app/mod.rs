//! The composition root: start the database, the ScanReporter, the scan channel and worker,
//! resume scans a restart interrupted, serve the API, and shut everything down in order on
//! SIGTERM/SIGINT.
//!
//! - `mod.rs`: [`run_service`], the order in which the parts start and stop;
//! - `startup.rs`: what runs once the database answers (resume, first scans, the embedding
//!   pipeline and its start-up sweep);
//! - `serve.rs`: the API socket (bound or passed by systemd), served once;
//! - `status.rs`: the systemd status line; `reload.rs`: SIGHUP; `shutdown.rs`: ordered stop.
//!
//! An external database that cannot be reached at start-up is waited for (with back-off) while
//! the socket already serves; the workers start once it answers.
//!
//! Under systemd (see [`crate::systemd`]): `READY=1` once migrations ran and the socket accepts
//! (or, while waiting for an unreachable external database, once the socket accepts),
//! `STATUS=` kept current, watchdog pings while the workers live, `STOPPING=1` on shutdown, and
//! SIGHUP reloads the configuration (`RELOADING=1` … `READY=1`): the log filter and the
//! `libraries` list apply at once; other changed settings are reported as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod reload;
mod serve;
mod shutdown;
mod startup;
mod status;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use serve::ApiSocket;
use status::StatusReporter;

use crate::config::{Config, Overrides};
use crate::db::{Database, DbError};
use crate::library::LibraryService;
use crate::liveness::Liveness;
use crate::progress::ScanReporter;
use crate::rpc::api::CoralRpc;
use crate::rpc::server::SocketError;
use crate::rpc::service::{RpcContext, Services};
use crate::scan::queue::ScanQueue;
use crate::scan::worker::ScanWorker;
use crate::systemd::SystemdEnv;

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
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// How corald was started, beyond its configuration: where the configuration came from (to
/// re-read it on SIGHUP, with the same flag overrides) and what systemd passed.
#[derive(Debug, Default)]
pub struct Service {
    /// The `--config` file, if one was named (else the system file is looked up again).
    pub config_path: Option<PathBuf>,
    /// Flag and environment overrides, applied again after a reload.
    pub overrides: Overrides,
    pub systemd: SystemdEnv,
}

/// Run the daemon until SIGTERM/SIGINT (or until `stop` is cancelled).
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), DaemonError> {
    run_service(config, Service::default(), stop).await
}

/// [`run`], with systemd integration and configuration reloads.
pub async fn run_service(
    mut config: Config,
    mut service: Service,
    stop: CancellationToken,
) -> Result<(), DaemonError> {
    // Installed first: until then SIGHUP would kill the process.
    let mut signals = Signals::install()?;
    let notifier = service.systemd.notifier();
    let activated = service.systemd.take_listener();
    let state_dir = config.state_dir();
    std::fs::create_dir_all(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    // Refuses early if another corald answers on the socket, before touching the database.
    let mut api_socket = ApiSocket::new(&config, activated).await?;

    notifier.status("starting: opening the database");
    let (database, waiting_for) = startup::open_database(&config, &state_dir).await?;
    let (core, idle) = Core::assemble(&config, &service, &database, &api_socket, &state_dir)?;
    let mut tasks = tokio::task::JoinSet::new();

    // The watchdog runs from here on: a daemon waiting for its database is not wedged.
    if let Some(interval) = service.systemd.watchdog {
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            "systemd watchdog enabled"
        );
        tasks.spawn(crate::systemd::watchdog_loop(
            notifier.clone(),
            Arc::clone(&core.liveness),
            interval,
            stop.clone(),
        ));
    }

    if let Some(why) = &waiting_for {
        api_socket.serve(&mut tasks, &core.rpc, &stop).await?;
        tracing::info!(socket = %api_socket.path.display(), pid = std::process::id(), "corald is serving its API while it waits for the database");
        // Ready for systemd once the socket accepts: a start timeout must not turn a database
        // outage into a restart loop. STATUS= says what it waits for.
        notifier.ready(&format!("waiting for the database: {why}"));
        let ready = tokio::select! {
            r = database.wait_until_ready(&stop) => r,
            _ = signals.stop_requested() => Ok(false),
        };
        match ready {
            Ok(true) => tracing::info!(
                database = database.target(),
                "the database answers: completing start-up"
            ),
            Ok(false) => {
                tracing::info!("shutting down before the database answered");
                notifier.stopping();
                stop.cancel();
                while tasks.join_next().await.is_some() {}
                api_socket.remove();
                database.close().await;
                tracing::info!("stopped");
                return Ok(());
            }
            Err(e) => {
                stop.cancel();
                api_socket.remove();
                return Err(e.into());
            }
        }
    }
    tracing::info!(database = database.description(), state_dir = %state_dir.display(), "database ready");

    let embedder = core
        .start_workers(idle, &config, &database, &mut tasks, &stop)
        .await;
    // Serves now unless it already did while waiting for the database.
    api_socket.serve(&mut tasks, &core.rpc, &stop).await?;
    tracing::info!(socket = %api_socket.path.display(), pid = std::process::id(), "corald ready");

    // Migrations ran and the socket accepts: ready (already said while waiting, if it waited).
    let status = StatusReporter {
        notifier: notifier.clone(),
        reporter: Arc::clone(&core.reporter),
        pool: database.pool.clone(),
        db: Arc::clone(&database.health),
    };
    if waiting_for.is_none() {
        notifier.ready(&status.line(true).await);
    } else {
        notifier.status(&status.line(true).await);
    }
    if notifier.enabled() {
        tasks.spawn(status.clone().run(stop.clone()));
    }
    core.libraries.sync(&[], &config.libraries, false).await;

    loop {
        tokio::select! {
            signal = signals.next() => {
                if signal == Signal::Stop {
                    break;
                }
                tracing::info!("SIGHUP received: reloading the configuration");
                notifier.reloading();
                reload::reload(&mut config, &service, &core.rpc).await;
                notifier.ready(&status.line(true).await);
            }
            _ = stop.cancelled() => break,
        }
    }
    shutdown::shut_down(shutdown::Parts {
        notifier: &notifier,
        stop: &stop,
        tasks,
        reporter: &core.reporter,
        api_socket: &api_socket,
        embedder: embedder.as_ref(),
        database,
    })
    .await;
    Ok(())
}

/// The daemon's services, made before the database answers (the API can serve meanwhile).
struct Core {
    reporter: Arc<ScanReporter>,
    queue: Arc<ScanQueue>,
    liveness: Arc<Liveness>,
    libraries: Arc<LibraryService>,
    rpc: CoralRpc,
}

/// What the workers take when they start, once the database answers.
struct IdleWorkers {
    /// The scan channel's receiving end.
    jobs: tokio::sync::mpsc::Receiver<crate::scan::queue::ScanJob>,
    threads: rayon::ThreadPool,
    watch_task: crate::watch::WatchTask,
}

impl Core {
    fn assemble(
        config: &Config,
        service: &Service,
        database: &Database,
        api_socket: &ApiSocket,
        state_dir: &std::path::Path,
    ) -> Result<(Core, IdleWorkers), DaemonError> {
        let pool = database.pool.clone();
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
        // The filesystem watcher feeds the scan channel; its task starts with the workers.
        let (fs_watcher, watch_task) = crate::watch::Watcher::new(
            config.watch.clone(),
            pool.clone(),
            Arc::clone(&queue),
            Arc::clone(&reporter),
        );
        let libraries = Arc::new(LibraryService {
            pool: pool.clone(),
            queue: Arc::clone(&queue),
            reporter: Arc::clone(&reporter),
            watcher: Arc::clone(&fs_watcher),
        });
        let rpc = CoralRpc(Arc::new(RpcContext {
            pool,
            reporter: Arc::clone(&reporter),
            queue: Arc::clone(&queue),
            started_at: Utc::now(),
            socket: api_socket.path.clone(),
            state_dir: state_dir.to_path_buf(),
            database: database.description().to_owned(),
            watcher: fs_watcher,
            services: std::sync::OnceLock::new(),
            db: Arc::clone(&database.health),
            last_counts: std::sync::Mutex::new((0, 0)),
            libraries: Arc::clone(&libraries),
        }));
        let core = Core {
            reporter,
            queue,
            liveness: Liveness::new(service.systemd.watchdog),
            libraries,
            rpc,
        };
        let idle = IdleWorkers {
            jobs,
            threads,
            watch_task,
        };
        Ok((core, idle))
    }

    /// Once the database answers: the embedding pipeline, the scan worker (after the scans a
    /// restart interrupted are queued again), progress ticking and persistence, the watcher and
    /// the database monitor. Returns the embedding pipeline, if it runs.
    async fn start_workers(
        &self,
        idle: IdleWorkers,
        config: &Config,
        database: &Database,
        tasks: &mut tokio::task::JoinSet<()>,
        stop: &CancellationToken,
    ) -> Option<crate::embed::Embedder> {
        let pool = &database.pool;
        let db_health = &database.health;
        let (embedder, embed_unavailable) =
            startup::start_embedder(config, pool, db_health, stop, &self.liveness).await;
        let IdleWorkers {
            jobs,
            threads,
            watch_task,
        } = idle;
        let worker = ScanWorker {
            pool: pool.clone(),
            reporter: Arc::clone(&self.reporter),
            queue: Arc::clone(&self.queue),
            threads: Arc::new(threads),
            batch_size: config.scan.batch_size,
            heartbeat: self.liveness.register("scan worker"),
            idle_beat: self.liveness.beat_interval(),
            embedder: embedder.clone(),
            db: Arc::clone(db_health),
        };

        let reembedding = startup::resume_interrupted(pool, &self.queue).await;

        tasks.spawn(Arc::clone(&self.reporter).run_ticker(
            Duration::from_millis(config.progress.notify_interval_ms),
            stop.clone(),
        ));
        tasks.spawn(crate::progress::persist::run_periodic(
            Arc::clone(&self.reporter),
            pool.clone(),
            Arc::clone(db_health),
            Duration::from_millis(config.progress.persist_interval_ms),
            stop.clone(),
        ));
        tasks.spawn(worker.run(jobs, stop.clone()));
        if let Some(e) = embedder.clone() {
            let plan = startup::start_reembed_jobs(pool, &self.queue, &e, reembedding).await;
            tasks.spawn(startup::sweep_missing_embeddings(e, plan, stop.clone()));
        }
        tasks.spawn(watch_task.run(stop.clone()));
        tasks.spawn(database.monitor(stop.clone()));
        let _ = self.rpc.0.services.set(Services {
            embedder: embedder.clone(),
            embed_unavailable,
        });
        embedder
    }
}

/// What a signal asks of corald.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
}

/// The signals that stop or reload corald.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, DaemonError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind| signal(kind).map_err(DaemonError::Signals);
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.terminate.recv() => { tracing::info!("SIGTERM received"); Signal::Stop }
            _ = self.interrupt.recv() => { tracing::info!("SIGINT received"); Signal::Stop }
            _ = self.hangup.recv() => Signal::Reload,
        }
    }

    /// Resolves on SIGTERM or SIGINT. A SIGHUP meanwhile stays pending: it reloads once
    /// start-up is complete.
    async fn stop_requested(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
        }
    }
}
