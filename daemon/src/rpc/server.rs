//! The Unix socket: binding it safely (a stale file from a crash is replaced, a live corald on
//! the same path is never stolen from), and serving JSON-RPC over WebSocket or plain HTTP POST on
//! each accepted connection until shutdown. Every accepted connection passes the peer
//! credential check of [`super::auth`] first. Under socket activation the listener comes from
//! systemd instead of [`bind`].

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jsonrpsee::server::{Methods, ServerConfig, serve_with_graceful_shutdown, stop_channel};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::auth::{self, AccessPolicy};

pub use crate::config::DEFAULT_MAX_REQUEST_BYTES;
/// Outgoing messages queued per connection before the server waits for the client to read.
pub const MESSAGE_BUFFER_PER_CONNECTION: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another corald is already answering on {0}; stop it first or choose another --socket")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create socket directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the socket passed by systemd: {0}")]
    Activated(std::io::Error),
}

/// Refuse when another corald answers on `path`: checked before corald touches its database,
/// and again when it binds.
pub async fn refuse_if_answered(path: &Path) -> Result<(), SocketError> {
    if UnixStream::connect(path).await.is_ok() {
        return Err(SocketError::AlreadyRunning(path.to_owned()));
    }
    Ok(())
}

/// Bind the API socket at `path` with mode 0660.
pub async fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    bind_with(path, 0o660, None).await
}

/// Use a listening socket passed by systemd (socket activation).
pub fn from_activated(
    listener: std::os::unix::net::UnixListener,
) -> Result<UnixListener, SocketError> {
    listener
        .set_nonblocking(true)
        .map_err(SocketError::Activated)?;
    UnixListener::from_std(listener).map_err(SocketError::Activated)
}

/// Bind the API socket at `path` with permission bits `mode`, and give it to group `gid` when
/// set (a failure to change the group is logged, not fatal: the mode still applies).
pub async fn bind_with(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            refuse_if_answered(path).await?;
            tracing::info!(socket = %path.display(), "replacing stale socket file");
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.to_owned(),
        source,
    })?;
    if let Some(gid) = gid
        && let Err(e) = nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
    {
        tracing::warn!(socket = %path.display(), gid, error = %e, "cannot give the socket to its group; only corald's own group can connect");
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        SocketError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Accept connections until `stop` is cancelled, then let open connections finish gracefully.
/// Each connection is admitted by `policy` first (refused peers get a 403 and are closed).
pub async fn serve(
    listener: UnixListener,
    methods: impl Into<Methods>,
    policy: AccessPolicy,
    max_request_bytes: u32,
    stop: CancellationToken,
) {
    let policy = std::sync::Arc::new(policy);
    let methods: Methods = methods.into();
    let config = ServerConfig::builder()
        .max_request_body_size(max_request_bytes)
        .max_connections(10_000)
        // Messages queued per connection for a client that does not read. Progress
        // subscriptions coalesce to the latest state while the queue is full, so a small queue
        // loses nothing and bounds what a stuck client costs (≈ 64 × 1 KB).
        .set_message_buffer_capacity(MESSAGE_BUFFER_PER_CONNECTION)
        .build();
    let svc_builder = jsonrpsee::server::Server::builder()
        .set_config(config)
        .to_service_builder();
    let (stop_handle, server_handle) = stop_channel();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of file descriptors and similar: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let svc = svc_builder
            .clone()
            .build(methods.clone(), stop_handle.clone());
        let stopped = stop_handle.clone().shutdown();
        let policy = std::sync::Arc::clone(&policy);
        tokio::spawn(async move {
            let Some(stream) = auth::admit(&policy, stream).await else {
                return;
            };
            if let Err(e) = serve_with_graceful_shutdown(stream, svc, stopped).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    let _ = server_handle.stop();
}
