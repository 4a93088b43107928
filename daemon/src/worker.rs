//! `corald worker`: only the embedding pipeline, for another machine (a GPU box). It connects to
//! the database of the corald that owns the libraries (an external PostgreSQL server: the
//! managed cluster listens on a local socket only), takes tracks from its embedding queue, reads
//! the music through a shared mount (`--path-map FROM=TO` maps a library root as corald sees it
//! to the path here), and stores the vectors. Progress reaches corald's subscribers through the
//! queue's rows; `coralctl status` lists the worker.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{Database, DbError};
use crate::embed::{EmbedError, Embedder};

/// What `corald worker` is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub database_url: String,
    /// `(FROM, TO)`: a library root under FROM (as corald sees it) is under TO here.
    pub path_map: Vec<(PathBuf, PathBuf)>,
    /// Overrides `embed.device`.
    pub device: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("cannot start the embedding pipeline: {0}")]
    Embed(#[from] EmbedError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Parse one `--path-map FROM=TO` (both absolute).
pub fn parse_path_map(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (from, to) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not FROM=TO"))?;
    let (from, to) = (PathBuf::from(from), PathBuf::from(to));
    if !from.is_absolute() || !to.is_absolute() {
        return Err(format!("{s:?}: both paths must be absolute"));
    }
    Ok((from, to))
}

/// Run until SIGTERM/SIGINT (or `stop`): wait for the database, start the pipeline, consume.
/// Tracks being embedded at a stop are stored first; the ones leased but not started are
/// taken over by another consumer when their lease expires.
pub async fn run_worker(
    config: Config,
    opts: WorkerOptions,
    stop: CancellationToken,
) -> Result<(), WorkerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(WorkerError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(WorkerError::Signals)?;
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = sigterm.recv() => tracing::info!("SIGTERM: stopping"),
                _ = sigint.recv() => tracing::info!("SIGINT: stopping"),
                _ = stop.cancelled() => {}
            }
            stop.cancel();
        });
    }
    let mut db_cfg = config.database.clone();
    db_cfg.url = Some(opts.database_url.clone());
    let db = Database::connect(&db_cfg, &config.state_dir()).await?;
    tracing::info!(database = %db.target(), "waiting for the database");
    if !db.wait_until_ready(&stop).await? {
        return Ok(());
    }
    tokio::spawn(db.monitor(stop.clone()));
    let mut embed = config.embed.clone();
    if let Some(d) = opts.device {
        embed.device = d;
    }
    for (from, to) in &opts.path_map {
        tracing::info!(from = %from.display(), to = %to.display(), "path mapping");
    }
    let embedder = Embedder::start_worker(
        &embed,
        db.pool.clone(),
        stop.clone(),
        std::sync::Arc::clone(&db.health),
        opts.path_map,
    )
    .await?;
    let s = embedder.status();
    tracing::info!(model = ?s.model, device = ?s.device, "worker ready: consuming the embedding queue");
    stop.cancelled().await;
    embedder.stopped().await;
    tracing::info!(
        tracks = embedder.status().tracks_embedded_since_start,
        "worker stopped"
    );
    db.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_maps_are_two_absolute_paths() {
        assert_eq!(
            parse_path_map("/srv/music=/mnt/nas/music"),
            Ok((PathBuf::from("/srv/music"), PathBuf::from("/mnt/nas/music")))
        );
        assert!(
            parse_path_map("/srv/music")
                .unwrap_err()
                .contains("FROM=TO")
        );
        assert!(
            parse_path_map("music=/mnt/music")
                .unwrap_err()
                .contains("absolute")
        );
    }

    #[test]
    fn a_root_under_a_mapped_path_moves_with_it() {
        let map = vec![
            (PathBuf::from("/srv/music"), PathBuf::from("/mnt/nas")),
            (PathBuf::from("/srv"), PathBuf::from("/mnt/srv")),
        ];
        let m = |p: &str| crate::embed::consumer::map_path(std::path::Path::new(p), &map);
        assert_eq!(m("/srv/music/Jazz"), PathBuf::from("/mnt/nas/Jazz"));
        assert_eq!(m("/srv/music"), PathBuf::from("/mnt/nas"));
        assert_eq!(m("/srv/other"), PathBuf::from("/mnt/srv/other"));
        // Components, not characters: /srv/musicals is not under /srv/music.
        assert_eq!(m("/srv/musicals"), PathBuf::from("/mnt/srv/musicals"));
        assert_eq!(m("/home/music"), PathBuf::from("/home/music"));
    }
}
