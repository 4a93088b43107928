//! systemd integration: the service manager's environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
//! `LISTEN_FDS`), readiness and status notifications, and the watchdog.
//!
//! - [`SystemdEnv::take`] reads the variables once, at the very start of `main`, and removes
//!   them so that child processes (the managed PostgreSQL) neither notify systemd in corald's
//!   name nor inherit the passed socket.
//! - [`Notifier`] sends `READY=1`, `STATUS=…`, `WATCHDOG=1`, `RELOADING=1` and `STOPPING=1` to
//!   the notification socket; without `NOTIFY_SOCKET` it does nothing.
//! - [`watchdog_loop`] pings systemd only while every worker's heartbeat
//!   ([`crate::liveness`]) is fresh, so a wedged worker stops the pings and systemd restarts
//!   corald.
//! - [`status_line`] is the one-line human summary behind `STATUS=` (`systemctl status corald`).

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coral_proto::{ScanPhase, ScanProgress};
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::liveness::Liveness;

/// A problem with what systemd passed to corald.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("invalid socket activation variables (LISTEN_PID/LISTEN_FDS): {0}")]
    ListenFds(std::io::Error),
    #[error(
        "socket activation passed file descriptor {fd}, which is not a listening Unix stream socket; \
         check ListenStream= in corald.socket"
    )]
    NotAUnixListener { fd: RawFd },
    #[error("invalid NOTIFY_SOCKET {0:?}: {1}")]
    NotifySocket(OsString, std::io::Error),
}

/// What the service manager handed to this process.
#[derive(Debug, Default)]
pub struct SystemdEnv {
    /// Where notifications go (`NOTIFY_SOCKET`), if anywhere.
    notify: Option<SocketAddr>,
    /// `WATCHDOG_USEC`, when the watchdog is enabled for this process.
    pub watchdog: Option<Duration>,
    /// The socket passed by socket activation (`LISTEN_FDS`), if any.
    listener: Option<UnixListener>,
}

impl SystemdEnv {
    /// Nothing from systemd: no notifications, no watchdog, bind the socket ourselves.
    pub fn none() -> Self {
        SystemdEnv::default()
    }

    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC`/`WATCHDOG_PID` and `LISTEN_FDS`/`LISTEN_PID`, and
    /// remove them from the environment. Passed descriptors are marked close-on-exec; the first
    /// must be a listening Unix stream socket (others are closed with a warning later).
    ///
    /// # Safety
    ///
    /// Edits the process environment: call it before any other thread exists (first thing in
    /// `main`, before the async runtime starts).
    pub unsafe fn take() -> Result<Self, SystemdError> {
        let notify_var = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty());
        // SAFETY: the caller guarantees no other thread runs.
        let watchdog = unsafe { sd_notify::watchdog_enabled_and_unset_env() };
        // SAFETY: as above.
        let fds: Vec<RawFd> = unsafe { sd_notify::listen_fds_and_unset_env() }
            .map_err(SystemdError::ListenFds)?
            .collect();
        // SAFETY: as above.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("LISTEN_FDNAMES");
        }
        let notify = match notify_var {
            Some(v) => Some(notify_address(&v).map_err(|e| SystemdError::NotifySocket(v, e))?),
            None => None,
        };
        let mut listener = None;
        for (i, fd) in fds.into_iter().enumerate() {
            // SAFETY: systemd passed these descriptors to this process and nothing else owns
            // them; each is wrapped exactly once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            if i == 0 {
                if !is_unix_stream_listener(fd) {
                    return Err(SystemdError::NotAUnixListener { fd });
                }
                listener = Some(UnixListener::from(owned));
            }
            // Further descriptors are dropped (closed): corald listens on one socket.
        }
        Ok(SystemdEnv {
            notify,
            watchdog: watchdog.filter(|d| !d.is_zero()),
            listener,
        })
    }

    /// A notifier for `NOTIFY_SOCKET` (a no-op one when it was not set).
    pub fn notifier(&self) -> Notifier {
        Notifier {
            addr: self.notify.clone().map(Arc::new),
        }
    }

    /// The socket passed by socket activation, taken out (it can be taken once).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }

    /// Whether corald was socket-activated (before [`Self::take_listener`]).
    pub fn socket_activated(&self) -> bool {
        self.listener.is_some()
    }
}

/// `NOTIFY_SOCKET` as an address: a path, or `@name` for an abstract socket.
fn notify_address(v: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = v.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name)
    } else {
        SocketAddr::from_pathname(Path::new(v))
    }
}

/// Whether `fd` is an `AF_UNIX`, `SOCK_STREAM` socket in listening state.
fn is_unix_stream_listener(fd: RawFd) -> bool {
    fn opt(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        (r == 0).then_some(value)
    }
    opt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && opt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && opt(fd, libc::SO_ACCEPTCONN) == Some(1)
}

/// Sends notifications to the service manager. Cheap to clone; errors are logged at debug
/// level and otherwise ignored (a notification is never worth failing for).
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    addr: Option<Arc<SocketAddr>>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier::default()
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// Send one datagram with every state in `states`.
    pub fn send(&self, states: &[NotifyState<'_>]) {
        let Some(addr) = &self.addr else {
            return;
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(msg.as_bytes(), addr));
        if let Err(e) = sent {
            tracing::debug!(error = %e, message = %msg.trim_end(), "cannot notify systemd");
        }
    }

    /// `READY=1` with the current status line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `STATUS=…`.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// `RELOADING=1` (with `MONOTONIC_USEC`, which newer systemd versions expect).
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// Ping the watchdog every half `WATCHDOG_USEC` while every worker is alive, until `stop`.
pub async fn watchdog_loop(
    notifier: Notifier,
    liveness: Arc<Liveness>,
    interval: Duration,
    stop: CancellationToken,
) {
    let period = (interval / 2).max(Duration::from_millis(50));
    let mut timer = tokio::time::interval(period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withholding = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let stalled = liveness.stalled();
        if stalled.is_empty() {
            if withholding {
                tracing::info!("every worker is alive again; watchdog pings resume");
                withholding = false;
            }
            notifier.watchdog();
        } else if !withholding {
            withholding = true;
            for (name, age) in &stalled {
                tracing::error!(
                    worker = name,
                    silent_s = age.as_secs_f64(),
                    "{name} shows no progress; withholding watchdog pings so systemd restarts corald"
                );
            }
        }
    }
}

/// `41203` → `41,203`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn whole_percent(p: f64) -> u64 {
    // Floor, like the progress percentages themselves: 99.9 % is not 100 %.
    p.clamp(0.0, 100.0).floor() as u64
}

/// The one-line summary sent as `STATUS=`: `idle · 41,203 tracks`, or
/// `scanning /srv/music 62 % · embedding 18 %` (plus `· 2 more queued`).
/// `active`: queued and running scans, oldest first; `tracks`: the indexed track count, if
/// known.
pub fn status_line(active: &[Arc<ScanProgress>], tracks: Option<i64>) -> String {
    let running: Vec<&ScanProgress> = active
        .iter()
        .map(Arc::as_ref)
        .filter(|p| p.phase != ScanPhase::Queued && !p.phase.is_terminal())
        .collect();
    let queued = active
        .iter()
        .filter(|p| p.phase == ScanPhase::Queued)
        .count();
    let mut line = match running.first() {
        None => match tracks {
            Some(n) => format!(
                "idle · {} track{}",
                thousands(n.max(0).unsigned_abs()),
                if n == 1 { "" } else { "s" }
            ),
            None => "idle".to_owned(),
        },
        Some(p) => {
            let target = match &p.scan.path {
                Some(sub) => format!("{}/{}", p.scan.library_path.trim_end_matches('/'), sub),
                None => p.scan.library_path.clone(),
            };
            let mut s = match p.phase {
                ScanPhase::Discovering => format!(
                    "scanning {target} · discovering ({} files)",
                    thousands(p.counts.files_discovered)
                ),
                _ => match p.indexing_percent {
                    Some(pct) => format!("scanning {target} {} %", whole_percent(pct)),
                    None => format!("scanning {target}"),
                },
            };
            if let Some(e) = p.embedding_percent {
                s.push_str(&format!(" · embedding {} %", whole_percent(e)));
            }
            if running.len() > 1 {
                s.push_str(&format!(" · {} more running", running.len() - 1));
            }
            s
        }
    };
    if queued > 0 {
        line.push_str(&format!(" · {queued} queued"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use coral_proto::{ScanMode, ScanTrigger};

    fn progress(phase: ScanPhase, indexing: Option<f64>, embedding: Option<f64>) -> ScanProgress {
        let mut p = ScanProgress {
            indexing_percent: indexing,
            embedding_percent: embedding,
            ..ScanProgress::starting(
                uuid::Uuid::new_v4(),
                1,
                "/srv/music".into(),
                ScanTrigger::Manual,
                ScanMode::Incremental,
                phase,
                Utc::now(),
            )
        };
        p.counts.files_discovered = 1234;
        p
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(41203), "41,203");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn idle_status_counts_tracks() {
        assert_eq!(status_line(&[], Some(41203)), "idle · 41,203 tracks");
        assert_eq!(status_line(&[], Some(1)), "idle · 1 track");
        assert_eq!(status_line(&[], None), "idle");
        let queued = Arc::new(progress(ScanPhase::Queued, None, None));
        assert_eq!(
            status_line(&[queued], Some(5)),
            "idle · 5 tracks · 1 queued"
        );
    }

    #[test]
    fn scanning_status_shows_percentages() {
        let p = Arc::new(progress(ScanPhase::Indexing, Some(62.97), Some(18.2)));
        assert_eq!(
            status_line(&[p], Some(10)),
            "scanning /srv/music 62 % · embedding 18 %"
        );
        let d = Arc::new(progress(ScanPhase::Discovering, None, None));
        let q = Arc::new(progress(ScanPhase::Queued, None, None));
        assert_eq!(
            status_line(&[d, q], None),
            "scanning /srv/music · discovering (1,234 files) · 1 queued"
        );
        let mut sub = progress(ScanPhase::Indexing, None, None);
        sub.scan.path = Some("Jazz".into());
        assert_eq!(
            status_line(&[Arc::new(sub)], None),
            "scanning /srv/music/Jazz"
        );
    }

    #[test]
    fn notify_socket_addresses() {
        let a = notify_address(std::ffi::OsStr::new("/run/systemd/notify")).expect("path");
        assert_eq!(a.as_pathname(), Some(Path::new("/run/systemd/notify")));
        let b = notify_address(std::ffi::OsStr::new("@abstract")).expect("abstract");
        assert!(b.as_pathname().is_none());
    }

    #[test]
    fn notifier_sends_datagrams() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            addr: Some(Arc::new(SocketAddr::from_pathname(&path).expect("addr"))),
        };
        n.ready("idle · 0 tracks");
        let mut buf = [0u8; 512];
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(
            std::str::from_utf8(&buf[..len]).expect("utf8"),
            "READY=1\nSTATUS=idle · 0 tracks\n"
        );
        Notifier::disabled().ready("nothing"); // no socket: silently nothing
    }
}
