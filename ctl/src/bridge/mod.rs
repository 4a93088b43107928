//! `coralctl bridge`: brings corald's JSON-RPC API to web browsers without widening the daemon's
//! attack surface. An HTTP server serves the live progress page at `/`, JSON-RPC 2.0 over
//! WebSocket at `/ws` and over plain HTTP at `POST /rpc` (for programs such as media-server
//! plugins that can only make HTTP requests), with the daemon's own method, notification and wire types (from
//! `coral-proto`), forwarded over one upstream connection to corald's Unix socket.
//!
//! Security model (see [`Config::from_args`]):
//! - loopback only unless `--allow-remote` is given together with a token of 16+ characters;
//! - an `Origin` allow-list (by default the bridge's own origins); a browser handshake from any
//!   other origin is refused with 403 before the upgrade;
//! - read-only methods and the subscriptions are open to allowed origins; `scan.start`,
//!   `scan.cancel`, `library.add` and `library.remove` need the token, given as a `?token=`
//!   query parameter or a `coral.token.<TOKEN>` WebSocket subprotocol entry (browsers cannot set
//!   headers), or on `/rpc` an `Authorization: Bearer <TOKEN>` header, compared in constant time;
//! - `--token-required-for-reads` (for a listen beyond loopback) makes every method and
//!   subscription need the token: requests without it get HTTP 401.
//!
//! Resilience: when corald goes away the bridge reconnects with back-off, re-subscribes, pushes a
//! fresh snapshot to every browser subscription and announces the state with `bridge.status`
//! notifications; browsers stay connected throughout. Each subscription holds at most one pending
//! update per scan, so a slow browser gets the latest state instead of a backlog.

mod http;
mod rpc;
mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

/// Shortest token accepted when the bridge listens beyond loopback.
pub const MIN_REMOTE_TOKEN_LEN: usize = 16;

/// Options of `coralctl bridge`.
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeArgs {
    /// Address and port to listen on (an IP address; loopback unless --allow-remote).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// Token that unlocks the mutating methods (scan.start, scan.cancel, library.add,
    /// library.remove). Without one, the bridge is read-only.
    #[arg(long, env = "CORAL_BRIDGE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Also accept WebSocket connections from pages of this origin (e.g.
    /// https://coral.example:8443). Repeatable. The bridge's own origins are always allowed.
    #[arg(long = "allow-origin", value_name = "URL")]
    pub allow_origin: Vec<String>,
    /// Allow listening on a non-loopback address. Needs a token of at least 16 characters; put a
    /// TLS-terminating proxy in front, since the bridge speaks plain HTTP.
    #[arg(long)]
    pub allow_remote: bool,
    /// Every method needs the token, reads too (HTTP 401 without it on /ws and /rpc). For a
    /// listen beyond loopback, where anyone who reaches the port could otherwise read the
    /// library.
    #[arg(long)]
    pub token_required_for_reads: bool,
}

/// Why the bridge refused its options.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0:?} is not an IP address and port (for example 127.0.0.1:7700)")]
    BadListen(String),
    #[error(
        "refusing to listen on {0}, which is not a loopback address: pass --allow-remote and a token (--token or CORAL_BRIDGE_TOKEN), and put a TLS proxy in front"
    )]
    RemoteNotAllowed(IpAddr),
    #[error(
        "--allow-remote needs a token of at least {MIN_REMOTE_TOKEN_LEN} characters (--token or CORAL_BRIDGE_TOKEN)"
    )]
    RemoteNeedsToken,
    #[error("the token is empty; leave it unset for a read-only bridge")]
    EmptyToken,
    #[error("--token-required-for-reads needs a token (--token or CORAL_BRIDGE_TOKEN)")]
    ReadsNeedToken,
    #[error("--allow-origin {0:?} is not an http(s) origin such as http://localhost:8080")]
    BadOrigin(String),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub token: Option<String>,
    /// Extra allowed origins, normalised (see [`http::normalize_origin`]).
    pub extra_origins: Vec<String>,
    pub socket: PathBuf,
    /// Every method needs the token.
    pub token_required_for_reads: bool,
}

impl Config {
    /// Check the options: loopback unless `--allow-remote` with a long enough token; well-formed
    /// origins; a non-empty token.
    pub fn from_args(args: &BridgeArgs, socket: PathBuf) -> Result<Config, ConfigError> {
        let listen: SocketAddr = args
            .listen
            .parse()
            .map_err(|_| ConfigError::BadListen(args.listen.clone()))?;
        let token = match args.token.as_deref() {
            Some("") => return Err(ConfigError::EmptyToken),
            t => t.map(str::to_owned),
        };
        if !listen.ip().is_loopback() {
            if !args.allow_remote {
                return Err(ConfigError::RemoteNotAllowed(listen.ip()));
            }
            if token
                .as_ref()
                .is_none_or(|t| t.chars().count() < MIN_REMOTE_TOKEN_LEN)
            {
                return Err(ConfigError::RemoteNeedsToken);
            }
        }
        if args.token_required_for_reads && token.is_none() {
            return Err(ConfigError::ReadsNeedToken);
        }
        let extra_origins = args
            .allow_origin
            .iter()
            .map(|o| http::normalize_origin(o).ok_or_else(|| ConfigError::BadOrigin(o.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            listen,
            token,
            extra_origins,
            socket,
            token_required_for_reads: args.token_required_for_reads,
        })
    }
}

/// Run the bridge until SIGINT or SIGTERM.
pub async fn run(args: BridgeArgs, socket: PathBuf) -> Result<()> {
    let config = Config::from_args(&args, socket)?;
    let upstream = upstream::Upstream::new(config.socket.clone());
    tokio::spawn(Arc::clone(&upstream).run());
    let server = http::Server::bind(&config, Arc::clone(&upstream))
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    println!(
        "coralctl bridge: listening on http://{}/ (corald socket {}; {})",
        server.local_addr(),
        config.socket.display(),
        if config.token_required_for_reads {
            "token required for every method"
        } else if config.token.is_some() {
            "token set: scans can be started from the page"
        } else {
            "no token: read-only"
        }
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        () = server.serve() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("coralctl bridge: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(listen: &str, token: Option<&str>, remote: bool) -> BridgeArgs {
        BridgeArgs {
            listen: listen.to_owned(),
            token: token.map(str::to_owned),
            allow_origin: vec!["HTTP://Example.COM:80/".to_owned()],
            allow_remote: remote,
            token_required_for_reads: false,
        }
    }

    #[test]
    fn loopback_only_unless_remote_with_a_long_token() {
        let sock = PathBuf::from("/tmp/x.sock");
        assert!(Config::from_args(&args("127.0.0.1:0", None, false), sock.clone()).is_ok());
        assert!(Config::from_args(&args("[::1]:7700", None, false), sock.clone()).is_ok());
        assert!(matches!(
            Config::from_args(
                &args("0.0.0.0:7700", Some("x".repeat(32).as_str()), false),
                sock.clone()
            ),
            Err(ConfigError::RemoteNotAllowed(_))
        ));
        assert!(matches!(
            Config::from_args(&args("0.0.0.0:7700", Some("short"), true), sock.clone()),
            Err(ConfigError::RemoteNeedsToken)
        ));
        assert!(matches!(
            Config::from_args(&args("0.0.0.0:7700", None, true), sock.clone()),
            Err(ConfigError::RemoteNeedsToken)
        ));
        let c = Config::from_args(
            &args("0.0.0.0:7700", Some("0123456789abcdef"), true),
            sock.clone(),
        );
        assert!(c.is_ok());
        assert!(matches!(
            Config::from_args(&args("localhost:7700", None, false), sock.clone()),
            Err(ConfigError::BadListen(_))
        ));
        assert!(matches!(
            Config::from_args(&args("127.0.0.1:7700", Some(""), false), sock.clone()),
            Err(ConfigError::EmptyToken)
        ));
        let mut reads = args("127.0.0.1:7700", None, false);
        reads.token_required_for_reads = true;
        assert!(matches!(
            Config::from_args(&reads, sock.clone()),
            Err(ConfigError::ReadsNeedToken)
        ));
        reads.token = Some("t".into());
        assert!(Config::from_args(&reads, sock).is_ok_and(|c| c.token_required_for_reads));
    }

    #[test]
    fn extra_origins_are_normalised_and_checked() {
        let sock = PathBuf::from("/tmp/x.sock");
        let c = Config::from_args(&args("127.0.0.1:0", None, false), sock.clone())
            .map_err(|e| e.to_string());
        assert_eq!(
            c.map(|c| c.extra_origins),
            Ok(vec!["http://example.com".to_owned()])
        );
        let mut bad = args("127.0.0.1:0", None, false);
        bad.allow_origin = vec!["file:///etc".to_owned()];
        assert!(matches!(
            Config::from_args(&bad, sock),
            Err(ConfigError::BadOrigin(_))
        ));
    }
}
