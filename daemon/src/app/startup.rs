//! Start-up after the database answers: interrupted scans resumed (and first scans for
//! libraries that never had one), the embedding pipeline started, re-embed jobs for libraries
//! served by a model other than the active one, and the other libraries' tracks lacking an
//! embedding of the active model queued.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::DaemonError;
use crate::config::Config;
use crate::db::Database;
use crate::db::health::DbHealth;
use crate::db::scans;
use crate::liveness::Liveness;
use crate::scan::queue::{ScanQueue, ScanRequest};
use coral_proto::ScanTrigger;

/// Open the database: the managed cluster started (or the external server's URL parsed), then
/// one attempt to connect and migrate. Configuration problems (a bad URL, a managed cluster
/// that cannot start) stop corald; a server that cannot be reached yet does not: the reason
/// comes back, the API comes up and says why, and start-up completes once the database
/// answers (no exit into a restart loop).
pub(super) async fn open_database(
    config: &Config,
    state_dir: &std::path::Path,
) -> Result<(Database, Option<String>), DaemonError> {
    let database = Database::connect(&config.database, state_dir).await?;
    let waiting_for = match database.prepare().await {
        Ok(()) => None,
        Err(e) if e.is_transient() => {
            tracing::error!(
                database = database.target(),
                error = %e,
                "the database cannot be reached; the API socket comes up meanwhile and start-up \
                 completes once it answers (retrying with back-off)"
            );
            database.health.start_unavailable(&e.to_string());
            Some(e.to_string())
        }
        Err(e) => return Err(e.into()),
    };
    Ok((database, waiting_for))
}

/// Queue again every scan that was queued or running when corald last stopped, with the same
/// request id and `resumed = true`; queue a first scan for any library that never had one.
/// Returns the libraries whose resumed job is a re-embed job (trigger `model_change`).
pub(super) async fn resume_interrupted(pool: &sqlx::PgPool, queue: &ScanQueue) -> Vec<i64> {
    let mut reembedding = Vec::new();
    let rows = match scans::unfinished(pool).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "cannot read interrupted scans; they will not resume");
            return reembedding;
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
                if h.info().trigger == ScanTrigger::ModelChange {
                    reembedding.push(h.info().library_id);
                }
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
            return reembedding;
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
    reembedding
}

/// Which libraries the start-up embedding work covers how.
#[derive(Debug, Default)]
pub(super) struct StartupEmbedding {
    /// Libraries with a re-embed job (resumed or new): the start-up sweep leaves them to it.
    pub reembedding: Vec<i64>,
    /// The other libraries: the sweep embeds what they lack, then checks whether each is
    /// complete under the active model.
    pub swept: Vec<i64>,
}

/// After a model change: a re-embed job (trigger `model_change`, background priority) for each
/// library served by a model other than the active one (`embed::serving`), unless one resumed.
/// The model can change only at a start (SIGHUP leaves `[embed]` to a restart).
pub(super) async fn start_reembed_jobs(
    pool: &sqlx::PgPool,
    queue: &ScanQueue,
    embedder: &crate::embed::Embedder,
    resumed: Vec<i64>,
) -> StartupEmbedding {
    let mut plan = StartupEmbedding {
        reembedding: resumed,
        swept: Vec::new(),
    };
    let libraries = match crate::embed::serving::libraries(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot read which model serves each library");
            return plan;
        }
    };
    let active = embedder.model();
    for (library_id, path, complete) in libraries {
        if plan.reembedding.contains(&library_id) {
            continue;
        }
        if !crate::embed::serving::needs_reembed(active, &complete) {
            plan.swept.push(library_id);
            continue;
        }
        let req = ScanRequest {
            library_id,
            library_root: PathBuf::from(&path),
            subdir: None,
            mode: coral_proto::ScanMode::Incremental,
            trigger: ScanTrigger::ModelChange,
        };
        match queue.submit(req).await {
            Ok((h, _)) => {
                tracing::info!(
                    request_id = %h.request_id(),
                    library = %path,
                    model_id = active.id,
                    "the active model changed: re-embedding the library in the background; \
                     similarity answers from its previous model until it is complete"
                );
                plan.reembedding.push(library_id);
            }
            Err(e) => {
                tracing::error!(library = %path, error = %e, "cannot queue the re-embed job")
            }
        }
    }
    plan
}

/// Start the embedding pipeline when enabled. `(None, Some(reason))` when it cannot run: corald
/// still indexes, and `daemon.status` / `track.similar` say why embeddings are unavailable.
pub(super) async fn start_embedder(
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
/// model (embeddings were off, a scan was interrupted, a library complete under no model when
/// the model changed). Libraries with a re-embed job are left to it. Once the sweep is done (it covered every
/// track of the swept libraries lacking a vector), each swept library is complete under the
/// active model and switched to it when it was not yet (`embed::serving`).
pub(super) async fn sweep_missing_embeddings(
    embedder: crate::embed::Embedder,
    plan: StartupEmbedding,
    stop: CancellationToken,
) {
    let scope = crate::embed::phase_5_store::LibraryScope {
        only: None,
        except: plan.reembedding,
    };
    let targets = match embedder.missing_targets_in(&scope).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list tracks lacking embeddings");
            return;
        }
    };
    if !targets.is_empty() {
        let request_id = uuid::Uuid::new_v4();
        tracing::info!(%request_id, tracks = targets.len(), "embedding tracks that lack an embedding");
        match embedder.embed(request_id, targets, stop.clone()).await {
            Ok(s) => tracing::info!(
                %request_id,
                embedded = s.embedded,
                skipped = s.skipped,
                failed = s.failed,
                "start-up embedding sweep finished"
            ),
            Err(e) => {
                tracing::warn!(%request_id, error = %e, "start-up embedding sweep ended early");
                return;
            }
        }
    }
    for library_id in plan.swept {
        if stop.is_cancelled() {
            return;
        }
        embedder.library_embedded(library_id, true).await;
    }
}
