//! Connecting to corald: a jsonrpsee WebSocket client over the daemon's Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonrpsee::async_client::{Client, ClientBuilder};
use jsonrpsee::client_transport::ws::{Url, WsTransportClientBuilder};
use tokio::net::UnixStream;

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "corald is not running (no socket at {0}); start it with `corald` (or `systemctl start corald`), or pass --socket"
    )]
    NoSocket(PathBuf),
    #[error(
        "corald is not running (nothing answers on {0}: connection refused); start it with `corald` (or `systemctl start corald`)"
    )]
    Refused(PathBuf),
    #[error("permission denied on {0}: ask to be added to the `coral` group, or use sudo")]
    PermissionDenied(PathBuf),
    #[error("cannot connect to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corald on {path} did not complete the handshake: {message}")]
    Handshake { path: PathBuf, message: String },
}

/// Connect to the daemon listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Client, ConnectError> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            let path = socket.to_owned();
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => ConnectError::NoSocket(path),
                std::io::ErrorKind::ConnectionRefused => ConnectError::Refused(path),
                std::io::ErrorKind::PermissionDenied => ConnectError::PermissionDenied(path),
                _ => ConnectError::Io { path, source: e },
            });
        }
    };
    let handshake = |message: String| ConnectError::Handshake {
        path: socket.to_owned(),
        message,
    };
    let url = Url::parse("ws://localhost/").map_err(|e| handshake(e.to_string()))?;
    let (tx, rx) = WsTransportClientBuilder::default()
        .connection_timeout(Duration::from_secs(10))
        .build_with_stream(url, stream)
        .await
        .map_err(|e| match e {
            // The daemon's peer-credential check answers 403 to users it does not admit.
            jsonrpsee::client_transport::ws::WsHandshakeError::Rejected {
                status_code: 403,
                ..
            } => ConnectError::PermissionDenied(socket.to_owned()),
            e => handshake(e.to_string()),
        })?;
    Ok(ClientBuilder::default()
        .request_timeout(Duration::from_secs(120))
        .build_with_tokio(tx, rx))
}
