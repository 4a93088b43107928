//! A fake systemd notification socket (`NOTIFY_SOCKET`) for tests of corald as a service.
//!
//! It is a fake because the real receiver is systemd itself (PID 1), which cannot run inside
//! the tests: a Unix datagram socket the test binds, read by a thread that records every
//! `sd_notify` datagram corald sends (`READY=1`, `STATUS=…`, `WATCHDOG=1`, `RELOADING=1`,
//! `STOPPING=1`, …) with the instant it arrived. Point corald at it with
//! `NOTIFY_SOCKET=<path>` (and `WATCHDOG_USEC` for watchdog pings).

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::daemon::eventually;

/// One datagram received on the fake notification socket.
#[derive(Debug, Clone)]
pub struct Notification {
    pub at: Instant,
    pub text: String,
    /// For `READY=1`: whether the API socket accepted a connection right when it arrived.
    pub socket_accepted: Option<bool>,
}

impl Notification {
    /// Whether one of its lines is exactly `line` (e.g. `READY=1`).
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    /// The value of its `STATUS=` line, if any.
    pub fn status(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("STATUS="))
    }
}

/// A fake service manager's notification socket, read by a thread; unbound on drop.
pub struct NotifySocket {
    path: PathBuf,
    seen: Arc<Mutex<Vec<Notification>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    /// Bind `path`. On `READY=1`, the reader connects to `api_socket` at once and records
    /// whether that worked.
    pub fn bind(path: PathBuf, api_socket: PathBuf) -> Result<NotifySocket> {
        let sock = UnixDatagram::bind(&path)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let seen: Arc<Mutex<Vec<Notification>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let seen = Arc::clone(&seen);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = sock.recv(&mut buf) else {
                        continue;
                    };
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let ready = text.lines().any(|l| l == "READY=1");
                    let socket_accepted = ready.then(|| UnixStream::connect(&api_socket).is_ok());
                    seen.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(Notification {
                            at,
                            text,
                            socket_accepted,
                        });
                }
            })
        };
        Ok(NotifySocket {
            path,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path (the value for `NOTIFY_SOCKET`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every notification so far, oldest first.
    pub fn all(&self) -> Vec<Notification> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Wait for the first notification after index `from` that satisfies `pred`; returns its
    /// index.
    pub async fn wait_for(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Notification) -> bool,
    ) -> Result<usize> {
        let r = eventually(timeout, what, || async {
            self.all()
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, n)| pred(n))
                .map(|(i, _)| i)
        })
        .await;
        r.with_context(|| format!("notifications so far: {:#?}", self.texts()))
    }

    /// The text of every notification so far.
    pub fn texts(&self) -> Vec<String> {
        self.all().into_iter().map(|n| n.text).collect()
    }

    /// The `STATUS=` values of the notifications from index `from` on.
    pub fn statuses(&self, from: usize) -> Vec<String> {
        self.all()
            .iter()
            .skip(from)
            .filter_map(|n| n.status().map(str::to_owned))
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
