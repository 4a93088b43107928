//! The watcher task: one inotify instance for all libraries, one watch per directory, events
//! turned into pending directories (see `debounce`), database moves for renames, and the
//! polling/paused fallbacks.
//!
//! Event rules (names starting with `.` and NAS metadata folders are ignored, like the scanner
//! ignores them; only audio file names and directories matter):
//!
//! * `IN_MODIFY` of a file: open for writing (holds its directory); `IN_CREATE`: open for one
//!   quiet period unless a write follows (a hard link gets no write and no close);
//!   `IN_CLOSE_WRITE`: closed; `IN_DELETE`, `IN_ATTRIB` (mtime, permissions): the directory is
//!   pending.
//! * `IN_CREATE` of a directory (or a symbolic link to one), and a directory moved in: watches
//!   are added for its whole tree, then the directory is pending — its scan finds files that
//!   landed before the watches existed.
//! * `IN_MOVED_FROM` + `IN_MOVED_TO` with the same cookie inside one library: the rows move in
//!   the database (`tracks::move_path`), watches below a moved directory are re-pathed, and no
//!   scan runs — unless nothing was known at the old path, the source still had pending
//!   changes, or a scan of that library is queued or running (a scan that read the old rows
//!   before the move could drop the moved row; the follow-up scan puts it back). A
//!   `IN_MOVED_FROM` left unpaired for 100 ms is a removal (the old directory is scanned), an
//!   unpaired `IN_MOVED_TO` an addition.
//! * `IN_DELETE_SELF`, `IN_MOVE_SELF`, `IN_UNMOUNT` or `IN_IGNORED` on a library root pause the
//!   library; `IN_UNMOUNT` of a directory below the root re-arms and scans that directory
//!   (an unmounted, now empty, directory deletes nothing: the scanner's empty-target rule).
//! * `IN_Q_OVERFLOW`: events were lost; every library re-adds missing watches and is rescanned.
//!
//! Events are read in batches of up to 64 KiB straight from the inotify descriptor through
//! tokio's `AsyncFd` (the crate's `EventStream` yields one event per poll; batches let a burst
//! of thousands of events be handled in a few wake-ups). Tree walks that add watches run on the
//! blocking pool; the task waits for them, so no event is read for a directory before its watch
//! is recorded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use coral_proto::{LibraryWatch, ScanMode, ScanTrigger, WatchMode};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use sqlx::PgPool;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::debounce::{Debouncer, is_under, join, parent_of, rebase};
use super::{Command, Published, WatchConfig, mounts, poll};
use crate::db::{libraries, tracks};
use crate::progress::{ScanHandle, ScanReporter};
use crate::scan::file_names::{is_audio_candidate, is_ignored_name};
use crate::scan::queue::{QueueError, ScanQueue, ScanRequest};

const EVENT_BUFFER: usize = 64 * 1024;
/// Most subtree scans one flush of a library sends; more are lifted to common parents.
const MAX_JOBS_PER_FLUSH: usize = 8;
/// How long an `IN_MOVED_FROM` waits for its `IN_MOVED_TO`.
const MOVE_PAIR_GRACE: Duration = Duration::from_millis(100);
/// A long burst releases its finished directories every this many quiet periods, and at most
/// once a minute: a burst shorter than that (a few thousand files) goes out in one flush.
const MAX_DELAY_FACTOR: u32 = 10;
const MIN_MAX_DELAY: Duration = Duration::from_secs(60);

/// What is watched on each directory.
fn watch_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::CLOSE_WRITE
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

fn is_audio(name: &[u8]) -> bool {
    is_audio_candidate(Path::new(OsStr::from_bytes(name)))
}

fn abs_path(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        "(root)".to_owned()
    } else {
        String::from_utf8_lossy(rel).into_owned()
    }
}

/// One event, owned, with the watch descriptor as a plain number.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub wd: i32,
    pub mask: EventMask,
    pub cookie: u32,
    pub name: Option<Vec<u8>>,
}

/// What adding watches to a tree found.
#[derive(Debug, Default)]
pub struct ArmOutcome {
    pub added: Vec<(Vec<u8>, WatchDescriptor)>,
    /// Directories in the tree (what watching it all needs).
    pub needed: u64,
    /// ENOSPC, or the configured `max_watches`, was reached.
    pub limit_hit: bool,
    /// The starting directory does not exist (any more).
    pub missing: bool,
    /// Directories that could not be watched for another reason.
    pub skipped: Vec<String>,
}

/// Add a watch to `root/start` and every directory below it (blocking; run on the blocking
/// pool). `held` watches are already in use; `limit` is the configured cap, if any. After the
/// limit is hit the walk goes on only to count the directories.
pub fn arm_tree(
    watches: &mut Watches,
    root: &Path,
    start: &[u8],
    held: u64,
    limit: Option<u64>,
) -> ArmOutcome {
    let mut out = ArmOutcome::default();
    let mut visited: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![start.to_vec()];
    while let Some(rel) = stack.pop() {
        let abs = abs_path(root, &rel);
        let md = match std::fs::metadata(&abs) {
            Ok(md) if md.is_dir() => md,
            _ => {
                if rel == start {
                    out.missing = true;
                }
                continue;
            }
        };
        if !visited.insert((md.dev(), md.ino())) {
            continue;
        }
        out.needed += 1;
        if !out.limit_hit {
            if limit.is_some_and(|l| held + out.added.len() as u64 >= l) {
                out.limit_hit = true;
            } else {
                match watches.add(&abs, watch_mask()) {
                    Ok(wd) => out.added.push((rel.clone(), wd)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => out.limit_hit = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        out.skipped.push(format!("{}: {e}", abs.display()));
                        continue;
                    }
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&abs) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if is_ignored_name(name.as_bytes()) {
                continue;
            }
            let Ok(ft) = entry.file_type() else {
                continue;
            };
            let is_dir = ft.is_dir()
                || (ft.is_symlink() && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()));
            if is_dir {
                stack.push(join(&rel, name.as_bytes()));
            }
        }
    }
    out
}

/// Why a library is polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollReason {
    Remote,
    WatchLimit,
    NoInotify,
}

struct Lib {
    id: i64,
    root: PathBuf,
    mode: WatchMode,
    poll_reason: Option<PollReason>,
    warning: Option<String>,
    /// The warning also belongs in `daemon.status.warnings`.
    alarm: bool,
    /// Watched directory → watch descriptor number.
    dirs: BTreeMap<Vec<u8>, i32>,
    root_identity: Option<(u64, u64)>,
    filesystem: Option<String>,
    debounce: Debouncer,
    last_event: Option<DateTime<Utc>>,
    next_poll: Option<Instant>,
    next_root_check: Instant,
    /// The watch limit in force when this library fell back to polling.
    limit_at_fallback: Option<u64>,
    last_poll: Option<Arc<ScanHandle>>,
    span: tracing::Span,
}

struct WatchEntry {
    wd: WatchDescriptor,
    lib: i64,
    rel: Vec<u8>,
}

struct MoveFrom {
    lib: i64,
    dir: Vec<u8>,
    name: Vec<u8>,
    is_dir: bool,
    at: Instant,
}

/// The watcher's state; runs as one task.
pub struct Actor {
    cfg: WatchConfig,
    pool: PgPool,
    queue: Arc<ScanQueue>,
    reporter: Arc<ScanReporter>,
    published: Arc<Mutex<Published>>,
    fd: Option<AsyncFd<Inotify>>,
    watches: Option<Watches>,
    inotify_error: Option<String>,
    wds: HashMap<i32, WatchEntry>,
    libs: BTreeMap<i64, Lib>,
    moves: HashMap<u32, MoveFrom>,
}

impl Actor {
    pub(super) fn new(
        cfg: WatchConfig,
        pool: PgPool,
        queue: Arc<ScanQueue>,
        reporter: Arc<ScanReporter>,
        published: Arc<Mutex<Published>>,
    ) -> Self {
        let mut actor = Actor {
            cfg,
            pool,
            queue,
            reporter,
            published,
            fd: None,
            watches: None,
            inotify_error: None,
            wds: HashMap::new(),
            libs: BTreeMap::new(),
            moves: HashMap::new(),
        };
        if actor.cfg.enabled {
            match Inotify::init().and_then(|i| {
                let w = i.watches();
                // SAFETY: the `Inotify` moved into the `AsyncFd` owns its descriptor (shared
                // only with `Watches` handles, which never close it) and keeps it open, and
                // the same, for as long as the `AsyncFd` lives.
                let fd = unsafe { AsyncFd::register_with_interest(i, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)?;
                Ok((fd, w))
            }) {
                Ok((fd, w)) => {
                    actor.fd = Some(fd);
                    actor.watches = Some(w);
                }
                Err(e) => {
                    let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                        " (too many inotify instances: raise fs.inotify.max_user_instances)"
                    } else {
                        ""
                    };
                    let msg = format!(
                        "inotify cannot be used: {e}{hint}; every library is polled every {} s",
                        actor.cfg.poll_interval_s
                    );
                    tracing::warn!("{msg}");
                    actor.inotify_error = Some(msg);
                }
            }
        }
        actor
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        stop: CancellationToken,
    ) {
        self.start_up().await;
        let mut fd = self.fd.take();
        let mut buf = vec![0u8; EVENT_BUFFER];
        loop {
            self.publish();
            let now = Instant::now();
            let wake = self
                .next_deadline(now)
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(c) => self.command(c).await,
                    None => break,
                },
                r = read_batch(&mut fd, &mut buf) => match r {
                    Ok(events) => self.handle_events(events).await,
                    Err(e) => {
                        tracing::error!(error = %e, "reading inotify events failed; falling back to polling");
                        fd = None;
                        self.lose_inotify(format!("reading inotify events failed: {e}"));
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            self.tick(Instant::now()).await;
        }
        drop(fd);
        tracing::debug!("watcher stopped");
    }

    // ----- libraries -------------------------------------------------------------------------

    fn new_lib(&self, id: i64, root: PathBuf) -> Lib {
        let quiet = self.cfg.debounce();
        Lib {
            id,
            span: tracing::info_span!("watch", library = %root.display()),
            root,
            mode: WatchMode::Disabled,
            poll_reason: None,
            warning: None,
            alarm: false,
            dirs: BTreeMap::new(),
            root_identity: None,
            filesystem: None,
            debounce: Debouncer::new(
                quiet,
                (quiet * MAX_DELAY_FACTOR).max(MIN_MAX_DELAY),
                Duration::from_secs(self.cfg.write_timeout_s),
                MAX_JOBS_PER_FLUSH,
            ),
            last_event: None,
            next_poll: None,
            next_root_check: Instant::now() + self.root_check(),
            limit_at_fallback: None,
            last_poll: None,
        }
    }

    fn root_check(&self) -> Duration {
        Duration::from_secs(self.cfg.root_check_s)
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.cfg.poll_interval_s)
    }

    /// Load the registered libraries, watch them, and queue start-up scans.
    async fn start_up(&mut self) {
        let rows = match libraries::list(&self.pool).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot list libraries; none is watched until one is added");
                return;
            }
        };
        for row in rows {
            self.add(row.id, PathBuf::from(row.path)).await;
        }
        if !self.cfg.scan_on_start {
            return;
        }
        let busy: HashSet<i64> = self
            .reporter
            .active()
            .iter()
            .map(|p| p.library_id)
            .collect();
        let ids: Vec<i64> = self
            .libs
            .values()
            .filter(|l| matches!(l.mode, WatchMode::Inotify | WatchMode::Polling))
            .filter(|l| !busy.contains(&l.id))
            .map(|l| l.id)
            .collect();
        for id in ids {
            self.submit(id, Vec::new(), ScanTrigger::Startup).await;
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Add { id, root, done } => {
                if !self.libs.contains_key(&id) {
                    self.add(id, root).await;
                    self.publish();
                }
                let _ = done.send(());
            }
            Command::Remove { id } => {
                self.unwatch_all(id);
                self.moves.retain(|_, m| m.lib != id);
                if let Some(lib) = self.libs.remove(&id) {
                    lib.span.in_scope(|| tracing::info!("no longer watched"));
                }
            }
        }
    }

    /// Register a library and start watching it as its filesystem allows.
    async fn add(&mut self, id: i64, root: PathBuf) {
        let mut lib = self.new_lib(id, root);
        if !self.cfg.enabled {
            lib.warning = Some("watching is off (watch.enabled = false)".into());
        } else if self.cfg.is_excluded(&lib.root) {
            lib.warning = Some("not watched (watch.exclude_libraries)".into());
        }
        let disabled = lib.warning.is_some();
        self.libs.insert(id, lib);
        if !disabled {
            self.arm(id).await;
        }
    }

    /// Watch a library from its root: inotify where it works, polling where it cannot, paused
    /// when the root is not there.
    async fn arm(&mut self, id: i64) {
        self.unwatch_all(id);
        let poll_s = self.cfg.poll_interval_s;
        let inotify_error = self.inotify_error.clone();
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let state = poll::check_root(&lib.root);
        if let poll::RootState::Unavailable(reason) = &state {
            let reason = reason.clone();
            self.pause(id, &reason);
            return;
        }
        lib.root_identity = state.identity();
        let mount = mounts::current_mount_of(&lib.root);
        lib.filesystem = mount.as_ref().map(|m| m.fs_type.clone());
        if let Some(m) = mount.filter(mounts::MountEntry::is_remote) {
            let note = poll::remote_fs_note(&m.fs_type, &m.mount_point, poll_s);
            self.start_polling(id, PollReason::Remote, note, false, false);
            return;
        }
        if let Some(err) = inotify_error {
            self.start_polling(id, PollReason::NoInotify, err, true, false);
            return;
        }
        let root = lib.root.clone();
        let span = lib.span.clone();
        let started = Instant::now();
        let Some(outcome) = self.arm_tree(root, Vec::new()).await else {
            return;
        };
        if outcome.missing {
            self.pause(
                id,
                "the library root vanished while its watches were being added",
            );
            return;
        }
        let (n, skipped) = (outcome.added.len(), outcome.skipped.len());
        let limit_hit = outcome.limit_hit;
        self.register(id, outcome, false);
        if limit_hit {
            return;
        }
        if let Some(lib) = self.libs.get_mut(&id) {
            lib.mode = WatchMode::Inotify;
            lib.poll_reason = None;
            lib.warning = (skipped > 0)
                .then(|| format!("{skipped} directories could not be watched (see the log)"));
            lib.alarm = false;
            lib.next_poll = None;
            lib.limit_at_fallback = None;
        }
        span.in_scope(|| {
            tracing::info!(
                watches = n,
                took_ms = started.elapsed().as_millis() as u64,
                "watching with inotify"
            )
        });
    }

    /// Run `arm_tree` for `start` of library `id` on the blocking pool.
    async fn arm_tree(&mut self, root: PathBuf, start: Vec<u8>) -> Option<ArmOutcome> {
        let mut watches = self.watches.clone()?;
        let held = self.wds.len() as u64;
        let limit = (self.cfg.max_watches > 0).then_some(self.cfg.max_watches);
        match tokio::task::spawn_blocking(move || {
            arm_tree(&mut watches, &root, &start, held, limit)
        })
        .await
        {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!(error = %e, "adding watches failed");
                None
            }
        }
    }

    /// Record the watches an arm added; on the watch limit, fall back to polling (scanning at
    /// once with `scan_now`, when events may have been missed).
    fn register(&mut self, id: i64, outcome: ArmOutcome, scan_now: bool) {
        let Some(lib) = self.libs.get(&id) else {
            // Removed meanwhile: give the watches back.
            if let Some(w) = self.watches.as_mut() {
                for (_, wd) in outcome.added {
                    let _ = w.remove(wd);
                }
            }
            return;
        };
        let span = lib.span.clone();
        for s in &outcome.skipped {
            span.in_scope(|| tracing::warn!(directory = %s, "cannot watch directory"));
        }
        if outcome.limit_hit {
            let held_by_lib = lib.dirs.len() as u64;
            let held_elsewhere = (self.wds.len() as u64).saturating_sub(held_by_lib);
            let needed = held_by_lib + outcome.needed;
            let configured = (self.cfg.max_watches > 0).then_some(self.cfg.max_watches);
            let kernel = poll::max_user_watches();
            let warning = poll::watch_limit_warning(
                &lib.root,
                needed,
                held_elsewhere,
                configured,
                kernel,
                self.cfg.poll_interval_s,
            );
            if let Some(w) = self.watches.as_mut() {
                for (_, wd) in outcome.added {
                    let _ = w.remove(wd);
                }
            }
            span.in_scope(|| tracing::warn!("{warning}"));
            self.start_polling(id, PollReason::WatchLimit, warning, true, scan_now);
            if let Some(lib) = self.libs.get_mut(&id) {
                lib.limit_at_fallback = configured.or(kernel);
            }
            return;
        }
        for (rel, wd) in outcome.added {
            let n = wd.get_watch_descriptor_id();
            // The same inode reached again (a moved directory whose old path we still knew):
            // the newest path is the true one.
            if let Some(old) = self.wds.remove(&n)
                && let Some(l) = self.libs.get_mut(&old.lib)
            {
                l.dirs.remove(&old.rel);
            }
            if let Some(lib) = self.libs.get_mut(&id) {
                lib.dirs.insert(rel.clone(), n);
            }
            self.wds.insert(n, WatchEntry { wd, lib: id, rel });
        }
    }

    /// Remove every watch of a library.
    fn unwatch_all(&mut self, id: i64) {
        self.unwatch_subtree(id, &[]);
    }

    /// Remove the watches of `dir` and below in library `id`.
    fn unwatch_subtree(&mut self, id: i64, dir: &[u8]) {
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let gone: Vec<(Vec<u8>, i32)> = lib
            .dirs
            .range(dir.to_vec()..)
            .take_while(|(k, _)| k.starts_with(dir))
            .filter(|(k, _)| is_under(k, dir))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (rel, n) in gone {
            lib.dirs.remove(&rel);
            if let Some(entry) = self.wds.remove(&n)
                && let Some(w) = self.watches.as_mut()
            {
                let _ = w.remove(entry.wd);
            }
        }
    }

    /// Re-path the watches of a directory that moved inside its library.
    fn rebase_watches(&mut self, id: i64, old: &[u8], new: &[u8]) {
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let moved: Vec<(Vec<u8>, i32)> = lib
            .dirs
            .range(old.to_vec()..)
            .take_while(|(k, _)| k.starts_with(old))
            .filter(|(k, _)| is_under(k, old))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (rel, n) in moved {
            lib.dirs.remove(&rel);
            let to = rebase(&rel, old, new);
            lib.dirs.insert(to.clone(), n);
            if let Some(e) = self.wds.get_mut(&n) {
                e.rel = to;
            }
        }
    }

    fn start_polling(
        &mut self,
        id: i64,
        reason: PollReason,
        warning: String,
        alarm: bool,
        scan_now: bool,
    ) {
        self.unwatch_all(id);
        let interval = self.poll_interval();
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let first = lib.mode != WatchMode::Polling;
        lib.mode = WatchMode::Polling;
        lib.poll_reason = Some(reason);
        lib.debounce.clear();
        if first {
            lib.span
                .in_scope(|| tracing::info!(reason = ?reason, "polling: {warning}"));
            // A library that lost inotify while watched is scanned now (events may have been
            // missed); one set up this way is scanned by whoever set it up (library.add,
            // start-up, a returning root).
            let now = Instant::now();
            lib.next_poll = Some(if scan_now { now } else { now + interval });
        }
        lib.warning = Some(warning);
        lib.alarm = alarm;
    }

    fn pause(&mut self, id: i64, reason: &str) {
        self.unwatch_all(id);
        let check = self.root_check();
        self.moves.retain(|_, m| m.lib != id);
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        if lib.mode != WatchMode::Paused {
            lib.span.in_scope(|| {
                tracing::warn!(reason, "library root unavailable: watching paused, nothing will be scanned or deleted until it is back")
            });
        }
        lib.mode = WatchMode::Paused;
        lib.debounce.clear();
        lib.next_poll = None;
        lib.warning = Some(format!(
            "library root unavailable ({reason}): watching is paused and nothing is scanned or \
             deleted until it is back (checked every {} s)",
            check.as_secs()
        ));
        lib.alarm = true;
        lib.next_root_check = Instant::now() + check;
    }

    /// inotify stopped working altogether: poll every library that used it.
    fn lose_inotify(&mut self, reason: String) {
        let msg = format!(
            "{reason}; every library is polled every {} s",
            self.cfg.poll_interval_s
        );
        self.inotify_error = Some(msg.clone());
        self.watches = None;
        self.wds.clear();
        let ids: Vec<i64> = self
            .libs
            .values()
            .filter(|l| l.mode == WatchMode::Inotify)
            .map(|l| l.id)
            .collect();
        for id in ids {
            if let Some(l) = self.libs.get_mut(&id) {
                l.dirs.clear();
            }
            self.start_polling(id, PollReason::NoInotify, msg.clone(), true, true);
        }
    }

    // ----- scans -----------------------------------------------------------------------------

    /// Queue an incremental scan of `rel` (empty: the whole library).
    async fn submit(
        &mut self,
        id: i64,
        rel: Vec<u8>,
        trigger: ScanTrigger,
    ) -> Option<Result<Arc<ScanHandle>, QueueError>> {
        let lib = self.libs.get(&id)?;
        let subdir = (!rel.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(&rel)));
        let req = ScanRequest {
            library_id: id,
            library_root: lib.root.clone(),
            subdir,
            mode: ScanMode::Incremental,
            trigger,
        };
        let span = lib.span.clone();
        let r = self.queue.submit(req).await;
        span.in_scope(|| match &r {
            Ok((h, merged)) => tracing::info!(
                path = %show(&rel),
                request_id = %h.request_id(),
                merged,
                trigger = trigger.as_str(),
                "scan queued"
            ),
            Err(e) => tracing::warn!(path = %show(&rel), error = %e, "could not queue scan"),
        });
        Some(r.map(|(h, _)| h))
    }

    fn scan_active(&self, id: i64) -> bool {
        self.reporter.active().iter().any(|p| p.library_id == id)
    }

    // ----- timers ----------------------------------------------------------------------------

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for m in self.moves.values() {
            consider(Some(m.at + MOVE_PAIR_GRACE));
        }
        for lib in self.libs.values() {
            match lib.mode {
                WatchMode::Inotify => {
                    consider(lib.debounce.next_deadline(now));
                    consider(Some(lib.next_root_check));
                }
                WatchMode::Polling => {
                    consider(lib.next_poll);
                    consider(Some(lib.next_root_check));
                }
                WatchMode::Paused => consider(Some(lib.next_root_check)),
                WatchMode::Disabled => {}
            }
        }
        next.map(|t| t.max(now))
    }

    async fn tick(&mut self, now: Instant) {
        // Moves whose other half never came.
        let expired: Vec<u32> = self
            .moves
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.at) >= MOVE_PAIR_GRACE)
            .map(|(c, _)| *c)
            .collect();
        for c in expired {
            if let Some(m) = self.moves.remove(&c) {
                self.departed(m, now);
            }
        }
        let ids: Vec<i64> = self.libs.keys().copied().collect();
        for id in ids {
            self.tick_library(id, now).await;
        }
    }

    async fn tick_library(&mut self, id: i64, now: Instant) {
        let check_every = self.root_check();
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let root_due = now >= lib.next_root_check;
        if root_due {
            lib.next_root_check = now + check_every;
        }
        match lib.mode {
            WatchMode::Disabled => {}
            WatchMode::Paused => {
                if root_due {
                    let state = poll::check_root(&lib.root);
                    if poll::root_is_back(&state, lib.root_identity.map(|(d, _)| d)) {
                        lib.span
                            .in_scope(|| tracing::info!("library root is back: watching again"));
                        self.arm(id).await;
                        if self
                            .libs
                            .get(&id)
                            .is_some_and(|l| l.mode != WatchMode::Paused)
                        {
                            self.submit(id, Vec::new(), ScanTrigger::FileSystemEvent)
                                .await;
                        }
                    }
                }
            }
            WatchMode::Inotify => {
                if root_due {
                    let state = poll::check_root(&lib.root);
                    match &state {
                        poll::RootState::Unavailable(reason) => {
                            let reason = reason.clone();
                            self.pause(id, &reason);
                            return;
                        }
                        poll::RootState::Present { .. }
                            if state.identity() != lib.root_identity =>
                        {
                            lib.span.in_scope(|| {
                                tracing::info!("library root was replaced or mounted over: re-watching and rescanning")
                            });
                            self.arm(id).await;
                            self.submit(id, Vec::new(), ScanTrigger::FileSystemEvent)
                                .await;
                            return;
                        }
                        poll::RootState::Present { .. } => {}
                    }
                }
                self.flush(id, now).await;
            }
            WatchMode::Polling => {
                if root_due
                    && let poll::RootState::Unavailable(reason) = poll::check_root(&lib.root)
                {
                    self.pause(id, &reason);
                    return;
                }
                if lib.next_poll.is_some_and(|t| now >= t) {
                    self.poll(id, now).await;
                }
            }
        }
    }

    /// One polling round: maybe inotify works again, else an incremental scan.
    async fn poll(&mut self, id: i64, now: Instant) {
        let interval = self.poll_interval();
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        lib.next_poll = Some(now + interval);
        if let poll::RootState::Unavailable(reason) = poll::check_root(&lib.root) {
            self.pause(id, &reason);
            return;
        }
        if lib.poll_reason == Some(PollReason::WatchLimit) {
            let configured = (self.cfg.max_watches > 0).then_some(self.cfg.max_watches);
            let current = configured.or_else(poll::max_user_watches);
            if current > lib.limit_at_fallback {
                lib.span.in_scope(
                    || tracing::info!(limit = ?current, "watch limit raised: trying inotify again"),
                );
                self.arm(id).await;
                if self
                    .libs
                    .get(&id)
                    .is_some_and(|l| l.mode == WatchMode::Inotify)
                {
                    self.submit(id, Vec::new(), ScanTrigger::FileSystemEvent)
                        .await;
                    return;
                }
            }
        }
        let Some(lib) = self.libs.get(&id) else {
            return;
        };
        if lib
            .last_poll
            .as_ref()
            .is_some_and(|h| !h.phase().is_terminal())
        {
            return; // the previous round is still queued or running
        }
        if let Some(Ok(h)) = self
            .submit(id, Vec::new(), ScanTrigger::FileSystemEvent)
            .await
            && let Some(lib) = self.libs.get_mut(&id)
        {
            lib.last_poll = Some(h);
        }
    }

    /// Send the library's ready subtrees to the scan channel.
    async fn flush(&mut self, id: i64, now: Instant) {
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let ready = lib.debounce.take_ready(now);
        if ready.is_empty() {
            return;
        }
        let root = lib.root.clone();
        // A subtree that no longer exists is scanned from its nearest existing ancestor.
        let mut targets: Vec<Vec<u8>> = Vec::new();
        for rel in ready {
            let mut r = rel;
            while !r.is_empty() && !abs_path(&root, &r).is_dir() {
                r = parent_of(&r).to_vec();
            }
            if r.is_empty()
                && let poll::RootState::Unavailable(reason) = poll::check_root(&root)
            {
                self.pause(id, &reason);
                return;
            }
            targets.push(r);
        }
        targets.sort();
        targets.dedup();
        let tops: Vec<Vec<u8>> = targets
            .iter()
            .filter(|t| !targets.iter().any(|o| o != *t && is_under(t, o)))
            .cloned()
            .collect();
        for rel in tops {
            if let Some(Err(QueueError::Full(_))) = self
                .submit(id, rel.clone(), ScanTrigger::FileSystemEvent)
                .await
                && let Some(lib) = self.libs.get_mut(&id)
            {
                lib.debounce.touch(&rel, Instant::now()); // try again after the next quiet period
            }
        }
    }

    // ----- events ----------------------------------------------------------------------------

    async fn handle_events(&mut self, events: Vec<RawEvent>) {
        let now = Instant::now();
        let mut new_dirs: Vec<(i64, Vec<u8>)> = Vec::new();
        for ev in events {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                tracing::warn!(
                    "inotify event queue overflowed: events were lost; rescanning every watched library"
                );
                for l in self.libs.values() {
                    if l.mode == WatchMode::Inotify {
                        new_dirs.push((l.id, Vec::new()));
                    }
                }
                continue;
            }
            let Some(entry) = self.wds.get(&ev.wd) else {
                continue;
            };
            let (id, dir) = (entry.lib, entry.rel.clone());
            if ev.mask.contains(EventMask::IGNORED) {
                self.wds.remove(&ev.wd);
                if let Some(l) = self.libs.get_mut(&id) {
                    l.dirs.remove(&dir);
                }
                if dir.is_empty() && self.mode(id) == Some(WatchMode::Inotify) {
                    self.pause(id, "its watch was removed (deleted or unmounted)");
                }
                continue;
            }
            if self.mode(id) != Some(WatchMode::Inotify) {
                continue;
            }
            match ev.name {
                None => self.self_event(id, &dir, ev.mask, now, &mut new_dirs),
                Some(name) => {
                    if is_ignored_name(&name) {
                        continue;
                    }
                    self.child_event(id, dir, name, ev.mask, ev.cookie, now, &mut new_dirs)
                        .await;
                }
            }
        }
        self.arm_new_dirs(new_dirs).await;
    }

    fn mode(&self, id: i64) -> Option<WatchMode> {
        self.libs.get(&id).map(|l| l.mode)
    }

    fn noted(&mut self, id: i64) -> Option<&mut Lib> {
        let lib = self.libs.get_mut(&id)?;
        lib.last_event = Some(Utc::now());
        Some(lib)
    }

    /// An event about a watched directory itself.
    fn self_event(
        &mut self,
        id: i64,
        dir: &[u8],
        mask: EventMask,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        let gone = mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF);
        let unmount = mask.contains(EventMask::UNMOUNT);
        if dir.is_empty() && (gone || unmount) {
            let why = if unmount {
                "its filesystem was unmounted"
            } else if mask.contains(EventMask::MOVE_SELF) {
                "it was moved away"
            } else {
                "it was deleted"
            };
            self.pause(id, why);
        } else if unmount {
            // A filesystem mounted below the root went away: watch what is there now and scan
            // it (an empty mount point deletes nothing).
            if let Some(lib) = self.noted(id) {
                lib.debounce.touch(dir, now);
            }
            new_dirs.push((id, dir.to_vec()));
        } else if mask.contains(EventMask::ATTRIB)
            && let Some(lib) = self.noted(id)
        {
            lib.debounce.touch(dir, now);
        }
    }

    /// An event about an entry of a watched directory.
    #[allow(clippy::too_many_arguments)]
    async fn child_event(
        &mut self,
        id: i64,
        dir: Vec<u8>,
        name: Vec<u8>,
        mask: EventMask,
        cookie: u32,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        let is_dir = mask.contains(EventMask::ISDIR);
        let path = join(&dir, &name);
        if mask.contains(EventMask::MOVED_FROM) {
            if is_dir || is_audio(&name) {
                self.moves.insert(
                    cookie,
                    MoveFrom {
                        lib: id,
                        dir,
                        name,
                        is_dir,
                        at: now,
                    },
                );
            }
            return;
        }
        if mask.contains(EventMask::MOVED_TO) {
            match self.moves.remove(&cookie) {
                Some(from) => {
                    self.paired_move(from, id, dir, name, is_dir, now, new_dirs)
                        .await
                }
                None => self.arrived(id, &dir, &name, is_dir, now, new_dirs),
            }
            return;
        }
        if is_dir {
            let Some(lib) = self.noted(id) else {
                return;
            };
            if mask.contains(EventMask::CREATE) {
                new_dirs.push((id, path));
            } else if mask.contains(EventMask::DELETE) {
                lib.debounce.remove_subtree(&path);
                lib.debounce.touch(&dir, now);
            } else if mask.contains(EventMask::ATTRIB) {
                lib.debounce.touch(&path, now);
            }
            return;
        }
        if !is_audio(&name) {
            // A symbolic link to a directory is followed like the scanner follows it.
            if mask.contains(EventMask::CREATE)
                && let Some(lib) = self.libs.get(&id)
                && abs_path(&lib.root, &path).is_dir()
            {
                new_dirs.push((id, path));
            }
            return;
        }
        let Some(lib) = self.noted(id) else {
            return;
        };
        if mask.contains(EventMask::CREATE) {
            lib.debounce.created(&path, now);
        } else if mask.contains(EventMask::MODIFY) {
            lib.debounce.write_activity(&path, now);
        } else if mask.contains(EventMask::CLOSE_WRITE) {
            lib.debounce.write_closed(&path, now);
        } else if mask.contains(EventMask::DELETE) {
            lib.debounce.forget_file(&path);
            lib.debounce.touch(&dir, now);
        } else if mask.contains(EventMask::ATTRIB) {
            lib.debounce.touch(&dir, now);
        }
    }

    /// Something appeared by a move from outside (or from another library).
    fn arrived(
        &mut self,
        id: i64,
        dir: &[u8],
        name: &[u8],
        is_dir: bool,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        let path = join(dir, name);
        if is_dir {
            // Armed, then scanned as a whole (see `arm_new_dirs`).
            self.noted(id);
            new_dirs.push((id, path));
        } else if is_audio(name)
            && let Some(lib) = self.noted(id)
        {
            lib.debounce.touch(dir, now);
        }
    }

    /// Something left by a move to outside the library (or its pair never came).
    fn departed(&mut self, m: MoveFrom, now: Instant) {
        let old = join(&m.dir, &m.name);
        if m.is_dir {
            self.unwatch_subtree(m.lib, &old);
        }
        if self.mode(m.lib) != Some(WatchMode::Inotify) {
            return;
        }
        if let Some(lib) = self.noted(m.lib) {
            if m.is_dir {
                lib.debounce.remove_subtree(&old);
            } else {
                lib.debounce.forget_file(&old);
            }
            lib.debounce.touch(&m.dir, now);
        }
    }

    /// A rename or move with both halves seen.
    #[allow(clippy::too_many_arguments)]
    async fn paired_move(
        &mut self,
        from: MoveFrom,
        id: i64,
        dir: Vec<u8>,
        name: Vec<u8>,
        is_dir: bool,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        if from.lib != id || (!is_dir && !is_audio(&name)) {
            // Between libraries, or renamed to a name the scanner ignores.
            let arrived_here = from.lib != id;
            self.departed(from, now);
            if arrived_here {
                self.arrived(id, &dir, &name, is_dir, now, new_dirs);
            }
            return;
        }
        let old = join(&from.dir, &from.name);
        let new = join(&dir, &name);
        let busy = self.scan_active(id);
        if is_dir {
            self.rebase_watches(id, &old, &new);
        }
        let moved = tracks::move_path(&self.pool, id, &old, &new, is_dir).await;
        let Some(lib) = self.noted(id) else {
            return;
        };
        let was_pending = if is_dir {
            let p = lib.debounce.has_pending(&old);
            lib.debounce.rebase(&old, &new);
            p || lib.debounce.has_pending(&from.dir)
        } else {
            let open = lib.debounce.is_open(&old);
            if open {
                lib.debounce.forget_file(&old);
                lib.debounce.write_activity(&new, now);
            }
            open || lib.debounce.has_pending(&from.dir)
        };
        let rows = match &moved {
            Ok(n) => *n,
            Err(e) => {
                lib.span.in_scope(|| {
                    tracing::warn!(from = %show(&old), to = %show(&new), error = %e, "could not apply a move to the database; rescanning")
                });
                0
            }
        };
        lib.span.in_scope(
            || tracing::debug!(from = %show(&old), to = %show(&new), rows, "moved in place"),
        );
        if rows == 0 || was_pending || busy {
            lib.debounce.touch(if is_dir { &new } else { &dir }, now);
        }
    }

    /// Add watches below new directories, then mark them pending (their scan finds what
    /// landed before the watches existed).
    async fn arm_new_dirs(&mut self, mut new_dirs: Vec<(i64, Vec<u8>)>) {
        new_dirs.sort();
        new_dirs.dedup();
        for (id, rel) in new_dirs {
            if self.mode(id) != Some(WatchMode::Inotify) {
                continue;
            }
            let Some(root) = self.libs.get(&id).map(|l| l.root.clone()) else {
                continue;
            };
            let Some(outcome) = self.arm_tree(root, rel.clone()).await else {
                continue;
            };
            let limit_hit = outcome.limit_hit;
            self.register(id, outcome, true);
            if limit_hit {
                continue;
            }
            if let Some(lib) = self.noted(id) {
                lib.debounce.touch(&rel, Instant::now());
            }
        }
    }

    // ----- status ----------------------------------------------------------------------------

    fn publish(&self) {
        let mut libraries = BTreeMap::new();
        let mut alarms = BTreeMap::new();
        for lib in self.libs.values() {
            libraries.insert(
                lib.id,
                LibraryWatch {
                    library_id: lib.id,
                    path: lib.root.to_string_lossy().into_owned(),
                    mode: lib.mode,
                    watches: lib.dirs.len() as u64,
                    last_event_at: lib.last_event,
                    pending_paths: lib.debounce.pending_dirs() as u64,
                    open_files: lib.debounce.open_files() as u64,
                    poll_interval_seconds: (lib.mode == WatchMode::Polling)
                        .then_some(self.cfg.poll_interval_s),
                    filesystem: lib.filesystem.clone(),
                    warning: lib.warning.clone(),
                },
            );
            if lib.alarm
                && let Some(w) = &lib.warning
            {
                alarms.insert(lib.id, w.clone());
            }
        }
        let mut p = self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.libraries = libraries;
        p.alarms = alarms;
        p.global = self.inotify_error.clone();
    }
}

/// The next batch of events (waits until there is one; forever without inotify).
async fn read_batch(
    fd: &mut Option<AsyncFd<Inotify>>,
    buf: &mut [u8],
) -> io::Result<Vec<RawEvent>> {
    let Some(fd) = fd.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = fd.readable_mut().await?;
        let result = guard.try_io(|inner| {
            let events = inner.get_mut().read_events(buf)?;
            Ok(events
                .map(|e| RawEvent {
                    wd: e.wd.get_watch_descriptor_id(),
                    mask: e.mask,
                    cookie: e.cookie,
                    name: e.name.map(|n| n.as_bytes().to_vec()),
                })
                .collect::<Vec<_>>())
        });
        match result {
            Ok(Ok(events)) => return Ok(events),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arming_watches_every_directory_once_and_honours_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["a/b/c", "a/d", "e", ".hidden/x", "@eaDir/y"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::os::unix::fs::symlink(root.join("a"), root.join("e/link")).expect("symlink");
        let inotify = Inotify::init().expect("inotify");
        let mut w = inotify.watches();
        let out = arm_tree(&mut w, root, b"", 0, None);
        assert!(!out.limit_hit && !out.missing);
        // root, a, a/b, a/b/c, a/d, e — the link reaches a/ again and is not counted twice.
        assert_eq!(out.needed, 6, "{:?}", out.added);
        assert_eq!(out.added.len(), 6);

        let out = arm_tree(&mut w, root, b"", 0, Some(3));
        assert!(out.limit_hit);
        assert_eq!(out.added.len(), 3);
        assert_eq!(out.needed, 6, "the walk goes on to count what is needed");

        let out = arm_tree(&mut w, root, b"nope", 0, None);
        assert!(out.missing);
    }

    /// An actor on a real inotify instance and a database that cannot be reached (writes
    /// fail fast; the watcher must cope).
    fn actor(debounce_ms: u64) -> (Actor, mpsc::Receiver<crate::scan::queue::ScanJob>) {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(50))
            .connect_lazy("postgres://nobody@127.0.0.1:9/none")
            .expect("lazy pool");
        let reporter = ScanReporter::new();
        let (queue, jobs) = ScanQueue::new(16, Arc::clone(&reporter), pool.clone());
        let cfg = WatchConfig {
            debounce_ms,
            ..WatchConfig::default()
        };
        let published = Arc::new(Mutex::new(Published::default()));
        (Actor::new(cfg, pool, queue, reporter, published), jobs)
    }

    fn event(wd: i32, mask: EventMask, cookie: u32, name: &str) -> RawEvent {
        RawEvent {
            wd,
            mask,
            cookie,
            name: (!name.is_empty()).then(|| name.as_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn an_overflow_rearms_and_rescans_the_whole_library() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir(root.join("a")).expect("mkdir");
        let (mut a, mut jobs) = actor(100);
        a.add(7, root.clone()).await;
        assert_eq!(a.mode(7), Some(WatchMode::Inotify));
        assert_eq!(a.libs[&7].dirs.len(), 2);
        std::fs::create_dir(root.join("late")).expect("mkdir"); // its event is never read
        a.handle_events(vec![event(-1, EventMask::Q_OVERFLOW, 0, "")])
            .await;
        assert_eq!(a.libs[&7].dirs.len(), 3, "the missed directory is watched");
        a.tick(Instant::now() + Duration::from_millis(150)).await;
        let job = jobs.try_recv().expect("a scan was queued");
        assert_eq!(
            (job.library_id, job.subdir.clone(), job.trigger),
            (7, None, ScanTrigger::FileSystemEvent)
        );
        assert!(jobs.try_recv().is_err(), "one scan");
    }

    #[tokio::test]
    async fn moves_pair_by_cookie_and_unpaired_halves_are_removals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(root.join("x")).expect("mkdir");
        let (mut a, mut jobs) = actor(100);
        a.add(7, root.clone()).await;
        let wd = |a: &Actor, rel: &str| a.libs[&7].dirs[rel.as_bytes()];
        let (root_wd, b_wd) = (wd(&a, ""), wd(&a, "a/b"));

        // a → x/z: watches below follow; the database is unreachable here, so the new
        // place is scanned instead of being moved in place.
        std::fs::rename(root.join("a"), root.join("x/z")).expect("rename");
        let x_wd = wd(&a, "x");
        a.handle_events(vec![
            event(root_wd, EventMask::MOVED_FROM | EventMask::ISDIR, 42, "a"),
            event(x_wd, EventMask::MOVED_TO | EventMask::ISDIR, 42, "z"),
        ])
        .await;
        assert!(a.moves.is_empty());
        assert_eq!(wd(&a, "x/z/b"), b_wd, "same watch, new path");
        assert!(!a.libs[&7].dirs.contains_key(b"a".as_slice()));
        assert_eq!(a.wds[&b_wd].rel, b"x/z/b".to_vec());
        a.tick(Instant::now() + Duration::from_millis(150)).await;
        let job = jobs.try_recv().expect("a scan");
        assert_eq!(job.subdir, Some(PathBuf::from("x/z")));

        // x/z moved out of the library: its watches go, x is scanned.
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::rename(root.join("x/z"), outside.path().join("z")).expect("rename");
        a.handle_events(vec![event(
            x_wd,
            EventMask::MOVED_FROM | EventMask::ISDIR,
            43,
            "z",
        )])
        .await;
        a.tick(Instant::now()).await;
        assert_eq!(a.moves.len(), 1, "waiting for its pair");
        a.tick(Instant::now() + MOVE_PAIR_GRACE).await;
        assert!(a.moves.is_empty());
        assert!(!a.wds.contains_key(&b_wd), "watches below were removed");
        a.tick(Instant::now() + MOVE_PAIR_GRACE + Duration::from_millis(150))
            .await;
        let job = jobs.try_recv().expect("a scan");
        assert_eq!(job.subdir, Some(PathBuf::from("x")));

        // The root deleted: paused, nothing queued, no watches left.
        a.handle_events(vec![event(root_wd, EventMask::DELETE_SELF, 0, "")])
            .await;
        assert_eq!(a.mode(7), Some(WatchMode::Paused));
        assert!(a.wds.is_empty());
        a.tick(Instant::now() + Duration::from_secs(1)).await;
        assert!(jobs.try_recv().is_err());
    }
}
