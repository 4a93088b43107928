//! Wiring: start the database, the ScanReporter, the scan channel and worker, resume scans a
//! restart interrupted, serve the API, and shut everything down in order on SIGTERM/SIGINT.
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

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::db::health::DbHealth;
use crate::db::{self, Database, DbError, scans};
use crate::library::LibraryService;
use crate::liveness::Liveness;
use crate::progress::ScanReporter;
use crate::rpc::api::{CoralRpc, RpcContext, Services};
use crate::rpc::auth::AccessPolicy;
use crate::rpc::server::{self, SocketError};
use crate::scan::queue::{ScanQueue, ScanRequest};
use crate::scan::worker::ScanWorker;
use crate::systemd::{Notifier, SystemdEnv};
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
    use tokio::signal::unix::{SignalKind, signal};
    // Installed first: until then SIGHUP would kill the process.
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let notifier = service.systemd.notifier();
    let activated = service.systemd.take_listener();
    let socket_activated = activated.is_some();
    let socket_mode = config.rpc.socket_mode_bits()?;

    let state_dir = config.state_dir();
    let socket = config.socket_path();
    std::fs::create_dir_all(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    // Refuse early if another corald answers on the socket, before touching the database.
    // (A socket passed by systemd answers by design: it is ours.)
    if activated.is_none() && tokio::net::UnixStream::connect(&socket).await.is_ok() {
        return Err(SocketError::AlreadyRunning(socket).into());
    }

    notifier.status("starting: opening the database");
    // Configuration problems (a bad URL, a managed cluster that cannot start) stop corald here.
    let database = Database::connect(&config.database, &state_dir).await?;
    let pool = database.pool.clone();
    let db_health = Arc::clone(&database.health);
    // A server that cannot be reached yet does not: the API comes up, says why, and start-up
    // completes once the database answers (no exit into a restart loop).
    let waiting_for = match database.prepare().await {
        Ok(()) => None,
        Err(e) if e.is_transient() => {
            tracing::error!(
                database = database.target(),
                error = %e,
                "the database cannot be reached; the API socket comes up meanwhile and start-up \
                 completes once it answers (retrying with back-off)"
            );
            db_health.start_unavailable(&e.to_string());
            Some(e.to_string())
        }
        Err(e) => return Err(e.into()),
    };

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
    let liveness = Liveness::new(service.systemd.watchdog);
    // The filesystem watcher feeds the scan channel; its task starts with the workers.
    let (fs_watcher, watch_task) = crate::watch::Watcher::new(
        config.watch.clone(),
        pool.clone(),
        Arc::clone(&queue),
        Arc::clone(&reporter),
    );

    let policy = AccessPolicy::from_config(&config.rpc);
    if let Some(why) = &policy.fallback {
        tracing::info!(
            group = %policy.group_name,
            gid = policy.group_gid,
            "{why}; the socket keeps corald's own group `{}` (gid {}), whose members may connect",
            policy.group_name,
            policy.group_gid
        );
    }
    let (mut activated_listener, socket) = match activated {
        Some(l) => {
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
                .unwrap_or(socket);
            tracing::info!(socket = %path.display(), "using the socket passed by systemd (socket activation)");
            (Some(server::from_activated(l)?), path)
        }
        None => (None, socket),
    };
    let libraries = Arc::new(LibraryService {
        pool: pool.clone(),
        queue: Arc::clone(&queue),
        reporter: Arc::clone(&reporter),
        watcher: Arc::clone(&fs_watcher),
    });
    let rpc = CoralRpc(Arc::new(RpcContext {
        pool: pool.clone(),
        reporter: Arc::clone(&reporter),
        queue: Arc::clone(&queue),
        started_at: Utc::now(),
        socket: socket.clone(),
        state_dir: state_dir.clone(),
        database: database.description().to_owned(),
        watcher: fs_watcher,
        services: std::sync::OnceLock::new(),
        db: Arc::clone(&db_health),
        last_counts: std::sync::Mutex::new((0, 0)),
        libraries: Arc::clone(&libraries),
    }));
    let api = rpc.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let mut serving = false;
    let gid = policy.fallback.is_none().then_some(policy.group_gid);

    // The watchdog runs from here on: a daemon waiting for its database is not wedged.
    if let Some(interval) = service.systemd.watchdog {
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            "systemd watchdog enabled"
        );
        tasks.spawn(crate::systemd::watchdog_loop(
            notifier.clone(),
            Arc::clone(&liveness),
            interval,
            stop.clone(),
        ));
    }

    if let Some(why) = &waiting_for {
        let listener = match activated_listener.take() {
            Some(l) => l,
            None => server::bind_with(&socket, socket_mode, gid).await?,
        };
        tasks.spawn(server::serve(
            listener,
            rpc.clone().into_rpc(),
            policy.clone(),
            config.rpc.max_request_bytes,
            stop.clone(),
        ));
        serving = true;
        tracing::info!(socket = %socket.display(), pid = std::process::id(), "corald is serving its API while it waits for the database");
        // Ready for systemd once the socket accepts: a start timeout must not turn a database
        // outage into a restart loop. STATUS= says what it waits for.
        notifier.ready(&format!("waiting for the database: {why}"));
        let ready = tokio::select! {
            r = database.wait_until_ready(&stop) => r,
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); Ok(false) }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); Ok(false) }
        };
        let ready = match ready {
            Ok(r) => r,
            Err(e) => {
                stop.cancel();
                if !socket_activated {
                    let _ = std::fs::remove_file(&socket);
                }
                return Err(e.into());
            }
        };
        if !ready {
            tracing::info!("shutting down before the database answered");
            notifier.stopping();
            stop.cancel();
            while tasks.join_next().await.is_some() {}
            if !socket_activated {
                let _ = std::fs::remove_file(&socket);
            }
            database.close().await;
            tracing::info!("stopped");
            return Ok(());
        }
        tracing::info!(
            database = database.target(),
            "the database answers: completing start-up"
        );
    }
    tracing::info!(database = database.description(), state_dir = %state_dir.display(), "database ready");

    let (embedder, embed_unavailable) =
        start_embedder(&config, &pool, &db_health, &stop, &liveness).await;
    let worker = ScanWorker {
        pool: pool.clone(),
        reporter: Arc::clone(&reporter),
        queue: Arc::clone(&queue),
        threads: Arc::new(threads),
        batch_size: config.scan.batch_size,
        heartbeat: liveness.register("scan worker"),
        idle_beat: liveness.beat_interval(),
        embedder: embedder.clone(),
        db: Arc::clone(&db_health),
    };

    resume_interrupted(&pool, &queue).await;

    tasks.spawn(Arc::clone(&reporter).run_ticker(
        Duration::from_millis(config.progress.notify_interval_ms),
        stop.clone(),
    ));
    tasks.spawn(crate::progress::persist::run_periodic(
        Arc::clone(&reporter),
        pool.clone(),
        Arc::clone(&db_health),
        Duration::from_millis(config.progress.persist_interval_ms),
        stop.clone(),
    ));
    tasks.spawn(worker.run(jobs, stop.clone()));
    if let Some(e) = embedder.clone() {
        tasks.spawn(sweep_missing_embeddings(e, stop.clone()));
    }
    tasks.spawn(watch_task.run(stop.clone()));
    tasks.spawn(database.monitor(stop.clone()));
    let _ = api.0.services.set(Services {
        embedder: embedder.clone(),
        embed_unavailable,
    });

    if !serving {
        let listener = match activated_listener.take() {
            Some(l) => l,
            None => server::bind_with(&socket, socket_mode, gid).await?,
        };
        tasks.spawn(server::serve(
            listener,
            rpc.into_rpc(),
            policy,
            config.rpc.max_request_bytes,
            stop.clone(),
        ));
    }
    tracing::info!(socket = %socket.display(), pid = std::process::id(), "corald ready");

    // Migrations ran and the socket accepts: ready (already said while waiting, if it waited).
    let status = StatusReporter {
        notifier: notifier.clone(),
        reporter: Arc::clone(&reporter),
        pool: pool.clone(),
        db: Arc::clone(&db_health),
    };
    if waiting_for.is_none() {
        notifier.ready(&status.line(true).await);
    } else {
        notifier.status(&status.line(true).await);
    }
    if notifier.enabled() {
        tasks.spawn(status.clone().run(stop.clone()));
    }
    libraries.sync(&[], &config.libraries, false).await;

    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                notifier.reloading();
                reload(&mut config, &service, &api).await;
                notifier.ready(&status.line(true).await);
            }
            _ = stop.cancelled() => break,
        }
    }
    tracing::info!("shutting down");
    notifier.stopping();
    stop.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(20), drain)
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 20 s");
    }
    // Persist the last state of scans that were interrupted; they resume at the next start.
    crate::progress::persist::save_interrupted(&reporter, &pool).await;
    // A socket passed by systemd stays: systemd keeps listening on it for the next start.
    if !socket_activated {
        let _ = std::fs::remove_file(&socket);
    }
    // The embedding pipeline stores the vectors it already computed before it stops.
    if let Some(e) = &embedder
        && tokio::time::timeout(Duration::from_secs(10), e.stopped())
            .await
            .is_err()
    {
        tracing::warn!("the embedding pipeline did not stop within 10 s");
    }
    database.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Keeps `STATUS=` current: at once when a scan changes phase, at most every 250 ms while
/// scans run, and every 30 s when idle (the track count can change through `library.remove`).
#[derive(Clone)]
struct StatusReporter {
    notifier: Notifier,
    reporter: Arc<ScanReporter>,
    pool: sqlx::PgPool,
    db: Arc<DbHealth>,
}

impl StatusReporter {
    /// The current line; `count` re-counts the tracks (an idle line needs the count).
    async fn line(&self, count: bool) -> String {
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

    async fn run(self, stop: CancellationToken) {
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

/// SIGHUP: read the configuration again and apply what can change while running (the log
/// filter, the `libraries` list). Settings that need a restart are kept as they are, with a
/// warning naming them. A configuration that does not load changes nothing.
async fn reload(config: &mut Config, service: &Service, api: &CoralRpc) {
    let mut new = match Config::load(service.config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return;
        }
    };
    new.apply(service.overrides.clone());
    if new.log != config.log {
        match crate::logging::set_filter(&new.log) {
            Ok(()) => tracing::info!(filter = %new.log, "log filter changed"),
            Err(e) => tracing::warn!(error = %e, "log filter not changed"),
        }
    }
    api.0
        .libraries
        .sync(&config.libraries, &new.libraries, true)
        .await;
    let mut needs_restart = Vec::new();
    if new.socket_path() != config.socket_path() {
        needs_restart.push("socket");
    }
    if new.state_dir() != config.state_dir() {
        needs_restart.push("state_dir");
    }
    if new.database != config.database {
        needs_restart.push("[database]");
    }
    if new.scan != config.scan {
        needs_restart.push("[scan]");
    }
    if new.progress != config.progress {
        needs_restart.push("[progress]");
    }
    if new.rpc != config.rpc {
        needs_restart.push("[rpc]");
    }
    if new.embed != config.embed {
        needs_restart.push("[embed]");
    }
    if new.watch != config.watch {
        needs_restart.push("[watch]");
    }
    if !needs_restart.is_empty() {
        tracing::warn!(
            settings = %needs_restart.join(", "),
            "changed settings need a restart to apply (systemctl restart corald)"
        );
    }
    // What runs now: the live settings from the new file, the rest as started.
    config.log = new.log;
    config.libraries = new.libraries;
    tracing::info!("configuration reloaded");
}

/// Queue again every scan that was queued or running when corald last stopped, with the same
/// request id and `resumed = true`; queue a first scan for any library that never had one.
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
        let removed = crate::progress::persist::row_counters(&row).tracks_removed;
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
    // A stop inside `library.add` (after the library's row, before its first scan's) leaves a
    // library no scan would ever cover when the watcher is off: give it its first scan now.
    let never = match crate::db::libraries::never_scanned(pool).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "cannot look for libraries that were never scanned");
            return;
        }
    };
    for (library_id, path) in never {
        let req = ScanRequest {
            library_id,
            library_root: PathBuf::from(&path),
            subdir: None,
            mode: coral_proto::ScanMode::Incremental,
            trigger: coral_proto::ScanTrigger::LibraryAdded,
        };
        match queue.submit(req).await {
            Ok((h, _)) => tracing::info!(
                request_id = %h.request_id(),
                library = %path,
                "library added before the last stop was never scanned: scanning it"
            ),
            Err(e) => tracing::error!(library = %path, error = %e, "cannot queue the first scan"),
        }
    }
}

/// Start the embedding pipeline when enabled. `(None, Some(reason))` when it cannot run: corald
/// still indexes, and `daemon.status` / `track.similar` say why embeddings are unavailable.
async fn start_embedder(
    config: &Config,
    pool: &sqlx::PgPool,
    db: &Arc<DbHealth>,
    stop: &CancellationToken,
    liveness: &Liveness,
) -> (Option<crate::embed::Embedder>, Option<String>) {
    if !config.embed.enabled {
        return (
            None,
            Some("embeddings are disabled (embed.enabled = false)".into()),
        );
    }
    // The inference thread is watched once it runs: a forward pass that never returns stops the
    // watchdog pings.
    let heartbeat = crate::liveness::Heartbeat::detached("inference");
    let started = crate::embed::Embedder::start_with_health(
        &config.embed,
        pool.clone(),
        stop.clone(),
        Some(Arc::clone(&heartbeat)),
        Arc::clone(db),
    )
    .await;
    match started {
        Ok(e) => {
            liveness.adopt(heartbeat);
            let s = e.status();
            tracing::info!(model = ?s.model, device = ?s.device, "embedding pipeline ready");
            (Some(e), None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "embeddings unavailable; indexing continues without them");
            (None, Some(format!("embeddings unavailable: {e}")))
        }
    }
}

/// At start-up, embed every track that lacks an embedding of its current file for the active
/// model (embeddings were off, a scan was interrupted, the model changed).
async fn sweep_missing_embeddings(embedder: crate::embed::Embedder, stop: CancellationToken) {
    let targets = match embedder.missing_targets().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list tracks lacking embeddings");
            return;
        }
    };
    if targets.is_empty() {
        return;
    }
    let request_id = uuid::Uuid::new_v4();
    tracing::info!(%request_id, tracks = targets.len(), "embedding tracks that lack an embedding");
    match embedder.embed(request_id, targets, stop).await {
        Ok(s) => tracing::info!(
            %request_id,
            embedded = s.embedded,
            skipped = s.skipped,
            failed = s.failed,
            "start-up embedding sweep finished"
        ),
        Err(e) => tracing::warn!(%request_id, error = %e, "start-up embedding sweep ended early"),
    }
}
