//! The API socket: the one corald binds (refused when another corald answers on it) or the one
//! systemd passed (socket activation), served once, either while start-up waits for the
//! database or when start-up is complete.

use std::path::PathBuf;

use coral_proto::CoralApiServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::DaemonError;
use crate::config::Config;
use crate::rpc::api::CoralRpc;
use crate::rpc::auth::AccessPolicy;
use crate::rpc::server;

pub(super) struct ApiSocket {
    /// Where clients connect.
    pub path: PathBuf,
    /// The listener systemd passed, until it is served.
    activated: Option<UnixListener>,
    /// Passed by systemd: it stays when corald stops (systemd keeps listening on it).
    socket_activated: bool,
    mode: u32,
    /// The group the socket gets, unless the configured one does not exist.
    gid: Option<u32>,
    policy: AccessPolicy,
    max_request_bytes: u32,
    serving: bool,
}

impl ApiSocket {
    /// Take the configured or passed socket. Refuses when another corald answers on the
    /// configured path (a socket passed by systemd answers by design: it is ours).
    pub(super) async fn new(
        config: &Config,
        activated: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Self, DaemonError> {
        let mode = config.rpc.socket_mode_bits()?;
        let configured = config.socket_path();
        if activated.is_none() {
            server::refuse_if_answered(&configured).await?;
        }
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
        let socket_activated = activated.is_some();
        let (activated, path) = match activated {
            Some(l) => {
                let path = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(PathBuf::from))
                    .unwrap_or(configured);
                tracing::info!(socket = %path.display(), "using the socket passed by systemd (socket activation)");
                (Some(server::from_activated(l)?), path)
            }
            None => (None, configured),
        };
        Ok(ApiSocket {
            path,
            activated,
            socket_activated,
            mode,
            gid: policy.fallback.is_none().then_some(policy.group_gid),
            policy,
            max_request_bytes: config.rpc.max_request_bytes,
            serving: false,
        })
    }

    /// Serve the API on the socket until `stop`, unless it is served already.
    pub(super) async fn serve(
        &mut self,
        tasks: &mut tokio::task::JoinSet<()>,
        rpc: &CoralRpc,
        stop: &CancellationToken,
    ) -> Result<(), DaemonError> {
        if self.serving {
            return Ok(());
        }
        let listener = match self.activated.take() {
            Some(l) => l,
            None => server::bind_with(&self.path, self.mode, self.gid).await?,
        };
        tasks.spawn(server::serve(
            listener,
            rpc.clone().into_rpc(),
            self.policy.clone(),
            self.max_request_bytes,
            stop.clone(),
        ));
        self.serving = true;
        Ok(())
    }

    /// Remove the socket file at the end, unless systemd passed it.
    pub(super) fn remove(&self) {
        if !self.socket_activated {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
