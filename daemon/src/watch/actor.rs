//! The watcher task: one inotify instance for all libraries, one watch per directory, events
//! turned into pending directories (see `debounce`), database moves for renames, and the
//! polling/paused fallbacks.
//!
//! This file owns the actor itself: its per-library state (`Lib`, `WatchEntry`, `PollReason`),
//! the commands from the [`Watcher`](super::Watcher) handle (add, remove), the mode changes
//! (polling, paused, inotify lost), queueing scans, the timers (ticking, flushing ready
//! subtrees, polling rounds, root checks) and what it publishes for `daemon.status`. Raw events
//! are handled in `inotify`, watches are added in `arm`, cookie-paired moves in `moves`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use coral_proto::{LibraryWatch, ScanMode, ScanTrigger, WatchMode};
use inotify::{Inotify, WatchDescriptor, Watches};
use sqlx::PgPool;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::debounce::{Debouncer, is_under, parent_of};
use super::inotify::{EVENT_BUFFER, abs_path, read_batch, show};
use super::moves::{MOVE_PAIR_GRACE, MoveFrom};
use super::{Command, Published, WatchConfig, poll};
use crate::db::libraries;
use crate::progress::{ScanHandle, ScanReporter};
use crate::scan::queue::{QueueError, ScanQueue, ScanRequest};

/// Most subtree scans one flush of a library sends; more are lifted to common parents.
const MAX_JOBS_PER_FLUSH: usize = 8;
/// A long burst releases its finished directories every this many quiet periods, and at most
/// once a minute: a burst shorter than that (a few thousand files) goes out in one flush.
const MAX_DELAY_FACTOR: u32 = 10;
const MIN_MAX_DELAY: Duration = Duration::from_secs(60);

/// Why a library is polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PollReason {
    Remote,
    WatchLimit,
    NoInotify,
}

/// One registered library and how it is watched.
pub(super) struct Lib {
    pub(super) id: i64,
    pub(super) root: PathBuf,
    pub(super) mode: WatchMode,
    pub(super) poll_reason: Option<PollReason>,
    pub(super) warning: Option<String>,
    /// The warning also belongs in `daemon.status.warnings`.
    pub(super) alarm: bool,
    /// Watched directory → watch descriptor number.
    pub(super) dirs: BTreeMap<Vec<u8>, i32>,
    pub(super) root_identity: Option<(u64, u64)>,
    pub(super) filesystem: Option<String>,
    pub(super) debounce: Debouncer,
    pub(super) last_event: Option<DateTime<Utc>>,
    pub(super) next_poll: Option<Instant>,
    pub(super) next_root_check: Instant,
    /// The watch limit in force when this library fell back to polling.
    pub(super) limit_at_fallback: Option<u64>,
    pub(super) last_poll: Option<Arc<ScanHandle>>,
    pub(super) span: tracing::Span,
}

/// What one watch descriptor stands for.
pub(super) struct WatchEntry {
    pub(super) wd: WatchDescriptor,
    pub(super) lib: i64,
    pub(super) rel: Vec<u8>,
}

/// The watcher's state; runs as one task.
pub struct Actor {
    pub(super) cfg: WatchConfig,
    pub(super) pool: PgPool,
    queue: Arc<ScanQueue>,
    reporter: Arc<ScanReporter>,
    published: Arc<Mutex<Published>>,
    fd: Option<AsyncFd<Inotify>>,
    pub(super) watches: Option<Watches>,
    pub(super) inotify_error: Option<String>,
    pub(super) wds: HashMap<i32, WatchEntry>,
    pub(super) libs: BTreeMap<i64, Lib>,
    pub(super) moves: HashMap<u32, MoveFrom>,
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
            .map(|p| p.scan.library_id)
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
    pub(super) async fn add(&mut self, id: i64, root: PathBuf) {
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

    pub(super) fn mode(&self, id: i64) -> Option<WatchMode> {
        self.libs.get(&id).map(|l| l.mode)
    }

    pub(super) fn noted(&mut self, id: i64) -> Option<&mut Lib> {
        let lib = self.libs.get_mut(&id)?;
        lib.last_event = Some(Utc::now());
        Some(lib)
    }

    pub(super) fn start_polling(
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

    pub(super) fn pause(&mut self, id: i64, reason: &str) {
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

    pub(super) fn scan_active(&self, id: i64) -> bool {
        self.reporter
            .active()
            .iter()
            .any(|p| p.scan.library_id == id)
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

    pub(super) async fn tick(&mut self, now: Instant) {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An actor on a real inotify instance and a database that cannot be reached (writes
    /// fail fast; the watcher must cope).
    pub(in crate::watch) fn actor(
        debounce_ms: u64,
    ) -> (Actor, mpsc::Receiver<crate::scan::queue::ScanJob>) {
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
}
