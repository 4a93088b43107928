//! The ordered stop: `STOPPING=1`, every task drained (20 s at most), interrupted scans
//! persisted so they resume at the next start, the socket removed, the embedding pipeline's
//! computed vectors stored (10 s at most), the database closed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::serve::ApiSocket;
use crate::db::Database;
use crate::progress::ScanReporter;
use crate::systemd::Notifier;

/// What the stop needs of the running daemon.
pub(super) struct Parts<'a> {
    pub notifier: &'a Notifier,
    pub stop: &'a CancellationToken,
    pub tasks: tokio::task::JoinSet<()>,
    pub reporter: &'a ScanReporter,
    pub api_socket: &'a ApiSocket,
    pub embedder: Option<&'a crate::embed::Embedder>,
    pub database: Database,
}

pub(super) async fn shut_down(p: Parts<'_>) {
    let Parts {
        notifier,
        stop,
        mut tasks,
        reporter,
        api_socket,
        embedder,
        database,
    } = p;
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
    crate::progress::persist::save_interrupted(reporter, &database.pool).await;
    // A socket passed by systemd stays: systemd keeps listening on it for the next start.
    api_socket.remove();
    // The embedding pipeline stores the vectors it already computed before it stops.
    if let Some(e) = embedder
        && tokio::time::timeout(Duration::from_secs(10), e.stopped())
            .await
            .is_err()
    {
        tracing::warn!("the embedding pipeline did not stop within 10 s");
    }
    database.close().await;
    tracing::info!("stopped");
}
