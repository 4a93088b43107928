//! The filesystem watcher: turns changes in library folders into ordinary, path-targeted,
//! incremental scans (trigger `file_system_event`) on the scan channel, and says honestly when
//! it cannot watch.
//!
//! How it decides, per library (details in the submodules):
//!
//! * **inotify** (`inotify`, `arm`, `moves`): one watch per directory (hidden `.name`
//!   directories and NAS metadata folders skipped, as the scanner skips them; symbolic links to
//!   directories are followed, each directory watched once). A new directory gets its watches
//!   first and is then scanned as a whole, so files written into it before its watch existed
//!   are found. Renames and moves inside a library are applied to the database directly (same
//!   track id, so the same embedding) and need no rescan; a move out is a removal, a move in an
//!   addition.
//!   `IN_Q_OVERFLOW` (events lost) re-arms every library and rescans it.
//! * **debounce** (`debounce`): changes wait for a quiet period (`debounce_ms`) and for files
//!   open for writing to be closed (or idle for `write_timeout_s`), then go out as a handful of
//!   subtree scans.
//! * **polling** (`poll`, `mounts`): libraries on network or FUSE filesystems, and libraries
//!   that hit the inotify watch limit (ENOSPC, or `max_watches`), get an incremental scan every
//!   `poll_interval_s`, with the reason in `daemon.status`. A library that hit the limit tries
//!   inotify again at each poll once the kernel's limit has been raised.
//! * **paused**: a root that disappears (deleted, moved away, unmounted — or missing at a
//!   check) pauses its library: no scan runs, nothing is deleted. The root is looked at every
//!   `root_check_s`; when it is back, watches are re-armed and an incremental scan runs. Active
//!   libraries' roots are checked as often, so a disk mounted over a watched (empty) mount point
//!   is noticed.
//! * **at start-up** (`scan_on_start`), every watched library without a scan already queued or
//!   running (a resumed one) gets an incremental `startup` scan: inotify cannot know what
//!   changed while corald was stopped.
//!
//! The watcher is one task owning all state (`actor`); the RPC API talks to it through
//! [`Watcher`].

pub mod actor;
pub mod arm;
pub mod debounce;
pub mod inotify;
pub mod mounts;
mod moves;
pub mod poll;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coral_proto::LibraryWatch;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::progress::ScanReporter;
use crate::scan::queue::ScanQueue;

pub use crate::config::watch::WatchConfig;

/// What the watcher publishes for `daemon.status`.
#[derive(Debug, Default)]
pub(crate) struct Published {
    libraries: BTreeMap<i64, LibraryWatch>,
    /// Warnings that belong in `daemon.status.warnings` (limits hit, roots missing).
    alarms: BTreeMap<i64, String>,
    /// A problem with inotify itself (it could not be started).
    global: Option<String>,
}

pub(crate) enum Command {
    Add {
        id: i64,
        root: PathBuf,
        done: oneshot::Sender<()>,
    },
    Remove {
        id: i64,
    },
}

/// The handle the rest of corald uses to talk to the watcher task.
pub struct Watcher {
    tx: mpsc::UnboundedSender<Command>,
    published: Arc<Mutex<Published>>,
}

/// The watcher task, to be spawned once.
pub struct WatchTask {
    actor: actor::Actor,
    rx: mpsc::UnboundedReceiver<Command>,
}

impl WatchTask {
    /// Watch until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        self.actor.run(self.rx, stop).await;
    }
}

impl Watcher {
    /// Build the watcher and its task (call inside the tokio runtime). It loads the registered
    /// libraries itself when the task starts.
    pub fn new(
        config: WatchConfig,
        pool: PgPool,
        queue: Arc<ScanQueue>,
        reporter: Arc<ScanReporter>,
    ) -> (Arc<Watcher>, WatchTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        let published = Arc::new(Mutex::new(Published::default()));
        let actor = actor::Actor::new(config, pool, queue, reporter, Arc::clone(&published));
        (Arc::new(Watcher { tx, published }), WatchTask { actor, rx })
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Published> {
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Start watching a newly registered library. Returns once its watches are in place (or
    /// after a few seconds on a very large tree), so a scan queued afterwards cannot miss a
    /// file written in between.
    pub async fn add_library(&self, id: i64, root: &Path) {
        let (done, wait) = oneshot::channel();
        let cmd = Command::Add {
            id,
            root: root.to_owned(),
            done,
        };
        if self.tx.send(cmd).is_err() {
            return; // the watcher has stopped (shutdown)
        }
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            tracing::warn!(library = %root.display(), "watches still being set up after 10 s; continuing");
        }
    }

    /// Stop watching a library that is being removed.
    pub fn remove_library(&self, id: i64) {
        let _ = self.tx.send(Command::Remove { id });
    }

    /// Per-library watch state for `daemon.status`.
    pub fn status(&self) -> Vec<LibraryWatch> {
        self.published().libraries.values().cloned().collect()
    }

    /// Watch problems that deserve a line in `daemon.status.warnings`.
    pub fn warnings(&self) -> Vec<String> {
        let p = self.published();
        p.global
            .iter()
            .cloned()
            .chain(p.alarms.iter().map(|(id, w)| {
                let path = p
                    .libraries
                    .get(id)
                    .map_or_else(|| id.to_string(), |l| l.path.clone());
                format!("library {path}: {w}")
            }))
            .collect()
    }
}
