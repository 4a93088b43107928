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
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::progress::ScanReporter;
use crate::scan::queue::ScanQueue;

/// The `[watch]` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Watch libraries for changes and scan what changed.
    pub enabled: bool,
    /// Quiet period before changes are scanned, in milliseconds.
    pub debounce_ms: u64,
    /// Seconds between incremental scans of libraries that cannot use inotify (network or
    /// FUSE filesystems, or the watch limit was reached).
    pub poll_interval_s: u64,
    /// A file open for writing holds its directory back until closed, or until it has seen no
    /// write for this many seconds.
    pub write_timeout_s: u64,
    /// How often a paused library's root is checked for its return (and a watched root for
    /// having been replaced or mounted over), in seconds.
    pub root_check_s: u64,
    /// Run an incremental scan of every watched library when corald starts.
    pub scan_on_start: bool,
    /// Library roots (or folders containing them) that are never watched.
    pub exclude_libraries: Vec<PathBuf>,
    /// Most inotify watches corald may hold in all (0: only the kernel's
    /// `fs.inotify.max_user_watches` limits). Reaching it acts exactly like the kernel's limit.
    pub max_watches: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            enabled: true,
            debounce_ms: 2000,
            poll_interval_s: 300,
            write_timeout_s: 60,
            root_check_s: 10,
            scan_on_start: true,
            exclude_libraries: Vec::new(),
            max_watches: 0,
        }
    }
}

impl WatchConfig {
    /// Check ranges; called by `Config::validate`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        if !(10..=600_000).contains(&self.debounce_ms) {
            return invalid("watch.debounce_ms", "must be between 10 and 600000");
        }
        if !(1..=604_800).contains(&self.poll_interval_s) {
            return invalid("watch.poll_interval_s", "must be between 1 and 604800");
        }
        if !(1..=86_400).contains(&self.write_timeout_s) {
            return invalid("watch.write_timeout_s", "must be between 1 and 86400");
        }
        if !(1..=3600).contains(&self.root_check_s) {
            return invalid("watch.root_check_s", "must be between 1 and 3600");
        }
        if let Some(p) = self.exclude_libraries.iter().find(|p| !p.is_absolute()) {
            return Err(ConfigError::Invalid {
                key: "watch.exclude_libraries",
                problem: format!("must list absolute paths ({} is not)", p.display()),
            });
        }
        Ok(())
    }

    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }

    /// Whether the library at `root` (canonical) is opted out.
    pub fn is_excluded(&self, root: &Path) -> bool {
        self.exclude_libraries.iter().any(|e| {
            let e = std::fs::canonicalize(e).unwrap_or_else(|_| e.clone());
            root.starts_with(&e)
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c = WatchConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.debounce(), Duration::from_secs(2));
        let bad = WatchConfig {
            debounce_ms: 0,
            ..WatchConfig::default()
        };
        let e = bad.validate().expect_err("zero debounce").to_string();
        assert!(e.contains("watch.debounce_ms"), "{e}");
        let bad = WatchConfig {
            exclude_libraries: vec![PathBuf::from("relative/music")],
            ..WatchConfig::default()
        };
        let e = bad.validate().expect_err("relative").to_string();
        assert!(e.contains("watch.exclude_libraries"), "{e}");
    }

    #[test]
    fn exclusions_cover_the_folder_and_below() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        let c = WatchConfig {
            exclude_libraries: vec![root.join("nas")],
            ..WatchConfig::default()
        };
        assert!(c.is_excluded(&root.join("nas")));
        assert!(c.is_excluded(&root.join("nas/music")));
        assert!(!c.is_excluded(&root.join("nasx")));
        assert!(!c.is_excluded(&root));
    }
}
